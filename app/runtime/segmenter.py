"""Segmenters (the U-Net): per-pixel class logits resized back to the image, a mask, mask PNGs.

Answers per item: ``mask`` (uint8 class indices at the input image's size) and ``logits``;
natively a PNG of the mask painted with ``mask_values`` (as JSON with base64 and class
fractions, or as ``image/png`` when the client accepts it); ``mask_values`` [0, 1] give a
1-bit PNG, as the reference predict script writes it.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from app.errors import ConfigError
from app.runtime.base import InferenceItem, ModelRuntime, TensorSpec
from app.runtime.images import encode_png


class SegmenterRuntime(ModelRuntime):
    task: ClassVar[str] = "segmentation"
    default_resize: ClassVar[tuple[int, int] | None] = None
    encodes_answers: ClassVar[bool] = True
    native_outputs: ClassVar[frozenset[str] | None] = frozenset({"mask"})  # logits at image size: 4 B/pixel/class

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.mask_values = self._mask_values()

    def _head_names(self) -> tuple[str, ...]:
        return ("mask", "logits")

    def _check_labels(self) -> None:
        if self.num_classes > 1:  # one class: the labels may name background and foreground
            super()._check_labels()

    def _mask_values(self) -> list[Any]:
        values = self.config.postprocess.mask_values or self.metadata.get("mask_values")
        if values:
            try:
                out = [list(v) if isinstance(v, (list, tuple)) else int(v) for v in values]
                np.asarray(out, dtype=np.int64)  # regular: all grey levels, or all triples
            except (TypeError, ValueError, OverflowError):
                raise ConfigError(f"model {self.name}: mask_values must be grey levels or [r, g, b] triples") from None
            if not all(0 <= c <= 255 for v in out for c in (v if isinstance(v, list) else [v])):
                raise ConfigError(f"model {self.name}: mask_values must be within 0..255")
            needed = self.num_classes + (self.num_classes == 1)
            if len(out) < needed:
                raise ConfigError(
                    f"model {self.name}: mask_values has {len(out)} entries but the model has {needed} classes"
                )
            return out
        if self.num_classes == 1:
            return [0, 255]
        return [round(i * 255 / (self.num_classes - 1)) for i in range(self.num_classes)]

    def output_specs(self) -> list[TensorSpec]:
        return [
            TensorSpec("mask", "UINT8", (-1, -1, -1)),
            TensorSpec("logits", "FP32", self.spec.head_shape(self.spec.heads[0], self.arguments)),
        ]

    def make_item(
        self, image: torch.Tensor, *, size: tuple[int, int] | None, scalar: torch.Tensor | None,
        outputs: frozenset[str] | None,
    ) -> InferenceItem:
        return InferenceItem(image=image, scalar=scalar, orig_size=size, outputs=outputs)

    def _results(self, items: list[InferenceItem], heads: Sequence[torch.Tensor]) -> list[dict[str, np.ndarray]]:
        logits = heads[0]
        results = []
        for i, it in enumerate(items):
            item_logits = logits[i : i + 1]
            if it.orig_size is not None and tuple(item_logits.shape[-2:]) != it.orig_size:
                item_logits = F.interpolate(item_logits, size=it.orig_size, mode="bilinear")
            result: dict[str, np.ndarray] = {}
            if it.outputs is None or "mask" in it.outputs:
                if self.num_classes == 1:
                    mask = torch.sigmoid(item_logits[0, 0]) > self.config.postprocess.mask_threshold
                else:
                    mask = item_logits[0].argmax(dim=0)
                result["mask"] = mask.to(torch.uint8).cpu().numpy()
            if it.outputs is None or "logits" in it.outputs:
                result["logits"] = item_logits[0].cpu().numpy()
            results.append(result)
        return results

    # ---- native answers ----------------------------------------------------------------------

    def mask_image(self, mask: np.ndarray) -> np.ndarray:
        """Paint class index i as ``mask_values[i]`` (grey levels, or RGB triples)."""
        return np.asarray(self.mask_values, dtype=np.uint8)[mask]

    def mask_png(self, mask: np.ndarray) -> bytes:
        """The mask PNG as the reference's ``mask_to_image`` writes it: with ``mask_values`` [0, 1]
        a 1-bit (black and white, mode "1") PNG; otherwise grey levels or RGB as painted."""
        if self.mask_values == [0, 1]:
            return encode_png(self.mask_image(mask).astype(bool))
        return encode_png(self.mask_image(mask))

    def format_native(self, result: dict[str, np.ndarray]) -> dict[str, Any]:
        mask = result["mask"]
        height, width = mask.shape
        counts = np.bincount(mask.ravel(), minlength=max(self.num_classes, 2))
        names = self.labels if self.num_classes > 1 else ["background", "foreground"]
        return {
            "mask": base64.b64encode(self.mask_png(mask)).decode("ascii"),
            "mask_format": "png",
            "width": int(width),
            "height": int(height),
            "class_fractions": {names[i]: float(c) / mask.size for i, c in enumerate(counts[: len(names)])},
        }

    def native_file(self, results: list[dict[str, np.ndarray]], accept: str) -> tuple[bytes, str] | None:
        if "image/png" in accept and len(results) == 1:
            return self.mask_png(results[0]["mask"]), "image/png"
        return None

    def describe(self) -> dict[str, Any]:
        return {"labels": self.labels, "mask_values": self.mask_values}
