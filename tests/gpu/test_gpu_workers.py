"""``--workers 2`` on a GPU: JPEG bytes cross to the device process, which decodes them on the GPU with
its batch; the HTTP processes never start CUDA; GPU memory in /metrics comes from the device process."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from support.models import write_small_store
from support.server import serve_store
from test_gpu import CUDA, photo, runtime, serve

pytestmark = pytest.mark.gpu


def _maps_cuda_driver(pid: int) -> bool:
    return "libcuda.so" in Path(f"/proc/{pid}/maps").read_text()


def test_two_http_processes_feed_one_gpu_process(tmp_path: Path) -> None:
    store = write_small_store(tmp_path / "store", ["resnet50_extra"])
    run = tmp_path / "run"
    env = {"MODSERVE_DEVICE": "cuda:0", "MODSERVE_WORKERS": "2", "MODSERVE_RUN_DIR": str(run)}
    datas = [photo(seed) for seed in range(6)]
    want = serve(runtime("resnet50_extra", CUDA), datas)
    with serve_store(store, tmp_path, env=env) as srv:
        for data, expected in zip(datas, want):
            with httpx.Client() as client:  # a new connection each: both HTTP processes answer
                r = client.post(f"{srv.url}/v1/models/resnet50_extra/predict",
                                files={"image": ("p.jpg", data, "image/jpeg")}, data={"scalar": "0.5"}, timeout=60)
            assert r.status_code == 200, r.text
            got = np.asarray(r.json()["predictions"][0]["probs"], dtype=np.float32)
            assert np.allclose(got, expected["probs"], atol=1e-4)
        pids = json.loads((run / "pids.json").read_text())
        assert _maps_cuda_driver(pids["device"])
        assert not any(_maps_cuda_driver(pid) for pid in pids["workers"])
        metrics = httpx.get(srv.url + "/metrics", timeout=10).text
        line = next(l for l in metrics.splitlines() if l.startswith("modserve_gpu_memory_allocated_bytes{"))
        assert float(line.split()[-1]) > 0
        assert list((run / "payload").iterdir()) == []
