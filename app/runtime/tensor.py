"""Tensor-in models: each item is a float tensor of the model's declared ``input_shape`` (the native
API's ``{"instances": [[...], ...]}``, a v2 FP32 tensor named ``input``), not an image.

Answers per item: ``output`` (or the name in ``output_names``); with ``labels`` the model is a
classifier and the native answer adds the winning label (the stack's own last layer decides whether
the values are probabilities: end it with Softmax for that).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from app.errors import ConfigError, InvalidInput
from app.nets.tensor_stack import input_shape_of
from app.runtime.base import InferenceItem, ModelRuntime, TensorSpec


class TensorRuntime(ModelRuntime):
    task: ClassVar[str] = "tensor"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.input_shape = input_shape_of(self.arguments)

    def _head_names(self) -> tuple[str, ...]:
        names = self.config.postprocess.output_names or (("probs",) if self.config.postprocess.labels else ("output",))
        if len(names) != 1:
            raise ConfigError(f"postprocess.output_names has {len(names)} names but the model has one output")
        return tuple(names)

    def input_specs(self) -> list[TensorSpec]:
        return [TensorSpec("input", "FP32", (-1, *self.input_shape))]

    def v2_alternatives(self) -> list[TensorSpec]:
        return []

    def input_hint(self) -> str:
        return f"send 'input' (FP32, {list(self.input_shape)} per item)"

    def output_specs(self) -> list[TensorSpec]:
        return [TensorSpec(self.head_names[0], "FP32", self.spec.head_shape(self.spec.heads[0], self.arguments))]

    def check_image_size(self, height: int, width: int, *, preprocessed: bool = False) -> None:
        raise InvalidInput(
            f"model {self.name} takes a tensor of shape {list(self.input_shape)} per instance, not an image:"
            ' send {"instances": [[...], ...]}'
        )

    def tensor_input(self, array: np.ndarray) -> torch.Tensor:
        if tuple(array.shape) != self.input_shape:
            raise InvalidInput(
                f"model {self.name} takes instances of shape {list(self.input_shape)}, got {list(array.shape)}"
            )
        if not np.isfinite(array).all():
            raise InvalidInput("instances hold NaN or infinite values; send finite numbers")
        return torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))

    @property
    def fixed_input_shape(self) -> bool:
        return True

    def set_pixel_limit(self, ceiling: int) -> None:
        return None  # a fixed input shape: every item costs the same

    def dummy_item(self) -> InferenceItem:
        return InferenceItem(image=torch.zeros(self.input_shape))

    def _results(self, items: list[InferenceItem], heads: Sequence[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        arrays = heads[0].cpu().numpy()
        name = self.head_names[0]
        return [{name: arrays[i]} if it.outputs is None or name in it.outputs else {} for i, it in enumerate(items)]

    def format_native(self, result: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = dict(result)
        name = self.head_names[0]
        if self.config.postprocess.labels and name in result:
            index = int(np.argmax(result[name]))
            out["label"] = {"index": index, "name": self.labels[index]}
        return out

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels if self.config.postprocess.labels else None}
