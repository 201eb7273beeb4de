"""Declared layer stacks (app/nets/layers.py): keys equal the user's own nn.Sequential, strict validation."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn

from app.errors import ConfigError
from app.loading import CheckpointSpec, load_checkpoint
from app.nets import get_net
from app.nets.layers import LAYER_TYPES, build_stack
from app.store.model_config import parse_model_config
from support.notes import NOTES_HEAD_TOML

HEAD = NOTES_HEAD_TOML
MLP = [
    {"type": "Linear", "in_features": 784, "out_features": 256},
    {"type": "ReLU"},
    {"type": "Linear", "in_features": 256, "out_features": 10},
]


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def meta(fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    with torch.device("meta"):
        return fn(*args, **kwargs)


def users_resnet_with_head(name: str) -> nn.Module:
    """What the notes' training script does: replace fc by Sequential(OrderedDict(...))."""
    net = torchvision.models.get_model(name, weights=None)
    net.fc = nn.Sequential(OrderedDict(
        fc1=nn.Linear(net.fc.in_features, 128), relu1=nn.ReLU(), dropout1=nn.Dropout(0.2),
        fc2=nn.Linear(128, 10), output=nn.Softmax(dim=1),
    ))
    return net


@pytest.mark.parametrize("backbone", ["resnet50", "resnet152"])
def test_declared_head_keys_equal_the_builtin_and_the_users(backbone: str) -> None:
    declared = meta(get_net, "torchvision", name=backbone, num_classes=10, head_attribute="fc", head=HEAD)
    users = meta(users_resnet_with_head, backbone)
    assert list(shapes(declared)) == list(shapes(users))
    assert shapes(declared) == shapes(users)
    if backbone == "resnet50":
        assert shapes(declared) == shapes(meta(get_net, "resnet50_head"))


def test_declared_head_forward_equals_the_users_module(tmp_path: Path) -> None:
    torch.manual_seed(0)
    users = torchvision.models.resnet18(weights=None)
    users.fc = nn.Sequential(OrderedDict(fc1=nn.Linear(512, 16), relu1=nn.ReLU(), fc2=nn.Linear(16, 3),
                                         output=nn.Softmax(dim=1)))
    users.eval()
    torch.save(users.state_dict(), tmp_path / "sd.pth")
    torch.save(users, tmp_path / "whole.pth")
    head = [
        {"name": "fc1", "type": "Linear", "in_features": 512, "out_features": 16},
        {"name": "relu1", "type": "ReLU"},
        {"name": "fc2", "type": "Linear", "in_features": 16, "out_features": 3},
        {"name": "output", "type": "Softmax", "dim": 1},
    ]
    args = {"name": "resnet18", "num_classes": 3, "head_attribute": "fc", "head": head}
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = users(x)
    for file in ("sd.pth", "whole.pth"):
        loaded = load_checkpoint("torchvision", args, CheckpointSpec(tmp_path / file))
        with torch.no_grad():
            assert (loaded.model(x) - want).abs().max().item() < 1e-5


def test_head_on_a_nested_attribute() -> None:
    head = [{"type": "Linear", "in_features": 4096, "out_features": 5}]
    declared = meta(get_net, "torchvision", name="vgg11", num_classes=5, head_attribute="classifier.6", head=head)
    users = meta(torchvision.models.vgg11, weights=None)
    users.classifier[6] = nn.Sequential(nn.Linear(4096, 5))
    assert shapes(declared) == shapes(users)
    assert "classifier.6.0.weight" in shapes(declared)


def test_unnamed_layers_are_numbered_like_sequential() -> None:
    stack = build_stack([
        {"type": "Conv2d", "in_channels": 3, "out_channels": 8, "kernel_size": 3, "padding": 1},
        {"type": "BatchNorm2d", "num_features": 8},
        {"type": "ReLU"},
        {"type": "MaxPool2d", "kernel_size": 2},
        {"type": "AdaptiveAvgPool2d", "output_size": 1},
        {"type": "Flatten"},
        {"name": "classifier", "type": "Linear", "in_features": 8, "out_features": 4},
    ])
    users = nn.Sequential(OrderedDict([
        ("0", nn.Conv2d(3, 8, 3, padding=1)), ("1", nn.BatchNorm2d(8)), ("2", nn.ReLU()), ("3", nn.MaxPool2d(2)),
        ("4", nn.AdaptiveAvgPool2d(1)), ("5", nn.Flatten()), ("classifier", nn.Linear(8, 4)),
    ]))
    assert shapes(stack) == shapes(users) and list(shapes(stack)) == list(shapes(users))
    plain = build_stack(MLP)
    assert shapes(plain) == shapes(nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)))


def test_repeat_expands_to_numbered_copies() -> None:
    stack = build_stack([
        {"type": "Linear", "in_features": 64, "out_features": 64, "repeat": 3},
        {"type": "GELU", "approximate": "tanh"},
    ])
    users = nn.Sequential(*[nn.Linear(64, 64) for _ in range(3)], nn.GELU(approximate="tanh"))
    assert shapes(stack) == shapes(users)
    assert stack[0] is not stack[1]  # copies, not one shared layer
    blocks = build_stack([
        {"type": "Sequential", "repeat": 2, "layers": [
            {"type": "Linear", "in_features": 8, "out_features": 8}, {"type": "BatchNorm1d", "num_features": 8},
            {"type": "Tanh"},
        ]},
        {"name": "out", "type": "Linear", "in_features": 8, "out_features": 2},
    ])
    users_blocks = nn.Sequential(OrderedDict([
        ("0", nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh())),
        ("1", nn.Sequential(nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Tanh())),
        ("out", nn.Linear(8, 2)),
    ]))
    assert list(shapes(blocks)) == list(shapes(users_blocks)) and shapes(blocks) == shapes(users_blocks)
    # nn.ModuleList numbering is the same: blocks.0.weight, blocks.1.weight, ...
    assert [k for k in shapes(blocks) if k.endswith("0.weight")] == ["0.0.weight", "1.0.weight"]


def test_every_layer_type_builds() -> None:
    examples: dict[str, dict[str, Any]] = {
        "Linear": {"in_features": 2, "out_features": 3, "bias": False},
        "Conv2d": {"in_channels": 3, "out_channels": 4, "kernel_size": [3, 1], "stride": 1, "padding": "same",
                   "padding_mode": "reflect"},
        "BatchNorm1d": {"num_features": 3, "eps": 1e-3, "momentum": 0.2},
        "BatchNorm2d": {"num_features": 3, "affine": False},
        "ReLU": {"inplace": False}, "GELU": {}, "Sigmoid": {}, "Tanh": {}, "Dropout": {"p": 0.1},
        "Softmax": {"dim": -1}, "LogSoftmax": {"dim": 1}, "Flatten": {"start_dim": 1},
        "MaxPool2d": {"kernel_size": 2, "stride": 2}, "AvgPool2d": {"kernel_size": 2, "count_include_pad": False},
        "AdaptiveAvgPool2d": {"output_size": [2, 2]}, "Identity": {},
    }
    assert set(examples) == set(LAYER_TYPES)
    for type_name, kwargs in examples.items():
        (layer,) = build_stack([{"type": type_name, **kwargs}])
        assert type(layer) is LAYER_TYPES[type_name].cls


def test_layer_stack_mlp_loads_the_users_sequential(tmp_path: Path) -> None:
    """A whole-model MLP, served as an image classifier on the flattened image (keys unchanged)."""
    torch.manual_seed(0)
    users = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10)).eval()
    declared = get_net("layer_stack", layers=MLP, num_classes=10, flatten_input=True)
    assert shapes(declared) == shapes(users)
    torch.save(users.state_dict(), tmp_path / "sd.pt")
    torch.save(users, tmp_path / "whole.pt")
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        want = users(x.flatten(1))
    for file in ("sd.pt", "whole.pt"):
        loaded = load_checkpoint("layer_stack", {"layers": MLP, "flatten_input": True}, CheckpointSpec(tmp_path / file))
        with torch.no_grad():
            assert (loaded.model(x) - want).abs().max().item() < 1e-5
    plain = load_checkpoint("layer_stack", {"layers": MLP}, CheckpointSpec(tmp_path / "sd.pt")).model
    with torch.no_grad():  # without flatten_input the stack takes the (B, 784) tensor itself
        assert (plain(x.flatten(1)) - want).abs().max().item() < 1e-5


@pytest.mark.parametrize(
    ("layers", "needle"),
    [
        ([{"type": "LSTM", "input_size": 3}], "unknown layer type 'LSTM'"),
        ([{"type": "__import__('os').system('true')"}], "unknown layer type"),
        ([{"type": "torch.nn.Linear", "in_features": 1, "out_features": 1}], "unknown layer type"),
        ([{"type": "Linear", "in_features": 4, "out_features": 2, "device": "cuda"}], "unknown argument 'device'"),
        ([{"type": "Linear", "in_features": 4}], "missing required argument(s) out_features"),
        ([{"type": "Linear", "in_features": True, "out_features": 2}], "in_features must be an integer"),
        ([{"type": "Linear", "in_features": "4", "out_features": 2}], "in_features must be an integer"),
        ([{"type": "Linear", "in_features": 0, "out_features": 2}], "in_features must be between"),
        ([{"type": "Dropout", "p": 2.0}], "p must be between"),
        ([{"type": "Softmax"}], "missing required argument(s) dim"),
        ([{"type": "GELU", "approximate": "exec"}], "approximate must be one of"),
        ([{"type": "ReLU", "name": "a"}, {"type": "Tanh", "name": "a"}], "'a' is used twice"),
        ([{"type": "ReLU", "name": "a.b"}], "name must be a plain identifier"),
        ([{"type": "ReLU", "name": "x", "repeat": 2}], "cannot have a name"),
        ([{"type": "ReLU", "repeat": 0}], "repeat must be"),
        ([{"type": "ReLU", "repeat": 10**6}], "repeat must be"),
        ([{"type": "Identity", "repeat": 256}] * 3, "more than 512 layers"),
        ([{"in_features": 4}], "missing 'type'"),
        (["Linear"], "must be a table"),
        ([], "is empty"),
        ("Linear(3, 4)", "must be a list"),
        ([{"type": "Sequential", "layers": [{"type": "Nope"}]}], "layers[0] (Sequential).layers[0] (Nope)"),
        ([{"type": "Linear", "in_features": 4, "out_features": 3}], "ends with 3 outputs but num_classes = 10"),
    ],
)
def test_bad_stacks_are_config_errors_naming_the_problem(tmp_path: Path, layers: Any, needle: str) -> None:
    torch.save({"x": torch.zeros(1)}, tmp_path / "sd.pt")
    with pytest.raises(ConfigError) as info:
        load_checkpoint("layer_stack", {"layers": layers}, CheckpointSpec(tmp_path / "sd.pt"))
    assert needle in info.value.message


@pytest.mark.parametrize(
    ("arguments", "needle"),
    [
        ({"name": "resnet18", "head": MLP}, "head and head_attribute go together"),
        ({"name": "resnet18", "head_attribute": "fc"}, "head and head_attribute go together"),
        ({"name": "resnet18", "head_attribute": "nope", "head": MLP}, "no such submodule"),
        ({"name": "resnet18", "head_attribute": "fc; import os", "head": MLP}, "dotted submodule name"),
        ({"name": "resnet18", "num_classes": 7, "head_attribute": "fc", "head": MLP},
         "head ends with 10 outputs but num_classes = 7: set num_classes = 10"),
    ],
)
def test_bad_heads(tmp_path: Path, arguments: dict[str, Any], needle: str) -> None:
    torch.save({"x": torch.zeros(1)}, tmp_path / "sd.pt")
    with pytest.raises(ConfigError) as info:
        load_checkpoint("torchvision", arguments, CheckpointSpec(tmp_path / "sd.pt"))
    assert needle in info.value.message


def test_model_toml_takes_a_stack_as_toml_writes_it() -> None:
    import tomllib

    text = """
architecture = "torchvision"
[arguments]
name = "resnet50"
num_classes = 10
head_attribute = "fc"
head = [
  {name = "fc1", type = "Linear", in_features = 2048, out_features = 128},
  {name = "relu1", type = "ReLU"},
  {name = "dropout1", type = "Dropout", p = 0.2},
  {name = "fc2", type = "Linear", in_features = 128, out_features = 10},
  {name = "output", type = "Softmax", dim = 1},
]
"""
    cfg = parse_model_config(tomllib.loads(text), source="model.toml")
    assert cfg.arguments["head"] == HEAD
    net = meta(get_net, cfg.architecture, **cfg.arguments)
    assert shapes(net) == shapes(meta(get_net, "resnet50_head"))
