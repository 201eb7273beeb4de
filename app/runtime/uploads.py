"""An uploaded image file -> what the batch needs, in a decode thread, with Pillow and numpy only.

No torch operation runs here (``torch.from_numpy`` and views only): a torch kernel in a decode
thread would start its own OpenMP team competing with the forward's for the cores.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from app.runtime.images import load_pixels, open_image, oriented_size
from app.runtime.preprocess import Preprocessor


@dataclass
class Upload:
    image: torch.Tensor
    """uint8 ``(C, h, w)`` at the model's input size (a view of an HWC array); a "meta" placeholder
    of that shape while ``encoded`` waits for the device."""
    size: tuple[int, int]
    """(height, width) of the upload as the user sees it (after EXIF orientation)."""
    encoded: torch.Tensor | None = None
    """The JPEG's bytes, for the GPU to decode with the rest of its batch."""


def decode_upload(
    data: bytes, pre: Preprocessor, device: torch.device, *, max_pixels: int,
    check_size: Callable[[int, int], None] | None = None,
) -> Upload:
    """Check the header, then decode (JPEGs at reduced size when ``pre.fast_jpeg``) and resize.

    On a GPU a JPEG is only checked here; the device decodes it with its batch (except for the U-Net
    reference pre-processing, whose Pillow bicubic resize runs on the host).
    """
    img = open_image(data, max_pixels=max_pixels, check_size=check_size)
    if device.type == "cuda" and img.format == "JPEG" and not pre.reference:
        size = oriented_size(img)
        height, width = pre.target_size(*size)
        placeholder = torch.empty((pre.channels, height, width), dtype=torch.uint8, device="meta")
        return Upload(placeholder, size, torch.frombuffer(bytearray(data), dtype=torch.uint8))
    pixels, size = load_pixels(img, color_mode=pre.cfg.color_mode, draft=pre.draft_size)
    array: np.ndarray = pre.resize_array(pixels, size)
    return Upload(torch.from_numpy(array).permute(2, 0, 1), size)
