"""Tensor pre-processing: resize uint8, scale to [0, 1], normalise.

Kept apart from decoding so the v2 protocol's already-preprocessed ``image``
tensors and the encoded-image paths share exactly one normalisation.

A model with ``scale`` and no explicit ``resample`` follows the U-Net reference's
predict script (milesial/Pytorch-UNet ``BasicDataset.preprocess``) bit for bit: Pillow's
BICUBIC resize to ``int(scale * w) x int(scale * h)``, then division by 255 (in float32,
which rounds exactly as the reference's float64 division cast to float32) only when some
pixel is above 1. Every other model resizes with torchvision as configured.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as F

from app.store.model_config import PreprocessConfig

_MODES = {
    "nearest": InterpolationMode.NEAREST,
    "bilinear": InterpolationMode.BILINEAR,
    "bicubic": InterpolationMode.BICUBIC,
}


class Preprocessor:
    def __init__(self, cfg: PreprocessConfig, *, default_resize: tuple[int, int] | None) -> None:
        self.cfg = cfg
        self.resize = cfg.resize if cfg.resize is not None else (None if cfg.scale else default_resize)
        self.channels = 3 if cfg.color_mode == "RGB" else 1
        mean = torch.tensor(cfg.mean, dtype=torch.float32)
        std = torch.tensor(cfg.std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(-1, 1, 1)
        self._shift = (-mean / std).view(-1, 1, 1)
        self._mode = _MODES[cfg.resample or "bilinear"]
        self.reference = cfg.scale is not None and cfg.resample is None and cfg.resize is None
        """Resize and scale as the U-Net reference does (Pillow bicubic, its divide-by-255 rule)."""
        self._mean = mean.view(-1, 1, 1)
        self._std = std.view(-1, 1, 1)
        self._identity = bool((mean == 0).all() and (std == 1).all())

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        if self.resize is not None:
            return self.resize
        if self.cfg.scale is not None:
            new_h, new_w = int(self.cfg.scale * height), int(self.cfg.scale * width)
            return max(new_h, 1), max(new_w, 1)
        return height, width

    def warmup_size(self) -> tuple[int, int]:
        if self.resize is not None:
            return self.resize
        return self.cfg.warmup_size or (64, 64)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``(C, H, W)`` -> float32 ``(C, h, w)`` as the model expects."""
        if self.reference:
            return self._reference(image)
        size = self.target_size(image.shape[-2], image.shape[-1])
        if tuple(image.shape[-2:]) != size:
            if size == (1, 1) and image.dtype == torch.uint8:
                # torch's uint8 antialias kernel asserts on a 1x1 output (2x2 -> 1x1); float works
                image = F.resize(image.float(), [1, 1], interpolation=self._mode, antialias=True)
                image = image.round_().clamp_(0, 255)
            else:
                image = F.resize(image, list(size), interpolation=self._mode, antialias=True)
        out = image.to(torch.float32)
        return out.mul_(self._scale.to(out.device)).add_(self._shift.to(out.device))

    def _reference(self, image: torch.Tensor) -> torch.Tensor:
        """The reference's ``BasicDataset.preprocess(..., is_mask=False)``, then mean/std if set.

        The resize runs in Pillow on the CPU (in the caller's decode thread); an image already on
        the GPU makes the round trip. As in the reference, pixels are divided by 255 only when
        some pixel of the resized image is above 1: an image whose pixels are all 0 or 1 is fed as
        0.0 and 1.0, as the reference trained and predicts on it (all black is 0 either way).
        The result keeps the reference's memory layout (a transposed HWC array, i.e. channels
        last), so the forward picks the same kernels and the logits match bit for bit.
        """
        height, width = self.target_size(image.shape[-2], image.shape[-1])
        hwc = image.permute(1, 2, 0)
        if tuple(image.shape[-2:]) != (height, width):
            array = np.ascontiguousarray(hwc.cpu().numpy())
            pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            pil = pil.resize((width, height), resample=Image.Resampling.BICUBIC)
            resized = np.array(pil, dtype=np.uint8).reshape(height, width, -1)
            hwc = torch.from_numpy(resized).to(image.device)
        else:
            hwc = hwc.contiguous()
        out = hwc.permute(2, 0, 1).to(torch.float32)  # keeps the channels-last strides
        if bool((out > 1).any()):
            out.div_(255.0)
        if not self._identity:
            out.sub_(self._mean.to(out.device)).div_(self._std.to(out.device))
        return out
