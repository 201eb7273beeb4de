"""What flows between the service and a runtime's forward: tensor specs and batch items."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Open Inference Protocol names: FP32, UINT8, BYTES
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class InferenceItem:
    """One instance for one forward: an image (and, when needed, its scalars).

    ``image`` is uint8 ``(C, h, w)`` at the model's input size when it came from an upload (the
    forward normalises the whole batch at once), or float32 already normalised (v2 ``image``
    tensors, tensor-in models, warm-up). With ``encoded`` set (a JPEG for the GPU to decode in
    the batch), ``image`` is a "meta" placeholder of the size it will have.
    """

    image: torch.Tensor
    scalar: torch.Tensor | None = None  # float32 (n_extra,)
    orig_size: tuple[int, int] | None = None  # (H, W) of the decoded image, for families that answer at it
    outputs: frozenset[str] | None = None  # None = every output
    solo: bool = False  # too large to share a forward with others (see ModelRuntime.needs_own_batch)
    encoded: torch.Tensor | None = None  # uint8 JPEG bytes, decoded on the device with its batch
    # Filled in by the forward, read back for metrics and logs:
    batch_size: int = 0
    started_at: float = 0.0  # time.perf_counter() when its batch started
    inference_s: float = 0.0

    def group_key(self) -> tuple[Any, ...]:
        """Items of one batch share shape and kind (uint8 to normalise, or float as it is)."""
        kind = self.image.dtype == torch.uint8
        if self.solo:
            return (*self.image.shape, kind, id(self))
        return (*self.image.shape, kind)
