"""The forward's input tensor from a batch of items, built on the inference thread.

Uploads arrive as uint8 at the model's input size (resized in the decode threads); here they are
stacked and normalised in one operation (uint8 in, float out). On a GPU the uint8 batch crosses
the bus from pinned memory (4x fewer bytes than float32), and JPEGs waiting in ``encoded`` are
decoded there as one batch (nvJPEG through torchvision's ``decode_jpeg`` on a list), then resized
and normalised on the device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from app.errors import InvalidInput
from app.runtime.faults import is_out_of_memory
from app.runtime.items import InferenceItem
from app.runtime.preprocess import Preprocessor


def batch_input(items: Sequence[InferenceItem], pre: Preprocessor, device: torch.device) -> torch.Tensor:
    """float32 ``(N, C, h, w)`` on ``device``, normalised as the model expects."""
    images = [it.image for it in items]
    if images[0].dtype != torch.uint8:  # already normalised (v2 image tensors, tensor models, warm-up)
        return torch.stack(images).to(device, non_blocking=True)
    if all(img.device.type == "cpu" for img in images):
        batch = _stack_hwc(images)
        if device.type != "cpu":
            batch = batch.pin_memory().to(device, non_blocking=True)
        return pre.normalize_batch(batch)
    on_device = [img.pin_memory().to(device, non_blocking=True) if img.device.type == "cpu" else img for img in images]
    return pre.normalize_batch(torch.stack(on_device))


def _stack_hwc(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack uint8 ``(C, h, w)`` views of HWC arrays into one NHWC block, seen as NCHW (channels-last
    strides: normalize_batch keeps them where the model wants them, else makes the float contiguous)."""
    return torch.stack([img.permute(1, 2, 0) for img in images]).permute(0, 3, 1, 2)


def decode_on_device(
    items: Sequence[InferenceItem], pre: Preprocessor, device: torch.device, color_mode: str,
) -> dict[int, BaseException]:
    """Decode the batch's waiting JPEGs on ``device`` in one call, resize each there; ``image`` then
    holds the uint8 result. A JPEG that fails (its header passed, its data did not) fails only its
    own item: the batch is retried one image at a time. Returns {index: error} of failed items."""
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB if color_mode == "RGB" else ImageReadMode.GRAY
    waiting = [i for i, it in enumerate(items) if it.encoded is not None]
    if not waiting:
        return {}
    data = [items[i].encoded for i in waiting]
    try:
        decoded: list[torch.Tensor | BaseException] = list(
            decode_jpeg(data, mode=mode, device=device, apply_exif_orientation=True))
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise
        decoded = [_decode_one(raw, mode, device) for raw in data]
    failed: dict[int, BaseException] = {}
    for i, out in zip(waiting, decoded):
        if isinstance(out, BaseException):
            failed[i] = out
        else:
            items[i].image, items[i].encoded = pre.resize_on_device(out), None
    return failed


def _decode_one(raw: torch.Tensor, mode: object, device: torch.device) -> torch.Tensor | BaseException:
    from torchvision.io import decode_jpeg

    try:
        return decode_jpeg(raw, mode=mode, device=device, apply_exif_orientation=True)  # type: ignore[arg-type]
    except RuntimeError as exc:
        if is_out_of_memory(exc):
            raise
        return InvalidInput(f"image could not be decoded (truncated or corrupt): {exc}")
