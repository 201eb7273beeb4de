"""The request log of a real server: one JSON line per request, carrying the response's request id."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from app.store.writer import write_model
from support.models import build_small, image_bytes, small_configs
from support.server import free_port, run_server

pytestmark = pytest.mark.e2e


def test_each_request_logs_one_json_line_with_its_id(tmp_path: Path) -> None:
    store = tmp_path / "store"
    write_model(store, "cls", small_configs()["resnet50_extra"], build_small("resnet50_extra").state_dict())
    port = free_port()
    with run_server(["-m", "app", "--store", str(store), "--port", str(port)], port=port, log_dir=tmp_path,
                    ready_path="/v2/health/ready") as srv:
        with httpx.Client(base_url=srv.url) as client:
            ok = client.post("/v1/models/cls/predict", files={"image": ("a.png", image_bytes())},
                             data={"scalar": "0.3"}, headers={"X-Request-ID": "req-ok-1"})
            bad = client.post("/v1/models/cls/predict", files={"image": ("a.png", image_bytes())})
            assert ok.status_code == 200 and bad.status_code == 422
            ids = {ok.headers["x-request-id"]: 200, bad.headers["x-request-id"]: 422}
    lines = [json.loads(line) for line in srv.output().splitlines() if line.startswith("{")]
    assert lines, srv.output()
    requests = [d for d in lines if d["logger"] == "modserve.access" and d["path"].startswith("/v1/")]
    assert {d["request_id"]: d["status"] for d in requests} == ids
    ok_line = next(d for d in requests if d["request_id"] == "req-ok-1")
    assert ok_line["model"] == "cls" and ok_line["version"] == "1" and ok_line["batch_size"] == 1
    assert ok_line["method"] == "POST" and ok_line["latency_ms"] > 0 and ok_line["client"].startswith("127.0.0.1")
    assert "time" in ok_line
    assert not any("uvicorn.access" == d["logger"] for d in lines)  # no duplicate access log
