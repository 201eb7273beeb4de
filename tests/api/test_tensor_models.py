"""Tensor-in models (the notes' MLP), saved as users save them, served over native JSON and v2 and
compared with a local forward of the user's own module."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from app.config import Settings
from app.main import create_app
from app.store.writer import to_toml

_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"
STACK = [{"type": "Linear", "in_features": 784, "out_features": 256}, {"type": "ReLU"},
         {"type": "Linear", "in_features": 256, "out_features": 10}]
NAMED = [{"name": "fc1", "type": "Linear", "in_features": 784, "out_features": 256}, {"name": "relu", "type": "ReLU"},
         {"name": "fc2", "type": "Linear", "in_features": 256, "out_features": 10},
         {"name": "output", "type": "Softmax", "dim": 1}]


def _user_models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    named = nn.Sequential(OrderedDict([("fc1", nn.Linear(784, 256)), ("relu", nn.ReLU()),
                                       ("fc2", nn.Linear(256, 10)), ("output", nn.Softmax(dim=1))])).eval()
    return {"plain": plain, "named": named}


def _write(root: Path, name: str, layers: list[dict[str, Any]], obj: Any, file: str, **extra: Any) -> None:
    cfg: dict[str, Any] = {"architecture": "tensor_stack",
                           "arguments": {"layers": layers, "input_shape": [784], "num_outputs": 10},
                           "checkpoint": {"file": file}, "runtime": {"device": "cpu"}, **extra}
    (root / name / "1").mkdir(parents=True)
    torch.save(obj, root / name / "1" / file)
    (root / name / "model.toml").write_text(to_toml(cfg))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, dict[str, nn.Module]]]:
    root = tmp_path_factory.mktemp("tensor-store")
    users = _user_models()
    _write(root, "mlp", STACK, users["plain"].state_dict(), "model.pt")
    _write(root, "mlp_whole", STACK, users["plain"], "model.pt")  # torch.save(model): nn.Sequential
    _write(root, "mlp_named", NAMED, users["named"].state_dict(), "model.pt",
           postprocess={"labels": [f"digit {i}" for i in range(10)]})
    with TestClient(create_app(Settings(store=root, warmup=False))) as client:
        yield client, users


@pytest.mark.parametrize(("model", "user"), [("mlp", "plain"), ("mlp_whole", "plain"), ("mlp_named", "named")])
def test_native_json_matches_the_users_forward(served: Any, model: str, user: str) -> None:
    client, users = served
    x = torch.rand(3, 784)
    r = client.post(f"/v1/models/{model}/predict", json={"instances": x.tolist()})
    assert r.status_code == 200, r.text
    with torch.no_grad():
        want = users[user](x).numpy()
    key = "probs" if model == "mlp_named" else "output"
    got = np.array([p[key] for p in r.json()["predictions"]])
    assert np.abs(got - want).max() < 1e-5
    if model == "mlp_named":
        assert [p["label"]["index"] for p in r.json()["predictions"]] == want.argmax(1).tolist()


def test_v2_fp32_tensor_matches_the_users_forward(served: Any) -> None:
    client, users = served
    x = torch.rand(2, 784)
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [2, 784], "data": x.flatten().tolist()}]}
    r = client.post("/v2/models/mlp/infer", json=body)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    assert out["name"] == "output" and out["shape"] == [2, 10]
    with torch.no_grad():
        want = users["plain"](x).numpy()
    assert np.abs(np.array(out["data"]).reshape(2, 10) - want).max() < 1e-5
    meta = client.get("/v2/models/mlp").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 784]}]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"instances": [[0.0] * 783]}, 422, "shape [784]"),
        ({"instances": [[True] * 784]}, 422, "finite numbers"),
        ({"instances": [[[0.0] * 784, [0.0]]]}, 422, "ragged"),
        ({"instances": [{"image": {"b64": _PNG_B64}}]}, 422, "not an image"),
    ],
)
def test_bad_tensor_instances(served: Any, body: dict[str, Any], status: int, needle: str) -> None:
    client, _ = served
    r = client.post("/v1/models/mlp/predict", json=body)
    assert r.status_code == status and needle in r.json()["error"], r.text


def test_images_models_refuse_tensors_and_v2_checks_shapes(served: Any) -> None:
    client, _ = served
    bad = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 10], "data": [0.0] * 10}]}
    r = client.post("/v2/models/mlp/infer", json=bad)
    assert r.status_code == 400 and "[-1, 784]" in r.json()["error"]
    r = client.post("/v2/models/mlp/infer", json={"inputs": [
        {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["x"]}]})
    assert r.status_code == 400 and "unknown input" in r.json()["error"]


def test_an_image_model_refuses_a_tensor_instance(tmp_path: Path) -> None:
    from support.models import write_small_store

    root = write_small_store(tmp_path, ["resnet50_head"])
    with TestClient(create_app(Settings(store=root, warmup=False))) as client:
        r = client.post("/v1/models/resnet50_head/predict", json={"instances": [[0.0, 1.0]]})
        assert r.status_code == 422 and "takes images" in r.json()["error"]


def test_the_dual_output_class_accepts_and_ignores_its_second_argument(tmp_path: Path) -> None:
    """The notes' dual-output class has forward(x, add_variable) and ignores add_variable: its users
    send the scalar, and get the same answer as without it."""
    import base64

    from support.models import image_bytes, write_small_store

    root = write_small_store(tmp_path, ["resnet50_dual", "resnet50_head"])
    png = image_bytes()
    with TestClient(create_app(Settings(store=root, warmup=False))) as client:
        with_scalar = client.post("/v1/models/resnet50_dual/predict", files={"image": ("a.png", png)}, data={"scalar": "0.7"})
        without = client.post("/v1/models/resnet50_dual/predict", files={"image": ("a.png", png)})
        assert with_scalar.status_code == 200 and with_scalar.json() == without.json()
        assert client.get("/v1/models/resnet50_dual").json()["ignored_inputs"] == ["scalar"]
        meta = client.get("/v2/models/resnet50_dual").json()
        assert "scalar" in [i["name"] for i in meta["inputs"]] and "not used" in meta["properties"]["ignored_inputs"]
        b64 = base64.b64encode(png).decode()
        v2 = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [b64],
                          "parameters": {"content_type": "base64"}},
                         {"name": "scalar", "datatype": "FP32", "shape": [1], "data": [0.7]}]}
        assert client.post("/v2/models/resnet50_dual/infer", json=v2).status_code == 200
        # a model whose class takes no second argument still refuses one
        r = client.post("/v1/models/resnet50_head/predict", files={"image": ("a.png", png)}, data={"scalar": "0.7"})
        assert r.status_code == 422 and "takes no scalar" in r.json()["error"]
