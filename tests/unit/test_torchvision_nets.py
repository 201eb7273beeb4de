"""Any torchvision classifier or segmenter by name: keys, loading as users save, inspect, refusals."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
from torch import nn
from torchvision import models as tvm

from app.errors import ConfigError, UnsafeCheckpoint
from app.loading import CheckpointSpec, inspect_checkpoint, load_checkpoint
from app.loading.inspect import fit_architectures
from app.nets import get_net, net_spec
from app.nets.torchvision_nets import classification_names, segmentation_names
from app.store.model_config import parse_model_config


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def on_meta(fn: Any, *args: Any, **kwargs: Any) -> nn.Module:
    with torch.device("meta"):
        return fn(*args, **kwargs)


def test_specs() -> None:
    cls, seg = net_spec("torchvision"), net_spec("torchvision_segmentation")
    assert (cls.task, cls.heads, cls.defaults["name"], cls.defaults["num_classes"]) == (
        "classification", ("logits",), "resnet50", 1000)
    assert (seg.task, seg.heads, seg.defaults["name"]) == ("segmentation", ("logits",), "fcn_resnet50")
    assert cls.head_shape("logits", {"num_classes": 7}) == (-1, 7)
    assert seg.head_shape("logits", {"num_classes": 3}) == (-1, 3, -1, -1)
    assert "resnet152" in classification_names() and "vit_b_16" in classification_names()
    assert set(segmentation_names()) == set(tvm.list_models(module=tvm.segmentation))


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("resnet152", {}), ("wide_resnet50_2", {}), ("vgg16_bn", {}), ("mobilenet_v3_small", {}),
        ("densenet121", {}), ("efficientnet_b0", {}), ("convnext_tiny", {}), ("vit_b_16", {"image_size": 64}),
        ("inception_v3", {"aux_logits": False}), ("googlenet", {"aux_logits": True}),
    ],
)
def test_keys_equal_torchvisions_own(name: str, extra: dict[str, Any]) -> None:
    ours = on_meta(get_net, "torchvision", name=name, num_classes=7, **extra)
    if name in ("inception_v3", "googlenet"):
        extra = {**extra, "init_weights": False}  # torchvision warns when it is left unset
    theirs = on_meta(tvm.get_model, name, weights=None, num_classes=7, **extra)
    assert type(ours) is type(theirs)
    assert list(shapes(ours)) == list(shapes(theirs)) and shapes(ours) == shapes(theirs)


@pytest.mark.parametrize(("name", "aux"), [("fcn_resnet50", True), ("deeplabv3_resnet101", False),
                                           ("lraspp_mobilenet_v3_large", False)])
def test_segmentation_keys_equal_torchvisions_own(name: str, aux: bool) -> None:
    ours = on_meta(get_net, "torchvision_segmentation", name=name, num_classes=4, aux_loss=aux)
    kwargs = {"aux_loss": True} if aux else {}
    theirs = on_meta(tvm.get_model, name, weights=None, weights_backbone=None, num_classes=4, **kwargs)
    assert shapes(ours) == shapes(theirs)


def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out["out"] if isinstance(out, dict) else out


@pytest.fixture(scope="module")
def resnet18_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A user's resnet18 saved every way users save it."""
    root = tmp_path_factory.mktemp("tv")
    torch.manual_seed(0)
    users = torchvision.models.resnet18(num_classes=7).eval()
    torch.save(users, root / "whole.pt")
    torch.save(users.state_dict(), root / "sd.pt")
    torch.save(nn.DataParallel(users).state_dict(), root / "dp.pt")
    torch.save({"state_dict": users.state_dict(), "epoch": 3}, root / "wrapped.pt")
    return root, users


@pytest.mark.parametrize(("file", "kind", "dp"), [("whole.pt", "whole_model", False), ("sd.pt", "state_dict", False),
                                                  ("dp.pt", "state_dict", True),
                                                  ("wrapped.pt", "wrapped_state_dict", False)])
def test_resnet18_loads_every_way(resnet18_files: tuple[Path, nn.Module], file: str, kind: str, dp: bool) -> None:
    root, users = resnet18_files
    loaded = load_checkpoint("torchvision", {"name": "resnet18", "num_classes": 7}, CheckpointSpec(root / file))
    assert (loaded.kind, loaded.dataparallel) == (kind, dp)
    assert type(loaded.model) is torchvision.models.ResNet and not loaded.model.training
    x = torch.randn(2, 3, 40, 40)
    assert (_forward(loaded.model, x) - _forward(users, x)).abs().max().item() < 1e-5


def test_wrong_arguments_say_what_differs(resnet18_files: tuple[Path, nn.Module]) -> None:
    root, _ = resnet18_files
    from app.errors import StateDictMismatch

    with pytest.raises(StateDictMismatch) as info:
        load_checkpoint("torchvision", {"name": "resnet18", "num_classes": 5}, CheckpointSpec(root / "sd.pt"))
    assert "fc.weight" in info.value.message
    with pytest.raises(UnsafeCheckpoint) as refused:  # a whole resnet18 is not a resnet34's classes
        load_checkpoint("torchvision", {"name": "vgg11", "num_classes": 7}, CheckpointSpec(root / "whole.pt"))
    assert "torchvision.models.resnet" in refused.value.message


@pytest.mark.parametrize("name", ["mobilenet_v3_small", "squeezenet1_1", "efficientnet_b0", "mnasnet0_5"])
def test_other_families_whole_and_state_dict(tmp_path: Path, name: str) -> None:
    torch.manual_seed(1)
    users = tvm.get_model(name, weights=None, num_classes=5).eval()
    torch.save(users, tmp_path / "whole.pt")
    torch.save(users.state_dict(), tmp_path / "sd.pt")
    x = torch.randn(1, 3, 64, 64)
    for file in ("whole.pt", "sd.pt"):
        loaded = load_checkpoint("torchvision", {"name": name, "num_classes": 5}, CheckpointSpec(tmp_path / file))
        assert (_forward(loaded.model, x) - _forward(users, x)).abs().max().item() < 1e-5


def test_segmentation_answers_its_out_tensor(tmp_path: Path) -> None:
    torch.manual_seed(2)
    users = tvm.get_model("lraspp_mobilenet_v3_large", weights=None, weights_backbone=None, num_classes=3).eval()
    torch.save(users, tmp_path / "whole.pt")
    torch.save(users.state_dict(), tmp_path / "sd.pt")
    x = torch.randn(1, 3, 48, 40)
    args = {"name": "lraspp_mobilenet_v3_large", "num_classes": 3}
    for file in ("whole.pt", "sd.pt"):
        model = load_checkpoint("torchvision_segmentation", args, CheckpointSpec(tmp_path / file)).model
        with torch.no_grad():
            out = model(x)
        assert isinstance(out, torch.Tensor) and out.shape == (1, 3, 48, 40)
        assert (out - _forward(users, x)).abs().max().item() < 1e-5


def test_whole_pickles_that_store_functions_are_refused(tmp_path: Path) -> None:
    """vit_* keeps functools.partial(LayerNorm) as an attribute: no weights-only load (its state_dict loads)."""
    users = tvm.get_model("vit_b_32", weights=None, num_classes=2, image_size=32).eval()
    torch.save(users, tmp_path / "whole.pt")
    args = {"name": "vit_b_32", "num_classes": 2, "image_size": 32}
    with pytest.raises(UnsafeCheckpoint) as info:
        load_checkpoint("torchvision", args, CheckpointSpec(tmp_path / "whole.pt"))
    assert "functools.partial" in info.value.message


@pytest.mark.parametrize(
    ("arch", "arguments", "needle"),
    [
        ("torchvision", {"name": "resnet9000"}, "unknown torchvision model 'resnet9000'"),
        ("torchvision", {"name": "fcn_resnet50"}, 'use architecture = "torchvision_segmentation"'),
        ("torchvision_segmentation", {"name": "resnet18"}, 'use architecture = "torchvision"'),
        ("torchvision", {"name": "fasterrcnn_resnet50_fpn"}, "unknown torchvision model"),
        ("torchvision", {"name": "regnet_y_400mf"}, "not supported"),
        ("torchvision", {"name": "resnet18", "image_size": 64}, "does not take argument 'image_size'"),
        ("torchvision", {"name": "resnet18", "num_classes": 0}, "num_classes must be a positive integer"),
        ("torchvision", {"name": "resnet18", "num_classes": 10**9}, "would need"),
        ("torchvision_segmentation", {"name": "lraspp_mobilenet_v3_large", "aux_loss": True}, "no auxiliary"),
    ],
)
def test_bad_arguments_are_config_errors(tmp_path: Path, arch: str, arguments: dict[str, Any], needle: str) -> None:
    torch.save({"x": torch.zeros(1)}, tmp_path / "sd.pt")
    with pytest.raises(ConfigError) as info:
        load_checkpoint(arch, arguments, CheckpointSpec(tmp_path / "sd.pt"))
    assert needle in info.value.message


def test_model_toml_rejects_arguments_the_builder_does_not_take() -> None:
    ok = parse_model_config({"architecture": "torchvision", "arguments": {"name": "resnet152"}}, source="m")
    assert ok.arguments == {"name": "resnet152"}
    with pytest.raises(ConfigError) as info:
        parse_model_config({"architecture": "torchvision", "arguments": {"weights": "DEFAULT"}}, source="m")
    assert "unknown arguments for torchvision: weights" in info.value.message


# --- inspect -------------------------------------------------------------------------------------


def _meta_state(fn: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
    return on_meta(fn, *args, **kwargs).state_dict()


@pytest.mark.parametrize(
    "name",
    ["resnet18", "resnet34", "resnet50", "resnet152", "wide_resnet50_2", "resnext50_32x4d", "resnext101_64x4d",
     "vgg11", "vgg16_bn", "alexnet", "densenet121", "mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small"],
)
def test_inspect_recognises_classifiers(name: str) -> None:
    fits = fit_architectures(_meta_state(tvm.get_model, name, weights=None, num_classes=11))
    assert [(f.arch, f.kwargs) for f in fits] == [("torchvision", {"name": name, "num_classes": 11})]


@pytest.mark.parametrize(("name", "aux"), [("fcn_resnet50", True), ("deeplabv3_resnet101", False),
                                           ("deeplabv3_mobilenet_v3_large", True),
                                           ("lraspp_mobilenet_v3_large", False)])
def test_inspect_recognises_segmenters(name: str, aux: bool) -> None:
    kwargs = {"aux_loss": True} if aux else {}
    state = _meta_state(tvm.get_model, name, weights=None, weights_backbone=None, num_classes=5, **kwargs)
    fits = fit_architectures(state)
    assert [(f.arch, f.kwargs) for f in fits] == [
        ("torchvision_segmentation", {"name": name, "num_classes": 5, "aux_loss": aux})]


def test_inspect_prints_the_model_toml(resnet18_files: tuple[Path, nn.Module]) -> None:
    import tomllib

    root, _ = resnet18_files
    for file in ("whole.pt", "sd.pt", "dp.pt"):
        facts = inspect_checkpoint(root / file)
        assert [str(f) for f in facts.fits] == ["torchvision(name='resnet18', num_classes=7)"]
    text = facts.to_text()
    assert "model.toml:" in text
    toml_text = "\n".join(line[4:] for line in text.split("model.toml:\n", 1)[1].splitlines())
    cfg = parse_model_config(tomllib.loads(toml_text), source="printed")
    assert (cfg.architecture, cfg.arguments) == ("torchvision", {"name": "resnet18", "num_classes": 7})


def test_builtin_architectures_still_fit_alone() -> None:
    """A resnet50_head state_dict is not mistaken for a plain torchvision model, and vice versa."""
    fits = fit_architectures(_meta_state(get_net, "resnet50_head", num_classes=4, backbone="resnet18"))
    assert [f.arch for f in fits] == ["resnet50_head"]


def test_the_docs_examples_parse_and_build() -> None:
    """Every model.toml example for the new kinds in docs/model-store.md is valid and builds (on meta)."""
    import re
    import tomllib

    text = (Path(__file__).resolve().parents[2] / "docs" / "model-store.md").read_text()
    blocks = [b for b in re.findall(r"```toml\n(.*?)```", text, re.S)
              if re.search(r'architecture = "(torchvision|torchvision_segmentation|layer_stack|tensor_stack)"', b)]
    assert len(blocks) >= 4
    for block in blocks:
        cfg = parse_model_config(tomllib.loads(block), source="docs")
        net = on_meta(get_net, cfg.architecture, **cfg.arguments)
        assert net_spec(cfg.architecture).num_classes(cfg.arguments) >= 1 and len(shapes(net)) > 0
