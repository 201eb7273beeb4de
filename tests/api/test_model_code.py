"""A model.py beside model.toml, for whole-model pickles of classes modserve cannot build: imported only
with MODSERVE_ALLOW_MODEL_CODE, never through the admin API; the pickle is still read weights-only."""

from __future__ import annotations

import io
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from app.config import Settings
from app.main import create_app
from app.runtime.images import decode_image
from app.runtime.preprocess import Preprocessor
from app.store.model_config import PreprocessConfig
from app.store.writer import to_toml
from support.models import image_bytes
from support.notes import Payload

TOKEN = "model-code-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MODEL_PY = '''
import torch
from torch import nn

open({marker!r}, "w").close()  # importing this file is running code: the test looks for this file


class GatedNet(nn.Module):
    """No builder in modserve makes this: a gate computed from the image scales the logits."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.gate = nn.Linear(4, 1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        f = self.features(x)
        return torch.softmax(self.fc(f) * torch.sigmoid(self.gate(f)), dim=1)
'''
CONFIG = {
    "architecture": "python_classifier", "arguments": {"num_classes": 3},
    "checkpoint": {"file": "model.pt"}, "runtime": {"device": "cpu", "max_batch_size": 2},
    "preprocess": {"resize": [16, 16]}, "postprocess": {"labels": ["a", "b", "c"]},
}


def _users_model(scratch: Path) -> nn.Module:
    """The class as the user's training script defines it (so it pickles as __main__.GatedNet)."""
    scope: dict[str, object] = {"__name__": "__main__"}
    exec(MODEL_PY.format(marker=str(scratch)), scope)  # noqa: S102 - the test's own source
    cls = scope["GatedNet"]
    torch.manual_seed(0)
    return cls().eval()  # type: ignore[operator]


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Path, Path, nn.Module]]:
    marker = tmp_path / "imported"
    model = _users_model(tmp_path / "training-script-ran")
    monkeypatch.setattr(sys.modules["__main__"], "GatedNet", type(model), raising=False)
    root = tmp_path / "store"
    (root / "gated" / "1").mkdir(parents=True)
    torch.save(model, root / "gated" / "1" / "model.pt")
    (root / "gated" / "model.toml").write_text(to_toml(CONFIG))
    (root / "gated" / "model.py").write_text(MODEL_PY.format(marker=str(marker)))
    yield root, marker, model


def _settings(root: Path, allow: bool) -> Settings:
    return Settings(store=root, warmup=False, admin_token=TOKEN, allow_model_code=allow)


def test_with_the_setting_off_model_py_is_never_imported(store: tuple[Path, Path, nn.Module]) -> None:
    root, marker, _ = store
    with TestClient(create_app(_settings(root, allow=False))) as client:
        info = client.get("/v1/models/gated").json()
        assert info["ready"] is False and "MODSERVE_ALLOW_MODEL_CODE" in info["reason"], info
        assert client.post("/v1/models/gated/predict", files={"image": ("a.png", image_bytes())}).status_code == 503
    assert not marker.exists()


def test_with_the_setting_on_the_users_class_serves_its_own_forward(store: tuple[Path, Path, nn.Module]) -> None:
    root, marker, model = store
    png = image_bytes(20, 20, seed=3)
    with TestClient(create_app(_settings(root, allow=True))) as client:
        r = client.post("/v1/models/gated/predict", files={"image": ("a.png", png)})
        assert r.status_code == 200, r.text
    assert marker.exists()
    pre = PreprocessConfig(**CONFIG["preprocess"])
    x = Preprocessor(pre, default_resize=None)(decode_image(png, color_mode="RGB", max_pixels=10**8)).unsqueeze(0)
    with torch.inference_mode():
        want = model(x)[0].numpy()
    got = np.asarray(r.json()["predictions"][0]["probs"], dtype=np.float32)
    assert np.abs(got - want).max() < 1e-5
    assert r.json()["predictions"][0]["label"]["index"] == int(np.argmax(want))


def test_code_execution_globals_are_refused_even_with_model_code(store: tuple[Path, Path, nn.Module]) -> None:
    root, marker, _ = store
    ran = root.parent / "payload-ran"
    torch.save({"model": Payload(ran)}, root / "gated" / "1" / "model.pt")
    with TestClient(create_app(_settings(root, allow=True))) as client:
        info = client.get("/v1/models/gated").json()
    assert info["ready"] is False and "builtins.exec" in info["reason"], info
    assert not ran.exists()


def test_the_admin_api_never_installs_or_changes_model_code(store: tuple[Path, Path, nn.Module]) -> None:
    root, _, model = store
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    with TestClient(create_app(_settings(root, allow=True))) as client:
        r = client.put("/admin/models/other/versions/1", headers=AUTH,
                       files={"checkpoint": ("model.pt", buf.getvalue()), "model_toml": (None, to_toml(CONFIG))})
        assert r.status_code == 422 and "never through the admin API" in r.json()["error"], r.text
        r = client.put("/admin/models/gated/versions/2", headers={**AUTH, "content-type": "application/octet-stream"},
                       content=buf.getvalue())
        assert r.status_code == 422 and "never through the admin API" in r.json()["error"], r.text
    assert not (root / "other").exists() and not (root / "gated" / "2").exists()


def test_the_admin_api_never_uploads_a_program(tmp_path: Path) -> None:
    """A .pt2 program is installed by the operator on disk; uploads are state_dicts."""
    from support.notes import ResNetTwoOutputs, export

    root = tmp_path / "store"
    root.mkdir()
    model = ResNetTwoOutputs(num_classes=3, backbone="resnet18")
    program = export(model, (torch.rand(2, 3, 32, 32), torch.rand(2, 1)), tmp_path / "dual.pt2").read_bytes()
    config = {"architecture": "exported_classifier", "arguments": {"outputs": ["probs", "features"], "num_classes": 3,
              "n_extra": 1}, "checkpoint": {"file": "model.pt2"}, "preprocess": {"resize": [32, 32]}}
    with TestClient(create_app(_settings(root, allow=False))) as client:
        r = client.put("/admin/models/dual/versions/1", headers=AUTH,
                       files={"checkpoint": ("model.pt2", program), "model_toml": (None, to_toml(config))})
    assert r.status_code == 422 and "installs on disk" in r.json()["error"], r.text
    assert not (root / "dual").exists()
