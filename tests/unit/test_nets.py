"""app.nets: checkpoint compatibility (state_dict keys), forward contracts and the registry.

Fast on CPU: narrow U-Nets, tiny inputs, resnet18 backbones wherever the
ResNet50 itself is not what is being checked.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models import resnet50 as tv_resnet50
from torchvision.models.resnet import ResNet

from app import nets
from app.errors import UnknownArchitecture
from app.nets.resnets import ResNetDual, ResNetExtra, ResNetExtraDual
from app.nets.unet import UNet as OurUNet
from ckpt_helpers import reference_unet_module

ALL_NETS = [
    "exported_classifier", "exported_segmenter", "exported_tensor", "layer_stack", "python_classifier",
    "python_segmenter", "python_tensor", "resnet50_dual", "resnet50_extra", "resnet50_extra_dual", "resnet50_head",
    "tensor_stack", "torchvision", "torchvision_segmentation", "unet",
]
RESNET_NETS = ["resnet50_head", "resnet50_extra", "resnet50_dual", "resnet50_extra_dual"]


# The reference U-Net (same classes, attribute names and layer order), as a user's script defines it.
UNet = reference_unet_module().UNet


# --- helpers -----------------------------------------------------------------------------


def shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def randomize_bn_stats(module: nn.Module, seed: int) -> None:
    """Non-trivial running stats, so eval-mode comparisons exercise every buffer."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)


def build(name: str, seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return nets.get_net(name, **kwargs)


def images(batch: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def first(out: Any) -> torch.Tensor:
    """The probs head, whether the net answers one tensor or a tuple."""
    return out[0] if isinstance(out, tuple) else out


def as_tuple(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def call(model: nn.Module, name: str, image: torch.Tensor, n_extra: int = 1) -> Any:
    if nets.net_spec(name).takes_extra:
        return model(image, torch.rand(image.size(0), n_extra, generator=torch.Generator().manual_seed(2)))
    return model(image)


@pytest.fixture(scope="module")
def resnet50_shapes() -> dict[str, tuple[int, ...]]:
    return shapes(tv_resnet50(weights=None))


# --- U-Net: the reference's checkpoints load unchanged and give the same logits --------------


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_matches_reference(bilinear: bool) -> None:
    torch.manual_seed(0)
    ref = UNet(3, 2, bilinear=bilinear)
    randomize_bn_stats(ref, seed=3)
    ours = nets.get_net("unet", n_channels=3, n_classes=2, bilinear=bilinear)
    assert isinstance(ours, OurUNet)
    assert (ours.n_channels, ours.n_classes, ours.bilinear) == (3, 2, bilinear)

    assert list(ours.state_dict()) == list(ref.state_dict())
    assert shapes(ours) == shapes(ref)
    result = ours.load_state_dict(ref.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    ref.eval(), ours.eval()
    with torch.no_grad():
        for size in [(32, 32), (19, 27)]:
            x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(4))
            expected = ref(x)
            assert expected.shape == (1, 2, *size)
            assert torch.equal(ours(x), expected)


@pytest.mark.parametrize("bilinear", [False, True])
@pytest.mark.parametrize(
    "size", [(1, 1), (5, 7), (15, 16), (16, 16), (17, 23), (31, 33), (32, 32), (37, 53), (64, 48)]
)
def test_unet_logits_keep_any_input_size(bilinear: bool, size: tuple[int, int]) -> None:
    model = build("unet", n_channels=3, n_classes=3, bilinear=bilinear, base_channels=4).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 3, *size)
    assert torch.isfinite(logits).all()


def test_unet_tiny_input_is_zero_padded_then_cropped() -> None:
    """Below 16 px the net sees the input centred in zeros; what it answers is the centre."""
    model = build("unet", base_channels=4).eval()
    x = torch.randn(1, 3, 5, 7)
    padded = F.pad(x, [4, 5, 5, 6])  # 7 -> 16 (4 left, 5 right), 5 -> 16 (5 top, 6 bottom)
    with torch.no_grad():
        assert torch.equal(model(x), model(padded)[..., 5:10, 4:11])


@pytest.mark.parametrize("bilinear", [False, True])
def test_unet_base_channels_scales_every_width(bilinear: bool) -> None:
    model = build("unet", n_channels=1, n_classes=5, bilinear=bilinear, base_channels=4)
    s = shapes(model)
    factor = 2 if bilinear else 1
    assert s["inc.double_conv.0.weight"] == (4, 1, 3, 3)
    assert s["down1.maxpool_conv.1.double_conv.0.weight"] == (8, 4, 3, 3)
    assert s["down3.maxpool_conv.1.double_conv.3.weight"] == (32, 32, 3, 3)
    assert s["down4.maxpool_conv.1.double_conv.3.weight"] == (64 // factor, 64 // factor, 3, 3)
    assert s["up1.conv.double_conv.0.weight"][1] == 64
    assert s["up4.conv.double_conv.3.weight"] == (4, 4, 3, 3)
    assert s["outc.conv.weight"] == (5, 4, 1, 1)
    assert ("up1.up.weight" in s) is not bilinear


def test_unet_default_keys_equal_full_width_reference() -> None:
    assert shapes(nets.get_net("unet")) == shapes(UNet(3, 2))


# --- ResNets: key sets of the real ResNet50 variants ---------------------------------------


def test_resnet50_variants_key_sets(resnet50_shapes: dict[str, tuple[int, ...]]) -> None:
    backbone = {k: v for k, v in resnet50_shapes.items() if not k.startswith("fc.")}
    wrapped = {f"net.{k}": v for k, v in resnet50_shapes.items()}
    assert wrapped["net.fc.weight"] == (1000, 2048)

    head = nets.get_net("resnet50_head")
    assert type(head) is ResNet
    assert shapes(head) == {
        **backbone,
        "fc.fc1.weight": (128, 2048),
        "fc.fc1.bias": (128,),
        "fc.fc2.weight": (10, 128),
        "fc.fc2.bias": (10,),
    }
    assert shapes(nets.get_net("resnet50_extra")) == {
        **wrapped,
        "fc_add.weight": (10, 1001),
        "fc_add.bias": (10,),
    }
    assert shapes(nets.get_net("resnet50_dual")) == {**wrapped, "fc1.weight": (10, 1000), "fc1.bias": (10,)}
    assert shapes(nets.get_net("resnet50_extra_dual", n_extra=3)) == {
        **wrapped,
        "fc_add.weight": (10, 1003),
        "fc_add.bias": (10,),
    }


def test_head_replaces_fc_with_named_mlp() -> None:
    model = build("resnet50_head", num_classes=4, backbone="resnet18")
    assert list(dict(model.fc.named_children())) == ["fc1", "relu1", "dropout1", "fc2", "output"]
    assert model.fc.fc1.in_features == 512  # taken from the replaced fc
    assert isinstance(model.fc.output, nn.Softmax) and model.fc.output.dim == 1


@pytest.mark.parametrize("name", ["resnet50_extra", "resnet50_extra_dual"])
def test_extra_width_follows_n_extra(name: str) -> None:
    model = build(name, num_classes=4, n_extra=3, backbone="resnet18")
    assert (model.n_extra, model.num_classes) == (3, 4)
    assert tuple(model.fc_add.weight.shape) == (4, 1003)
    assert tuple(model.net.fc.weight.shape) == (1000, 512)


# --- ResNets: forward contracts ----------------------------------------------------------


@pytest.mark.parametrize("name", RESNET_NETS)
def test_resnet_outputs_and_eval_determinism(name: str) -> None:
    model = build(name, num_classes=4, backbone="resnet18").eval()
    x = images()
    with torch.no_grad():
        once, twice = call(model, name, x), call(model, name, x)
    spec = nets.net_spec(name)
    heads = as_tuple(once)
    assert len(heads) == len(spec.heads)
    probs = heads[0]
    assert probs.shape == (2, 4)
    assert torch.allclose(probs.sum(dim=1), torch.ones(2), atol=1e-5)
    assert (probs >= 0).all()
    for a, b in zip(heads, as_tuple(twice), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["resnet50_dual", "resnet50_extra_dual"])
def test_dual_features_are_the_backbone_output(name: str) -> None:
    model = build(name, num_classes=4, backbone="resnet18").eval()
    x = images()
    with torch.no_grad():
        probs, features = call(model, name, x)
        backbone = model.net(x)
    assert probs.shape == (2, 4)
    assert features.shape == (2, 1000)
    assert torch.equal(features, backbone)


def test_dual_probs_formula() -> None:
    model = build("resnet50_dual", num_classes=4, backbone="resnet18").eval()
    x = images()
    with torch.no_grad():
        probs, features = model(x)
        assert torch.allclose(probs, torch.softmax(model.fc1(torch.relu(features)), dim=1))


@pytest.mark.parametrize("name", ["resnet50_extra", "resnet50_extra_dual"])
def test_extra_scalar_shapes(name: str) -> None:
    one = build(name, num_classes=4, n_extra=1, backbone="resnet18").eval()
    three = build(name, num_classes=4, n_extra=3, backbone="resnet18").eval()
    x = images()
    with torch.no_grad():
        flat = one(x, torch.tensor([0.5, 2.0]))
        column = one(x, torch.tensor([[0.5], [2.0]], dtype=torch.float64))  # cast to the features' dtype
        assert torch.equal(first(flat), first(column))
        assert first(three(x, torch.rand(2, 3))).shape == (2, 4)
        joined = torch.cat([torch.relu(one.net(x)), torch.tensor([[0.5], [2.0]])], dim=1)
        assert torch.allclose(first(flat), torch.softmax(one.fc_add(joined), dim=1))
        for bad in [torch.rand(2), torch.rand(2, 2), torch.rand(3, 3), torch.rand(2, 3, 1)]:
            with pytest.raises(ValueError, match="scalar must have shape"):
                three(x, bad)


def test_extra_scalar_changes_probs() -> None:
    model = build("resnet50_extra", num_classes=4, backbone="resnet18").eval()
    x = images()
    with torch.no_grad():
        assert not torch.allclose(model(x, torch.zeros(2)), model(x, torch.full((2,), 50.0)))


@pytest.mark.parametrize("name", RESNET_NETS)
def test_state_dict_round_trip(name: str) -> None:
    """A checkpoint of one build loads strictly into a fresh build and answers the same."""
    source = build(name, seed=1, num_classes=3, backbone="resnet18").eval()
    target = build(name, seed=2, num_classes=3, backbone="resnet18")
    target.load_state_dict(source.state_dict(), strict=True)
    target.eval()
    x = images()
    with torch.no_grad():
        a, b = call(source, name, x), call(target, name, x)
    for left, right in zip(as_tuple(a), as_tuple(b), strict=True):
        assert torch.equal(left, right)


@pytest.mark.parametrize("name", RESNET_NETS)
def test_invalid_backbone_names_the_allowed_ones(name: str) -> None:
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50, resnet101"):
        nets.get_net(name, backbone="vgg16")


@pytest.mark.parametrize("name", RESNET_NETS)
def test_builders_never_download(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a builder tried to download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    nets.get_net(name, backbone="resnet18")


@pytest.mark.parametrize("kwargs", [{"num_classes": 0}, {"n_extra": 0}])
def test_non_positive_sizes_rejected(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="positive"):
        nets.get_net("resnet50_extra", backbone="resnet18", **kwargs)


# --- registry ----------------------------------------------------------------------------


def test_list_nets() -> None:
    assert nets.list_nets() == ALL_NETS


def test_unknown_architecture() -> None:
    with pytest.raises(UnknownArchitecture) as info:
        nets.get_net("resnet9000")
    assert str(info.value) == f"unknown architecture 'resnet9000'; known: {', '.join(ALL_NETS)}"
    assert info.value.status_code == 422
    for lookup in (nets.net_spec, nets.builder_params):
        with pytest.raises(UnknownArchitecture):
            lookup("resnet9000")


@pytest.mark.parametrize(
    ("name", "root_class", "task", "takes_extra", "heads"),
    [
        ("unet", OurUNet, "segmentation", False, ("logits",)),
        ("resnet50_head", ResNet, "classification", False, ("probs",)),
        ("resnet50_extra", ResNetExtra, "classification", True, ("probs",)),
        ("resnet50_dual", ResNetDual, "classification", False, ("probs", "features")),
        ("resnet50_extra_dual", ResNetExtraDual, "classification", True, ("probs", "features")),
    ],
)
def test_net_spec(name: str, root_class: type, task: str, takes_extra: bool, heads: tuple[str, ...]) -> None:
    spec = nets.net_spec(name)
    got = (spec.name, spec.root_class, spec.task, spec.takes_extra, spec.heads)
    assert got == (name, root_class, task, takes_extra, heads)
    assert callable(spec.builder)
    model = spec.builder(**({} if name == "unet" else {"backbone": "resnet18"}))
    assert type(model) is root_class
    assert model.training  # builders return the model as constructed; the loader calls eval()


def test_defaults_and_builder_params() -> None:
    unet_defaults = {"n_channels": 3, "n_classes": 2, "bilinear": False, "base_channels": 64}
    assert nets.net_spec("unet").defaults == unet_defaults
    assert nets.net_spec("resnet50_head").defaults == {"num_classes": 10, "backbone": "resnet50"}
    extra_defaults = {"num_classes": 10, "n_extra": 1, "backbone": "resnet50"}
    assert nets.net_spec("resnet50_extra_dual").defaults == extra_defaults
    assert nets.builder_params("unet") == {"n_channels", "n_classes", "bilinear", "base_channels"}
    assert nets.builder_params("resnet50_dual") == {"num_classes", "backbone"}
    assert nets.builder_params("resnet50_extra") == {"num_classes", "n_extra", "backbone"}
    for name in ALL_NETS:
        assert nets.builder_params(name) == set(nets.net_spec(name).defaults)


def test_spec_is_frozen_and_defaults_cannot_leak() -> None:
    spec = nets.net_spec("unet")
    with pytest.raises(AttributeError):
        spec.task = "classification"  # type: ignore[misc]
    spec.defaults["base_channels"] = 1
    assert nets.net_spec("unet").defaults["base_channels"] == 64


def test_get_net_rejects_unknown_arguments() -> None:
    with pytest.raises(TypeError, match="unknown arguments for unet: depth"):
        nets.get_net("unet", depth=5)


def test_registry_is_closed_to_duplicates_and_bad_builders() -> None:
    def builder(*, n: int = 1) -> nn.Module:
        return nn.Identity()

    with pytest.raises(ValueError, match="already registered"):
        nets.register_net("unet", task="segmentation", heads=("logits",))(builder)

    def positional(n: int = 1) -> nn.Module:
        return nn.Identity()

    def unannotated(*, n: int = 1):  # type: ignore[no-untyped-def]
        return nn.Identity()

    bad: list[Callable[..., Any]] = [positional, unannotated]
    for fn in bad:
        with pytest.raises(TypeError):
            nets.register_net("never_registered", task="classification", heads=("probs",))(fn)
    with pytest.raises(ValueError, match="task"):
        nets.register_net("never_registered", task="detection", heads=("boxes",))  # type: ignore[arg-type]
    assert "never_registered" not in nets.list_nets()
