"""Any torchvision model, declared heads and stacks, safetensors: served by a real app, equal to the user's forward."""

from __future__ import annotations

import io
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
from fastapi.testclient import TestClient
from PIL import Image
from torch import nn

from app.config import Settings
from app.main import create_app
from app.runtime.images import decode_image
from app.runtime.preprocess import Preprocessor
from app.store.model_config import PreprocessConfig
from app.store.writer import to_toml
from support.models import image_bytes

RUNTIME = {"device": "cpu", "max_batch_size": 2, "max_batch_delay_ms": 1.0}
IMAGENET = {"resize": [32, 32], "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
HEAD = [
    {"name": "fc1", "type": "Linear", "in_features": 512, "out_features": 16},
    {"name": "relu1", "type": "ReLU"},
    {"name": "dropout1", "type": "Dropout", "p": 0.2},
    {"name": "fc2", "type": "Linear", "in_features": 16, "out_features": 3},
    {"name": "output", "type": "Softmax", "dim": 1},
]
MLP = [
    {"type": "Linear", "in_features": 784, "out_features": 32},
    {"type": "ReLU"},
    {"type": "Linear", "in_features": 32, "out_features": 10},
]


def _users_models() -> dict[str, tuple[nn.Module, dict[str, Any], str]]:
    """Each model as the user's own code builds it, its model.toml, and how the user saved it."""
    torch.manual_seed(0)
    resnet = torchvision.models.resnet18(num_classes=3).eval()
    head = torchvision.models.resnet18(weights=None)
    head.fc = nn.Sequential(OrderedDict(fc1=nn.Linear(512, 16), relu1=nn.ReLU(), dropout1=nn.Dropout(0.2),
                                        fc2=nn.Linear(16, 3), output=nn.Softmax(dim=1)))
    head.eval()
    mlp = nn.Sequential(nn.Linear(784, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=2).eval()
    labels = {"labels": ["cat", "dog", "bird"]}
    return {
        "tv_resnet": (resnet, {
            "architecture": "torchvision", "arguments": {"name": "resnet18", "num_classes": 3},
            "preprocess": IMAGENET, "postprocess": labels}, "state_dict"),
        "tv_head": (head, {
            "architecture": "torchvision",
            "arguments": {"name": "resnet18", "num_classes": 3, "head_attribute": "fc", "head": HEAD},
            "preprocess": IMAGENET, "postprocess": {**labels, "output_names": ["probs"]}}, "safetensors"),
        "mlp": (mlp, {
            "architecture": "layer_stack", "arguments": {"layers": MLP, "flatten_input": True},
            "preprocess": {"resize": [28, 28], "color_mode": "L"}}, "whole_model"),
        "tv_seg": (seg, {
            "architecture": "torchvision_segmentation",
            "arguments": {"name": "lraspp_mobilenet_v3_large", "num_classes": 2},
            "preprocess": {"warmup_size": [32, 32], **{k: v for k, v in IMAGENET.items() if k != "resize"}}},
         "whole_model"),
    }


MODELS = _users_models()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("anystore")
    for name, (model, cfg, how) in MODELS.items():
        version = root / name / "1"
        version.mkdir(parents=True)
        if how == "safetensors":
            safetensors.torch.save_file(model.state_dict(), version / "model.safetensors")
        else:
            torch.save(model.state_dict() if how == "state_dict" else model, version / "model.pt")
        (root / name / "model.toml").write_text(to_toml({**cfg, "runtime": RUNTIME}))
    with TestClient(create_app(Settings(store=root, warmup=False))) as c:
        yield c


def _local(name: str, data: bytes) -> torch.Tensor:
    """The user's own module on the same preprocessed input."""
    model, cfg, _ = MODELS[name]
    pre = PreprocessConfig(**cfg["preprocess"])
    raw = decode_image(data, color_mode=pre.color_mode, max_pixels=10**8)
    x = Preprocessor(pre, default_resize=None)(raw).unsqueeze(0)
    with torch.inference_mode():
        if name == "mlp":
            x = x.flatten(1)
        out = model(x)
    return out["out"] if isinstance(out, dict) else out


def _post(client: TestClient, name: str, data: bytes, **kw: Any):
    return client.post(f"/v1/models/{name}/predict", files={"image": ("x.png", data, "image/png")}, **kw)


def test_all_ready(client: TestClient) -> None:
    for name in MODELS:
        info = client.get(f"/v1/models/{name}").json()
        assert info["ready"] is True, info


@pytest.mark.parametrize(("name", "head"), [("tv_resnet", "logits"), ("tv_head", "probs"), ("mlp", "logits")])
def test_classifiers_answer_the_users_forward(client: TestClient, name: str, head: str) -> None:
    data = image_bytes(50, 40, seed=7)
    r = _post(client, name, data)
    assert r.status_code == 200, r.text
    pred = r.json()["predictions"][0]
    want = _local(name, data)[0].numpy()
    got = np.asarray(pred[head], dtype=np.float32)
    assert np.abs(got - want).max() < 1e-5
    assert pred["label"]["index"] == int(np.argmax(want))


def test_segmenter_answers_the_users_out_mask(client: TestClient) -> None:
    data = image_bytes(45, 31, seed=8)
    logits = _local("tv_seg", data)
    want = np.asarray([0, 255], dtype=np.uint8)[logits[0].argmax(0).numpy()]
    r = _post(client, "tv_seg", data, headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), want)
