"""SIGTERM on a real uvicorn process: drain, finish what is in flight, exit 0."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from support.models import build_small, image_bytes, small_configs
from support.server import free_port, run_server
from app.store.writer import write_model

pytestmark = pytest.mark.e2e


def test_sigterm_drains_in_flight_requests_and_exits_zero(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_model(store, "slow", small_configs()["resnet50_head"], build_small("resnet50_head").state_dict())
    port = free_port()
    env = {"MODSERVE_FAULT_INJECTION": "sleep_ms=2500", "MODSERVE_GRACEFUL_TIMEOUT": "20"}
    result: dict[str, httpx.Response] = {}

    def slow_request(url: str) -> None:
        result["r"] = httpx.post(f"{url}/v1/models/slow/predict", files={"image": ("a.png", image_bytes())}, timeout=30)

    with run_server(["-m", "app", "--store", str(store), "--port", str(port)], env=env, port=port,
                    log_dir=tmp_path, ready_path="/v2/health/ready") as srv:
        worker = threading.Thread(target=slow_request, args=(srv.url,))
        worker.start()
        time.sleep(0.8)  # the request is now inside the model
        srv.proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        # readiness is gone at once: the listener is closed or answers 503
        try:
            ready = httpx.get(srv.url + "/v2/health/ready", timeout=2)
            assert ready.status_code == 503
        except httpx.TransportError:
            pass
        try:
            late = httpx.post(f"{srv.url}/v1/models/slow/predict", files={"image": ("a.png", image_bytes())}, timeout=5)
            assert late.status_code == 503
        except httpx.TransportError:
            pass
        worker.join(30)
        code = srv.proc.wait(30)
    assert result["r"].status_code == 200, result["r"].text
    assert len(result["r"].json()["predictions"][0]["probs"]) == 4
    assert code == 0, srv.output()
    assert "draining" in srv.output()


def test_startup_with_corrupt_model_is_live_but_not_ready(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_model(store, "good", small_configs()["resnet50_head"], build_small("resnet50_head").state_dict())
    (store / "bad" / "1").mkdir(parents=True)
    (store / "bad" / "1" / "model.pth").write_bytes(b"PK\x03\x04 truncated zip")
    (store / "bad" / "model.toml").write_text('architecture = "unet"\n')
    port = free_port()
    strict = {"MODSERVE_STRICT_READINESS": "true"}
    with run_server(["-m", "app", "--store", str(store), "--port", str(port)], port=port, log_dir=tmp_path,
                    env=strict) as srv:
        assert httpx.get(srv.url + "/v2/health/live").status_code == 200
        ready = httpx.get(srv.url + "/v2/health/ready")
        assert ready.status_code == 503 and "bad" in ready.json()["error"]
        ok = httpx.post(f"{srv.url}/v1/models/good/predict", files={"image": ("a.png", image_bytes())})
        assert ok.status_code == 200
        bad = httpx.post(f"{srv.url}/v1/models/bad/predict", files={"image": ("a.png", image_bytes())})
        assert bad.status_code == 503 and "not ready" in bad.json()["error"]
    # The default (not strict) readiness: the good model serves, so the replica stays in service.
    port = free_port()
    with run_server(["-m", "app", "--store", str(store), "--port", str(port)], port=port, log_dir=tmp_path) as srv:
        assert httpx.get(srv.url + "/v2/health/ready").json() == {"ready": True}
        assert httpx.get(srv.url + "/v2/models/bad/ready").status_code == 503
