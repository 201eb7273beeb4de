"""Versions are immutable and complete-or-absent; uploads never stall the event loop."""

from __future__ import annotations

import asyncio
import io
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

import app.admin
from app.config import Settings
from app.main import create_app
from app.store.writer import to_toml
from support.models import build_small, image_bytes, small_configs, write_small_store

TOKEN = "upload-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OCTET = {**AUTH, "content-type": "application/octet-stream"}


def _ckpt(seed: int = 1, name: str = "unet") -> bytes:
    buf = io.BytesIO()
    torch.save(build_small(name, seed=seed).state_dict(), buf)
    return buf.getvalue()


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return write_small_store(tmp_path / "store", ["unet", "resnet50_head"])


@pytest.fixture
def client(store: Path) -> Any:
    with TestClient(create_app(Settings(store=store, warmup=False, admin_token=TOKEN))) as c:
        yield c


def test_upload_to_an_existing_version_is_409_and_changes_nothing(client: TestClient, store: Path) -> None:
    before = _snapshot(store)
    r = client.put("/admin/models/unet/versions/1", headers=OCTET, content=_ckpt(seed=9))
    assert r.status_code == 409 and "immutable" in r.json()["error"]
    assert _snapshot(store) == before
    assert client.post("/v2/repository/models/unet/load", headers=AUTH).status_code == 200  # sha256 still fits


@pytest.mark.parametrize("version", ["01", "00001", "1.0", "-1", "1e3", "１"])
def test_versions_are_canonical_digits(client: TestClient, store: Path, version: str) -> None:
    before = _snapshot(store)
    r = client.put(f"/admin/models/unet/versions/{version}", headers=OCTET, content=_ckpt())
    assert r.status_code == 422, r.text
    assert "error" in r.json()
    assert _snapshot(store) == before
    assert client.post("/v2/repository/models/unet/load", headers=AUTH).status_code == 200


def test_refused_uploads_leave_nothing(client: TestClient, store: Path) -> None:
    before = _snapshot(store)
    wrong_arch = _ckpt(name="resnet50_head")  # a real state_dict, but not a unet's
    for body in (b"", b"garbage", wrong_arch):
        r = client.put("/admin/models/unet/versions/2", headers=OCTET, content=body)
        assert r.status_code == 422, r.text
    cfg = to_toml(small_configs()["unet"])
    r = client.put("/admin/models/fresh/versions/1", headers=AUTH,
                   files={"checkpoint": ("model.pth", b"garbage"), "model_toml": (None, cfg)})
    assert r.status_code == 422
    assert _snapshot(store) == before
    assert not (store / "unet" / "2").exists() and not (store / "fresh").exists()
    assert list((store / ".staging").iterdir()) == []
    # the model still loads and answers as before
    assert client.post("/v2/repository/models/unet/load", headers=AUTH).json()["version"] == "1"
    assert client.get("/v2/health/ready").status_code == 200


def test_nan_weights_are_refused_at_upload(client: TestClient, store: Path) -> None:
    sd = build_small("unet").state_dict()
    first = next(k for k, t in sd.items() if t.is_floating_point())
    sd[first] = torch.full_like(sd[first], float("nan"))
    buf = io.BytesIO()
    torch.save(sd, buf)
    r = client.put("/admin/models/unet/versions/2", headers=OCTET, content=buf.getvalue())
    assert r.status_code == 422 and "NaN" in r.json()["error"]
    assert not (store / "unet" / "2").exists()


def test_a_complete_upload_appears_whole(client: TestClient, store: Path) -> None:
    data = _ckpt(seed=4)
    r = client.put("/admin/models/unet/versions/2", headers=OCTET, content=data)
    assert r.status_code == 200, r.text
    assert sorted(p.name for p in (store / "unet" / "2").iterdir()) == ["model.pth"]
    assert (store / "unet" / "2" / "model.pth").read_bytes() == data
    assert list((store / ".staging").iterdir()) == []
    assert client.post("/v2/repository/models/unet/load", headers=AUTH).json()["version"] == "2"


def test_staging_leftovers_are_removed_at_start_up(store: Path) -> None:
    leftover = store / ".staging" / "abc123" / "2"
    leftover.mkdir(parents=True)
    (leftover / "model.pth").write_bytes(b"half a checkpoint")
    with TestClient(create_app(Settings(store=store, warmup=False))) as client:
        assert client.get("/v2/health/ready").status_code == 200
        assert [m["name"] for m in client.get("/v1/models").json()["models"]] == ["resnet50_head", "unet"]
    assert list((store / ".staging").iterdir()) == []


def test_health_answers_while_an_upload_is_validated(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation runs in a worker thread: it blocks here until a health probe has been answered,
    which could never happen if it ran on the event loop."""
    probe_answered, validating = threading.Event(), threading.Event()
    real_validate = app.admin.validate_upload

    def slow_validate(*args: Any) -> None:
        validating.set()
        assert probe_answered.wait(30), "no health probe was answered during the validation"
        real_validate(*args)

    monkeypatch.setattr(app.admin, "validate_upload", slow_validate)
    application = create_app(Settings(store=store, warmup=False, admin_token=TOKEN))

    async def main() -> tuple[int, int]:
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                upload = asyncio.ensure_future(
                    c.put("/admin/models/unet/versions/2", headers=OCTET, content=_ckpt(seed=2) * 1)
                )
                while not validating.is_set():
                    await asyncio.sleep(0.01)
                live = await c.get("/v2/health/live")
                probe_answered.set()
                return live.status_code, (await upload).status_code

    assert asyncio.run(main()) == (200, 200)


def test_concurrent_uploads_of_one_version_one_wins(store: Path) -> None:
    application = create_app(Settings(store=store, warmup=False, admin_token=TOKEN))
    bodies = [_ckpt(seed=s) for s in (5, 6, 7)]

    async def main() -> list[int]:
        async with application.router.lifespan_context(application):
            transport = httpx.ASGITransport(app=application)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=60) as c:
                rs = await asyncio.gather(
                    *(c.put("/admin/models/unet/versions/3", headers=OCTET, content=b) for b in bodies)
                )
        return sorted(r.status_code for r in rs)

    assert asyncio.run(main()) == [200, 409, 409]
    files = list((store / "unet" / "3").iterdir())
    assert [p.name for p in files] == ["model.pth"] and files[0].read_bytes() in bodies


def test_image_through_a_new_model(client: TestClient) -> None:
    cfg = to_toml(small_configs()["unet"])
    r = client.put("/admin/models/fresh/versions/1", headers=AUTH,
                   files={"checkpoint": ("model.pth", _ckpt()), "model_toml": (None, cfg)})
    assert r.status_code == 200, r.text
    assert client.post("/v2/repository/models/fresh/load", headers=AUTH).status_code == 200
    assert client.post("/v1/models/fresh/predict", files={"image": ("a.png", image_bytes())}).status_code == 200
