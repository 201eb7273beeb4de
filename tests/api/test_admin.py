"""Admin API: auth, atomic reloads under load, failed reloads that change nothing, traversal."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import pickle
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.store.writer import write_model
from app.main import create_app
from app.store.writer import to_toml
from support.models import build_small, image_bytes, small_configs

TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _unet_cfg() -> dict[str, Any]:
    cfg = dict(small_configs()["unet"])
    cfg["runtime"] = {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 1.0}
    return cfg


def _write_versions(root: Path, versions: range) -> None:
    for v in versions:
        write_model(root, "seg", _unet_cfg(), build_small("unet", seed=v).state_dict(), version=str(v))


def _settings(root: Path, **kw: Any) -> Settings:
    return Settings(store=root, warmup=False, admin_token=TOKEN, **kw)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    _write_versions(root, range(1, 2))
    return root


@pytest.fixture
def client(store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(_settings(store))) as c:
        yield c


def _predict(client: TestClient) -> httpx.Response:
    r = client.post("/v1/models/seg/predict", files={"image": ("a.png", image_bytes(24, 20, seed=9))})
    assert r.status_code == 200, r.text
    return r


def _err(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    assert needle.lower() in r.json()["error"].lower(), r.json()


def test_auth(store: Path, caplog: pytest.LogCaptureFixture) -> None:
    with TestClient(create_app(_settings(store))) as client:
        _err(client.post("/v2/repository/models/seg/load"), 401, "admin token")
        _err(client.post("/v2/repository/models/seg/load", headers={"Authorization": "Bearer nope"}), 401, "invalid")
        _err(client.post("/v2/repository/models/seg/load", headers={"Authorization": TOKEN}), 401, "bearer")
        ok = client.post("/v2/repository/models/seg/load", headers=AUTH)
        assert ok.status_code == 200 and ok.json()["version"] == "1"
        assert len(ok.json()["sha256"]) == 64
        _err(client.put("/admin/models/seg/versions/2", content=b"x"), 401, "admin token")
    assert TOKEN not in caplog.text
    with TestClient(create_app(Settings(store=store, warmup=False))) as client:
        for method, path in (("post", "/v2/repository/models/seg/load"), ("post", "/v2/repository/models/seg/unload"),
                             ("put", "/admin/models/seg/versions/2")):
            _err(getattr(client, method)(path, headers=AUTH), 403, "admin API disabled")


def test_load_accepts_empty_body_and_parameters(client: TestClient, store: Path) -> None:
    _write_versions(store, range(2, 3))
    r = client.post("/v2/repository/models/seg/load", headers={**AUTH, "content-length": "0"})
    assert r.status_code == 200 and r.json()["version"] == "2"  # newest
    r = client.post("/v2/repository/models/seg/load", headers=AUTH, json={"parameters": {"version": "1"}})
    assert r.json()["version"] == "1"
    assert _predict(client).headers["X-Model-Version"] == "1"
    _err(client.post("/v2/repository/models/seg/load", headers=AUTH, json={"parameters": {"version": "9"}}),
         404, "no version 9")
    _err(client.post("/v2/repository/models/seg/load", headers=AUTH, json={"parameters": {"version": "1a"}}),
         422, "digits")
    _err(client.post("/v2/repository/models/seg/load", headers=AUTH, content=b"[1]"), 400, "parameters")


def test_unload_then_load(client: TestClient) -> None:
    assert client.post("/v2/repository/models/seg/unload", headers=AUTH, json={"parameters": {}}).json() == {
        "name": "seg", "unload": True}
    _err(client.post("/v1/models/seg/predict", files={"image": ("a.png", image_bytes())}), 503, "unloaded")
    assert client.get("/v2/health/ready").status_code == 200  # unloaded on purpose: still ready
    assert client.post("/v2/repository/models/seg/load", headers=AUTH).status_code == 200
    _predict(client)


def _evil_pickle(marker: Path) -> bytes:
    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))
    return pickle.dumps({"state_dict": Evil()})


@pytest.mark.parametrize("case", ["corrupt", "truncated", "wrong_arguments", "sha256", "evil_pickle"])
def test_failed_reload_keeps_the_old_model(client: TestClient, store: Path, tmp_path: Path, case: str) -> None:
    before = _predict(client)
    target = store / "seg" / "2" / "model.pth"
    target.parent.mkdir()
    marker = tmp_path / "pwned"
    if case == "corrupt":
        target.write_bytes(b"not a checkpoint at all")
    elif case == "truncated":
        buf = io.BytesIO()
        torch.save(build_small("unet", seed=5).state_dict(), buf)
        target.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    elif case == "wrong_arguments":
        cfg = _unet_cfg()
        torch.manual_seed(0)
        from app import nets
        other = nets.get_net("unet", n_channels=3, n_classes=5, base_channels=4)
        torch.save(other.state_dict(), target)
    elif case == "sha256":
        torch.save(build_small("unet", seed=5).state_dict(), target)
        cfg = _unet_cfg()
        cfg["checkpoint"] = {"file": "model.pth", "sha256": {"2": "0" * 64}}
        (store / "seg" / "model.toml").write_text(to_toml(cfg))
    else:
        target.write_bytes(_evil_pickle(marker))
    r = client.post("/v2/repository/models/seg/load", headers=AUTH)
    assert 400 <= r.status_code < 500, r.text
    assert r.json()["error"]
    after = _predict(client)
    assert after.headers["X-Model-Version"] == "1"
    assert after.content == before.content  # the old model, with the old outputs
    info = client.get("/v1/models/seg").json()
    assert info["ready"] is True and info["last_error"] and "load failed" in info["last_error"]
    assert not marker.exists()


def test_path_traversal_is_refused(client: TestClient, store: Path, tmp_path: Path) -> None:
    for path in ("/v2/repository/models/../load", "/v2/repository/models/%2e%2e%2f/load",
                 "/v2/repository/models/%2Fetc%2Fpasswd/load", "/v2/repository/models/..%2F..%2Fetc/load"):
        r = client.post(path, headers=AUTH)  # the router matches no route for a name with a slash
        assert r.status_code == 404, (path, r.status_code)
        assert "error" in r.json()
    r = client.post("/v2/repository/models/../load", headers=AUTH)  # normalised to another path
    assert r.status_code == 404 and "error" in r.json()
    for name in ("...", ".hidden"):
        r = client.post(f"/v2/repository/models/{name}/load", headers=AUTH)
        assert r.status_code == 422 and "invalid model name" in r.json()["error"]
    outside = tmp_path / "outside"
    outside.mkdir()
    torch.save(build_small("unet", seed=3).state_dict(), outside / "model.pth")
    os.symlink(outside, store / "seg" / "7")
    _err(client.post("/v2/repository/models/seg/load", headers=AUTH, json={"parameters": {"version": "7"}}),
         422, "outside the model store")
    _err(client.put("/admin/models/seg/versions/7", headers=AUTH, content=b"x"), 422, "outside the model store")
    assert (outside / "model.pth").read_bytes()[:2] == b"PK"  # untouched


def test_upload_new_version_and_new_model(client: TestClient, store: Path) -> None:
    buf = io.BytesIO()
    torch.save(build_small("unet", seed=42).state_dict(), buf)
    data = buf.getvalue()
    r = client.put("/admin/models/seg/versions/3", headers={**AUTH, "content-type": "application/octet-stream"},
                   content=data)
    assert r.status_code == 200, r.text
    assert r.json() == {"name": "seg", "version": "3", "sha256": hashlib.sha256(data).hexdigest()}
    assert (store / "seg" / "3" / "model.pth").read_bytes() == data
    assert [p.name for p in (store / "seg" / "3").iterdir()] == ["model.pth"]  # no temp file left
    assert client.post("/v2/repository/models/seg/load", headers=AUTH).json()["version"] == "3"
    # a new model: its model.toml comes with the checkpoint
    _err(client.put("/admin/models/fresh/versions/1", headers=AUTH, content=data), 422, "model.toml")
    r = client.put("/admin/models/fresh/versions/1", headers=AUTH,
                   files={"checkpoint": ("model.pth", data), "model_toml": (None, to_toml(_unet_cfg()))})
    assert r.status_code == 200, r.text
    assert client.post("/v2/repository/models/fresh/load", headers=AUTH).status_code == 200
    assert client.post("/v1/models/fresh/predict", files={"image": ("a.png", image_bytes())}).status_code == 200


def test_upload_refuses_whole_model_pickles(client: TestClient, store: Path, tmp_path: Path) -> None:
    buf = io.BytesIO()
    torch.save(build_small("unet"), buf)  # a whole nn.Module
    _err(client.put("/admin/models/seg/versions/4", headers=AUTH, content=buf.getvalue()), 422, "state_dict")
    marker = tmp_path / "pwned"
    _err(client.put("/admin/models/seg/versions/4", headers=AUTH, content=_evil_pickle(marker)), 422, "state_dict")
    assert not marker.exists()
    assert not (store / "seg" / "4").exists()  # a refused upload leaves no version folder
    bad_toml = 'architecture = "vgg"\n'
    _err(client.put("/admin/models/new2/versions/1", headers=AUTH,
                    files={"checkpoint": ("m.pth", b"x"), "model_toml": (None, bad_toml)}), 422, "unknown architecture")


def test_reload_under_load_switches_exactly_once_per_reload(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _write_versions(root, range(1, 7))
    (root / "seg" / "model.toml").write_text(to_toml({**_unet_cfg(), "version": "1"}))
    app = create_app(_settings(root))
    seen: list[list[tuple[str, str]]] = [[] for _ in range(8)]
    failures: list[str] = []

    async def client_loop(client: httpx.AsyncClient, i: int, stop: asyncio.Event) -> None:
        while not stop.is_set():
            r = await client.post("/v1/models/seg/predict", files={"image": ("a.png", image_bytes(20, 16, seed=i))})
            if r.status_code != 200:
                failures.append(r.text)
            else:
                seen[i].append((r.headers["X-Model-Version"], r.headers["X-Model-Sha256"]))

    async def main() -> list[dict[str, Any]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as client:
                stop = asyncio.Event()
                tasks = [asyncio.ensure_future(client_loop(client, i, stop)) for i in range(8)]
                loads = []
                for version in range(2, 7):
                    await asyncio.sleep(0.15)
                    r = await client.post("/v2/repository/models/seg/load", headers=AUTH,
                                          json={"parameters": {"version": str(version)}})
                    assert r.status_code == 200, r.text
                    loads.append(r.json())
                await asyncio.sleep(0.15)
                stop.set()
                await asyncio.gather(*tasks)
        return loads

    loads = asyncio.run(main())
    assert failures == []
    sha_by_version = {"1": None, **{d["version"]: d["sha256"] for d in loads}}
    for trace in seen:
        assert trace, "every client got answers"
        versions = [int(v) for v, _ in trace]
        assert versions == sorted(versions)  # never back to an older model
        for v, sha in trace:
            assert sha_by_version.get(v) in (None, sha)
    all_versions = {v for trace in seen for v, _ in trace}
    assert {"1", "6"} <= all_versions


def test_concurrent_reloads_of_one_model_conflict(client: TestClient, store: Path) -> None:
    """While one load builds (held here until the second request has been answered), a second gets 409."""
    _write_versions(store, range(2, 3))
    app = client.app
    registry = app.state.registry
    building, second_answered = threading.Event(), threading.Event()
    real_build = registry._build

    def held_build(*args: Any) -> Any:
        building.set()
        assert second_answered.wait(30)
        return real_build(*args)

    registry._build = held_build

    async def main() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
            first = asyncio.ensure_future(c.post("/v2/repository/models/seg/load", headers=AUTH))
            while not building.is_set():
                await asyncio.sleep(0.01)
            second = await c.post("/v2/repository/models/seg/load", headers=AUTH)
            second_answered.set()
            return [(await first).status_code, second.status_code]

    try:
        statuses = client.portal.call(main)  # run on the app's own loop, where its locks live
    finally:
        registry._build = real_build
    assert statuses == [200, 409]


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_twenty_reloads_keep_memory_bounded(client: TestClient) -> None:
    for _ in range(3):
        assert client.post("/v2/repository/models/seg/load", headers=AUTH).status_code == 200
    start = _rss_mb()
    for _ in range(20):
        assert client.post("/v2/repository/models/seg/load", headers=AUTH).status_code == 200
        _predict(client)
    assert _rss_mb() - start < 150, "resident memory grew by more than 150 MB over 20 reloads"


def test_one_audit_line_per_admin_action(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    import json

    caplog.set_level("INFO", logger="modserve.audit")
    client.post("/v2/repository/models/seg/load", headers=AUTH)
    client.post("/v2/repository/models/seg/load", headers=AUTH, json={"parameters": {"version": "9"}})
    client.post("/v2/repository/models/seg/unload", headers=AUTH)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "modserve.audit"]
    assert [(d["action"], d["result"].split(" ")[0]) for d in lines] == [("load", "ok"), ("load", "failed"), ("unload", "ok")]
    assert lines[0]["version"] == "1" and len(lines[0]["sha256"]) == 64 and lines[0]["client"]
    assert "time" in lines[0] and TOKEN not in caplog.text
