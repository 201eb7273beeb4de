"""Programs written by ``torch.export.save`` (``.pt2``): the way to serve a model whose class modserve
cannot build. Nothing is built here: the loader reads the archive (app/loading/exported.py) and
wraps its module in ``ExportedNet``; model.toml declares the family, the inputs and the outputs.

- ``exported_classifier``: an image (and ``n_extra`` scalars when > 0) in; ``outputs`` names the
  forward's outputs in order, the first holding ``num_classes`` values;
- ``exported_segmenter``: an image in, per-pixel logits (``num_classes`` channels) out;
- ``exported_tensor``: a tensor of ``input_shape`` per item in, ``num_outputs`` values out.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.nets import register_net

if TYPE_CHECKING:
    from app.nets import NetSpec


class ExportedNet(nn.Module):
    """An exported program's module behind nn.Module's usual surface.

    ``eval()`` only sets a flag: train/eval behaviour (dropout, batch norm) was fixed when the
    program was exported, and the exported module refuses ``train``/``eval`` calls itself.
    """

    def __init__(self, program: nn.Module, *, inputs: int, outputs: int) -> None:
        super().__init__()
        self.program = program
        self.n_inputs, self.n_outputs = inputs, outputs

    def train(self, mode: bool = True) -> "ExportedNet":
        self.training = mode
        return self

    def forward(self, *args: torch.Tensor) -> Any:
        return self.program(*args)


def _needs_archive(name: str) -> ExportedNet:
    raise ValueError(f"'{name}' is loaded from a .pt2 archive written by torch.export.save, not built")


def _positive(**values: Any) -> None:
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r}")


def _output_names(outputs: Any) -> tuple[str, ...]:
    if (not isinstance(outputs, (list, tuple)) or not 1 <= len(outputs) <= 16
            or not all(isinstance(o, str) and o.isidentifier() for o in outputs) or len(set(outputs)) != len(outputs)):
        raise ValueError(f"outputs must be 1 to 16 distinct names, got {outputs!r}")
    return tuple(outputs)


def _classifier_spec(spec: NetSpec, arguments: dict[str, Any]) -> NetSpec:
    args = {**spec.defaults, **arguments}
    heads = _output_names(args["outputs"])
    _positive(num_classes=args["num_classes"])
    if isinstance(args["n_extra"], bool) or not isinstance(args["n_extra"], int) or not 0 <= args["n_extra"] <= 64:
        raise ValueError(f"n_extra must be an integer from 0 to 64, got {args['n_extra']!r}")
    return dataclasses.replace(
        spec, heads=heads, head_shapes=(("num_classes",), *((-1,) for _ in heads[1:])),
        takes_extra=int(args["n_extra"]) > 0,
    )


@register_net("exported_classifier", task="classification", heads=("probs",), head_shapes=(("num_classes",),),
              resolve=_classifier_spec)
def exported_classifier(*, outputs: tuple[str, ...] = ("probs",), num_classes: int = 10, n_extra: int = 0) -> ExportedNet:
    """An image (plus ``n_extra`` scalars) in; the outputs named in ``outputs``."""
    return _needs_archive("exported_classifier")


@register_net("exported_segmenter", task="segmentation", heads=("logits",), head_shapes=(("num_classes", -1, -1),))
def exported_segmenter(*, num_classes: int = 2) -> ExportedNet:
    """An image in, ``num_classes`` channels of per-pixel logits out."""
    return _needs_archive("exported_segmenter")


@register_net("exported_tensor", task="tensor", heads=("output",), head_shapes=(("num_outputs",),), classes="num_outputs")
def exported_tensor(*, input_shape: tuple[int, ...] = (), num_outputs: int = 10) -> ExportedNet:
    """A tensor of ``input_shape`` per item in, ``num_outputs`` values out."""
    return _needs_archive("exported_tensor")
