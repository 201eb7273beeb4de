"""Edge limits on a real uvicorn process, over raw sockets: oversized or too many headers (431),
heads and bodies that never finish (408), slow senders that must not hold inference slots, and
keep-alive connections that stay usable while idle and are closed after the configured time.

Statuses, bodies and liveness are asserted, never durations: the short timeouts set through the
environment only keep the module fast.
"""

from __future__ import annotations

import json
import re
import select
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import httpx
import pytest

from support.models import image_bytes, write_small_store
from support.server import Server, serve_store

pytestmark = pytest.mark.e2e

MODEL = "resnet50_head"
MAX_HEADER_BYTES = 32 * 1024
MAX_HEADER_COUNT = 100


# ---- raw HTTP helpers ----------------------------------------------------------------------------


def _connect(server: Server, timeout: float = 30) -> socket.socket:
    host, port = server.url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def _send_until_answered(sock: socket.socket, chunks: Iterable[bytes], pause: float = 0.0) -> None:
    """Send ``chunks`` like a well-behaved client: stop as soon as the server has answered (or
    hung up), since a server that refuses a request does not read the rest of it."""
    for chunk in chunks:
        readable, _, _ = select.select([sock], [], [], 0)
        if readable:
            return
        try:
            sock.sendall(chunk)
        except (BrokenPipeError, ConnectionResetError):
            return
        if pause:
            time.sleep(pause)


def _read_until_closed(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:  # the server closed with our unread bytes pending: RST
            return data
        if not part:
            return data
        data += part


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One response on a keep-alive connection (Content-Length framed)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        assert part, f"connection closed before a response head: {data!r}"
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        part = sock.recv(65536)
        assert part, "connection closed mid-body"
        body += part
    return status, headers, body


def _parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    """A whole response read until close: status, headers, JSON body."""
    assert raw.startswith(b"HTTP/1.1 "), raw[:200]
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers, json.loads(body)


def _live_and_ready(server: Server) -> None:
    assert httpx.get(server.url + "/v2/health/live", timeout=10).status_code == 200
    assert httpx.get(server.url + "/v2/health/ready", timeout=10).status_code == 200


def _five_xx(server: Server) -> list[str]:
    text = httpx.get(server.url + "/metrics", timeout=10).text
    return [line for line in text.splitlines()
            if line.startswith("modserve_requests_total{") and re.search(r'code="5\d\d"', line)]


def _predict(server: Server) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{MODEL}/predict",
                      files={"image": ("a.png", image_bytes())}, timeout=60)


# ---- servers ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_store(tmp_path_factory.mktemp("edge-store"), names=[MODEL])


@pytest.fixture(scope="module")
def server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Short head and body deadlines, a 3 s keep-alive, default header limits spelled out."""
    env = {"MODSERVE_HEADER_TIMEOUT": "2", "MODSERVE_BODY_TIMEOUT": "2", "MODSERVE_KEEP_ALIVE_TIMEOUT": "3",
           "MODSERVE_MAX_HEADER_BYTES": str(MAX_HEADER_BYTES), "MODSERVE_MAX_HEADER_COUNT": str(MAX_HEADER_COUNT)}
    with serve_store(store, tmp_path_factory.mktemp("edge-logs"), env) as srv:
        yield srv


@pytest.fixture(scope="module")
def slots_server(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Two inference slots and a long body deadline; keep-alive left at its default."""
    env = {"MODSERVE_MAX_CONCURRENCY": "2", "MODSERVE_BODY_TIMEOUT": "30"}
    with serve_store(store, tmp_path_factory.mktemp("slots-logs"), env) as srv:
        yield srv


# ---- 431: request head too large -------------------------------------------------------------------


def test_one_100kb_header_gets_431_and_the_server_stays_up(server: Server) -> None:
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    with _connect(server) as sock:
        _send_until_answered(sock, (request[i:i + 8192] for i in range(0, len(request), 8192)))
        status, headers, body = _parse(_read_until_closed(sock))
    assert status == 431
    assert headers["content-type"] == "application/json" and headers["connection"] == "close"
    assert str(MAX_HEADER_BYTES) in body["error"]
    _live_and_ready(server)


@pytest.mark.parametrize("size", [MAX_HEADER_BYTES + 100, 60_000])
def test_a_head_that_arrives_in_one_write_is_counted_exactly(server: Server, size: int) -> None:
    """The read that completes a head counts too: just over the limit in one write is refused."""
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * size + b"\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(request)
        status, _, body = _parse(_read_until_closed(sock))
    assert status == 431 and str(MAX_HEADER_BYTES) in body["error"]
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES - 200) + b"\r\n\r\n"
    with _connect(server) as sock:  # just under the limit, in one write: served
        sock.sendall(request)
        status, _, _ = _read_response(sock)
    assert status == 200


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST /v2/health/live HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"POST /v2/health/live HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"G\x00ET / HTTP/1.1\r\nHost: a\r\n\r\n",
    ],
)
def test_malformed_http_gets_a_json_400(server: Server, request_bytes: bytes) -> None:
    with _connect(server) as sock:
        sock.sendall(request_bytes)
        status, headers, body = _parse(_read_until_closed(sock))
    assert status == 400 and headers["content-type"] == "application/json" and "invalid HTTP" in body["error"]
    _live_and_ready(server)


def test_a_5mb_header_sent_in_chunks_gets_431(server: Server) -> None:
    def chunks() -> Iterator[bytes]:
        yield b"GET /v1/models HTTP/1.1\r\nHost: a\r\nX-Huge: "
        for _ in range(5 * 16):
            yield b"b" * 65536  # 5 MB in all, never finished
    with _connect(server) as sock:
        _send_until_answered(sock, chunks())
        status, _, body = _parse(_read_until_closed(sock))
    assert status == 431 and "error" in body
    _live_and_ready(server)


def test_health_probe_answers_while_a_large_header_trickles_in(server: Server) -> None:
    """The header is trickled from a thread; a probe on another connection meanwhile gets 200."""
    halfway, probed = threading.Event(), threading.Event()
    answer: dict[str, bytes] = {}

    def trickle() -> None:
        with _connect(server) as sock:
            sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            for i in range(MAX_HEADER_BYTES // 1024 * 2):  # twice the limit, 1 KB at a time
                if i == MAX_HEADER_BYTES // 1024 // 2:
                    halfway.set()  # half the limit is in: the head is still being received
                    probed.wait(10)
                _send_until_answered(sock, [b"c" * 1024])
                time.sleep(0.005)
            answer["raw"] = _read_until_closed(sock)

    worker = threading.Thread(target=trickle)
    worker.start()
    try:
        assert halfway.wait(30)
        assert "raw" not in answer  # the trickled request is still unanswered
        probe = httpx.get(server.url + "/v2/health/live", timeout=10)
        assert probe.status_code == 200
        ready = httpx.get(server.url + "/v2/health/ready", timeout=10)
        assert ready.status_code == 200
    finally:
        probed.set()
        worker.join(60)
    status, _, body = _parse(answer["raw"])
    assert status == 431 and "error" in body


def test_a_large_body_is_not_counted_as_header_bytes(server: Server) -> None:
    """A valid request whose body (larger than the header limit) arrives after its head is
    answered normally, twice on one keep-alive connection: only the head counts towards 431."""
    png = image_bytes(200, 200)  # ~120 KB, several times MODSERVE_MAX_HEADER_BYTES
    body = (b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n" + png + b"\r\n--b--\r\n")
    head = (f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: a\r\n"
            f"Content-Type: multipart/form-data; boundary=b\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with _connect(server) as sock:
        for _ in range(2):
            sock.sendall(head)
            time.sleep(0.2)  # the head is parsed on its own, then the body arrives in large reads
            sock.sendall(body)
            status, _, answer = _read_response(sock)
            assert status == 200, answer
            assert len(json.loads(answer)["predictions"][0]["probs"]) == 4
    r = httpx.post(f"{server.url}/v1/models/{MODEL}/predict", files={"image": ("a.png", png)}, timeout=60)
    assert r.status_code == 200, r.text


def test_too_many_headers_get_431(server: Server) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADER_COUNT + 20))
    with _connect(server) as sock:
        _send_until_answered(sock, [b"GET /v1/models HTTP/1.1\r\nHost: a\r\n" + headers + b"\r\n"])
        status, headers_, body = _parse(_read_until_closed(sock))
    assert status == 431 and headers_["connection"] == "close"
    assert str(MAX_HEADER_COUNT) in body["error"]
    # exactly at the limit is fine
    at_limit = "".join(f"X-H{i}: v\r\n" for i in range(MAX_HEADER_COUNT - 1))  # + Host
    with _connect(server) as sock:
        sock.sendall(f"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n{at_limit}\r\n".encode())
        status, _, _ = _read_response(sock)
    assert status == 200
    _live_and_ready(server)


# ---- 408: heads and bodies that never finish -----------------------------------------------------


def test_slowloris_head_gets_408_and_the_connection_is_closed(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(b"POST /v1/models/x/predict HTTP/1.1\r\nHost: a\r\n")  # and then nothing
        status, headers, body = _parse(_read_until_closed(sock))  # returns only once the server closed
    assert status == 408 and headers["connection"] == "close"
    assert "headers not received" in body["error"]
    _live_and_ready(server)


def test_slow_body_gets_408_and_the_connection_is_closed(server: Server) -> None:
    with _connect(server) as sock:
        sock.sendall(
            f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: a\r\n"
            "Content-Type: multipart/form-data; boundary=xyz\r\nContent-Length: 1000\r\n\r\n".encode()
            + b"--xyz\r\nCon"  # 10 bytes of 1000, then nothing
        )
        status, headers, body = _parse(_read_until_closed(sock))
    assert status == 408 and headers["connection"] == "close"
    assert "body not received" in body["error"]
    _live_and_ready(server)


def test_idle_connection_without_bytes_is_closed_silently(server: Server) -> None:
    with _connect(server) as sock:
        assert _read_until_closed(sock) == b""  # no 408 for a request that never started


def test_slow_senders_hold_no_inference_slots(slots_server: Server) -> None:
    """Twice the slot count of clients hang mid-body; a complete prediction still gets 200."""
    boundary = "slowslowslow"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image_bytes()[:200]
    head = (f"POST /v1/models/{MODEL}/predict HTTP/1.1\r\nHost: a\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: 1000000\r\n\r\n").encode()
    slow = [_connect(slots_server) for _ in range(4)]
    try:
        for sock in slow:
            sock.sendall(head + part)
        time.sleep(0.5)  # let the server parse what they sent
        for _ in range(2):
            r = _predict(slots_server)
            assert r.status_code == 200, r.text
            assert len(r.json()["predictions"][0]["probs"]) == 4
        assert httpx.get(slots_server.url + "/v2/health/ready", timeout=10).status_code == 200
        for sock in slow:  # all still waiting for their bodies: none was answered
            readable, _, _ = select.select([sock], [], [], 0)
            assert not readable
    finally:
        for sock in slow:
            sock.close()
    _live_and_ready(slots_server)


# ---- keep-alive -------------------------------------------------------------------------------------


def test_keep_alive_connection_is_reused_then_closed_after_the_timeout(server: Server) -> None:
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n"
    with _connect(server) as sock:
        sock.sendall(request)
        assert _read_response(sock)[0] == 200
        time.sleep(1.5)  # idle, within MODSERVE_KEEP_ALIVE_TIMEOUT=3
        sock.sendall(request)
        status, headers, _ = _read_response(sock)
        assert status == 200 and headers.get("connection", "").lower() != "close"
        time.sleep(4.5)  # idle past the keep-alive timeout
        assert _read_until_closed(sock) == b""


def test_default_keep_alive_outlasts_uvicorns_old_5s(slots_server: Server) -> None:
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: a\r\n\r\n"
    with _connect(slots_server) as sock:
        sock.sendall(request)
        assert _read_response(sock)[0] == 200
        time.sleep(6)
        sock.sendall(request)
        assert _read_response(sock)[0] == 200


# ---- last: nothing above was a server error ------------------------------------------------------


def test_no_server_errors_were_counted(server: Server, slots_server: Server) -> None:
    for srv in (server, slots_server):
        _live_and_ready(srv)
        assert _five_xx(srv) == []
        assert "Traceback" not in srv.output()
