"""Tensor pre-processing with torch: resize uint8, scale to [0, 1], normalise.

Kept apart from decoding so the v2 protocol's already-preprocessed ``image``
tensors and the encoded-image paths share exactly one normalisation.
"""

from __future__ import annotations

import torch
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
        self._mode = _MODES[cfg.resample]

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
