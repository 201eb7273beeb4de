"""torchvision ResNets modified the way users' training code modifies them.

Attribute names are the checkpoint contract: ``fc.fc1``/``fc.fc2`` for the
replaced head, ``net.*`` plus ``fc_add``/``fc1`` for the wrappers. Backbones are
always built with ``weights=None``: the checkpoint supplies every weight, and a
server must never download anything.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn
from torchvision.models import resnet
from torchvision.models.resnet import ResNet

from app.nets import register_net

BACKBONES: dict[str, Callable[..., ResNet]] = {
    "resnet18": resnet.resnet18,
    "resnet34": resnet.resnet34,
    "resnet50": resnet.resnet50,
    "resnet101": resnet.resnet101,
}
IMAGENET_CLASSES = 1000
"""Width of the backbone's own fc, which the wrappers keep and build on."""


def make_backbone(backbone: str) -> ResNet:
    """An untrained torchvision ResNet with its 1000-way fc; ValueError for unknown names."""
    try:
        factory = BACKBONES[backbone]
    except KeyError:
        raise ValueError(f"unknown backbone {backbone!r}; allowed: {', '.join(BACKBONES)}") from None
    return factory(weights=None)


def _check_positive(**values: int) -> None:
    for key, value in values.items():
        if value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value}")


def _as_columns(scalar: torch.Tensor, like: torch.Tensor, n_extra: int) -> torch.Tensor:
    """(B,) becomes (B, 1); (B, n_extra) stays; cast to the features' dtype and device."""
    if scalar.dim() == 1:
        scalar = scalar.unsqueeze(1)
    if scalar.dim() != 2 or scalar.shape != (like.size(0), n_extra):
        batch = like.size(0)
        allowed = f"({batch},) or ({batch}, 1)" if n_extra == 1 else f"({batch}, {n_extra})"
        raise ValueError(f"scalar must have shape {allowed}; got {tuple(scalar.shape)}")
    return scalar.to(device=like.device, dtype=like.dtype)


class ResNetExtra(nn.Module):
    """ResNet whose 1000 logits are joined by extra scalar inputs before the class head."""

    def __init__(self, net: ResNet, num_classes: int, n_extra: int = 1) -> None:
        super().__init__()
        self.n_extra = n_extra
        self.num_classes = num_classes
        self.net = net
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc_add = nn.Linear(IMAGENET_CLASSES + n_extra, num_classes)
        self.output = nn.Softmax(dim=1)

    def forward(self, image: torch.Tensor, scalar: torch.Tensor) -> torch.Tensor:
        x = self.net(image)
        x = torch.cat([self.dropout(self.relu(x)), _as_columns(scalar, x, self.n_extra)], dim=1)
        return self.output(self.fc_add(x))


class ResNetDual(nn.Module):
    """ResNet answering class probabilities and its raw 1000-dim features (e.g. for retrieval)."""

    def __init__(self, net: ResNet, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.net = net
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc1 = nn.Linear(IMAGENET_CLASSES, num_classes)
        self.output = nn.Softmax(dim=1)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(image)
        probs = self.output(self.fc1(self.dropout(self.relu(features))))
        return probs, features


class ResNetExtraDual(ResNetExtra):
    """ResNetExtra that also answers the backbone's 1000-dim features (same layers and keys)."""

    def forward(self, image: torch.Tensor, scalar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(image)
        x = torch.cat([self.dropout(self.relu(features)), _as_columns(scalar, features, self.n_extra)], dim=1)
        return self.output(self.fc_add(x)), features


@register_net("resnet50_head", task="classification", heads=("probs",), head_shapes=(("num_classes",),))
def resnet50_head(*, num_classes: int = 10, backbone: str = "resnet50") -> ResNet:
    """torchvision ResNet whose fc is replaced by a small MLP ending in softmax."""
    _check_positive(num_classes=num_classes)
    net = make_backbone(backbone)
    in_features = net.fc.in_features
    net.fc = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(in_features, 128),
            relu1=nn.ReLU(),
            dropout1=nn.Dropout(0.5),
            fc2=nn.Linear(128, num_classes),
            output=nn.Softmax(dim=1),
        )
    )
    return net


@register_net(
    "resnet50_extra", task="classification", heads=("probs",), takes_extra=True, head_shapes=(("num_classes",),)
)
def resnet50_extra(*, num_classes: int = 10, n_extra: int = 1, backbone: str = "resnet50") -> ResNetExtra:
    """Image plus ``n_extra`` scalars in, class probabilities out."""
    _check_positive(num_classes=num_classes, n_extra=n_extra)
    return ResNetExtra(make_backbone(backbone), num_classes, n_extra)


@register_net(
    "resnet50_dual", task="classification", heads=("probs", "features"),
    head_shapes=(("num_classes",), (IMAGENET_CLASSES,)), ignored_inputs=("scalar",),
)
def resnet50_dual(*, num_classes: int = 10, backbone: str = "resnet50") -> ResNetDual:
    """Image in, (probabilities, 1000-dim features) out."""
    _check_positive(num_classes=num_classes)
    return ResNetDual(make_backbone(backbone), num_classes)


@register_net(
    "resnet50_extra_dual", task="classification", heads=("probs", "features"), takes_extra=True,
    head_shapes=(("num_classes",), (IMAGENET_CLASSES,)),
)
def resnet50_extra_dual(
    *, num_classes: int = 10, n_extra: int = 1, backbone: str = "resnet50"
) -> ResNetExtraDual:
    """Image plus ``n_extra`` scalars in, (probabilities, 1000-dim features) out."""
    _check_positive(num_classes=num_classes, n_extra=n_extra)
    return ResNetExtraDual(make_backbone(backbone), num_classes, n_extra)
