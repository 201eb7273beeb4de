"""End to end: a real uvicorn process started the way users start it, called with httpx."""

from __future__ import annotations

import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from support.models import image_bytes
from support.server import free_port, run_server

pytestmark = pytest.mark.e2e


def test_python_m_app_serves_every_model(small_store: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {"MODSERVE_STORE": str(small_store), "MODSERVE_PORT": str(port), "MODSERVE_DEVICE": "cpu"}
    with run_server(["-m", "app"], env=env, port=port, log_dir=tmp_path, ready_path="/v2/health/ready") as srv:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            models = client.get("/v1/models").json()["models"]
            assert {m["name"] for m in models} >= {"unet", "resnet50_extra"}
            assert all(m["ready"] for m in models)
            r = client.post("/v1/models/resnet50_extra/predict",
                            files={"image": ("a.png", image_bytes())}, data={"scalar": "0.5"})
            assert r.status_code == 200
            probs = r.json()["predictions"][0]["probs"]
            assert len(probs) == 4 and sum(probs) == pytest.approx(1.0, abs=1e-5)
            r = client.post("/v1/models/unet/predict", files={"image": ("a.png", image_bytes(61, 29))},
                            headers={"Accept": "image/png"})
            assert Image.open(io.BytesIO(r.content)).size == (61, 29)
            r = client.post("/v1/models/resnet50_dual/predict", files={"image": ("a.png", image_bytes())})
            pred = r.json()["predictions"][0]
            assert len(pred["features"]) == 1000 and np.isclose(sum(pred["probs"]), 1.0)
            bad = client.post("/v1/models/resnet50_extra/predict", files={"image": ("a.png", b"junk")},
                              data={"scalar": "1"})
            assert bad.status_code == 422 and "error" in bad.json()
    assert "Application startup complete" in srv.output()


def test_cli_flags_win_over_environment(small_store: Path, tmp_path: Path) -> None:
    port = free_port()
    env = {"MODSERVE_STORE": "/nonexistent", "MODSERVE_PORT": "1", "MODSERVE_DEVICE": "cuda:7"}
    args = ["-m", "app.cli", "serve", "--store", str(small_store), "--port", str(port), "--device", "cpu"]
    with run_server(args, env=env, port=port, log_dir=tmp_path, ready_path="/v2/health/ready") as srv:
        info = httpx.get(srv.url + "/v1/models/resnet50_head", timeout=30).json()
        assert info["ready"] and info["device"] == "cpu"


def test_empty_store_starts_and_says_so(tmp_path: Path) -> None:
    store = tmp_path / "empty"
    store.mkdir()
    port = free_port()
    with run_server(["-m", "app", "--store", str(store), "--port", str(port)], port=port, log_dir=tmp_path) as srv:
        assert httpx.get(srv.url + "/v1/models").json() == {"models": []}
        assert httpx.get(srv.url + "/v2/health/ready").status_code == 200
    assert "no models in store" in srv.output()
