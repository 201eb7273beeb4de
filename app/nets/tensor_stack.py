"""Tensor-in models declared as a stack of layers (the notes' MLP: Linear(784, 256), ReLU,
Linear(256, 10)): the input is a tensor of ``input_shape`` per item, not an image.

Keys are those of the user's own ``nn.Sequential`` (numbered, or named with an OrderedDict), so a
``state_dict`` or a whole-model pickle of it loads as it is.
"""

from __future__ import annotations

import math
from typing import Any

from torch import nn

from app.nets import register_net
from app.nets.layers import build_stack, output_width

MAX_INPUT_ELEMENTS = 1 << 24


def _input_shape(value: Any) -> tuple[int, ...]:
    if (not isinstance(value, (list, tuple)) or not 1 <= len(value) <= 4
            or any(isinstance(d, bool) or not isinstance(d, int) or d < 1 for d in value)):
        raise ValueError(f"input_shape must be 1 to 4 positive integers (without the batch), got {value!r}")
    if math.prod(value) > MAX_INPUT_ELEMENTS:
        raise ValueError(f"input_shape {list(value)} holds more than {MAX_INPUT_ELEMENTS} values per item")
    return tuple(value)


@register_net(
    "tensor_stack", task="tensor", heads=("output",), head_shapes=(("num_outputs",),), classes="num_outputs"
)
def tensor_stack(
    *, layers: list[dict[str, Any]] | None = None, input_shape: list[int] | None = None, num_outputs: int = 10
) -> nn.Sequential:
    """A stack of layers fed a tensor of ``input_shape`` per item; answers ``num_outputs`` values."""
    if layers is None:
        raise ValueError("layers is required: a list of layer tables")
    _input_shape(input_shape if input_shape is not None else [])
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise ValueError(f"num_outputs must be a positive integer, got {num_outputs!r}")
    stack = build_stack(layers, path="layers")
    width = output_width(stack)
    if width is not None and width != num_outputs:
        raise ValueError(f"layers end with {width} outputs but num_outputs = {num_outputs}: set num_outputs = {width}")
    return stack


def input_shape_of(arguments: dict[str, Any]) -> tuple[int, ...]:
    return _input_shape(arguments.get("input_shape"))
