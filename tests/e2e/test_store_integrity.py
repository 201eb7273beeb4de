"""The store stays whole across uploads on a real uvicorn process: a server killed mid-upload
leaves only a staging leftover (cleared at the next start, every model serving again), a refused
upload leaves nothing, and a complete one appears as a version that loads."""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from support.models import build_small, image_bytes, write_small_store
from support.server import Server, free_port, run_server, stop

pytestmark = pytest.mark.e2e

TOKEN = "e2e-store-integrity-token-0123"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODELS = ["resnet50_head", "unet"]
TARGET = "resnet50_head"


def _serve(store: Path, log_dir: Path):
    port = free_port()
    env = {"MODSERVE_STORE": str(store), "MODSERVE_PORT": str(port), "MODSERVE_DEVICE": "cpu",
           "MODSERVE_WARMUP": "false", "MODSERVE_ADMIN_TOKEN": TOKEN}
    return run_server(["-m", "app"], env=env, port=port, log_dir=log_dir, ready_path="/v2/health/ready")


def _checkpoint(seed: int) -> bytes:
    buf = io.BytesIO()
    torch.save(build_small(TARGET, seed=seed).state_dict(), buf)
    return buf.getvalue()


def _predicts(server: Server, name: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/models/{name}/predict", files={"image": ("a.png", image_bytes())},
                      timeout=60)


def _entries(folder: Path) -> list[Path]:
    return sorted(folder.iterdir()) if folder.is_dir() else []


def _wait_until(condition, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_sigkill_mid_upload_leaves_the_store_serving(tmp_path: Path) -> None:
    store = write_small_store(tmp_path / "store", names=MODELS)
    staging, version_dir = store / ".staging", store / TARGET / "2"
    data = _checkpoint(seed=1)
    release = threading.Event()
    outcome: dict[str, object] = {}

    def body() -> Iterator[bytes]:
        step = 64 * 1024
        for i in range(0, len(data), step):
            if i == 16 * step:  # 1 MiB is in: hold the rest until the server has been killed
                release.wait(60)
            yield data[i:i + step]

    def upload(url: str) -> None:
        try:
            outcome["response"] = httpx.put(
                f"{url}/admin/models/{TARGET}/versions/2", content=body(),
                headers={**AUTH, "Content-Type": "application/octet-stream"}, timeout=60)
        except httpx.TransportError as exc:
            outcome["error"] = exc

    with _serve(store, tmp_path) as srv:
        for name in MODELS:
            assert _predicts(srv, name).status_code == 200
        worker = threading.Thread(target=upload, args=(srv.url,))
        worker.start()
        try:
            _wait_until(lambda: _entries(staging), "the upload to reach the staging folder")
            stop(srv.proc, signal.SIGKILL)
        finally:
            release.set()
            worker.join(60)
    assert srv.proc.returncode == -signal.SIGKILL
    assert "response" not in outcome, outcome  # the upload never completed
    leftovers = _entries(staging)
    assert leftovers, "the kill should have hit mid-upload"
    assert not version_dir.exists()

    with _serve(store, tmp_path) as srv:
        for name in MODELS:
            r = _predicts(srv, name)
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == "1"
        assert httpx.get(srv.url + "/v2/health/ready", timeout=10).status_code == 200
        models = httpx.get(srv.url + "/v1/models", timeout=10).json()["models"]
        assert sorted(m["name"] for m in models) == sorted(MODELS) and all(m["ready"] for m in models)
        assert _entries(staging) == []
        assert not version_dir.exists()
    assert "unfinished upload" in srv.output()
    assert "Traceback" not in srv.output()


def test_refused_upload_leaves_nothing_and_a_complete_one_loads(tmp_path: Path) -> None:
    store = write_small_store(tmp_path / "store", names=[TARGET])
    staging = store / ".staging"
    with _serve(store, tmp_path) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        octet = {**AUTH, "Content-Type": "application/octet-stream"}
        bad = client.put(f"/admin/models/{TARGET}/versions/2", content=b"\x00garbage" * 4096, headers=octet)
        assert bad.status_code == 422, bad.text
        assert "error" in bad.json()
        assert not (store / TARGET / "2").exists()
        assert _entries(staging) == []

        good = client.put(f"/admin/models/{TARGET}/versions/2", content=_checkpoint(seed=2), headers=octet)
        assert good.status_code == 200, good.text
        assert good.json()["version"] == "2" and len(good.json()["sha256"]) == 64
        assert (store / TARGET / "2").is_dir()
        assert _entries(staging) == []

        load = client.post(f"/v2/repository/models/{TARGET}/load", json={"parameters": {"version": "2"}},
                           headers=AUTH)
        assert load.status_code == 200, load.text
        assert load.json()["version"] == "2"
        r = _predicts(srv, TARGET)
        assert r.status_code == 200 and r.json()["model_version"] == "2"
        again = client.put(f"/admin/models/{TARGET}/versions/2", content=_checkpoint(seed=3), headers=octet)
        assert again.status_code == 409  # versions are immutable
        assert _entries(staging) == []
