"""Any torchvision classification or segmentation model, by name, optionally with a declared head.

``architecture = "torchvision"`` with ``[arguments] name = "resnet152"`` builds
``torchvision.models.get_model(name, weights=None, num_classes=...)``: the checkpoint supplies
every weight and nothing is ever downloaded. Classifiers answer raw **logits** (torchvision's
models end in a Linear layer; argmax, hence the native ``label``, is the same as for
probabilities). ``head_attribute`` + ``head`` replace one submodule (``fc``, ``classifier``,
``classifier.6``, ...) by a declared layer stack (app/nets/layers.py), for the common
"swap the fc for a small MLP" fine-tune.

``architecture = "torchvision_segmentation"`` builds the models of
``torchvision.models.segmentation`` (``weights_backbone=None`` as well). They answer a dict
``{"out": ..., "aux": ...}``; a forward hook on the built model returns its ``out`` tensor, so the
segmenter runtime gets per-pixel logits and the state_dict keys stay torchvision's own.

The task of a registry entry is fixed, so the two families are two architectures; a name of the
other family is refused with a hint.
"""

from __future__ import annotations

import functools
import inspect
import re
import typing
from collections.abc import Mapping
from typing import Any

from torch import nn
from torchvision import models as tvm

from app.nets import register_net
from app.nets.layers import build_stack, check_classes

NO_META_BUILD = ("regnet_",)
"""Name prefixes whose builders compute their layout with tensor ops that fail on the meta device
(the loader's memory probe): not served yet."""


@functools.cache
def classification_names() -> tuple[str, ...]:
    names = tvm.list_models(module=tvm)
    return tuple(n for n in names if not n.startswith(NO_META_BUILD))


@functools.cache
def segmentation_names() -> tuple[str, ...]:
    return tuple(tvm.list_models(module=tvm.segmentation))


def _check_name(name: Any, allowed: tuple[str, ...], other: tuple[str, ...], other_arch: str) -> str:
    if not isinstance(name, str) or name not in allowed:
        if isinstance(name, str) and name in other:
            raise ValueError(f"{name!r} is a {other_arch.split('_')[-1]} model: use architecture = \"{other_arch}\"")
        if isinstance(name, str) and name.startswith(NO_META_BUILD):
            raise ValueError(f"{name!r} is not supported (its builder cannot run on the meta device)")
        raise ValueError(f"unknown torchvision model {name!r}; known: {', '.join(allowed)}")
    return name


def _accepts(builder: Any, key: str) -> bool:
    """Whether the torchvision builder takes ``key``: its own parameter, or (through **kwargs) one of
    the model class's constructor parameters."""
    params = inspect.signature(builder).parameters
    if key in params and params[key].kind is not inspect.Parameter.VAR_KEYWORD:
        return True
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return False
    cls = typing.get_type_hints(builder).get("return")
    if not isinstance(cls, type):
        return False
    return key in inspect.signature(cls.__init__).parameters


def _extras(name: str, builder: Any, extras: Mapping[str, Any]) -> dict[str, Any]:
    """The extra builder arguments that were set (not None), each checked against the builder."""
    out: dict[str, Any] = {}
    for key, value in extras.items():
        if value is None:
            continue
        if not _accepts(builder, key):
            raise ValueError(f"torchvision model {name!r} does not take argument {key!r}")
        out[key] = value
    return out


def _replace(net: nn.Module, attribute: Any, head: Any, num_classes: int) -> None:
    """Put the declared stack where ``attribute`` (a dotted submodule path) was."""
    if not isinstance(attribute, str) or not re.fullmatch(r"[A-Za-z_]\w*(\.\w+)*", attribute):
        raise ValueError(f"head_attribute must be a dotted submodule name like 'fc' or 'classifier.6', got {attribute!r}")
    parent_path, _, child = attribute.rpartition(".")
    try:
        parent = net.get_submodule(parent_path)
        parent.get_submodule(child)
    except AttributeError:
        children = ", ".join(name for name, _ in net.named_children())
        raise ValueError(f"head_attribute {attribute!r}: no such submodule (top-level ones: {children})") from None
    stack = build_stack(head, path="head")
    check_classes(stack, num_classes, "head")
    setattr(parent, child, stack)


def _positive(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    return num_classes


@register_net("torchvision", task="classification", heads=("logits",), head_shapes=(("num_classes",),))
def torchvision_classifier(
    *,
    name: str = "resnet50",
    num_classes: int = 1000,
    head_attribute: str | None = None,
    head: list[dict[str, Any]] | None = None,
    aux_logits: bool | None = None,
    transform_input: bool | None = None,
    image_size: int | None = None,
) -> nn.Module:
    """A torchvision classifier (``weights=None``) answering logits; optionally with a declared head.

    ``aux_logits`` / ``transform_input`` (googlenet, inception_v3) and ``image_size`` (vit_*) are
    passed on only when set, and only to builders that take them.
    """
    name = _check_name(name, classification_names(), segmentation_names(), "torchvision_segmentation")
    _positive(num_classes)
    if (head is None) != (head_attribute is None):
        raise ValueError("head and head_attribute go together: set both (or neither)")
    builder = tvm.get_model_builder(name)
    kwargs = _extras(
        name, builder, {"aux_logits": aux_logits, "transform_input": transform_input, "image_size": image_size}
    )
    if _accepts(builder, "init_weights"):
        kwargs.setdefault("init_weights", False)  # the checkpoint sets every weight; also avoids a FutureWarning
    net = builder(weights=None, num_classes=num_classes, **kwargs)
    if head_attribute is not None:
        _replace(net, head_attribute, head, num_classes)
    return net


def _main_output(_module: nn.Module, _args: Any, output: Any) -> Any:
    """Forward hook: torchvision segmenters answer {"out": logits, "aux": ...}; serve ``out``."""
    if isinstance(output, Mapping):
        return output["out"]
    return output


@register_net(
    "torchvision_segmentation", task="segmentation", heads=("logits",), head_shapes=(("num_classes", -1, -1),)
)
def torchvision_segmenter(*, name: str = "fcn_resnet50", num_classes: int = 21, aux_loss: bool = False) -> nn.Module:
    """A torchvision segmentation model (``weights=None, weights_backbone=None``) answering its ``out`` logits.

    ``aux_loss = true`` builds the auxiliary classifier too (checkpoints trained with it have
    ``aux_classifier.*`` keys); it is not served.
    """
    name = _check_name(name, segmentation_names(), classification_names(), "torchvision")
    _positive(num_classes)
    if not isinstance(aux_loss, bool):
        raise ValueError(f"aux_loss must be true or false, got {aux_loss!r}")
    builder = tvm.get_model_builder(name)
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes}
    if aux_loss:
        if "aux_loss" not in inspect.signature(builder).parameters:
            raise ValueError(f"torchvision model {name!r} has no auxiliary classifier (aux_loss)")
        kwargs["aux_loss"] = True
    net = builder(**kwargs)
    net.register_forward_hook(_main_output)
    return net


# --- recognising a state_dict (for ``modserve inspect``) -------------------------------------------

_RESNETS: dict[tuple[str, tuple[int, ...]], tuple[str, ...]] = {
    ("basic", (2, 2, 2, 2)): ("resnet18",),
    ("basic", (3, 4, 6, 3)): ("resnet34",),
    ("bottleneck", (3, 4, 6, 3)): ("resnet50", "resnext50_32x4d", "wide_resnet50_2"),
    ("bottleneck", (3, 4, 23, 3)): ("resnet101", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet101_2"),
    ("bottleneck", (3, 8, 36, 3)): ("resnet152",),
}
_VGG_CONVS = {8: "vgg11", 10: "vgg13", 13: "vgg16", 16: "vgg19"}
_DENSENET_BLOCK3 = {24: "densenet121", 36: "densenet161", 32: "densenet169", 48: "densenet201"}


def _blocks(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    rx = re.compile(pattern)
    return len({m.group(1) for k in shapes if (m := rx.match(k))})


def _resnet_names(shapes: Mapping[str, tuple[int, ...]], prefix: str = "") -> tuple[str, ...]:
    if f"{prefix}conv1.weight" not in shapes or f"{prefix}layer1.0.conv1.weight" not in shapes:
        return ()
    block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in shapes else "basic"
    counts = tuple(_blocks(shapes, re.escape(prefix) + rf"layer{i}\.(\d+)\.") for i in range(1, 5))
    return _RESNETS.get((block, counts), ())


def guess_classifiers(shapes: Mapping[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Candidate ``torchvision`` arguments for a state_dict (resnet/resnext/wide_resnet, vgg, alexnet,
    densenet, mobilenet families); the caller verifies each by building it on the meta device."""
    out: list[dict[str, Any]] = []
    if "fc.weight" in shapes:
        out += [{"name": n, "num_classes": shapes["fc.weight"][0]} for n in _resnet_names(shapes)]
    if "classifier.6.weight" in shapes and "features.0.weight" in shapes:
        convs = sum(1 for k, s in shapes.items() if re.fullmatch(r"features\.\d+\.weight", k) and len(s) == 4)
        classes = shapes["classifier.6.weight"][0]
        if convs == 5:
            out.append({"name": "alexnet", "num_classes": classes})
        elif convs in _VGG_CONVS:
            bn = any(re.fullmatch(r"features\.\d+\.running_mean", k) for k in shapes)
            out.append({"name": _VGG_CONVS[convs] + ("_bn" if bn else ""), "num_classes": classes})
    if "classifier.weight" in shapes and "features.conv0.weight" in shapes:
        name = _DENSENET_BLOCK3.get(_blocks(shapes, r"features\.denseblock3\.denselayer(\d+)\."))
        if name:
            out.append({"name": name, "num_classes": shapes["classifier.weight"][0]})
    if "classifier.1.weight" in shapes and "features.18.0.weight" in shapes:
        out.append({"name": "mobilenet_v2", "num_classes": shapes["classifier.1.weight"][0]})
    if "classifier.3.weight" in shapes and "classifier.0.weight" in shapes and "features.0.0.weight" in shapes:
        size = {960: "mobilenet_v3_large", 576: "mobilenet_v3_small"}.get(shapes["classifier.0.weight"][-1])
        if size:
            out.append({"name": size, "num_classes": shapes["classifier.3.weight"][0]})
    return out


def guess_segmenters(shapes: Mapping[str, tuple[int, ...]]) -> list[dict[str, Any]]:
    """Candidate ``torchvision_segmentation`` arguments for a state_dict (fcn, deeplabv3, lraspp)."""
    aux = any(k.startswith("aux_classifier.") for k in shapes)
    out: list[dict[str, Any]] = []
    if "classifier.4.weight" in shapes:
        classes = shapes["classifier.4.weight"][0]
        head = "deeplabv3" if "classifier.0.convs.0.0.weight" in shapes else "fcn"
        for backbone in _resnet_names(shapes, "backbone."):
            out.append({"name": f"{head}_{backbone}", "num_classes": classes, "aux_loss": aux})
        if "backbone.0.0.weight" in shapes and head == "deeplabv3":
            out.append({"name": "deeplabv3_mobilenet_v3_large", "num_classes": classes, "aux_loss": aux})
    if "classifier.low_classifier.weight" in shapes:
        out.append({"name": "lraspp_mobilenet_v3_large", "num_classes": shapes["classifier.low_classifier.weight"][0],
                    "aux_loss": False})
    return out


GUESSERS = {"torchvision": guess_classifiers, "torchvision_segmentation": guess_segmenters}
"""Architecture -> candidate arguments from a state_dict's shapes (app/loading/inspect.py uses them)."""

__all__ = ["GUESSERS", "classification_names", "segmentation_names", "torchvision_classifier", "torchvision_segmenter"]
