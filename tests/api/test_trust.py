"""Trust: no request can make loading run code (issue: admin token + trusted, code-execution globals)."""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.store.writer import to_toml
from support.models import build_small, image_bytes, small_configs, write_small_store

TOKEN = "trust-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _state_dict_bytes(seed: int = 1) -> bytes:
    buf = io.BytesIO()
    torch.save(build_small("unet", seed=seed).state_dict(), buf)
    return buf.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return write_small_store(tmp_path / "store", ["unet"])


def _client(store: Path, **kw: Any) -> TestClient:
    return TestClient(create_app(Settings(store=store, warmup=False, admin_token=TOKEN, **kw)))


@pytest.mark.parametrize(
    ("checkpoint", "needle"),
    [
        ({"file": "model.pth", "trusted": True, "format": "whole_model"}, "trusted cannot be set"),
        ({"file": "model.pth", "trusted": True}, "trusted cannot be set"),
        ({"file": "model.pth", "trusted": False}, "trusted cannot be set"),
        ({"file": "model.pth", "format": "whole_model"}, "whole_model"),
    ],
)
def test_admin_upload_cannot_widen_what_loading_executes(
    store: Path, checkpoint: dict[str, Any], needle: str
) -> None:
    before = _snapshot(store)
    cfg = {**small_configs()["unet"], "checkpoint": checkpoint}
    with _client(store) as client:
        for name in ("unet", "newmodel"):  # an existing model and a new one
            r = client.put(f"/admin/models/{name}/versions/2", headers=AUTH,
                           files={"checkpoint": ("model.pth", _state_dict_bytes()), "model_toml": (None, to_toml(cfg))})
            assert r.status_code == 422, r.text
            assert needle in r.json()["error"]
        assert client.get("/v2/health/ready").status_code == 200
        assert client.post("/v1/models/unet/predict", files={"image": ("a.png", image_bytes())}).status_code == 200
    assert _snapshot(store) == before  # nothing written, not even an empty folder
    assert not (store / "newmodel").exists()


def test_trusted_on_disk_needs_the_server_setting(store: Path) -> None:
    cfg = {**small_configs()["unet"], "checkpoint": {"file": "model.pth", "trusted": True}}
    (store / "unet" / "model.toml").write_text(to_toml(cfg))
    with _client(store) as client:
        info = client.get("/v1/models/unet").json()
        assert info["ready"] is False
        assert "MODSERVE_ALLOW_TRUSTED_CHECKPOINTS" in info["reason"]
        r = client.post("/v2/repository/models/unet/load", headers=AUTH)
        assert r.status_code == 422 and "MODSERVE_ALLOW_TRUSTED_CHECKPOINTS" in r.json()["error"]
    with _client(store, allow_trusted_checkpoints=True) as client:  # the operator's two decisions
        assert client.get("/v1/models/unet").json()["ready"] is True


class _Shell:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def test_trusted_still_refuses_code_execution_globals(store: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    model = build_small("unet")
    model.payload = _Shell(marker)  # a whole model that calls os.system when unpickled
    target = store / "unet" / "2" / "model.pth"
    target.parent.mkdir()
    torch.save(model, target)
    cfg = {**small_configs()["unet"], "checkpoint": {"file": "model.pth", "trusted": True}}
    (store / "unet" / "model.toml").write_text(to_toml({**cfg, "version": 2}))
    with _client(store, allow_trusted_checkpoints=True) as client:
        info = client.get("/v1/models/unet").json()
        assert info["ready"] is False
        assert "system" in info["reason"] and "trusted" in info["reason"]
    assert not marker.exists()


def test_trusted_user_class_loads_with_the_setting(store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What trust is for: a whole model of the user's own class, importable on the server."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "usernets.py").write_text(
        "from app.nets.unet import UNet\n\nclass MyUNet(UNet):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(pkg))
    import usernets  # noqa: PLC0415 - the user's module, importable only now

    cfg = small_configs()["unet"]
    torch.manual_seed(3)
    model = usernets.MyUNet(**cfg["arguments"]).eval()
    target = store / "unet" / "2" / "model.pth"
    target.parent.mkdir()
    torch.save(model, target)
    trusted = {**cfg, "checkpoint": {"file": "model.pth", "trusted": True, "format": "whole_model"}}
    (store / "unet" / "model.toml").write_text(to_toml(trusted))
    try:
        with _client(store, allow_trusted_checkpoints=True) as client:
            info = client.get("/v1/models/unet").json()
            assert info["ready"] is True and info["version"] == "2", info
            r = client.post("/v1/models/unet/predict", files={"image": ("a.png", image_bytes())})
            assert r.status_code == 200 and r.headers["X-Model-Version"] == "2"
    finally:
        sys.modules.pop("usernets", None)
