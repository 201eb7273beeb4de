"""/metrics before and after requests and a reload; request ids on every response."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.store.writer import write_model
from app.main import create_app
from support.models import build_small, image_bytes, small_configs

TOKEN = "metrics-token-0123456789"


def _sample(text: str, metric: str, /, **labels: str) -> float:
    """The value of one sample in Prometheus text format (0 when absent)."""
    for line in text.splitlines():
        if not line.startswith(metric + "{") and not line.startswith(metric + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    for v in (1, 2):
        write_model(tmp_path, "seg", small_configs()["unet"], build_small("unet", seed=v).state_dict(), version=str(v))
    cfg = small_configs()["resnet50_head"]
    write_model(tmp_path, "cls", cfg, build_small("resnet50_head").state_dict())
    settings = Settings(store=tmp_path, warmup=False, admin_token=TOKEN)
    with TestClient(create_app(settings)) as c:
        yield c


def test_counters_histograms_and_gauges_move(client: TestClient) -> None:
    before = client.get("/metrics").text
    assert _sample(before, "modserve_model_info", name="seg", version="2", device="cpu", dtype="float32") == 1
    assert _sample(before, "modserve_model_loads_total", model="seg", result="success") == 1
    assert _sample(before, "modserve_queue_depth", model="cls") == 0
    for _ in range(3):
        assert client.post("/v1/models/cls/predict", files={"image": ("a.png", image_bytes())}).status_code == 200
    client.post("/v1/models/cls/predict", files={"image": ("a.png", b"junk")})
    after = client.get("/metrics").text
    assert _sample(after, "modserve_requests_total", model="cls", family="native", code="200") == 3
    assert _sample(after, "modserve_requests_total", model="cls", family="native", code="422") == 1
    for stage in ("queue", "preprocess", "inference"):  # the three that reached the model
        assert _sample(after, "modserve_request_duration_seconds_count", model="cls", family="native", stage=stage) == 3
    assert _sample(after, "modserve_request_duration_seconds_count", model="cls", family="native", stage="total") == 4
    assert _sample(after, "modserve_batch_size_count", model="cls") == 3
    assert _sample(after, "modserve_batch_size_sum", model="cls") == 3
    assert _sample(after, "modserve_requests_total", family="health") == 0
    assert "modserve_gpu_memory_allocated_bytes" not in after  # CPU-only host


def test_reload_changes_info_gauge_and_load_counters(client: TestClient) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/v2/repository/models/seg/load", headers=auth, json={"parameters": {"version": "1"}})
    assert r.status_code == 200
    text = client.get("/metrics").text
    assert _sample(text, "modserve_model_info", name="seg", version="1") == 1
    assert _sample(text, "modserve_model_info", name="seg", version="2") == 0
    assert _sample(text, "modserve_model_loads_total", model="seg", result="success") == 2
    assert _sample(text, "modserve_model_load_duration_seconds_count", model="seg") == 2
    client.post("/v2/repository/models/seg/load", headers=auth, json={"parameters": {"version": "5"}})
    text = client.get("/metrics").text
    assert _sample(text, "modserve_model_loads_total", model="seg", result="failure") == 1
    assert _sample(text, "modserve_requests_total", family="admin", code="404") == 1


def test_request_id_is_kept_sanitised_or_generated(client: TestClient) -> None:
    r = client.get("/v1/models", headers={"X-Request-ID": "abc-123"})
    assert r.headers["x-request-id"] == "abc-123"
    r = client.get("/v1/models", headers={"X-Request-ID": "evil\u0000<script>" + "x" * 200})
    rid = r.headers["x-request-id"]
    assert rid.startswith("evilscript") and len(rid) <= 64
    generated = client.get("/v2/health/live").headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)
    err = client.get("/v1/models/nope")
    assert err.status_code == 404 and err.headers["x-request-id"]
