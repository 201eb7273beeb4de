"""Issue 15's acceptance, as a user does it: save models exactly as the notes do (torch.save of the model
or its state_dict, torch.export.save, safetensors), write a model.toml, serve them with a real server
(uvicorn subprocess, real sockets), and compare every answer with a local forward of the user's own
module on the same input (max abs difference < 1e-5 in float32)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.torch
import torch
import torchvision
import tritonclient.http as httpclient
from torch import nn

from app import nets
from app.nets.unet import UNet
from app.store.writer import to_toml
from support.notes import NOTES_HEAD_TOML, ResNetTwoOutputs, ResNetWithScalar, export, notes_head
from support.server import Server, serve_store

RUNTIME = {"device": "cpu", "max_batch_size": 2, "max_batch_delay_ms": 1.0}
SIZE = 32
TOL = 1e-5
MLP_NAMED = OrderedDict([("fc1", nn.Linear(784, 256)), ("relu1", nn.ReLU()), ("fc2", nn.Linear(256, 10))])
MLP_TOML = [{"type": "Linear", "in_features": 784, "out_features": 256}, {"type": "ReLU"},
            {"type": "Linear", "in_features": 256, "out_features": 10}]


class Tower(nn.Module):
    """The ModuleList pattern: the same block many times, applied in turn, then a named output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(32, 32), nn.ReLU()) for _ in range(4)])
        self.out = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out(x)


TOWER_TOML = [
    {"name": "blocks", "type": "Sequential", "layers": [
        {"type": "Sequential", "repeat": 4, "layers": [
            {"type": "Linear", "in_features": 32, "out_features": 32}, {"type": "ReLU"}]}]},
    {"name": "out", "type": "Linear", "in_features": 32, "out_features": 5},
]


def _image_model(arch: str, arguments: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"architecture": arch, "arguments": arguments, "runtime": RUNTIME,
            "preprocess": {"resize": [SIZE, SIZE]}, **extra}


def _tensor_model(arch: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"architecture": arch, "arguments": arguments, "runtime": RUNTIME}


def _save(root: Path, name: str, config: dict[str, Any], save: Any, file: str) -> None:
    version = root / name / "1"
    version.mkdir(parents=True)
    save(version / file)
    (root / name / "model.toml").write_text(to_toml({**config, "checkpoint": {"file": file}}))


def _users_models(root: Path) -> dict[str, tuple[nn.Module, int]]:
    """Each user's module (and how many inputs its forward takes), saved into the store at ``root``."""
    torch.manual_seed(0)
    x, s = torch.randn(2, 3, SIZE, SIZE), torch.rand(2, 1)
    r152 = torchvision.models.resnet152(weights=None).eval()  # the notes' save/load example
    r50_head = torchvision.models.resnet50(weights=None)
    r50_head.fc = notes_head()
    r50_head.eval()
    r152_head = torchvision.models.resnet152(weights=None)
    r152_head.fc = notes_head()
    r152_head.eval()
    mlp = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    mlp_named = nn.Sequential(MLP_NAMED).eval()
    extra, dual = ResNetWithScalar().eval(), ResNetTwoOutputs().eval()
    unet = UNet(3, 2, bilinear=False, base_channels=8).eval()  # the reference U-Net's class
    st = torchvision.models.resnet18(num_classes=5).eval()
    tower = Tower().eval()
    tv = {"name": "resnet152"}
    head = {"num_classes": 10, "head_attribute": "fc", "head": NOTES_HEAD_TOML}
    probs = {"postprocess": {"output_names": ["probs"]}}
    saves = {
        "r152_whole": (r152, 1, _image_model("torchvision", tv), lambda p: torch.save(r152, p), "model.pt"),
        "r152_state": (r152, 1, _image_model("torchvision", tv), lambda p: torch.save(r152.state_dict(), p), "model.pth"),
        "r50_head": (r50_head, 1, _image_model("torchvision", {"name": "resnet50", **head}, **probs),
                     lambda p: torch.save(r50_head.state_dict(), p), "model.pt"),
        "r152_head": (r152_head, 1, _image_model("torchvision", {"name": "resnet152", **head}, **probs),
                      lambda p: torch.save(r152_head, p), "model.pt"),
        "mlp": (mlp, 1, _tensor_model("tensor_stack", {"layers": MLP_TOML, "input_shape": [784]}),
                lambda p: torch.save(mlp.state_dict(), p), "model.pt"),
        "mlp_named": (mlp_named, 1, _tensor_model("tensor_stack", {
            "layers": [{"name": n, **e} for n, e in zip(MLP_NAMED, MLP_TOML)], "input_shape": [784]}),
            lambda p: torch.save(mlp_named, p), "model.pt"),
        "tower": (tower, 1, _tensor_model("tensor_stack", {"layers": TOWER_TOML, "input_shape": [32], "num_outputs": 5}),
                  lambda p: torch.save(tower.state_dict(), p), "model.pt"),
        "extra_pt2": (extra, 2, _image_model("exported_classifier", {"num_classes": 10, "n_extra": 1}),
                      lambda p: export(extra, (x, s), p), "model.pt2"),
        "dual_pt2": (dual, 2, _image_model("exported_classifier", {
            "outputs": ["probs", "features"], "num_classes": 10, "n_extra": 1}),
            lambda p: export(dual, (x, s), p), "model.pt2"),
        "unet_pt2": (unet, 1, {"architecture": "exported_segmenter", "arguments": {"num_classes": 2},
                               "runtime": RUNTIME, "preprocess": {"warmup_size": [48, 40]}},
                     lambda p: export(unet, (torch.randn(2, 3, 48, 40),), p, spatial=True), "model.pt2"),
        "st_resnet18": (st, 1, _image_model("torchvision", {"name": "resnet18", "num_classes": 5}),
                        lambda p: safetensors.torch.save_file(st.state_dict(), p), "model.safetensors"),
    }
    for name, (_, _, config, save, file) in saves.items():
        _save(root, name, config, save, file)
    return {name: (module, inputs) for name, (module, inputs, *_) in saves.items()}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, dict[str, tuple[nn.Module, int]]]]:
    root = tmp_path_factory.mktemp("users-store")
    models = _users_models(root)
    with serve_store(root, tmp_path_factory.mktemp("logs"), env={"MODSERVE_STRICT_READINESS": "true"}) as server:
        yield server, models


def _local(module: nn.Module, *inputs: np.ndarray) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(i) for i in inputs))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def test_notes_head_declared_has_the_builtin_resnet50_heads_keys() -> None:
    declared = nets.get_net("torchvision", name="resnet50", num_classes=10, head_attribute="fc", head=NOTES_HEAD_TOML)
    users = torchvision.models.resnet50(weights=None)
    users.fc = notes_head()
    builtin = nets.get_net("resnet50_head", num_classes=10)
    shapes = [{k: tuple(v.shape) for k, v in m.state_dict().items()} for m in (declared, users, builtin)]
    assert shapes[0] == shapes[1] == shapes[2]


def test_every_model_is_ready(served: tuple[Server, dict[str, Any]]) -> None:
    server, models = served
    listed = {m["name"]: m for m in httpx.get(f"{server.url}/v1/models").json()["models"]}
    assert {n: listed[n]["ready"] for n in models} == {n: True for n in models}, listed


@pytest.mark.parametrize("name", ["r152_whole", "r152_state", "r50_head", "r152_head", "extra_pt2", "dual_pt2",
                                  "st_resnet18"])
def test_image_models_over_v2_equal_the_users_forward(served: tuple[Server, dict[str, Any]], name: str) -> None:
    server, models = served
    module, n_inputs = models[name]
    rng = np.random.default_rng(7)
    image = rng.random((2, 3, SIZE, SIZE), dtype=np.float32)
    scalar = rng.random((2, 1), dtype=np.float32)
    inputs = [httpclient.InferInput("image", list(image.shape), "FP32")]
    inputs[0].set_data_from_numpy(image, binary_data=True)
    if n_inputs == 2:
        inputs.append(httpclient.InferInput("scalar", list(scalar.shape), "FP32"))
        inputs[1].set_data_from_numpy(scalar, binary_data=True)
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        result = client.infer(name, inputs)
        outputs = [o["name"] for o in result.get_response()["outputs"]]
        got = [result.as_numpy(o) for o in outputs]
    finally:
        client.close()
    want = _local(module, image, scalar) if n_inputs == 2 else _local(module, image)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.shape == w.shape and np.abs(g - w).max() < TOL, name


def test_exported_unet_logits_and_mask_equal_the_users_forward(served: tuple[Server, dict[str, Any]]) -> None:
    server, models = served
    image = np.random.default_rng(3).random((1, 3, 45, 37), dtype=np.float32)  # odd sizes: any size is served
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "data": image.ravel().tolist()}]}
    r = httpx.post(f"{server.url}/v2/models/unet_pt2/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    (want,) = _local(models["unet_pt2"][0], image)
    logits = np.asarray(outputs["logits"]["data"], dtype=np.float32).reshape(outputs["logits"]["shape"])
    assert logits.shape == want.shape and np.abs(logits - want).max() < TOL
    mask = np.asarray(outputs["mask"]["data"]).reshape(outputs["mask"]["shape"])
    np.testing.assert_array_equal(mask[0] > 0, want[0].argmax(0) == 1)


@pytest.mark.parametrize("name", ["mlp", "mlp_named", "tower"])
def test_tensor_models_native_and_v2_equal_the_users_forward(served: tuple[Server, dict[str, Any]], name: str) -> None:
    server, models = served
    module, _ = models[name]
    width = 32 if name == "tower" else 784
    x = np.random.default_rng(5).random((3, width), dtype=np.float32)
    (want,) = _local(module, x)
    native = httpx.post(f"{server.url}/v1/models/{name}/predict", json={"instances": x.tolist()}, timeout=60)
    assert native.status_code == 200, native.text
    got = np.asarray([p["output"] for p in native.json()["predictions"]], dtype=np.float32)
    assert np.abs(got - want).max() < TOL
    client = httpclient.InferenceServerClient(server.url.removeprefix("http://"))
    try:
        inp = httpclient.InferInput("input", list(x.shape), "FP32")
        inp.set_data_from_numpy(x, binary_data=True)
        got_v2 = client.infer(name, [inp]).as_numpy("output")
    finally:
        client.close()
    assert np.abs(got_v2 - want).max() < TOL


def test_an_input_the_program_was_not_exported_for_is_a_422(served: tuple[Server, dict[str, Any]]) -> None:
    """The U-Net was exported for heights and widths from 32: its own guard refuses 20 x 20."""
    server, _ = served
    image = np.zeros((1, 3, 20, 20), dtype=np.float32)
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(image.shape), "data": image.ravel().tolist()}]}
    r = httpx.post(f"{server.url}/v2/models/unet_pt2/infer", json=body, timeout=60)
    assert r.status_code in (400, 422) and "does not take this input" in r.json()["error"], r.text
    assert httpx.get(f"{server.url}/v2/models/unet_pt2/ready").status_code == 200
