"""A real uvicorn process meets clients that hang up mid-body and paths that try to forge log
lines; and a too-short admin token stops the CLI before it serves anything."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support.models import image_bytes, write_small_store
from support.server import ROOT, Server, free_port, serve_store

pytestmark = pytest.mark.e2e

MODEL = "resnet50_head"
TOKEN_16 = "0123456789abcdef"  # exactly the shortest token allowed


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_store(tmp_path_factory.mktemp("disc-store"), names=[MODEL])


def _connect(server: Server) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=30)


def _five_xx(server: Server) -> list[str]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return [line for line in text.splitlines()
            if line.startswith("modserve_requests_total{") and re.search(r'code="5\d\d"', line)]


def _wait_for_log(server: Server, predicate, what: str, timeout: float = 30) -> list[str]:
    """Poll the server's log until ``predicate(lines)`` holds (the server logs asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = server.output().splitlines()
        if predicate(lines):
            return lines
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} in the server log:\n{server.output()}")
        time.sleep(0.1)


# ---- clients that disconnect mid-body -----------------------------------------------------------


def _hang_up_mid_body(server: Server, path: str, content_type: str, partial: bytes) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: {content_type}\r\n"
            "Content-Length: 100000\r\n\r\n").encode()
    assert len(partial) == 1000
    with _connect(server) as sock:
        sock.sendall(head + partial)
        time.sleep(0.3)  # the route is now reading the body
    # closed with 99 000 bytes still owed


def test_client_disconnect_mid_body_is_not_a_server_error(store: Path, tmp_path: Path) -> None:
    boundary = "cutcutcut"
    multipart = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
                 "Content-Type: image/png\r\n\r\n").encode()
    multipart += (image_bytes(200, 200) * 2)[: 1000 - len(multipart)]
    v2_json = b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": ['
    v2_json += b"0.5, " * ((1000 - len(v2_json)) // 5)
    v2_json += b" " * (1000 - len(v2_json))
    env = {"MODSERVE_ADMIN_TOKEN": TOKEN_16}  # 16 characters: accepted
    with serve_store(store, tmp_path, env) as srv:
        _hang_up_mid_body(srv, f"/v1/models/{MODEL}/predict", f"multipart/form-data; boundary={boundary}", multipart)
        _hang_up_mid_body(srv, f"/v2/models/{MODEL}/infer", "application/json", v2_json)

        def both_logged(lines: list[str]) -> bool:
            hits = [line for line in lines if "disconnected" in line and '"level": "info"' in line]
            return any("/predict" in h for h in hits) and any("/infer" in h for h in hits)

        lines = _wait_for_log(srv, both_logged, "info line about each disconnect")
        assert httpx.get(srv.url + "/v2/health/live", timeout=10).status_code == 200
        assert httpx.get(srv.url + "/v2/health/ready", timeout=10).status_code == 200
        ok = httpx.post(f"{srv.url}/v1/models/{MODEL}/predict", files={"image": ("a.png", image_bytes())},
                        timeout=60)
        assert ok.status_code == 200, ok.text
        assert _five_xx(srv) == []
        access = [json.loads(line) for line in lines if line.startswith("{")]
        statuses = {d["path"]: d["status"] for d in access if d.get("logger") == "modserve.access"}
        assert statuses[f"/v1/models/{MODEL}/predict"] == 499
        assert statuses[f"/v2/models/{MODEL}/infer"] == 499
    log = srv.output()
    assert "unhandled error" not in log and "Traceback" not in log, log
    assert not any(json.loads(line).get("level") in ("error", "critical")
                   for line in log.splitlines() if line.startswith("{")), log


# ---- log injection ----------------------------------------------------------------------------------


def test_text_logs_escape_newlines_and_ansi_escapes_from_the_path(store: Path, tmp_path: Path) -> None:
    forged = "/v1/models/x%0AERROR%20forged%20line%1B[31m/predict"
    with serve_store(store, tmp_path, {"MODSERVE_LOG_FORMAT": "text"}) as srv:
        with _connect(srv) as sock:
            sock.sendall(f"POST {forged} HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"
                         "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode())
            answer = b""
            while part := sock.recv(65536):
                answer += part
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer
        _wait_for_log(srv, lambda lines: any("forged" in line for line in lines), "line with the path")
        assert httpx.get(srv.url + "/v2/health/live", timeout=10).status_code == 200
    log = srv.output()
    assert "\x1b" not in log
    for line in log.splitlines():
        assert not line.startswith("ERROR") or "forged" not in line, line
        assert not re.match(r"\s*ERROR\s+forged", line), line
    assert "x\\nERROR forged line\\x1b[31m" in log, log


# ---- a short admin token refuses to start -------------------------------------------------------


def test_admin_token_shorter_than_16_characters_refuses_to_start(store: Path) -> None:
    env = {**os.environ, "MODSERVE_ADMIN_TOKEN": "short", "MODSERVE_WARMUP": "false"}
    result = subprocess.run(
        [sys.executable, "-m", "app", "--store", str(store), "--port", str(free_port()), "--device", "cpu"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0
    message = result.stderr + result.stdout
    assert "MODSERVE_ADMIN_TOKEN" in message and "16" in message, message
    assert "short" not in message.replace("shortest", "")  # the token itself is not echoed
    assert "serving" not in result.stdout
