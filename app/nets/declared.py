"""Models modserve does not build: the checkpoint is the model, model.toml declares its interface.

Two sources, one family each of three names:

- ``exported_*``: a program written by ``torch.export.save`` (``.pt2``), the general way, with no
  Python class at serving time (loaded by app/loading/exported.py into ``ExportedNet``);
- ``python_*``: a whole-model pickle whose classes come from a ``model.py`` beside model.toml,
  imported only when the operator sets ``MODSERVE_ALLOW_MODEL_CODE`` (app/loading/model_code.py).

``*_classifier``: an image (and ``n_extra`` scalars when > 0) in; ``outputs`` names the forward's
outputs in order, the first holding ``num_classes`` values. ``*_segmenter``: an image in,
``num_classes`` channels of per-pixel logits out. ``*_tensor``: a tensor of ``input_shape`` per
item in, ``num_outputs`` values out.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from app.errors import InvalidInput
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
        try:
            return self.program(*args)
        except (AssertionError, RuntimeError) as exc:
            # The program's own checks of its inputs (a shape outside the ranges it was exported for,
            # a guard) make it the request's fault; anything else (out of memory, ...) goes on as it is.
            if isinstance(exc, RuntimeError) and not str(exc).startswith("Expected input at"):
                raise
            raise InvalidInput(f"the exported program does not take this input: {str(exc)[:300]}") from None


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


class PythonNet(nn.Module):
    """A module unpickled with the classes of the operator's ``model.py`` (app/loading/model_code.py)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *args: torch.Tensor) -> Any:
        return self.model(*args)


def _register_family(prefix: str, root: type[nn.Module], source: str) -> None:
    """``{prefix}_classifier``, ``{prefix}_segmenter`` and ``{prefix}_tensor``: nothing to build, the
    checkpoint is the model; model.toml declares its inputs and outputs."""

    def classifier(*, outputs: tuple[str, ...] = ("probs",), num_classes: int = 10, n_extra: int = 0) -> nn.Module:
        raise ValueError(f"'{prefix}_classifier' is loaded from {source}, not built")

    def segmenter(*, num_classes: int = 2) -> nn.Module:
        raise ValueError(f"'{prefix}_segmenter' is loaded from {source}, not built")

    def tensor(*, input_shape: tuple[int, ...] = (), num_outputs: int = 10) -> nn.Module:
        raise ValueError(f"'{prefix}_tensor' is loaded from {source}, not built")

    for builder in (classifier, segmenter, tensor):
        builder.__annotations__["return"] = root
    register_net(f"{prefix}_classifier", task="classification", heads=("probs",), head_shapes=(("num_classes",),),
                 resolve=_classifier_spec)(classifier)
    register_net(f"{prefix}_segmenter", task="segmentation", heads=("logits",),
                 head_shapes=(("num_classes", -1, -1),))(segmenter)
    register_net(f"{prefix}_tensor", task="tensor", heads=("output",), head_shapes=(("num_outputs",),),
                 classes="num_outputs")(tensor)


_register_family("exported", ExportedNet, "a .pt2 archive written by torch.export.save")
_register_family("python", PythonNet, "a whole-model pickle with the classes of the model's model.py")
