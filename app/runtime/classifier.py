"""Classifiers: one or more heads (class probabilities, raw features), an optional scalar input.

Answers per item: each head as an array; natively also the winning ``label`` of the first head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from app.errors import ConfigError
from app.runtime.base import InferenceItem, ModelRuntime, TensorSpec


class ClassifierRuntime(ModelRuntime):
    task: ClassVar[str] = "classification"
    default_resize: ClassVar[tuple[int, int] | None] = (224, 224)

    def _head_names(self) -> tuple[str, ...]:
        names = self.config.postprocess.output_names or self.spec.heads
        if len(names) != len(self.spec.heads):
            raise ConfigError(
                f"postprocess.output_names has {len(names)} names but {self.config.architecture}"
                f" has {len(self.spec.heads)} heads ({', '.join(self.spec.heads)})"
            )
        return tuple(names)

    def output_specs(self) -> list[TensorSpec]:
        return [
            TensorSpec(name, "FP32", self.spec.head_shape(head, self.arguments))
            for name, head in zip(self.head_names, self.spec.heads)
        ]

    def _results(self, items: list[InferenceItem], heads: Sequence[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        arrays = [h.cpu().numpy() for h in heads]
        return [
            {
                name: arr[i]
                for name, arr in zip(self.head_names, arrays)
                if it.outputs is None or name in it.outputs
            }
            for i, it in enumerate(items)
        ]

    def format_native(self, result: dict[str, np.ndarray]) -> dict[str, Any]:
        out: dict[str, Any] = dict(result)  # numpy arrays: orjson writes them without a Python loop
        first = self.head_names[0]
        if first in result:
            index = int(np.argmax(result[first]))
            out["label"] = {"index": index, "name": self.labels[index]}
        return out
