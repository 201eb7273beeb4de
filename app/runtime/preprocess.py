"""Pre-processing in two halves: resize on the host (Pillow/numpy, in the decode threads), then one
batched normalisation (uint8 batch in, float out) on the inference thread.

No torch runs in the decode threads: torch ops there would start a second OpenMP team competing
with the forward's for the same cores (measured in bench/README.md, "Thread layout"). The resize
is Pillow's (bilinear/bicubic with antialiasing, which torchvision's uint8 kernels were ported from:
within one grey level of them) or, for ``nearest``, torchvision's own index rule in numpy.

A model with ``scale`` and no explicit ``resample`` follows the U-Net reference's
predict script (milesial/Pytorch-UNet ``BasicDataset.preprocess``) bit for bit: Pillow's
BICUBIC resize to ``int(scale * w) x int(scale * h)``, then division by 255 (in float32,
which rounds exactly as the reference's float64 division cast to float32) only when some
pixel is above 1.

``fast_jpeg`` (model.toml ``preprocess.fast_jpeg``): a JPEG much larger than the model's input is
decoded at 1/2, 1/4 or 1/8 scale in the DCT domain (Pillow's ``draft``), never below the target
size, then resized exactly; its effect on outputs is measured in bench/README.md ("JPEG draft").
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
_PIL_MODES = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}

FAST_JPEG_DEFAULT = True
"""Default of ``preprocess.fast_jpeg`` when unset, except for the U-Net reference pre-processing (chosen
from the figures in bench/README.md, "JPEG draft decode")."""


class Preprocessor:
    def __init__(self, cfg: PreprocessConfig, *, default_resize: tuple[int, int] | None) -> None:
        self.cfg = cfg
        self.resize = cfg.resize if cfg.resize is not None else (None if cfg.scale else default_resize)
        self.channels = 3 if cfg.color_mode == "RGB" else 1
        mean = torch.tensor(cfg.mean, dtype=torch.float32)
        std = torch.tensor(cfg.std, dtype=torch.float32)
        self._scale = (1.0 / (255.0 * std)).view(-1, 1, 1)
        self._shift = (-mean / std).view(-1, 1, 1)
        self._resample = cfg.resample or "bilinear"
        self._mode = _MODES[self._resample]
        self.reference = cfg.scale is not None and cfg.resample is None and cfg.resize is None
        """Resize and scale as the U-Net reference does (Pillow bicubic, its divide-by-255 rule)."""
        self._mean = mean.view(-1, 1, 1)
        self._std = std.view(-1, 1, 1)
        self._identity = bool((mean == 0).all() and (std == 1).all())
        fast = cfg.fast_jpeg
        self.fast_jpeg: bool = (not self.reference and FAST_JPEG_DEFAULT) if fast is None else fast
        """Decode large JPEGs at reduced size (DCT scaling); unset: on, except for the U-Net reference."""

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

    def draft_size(self, height: int, width: int) -> tuple[int, int] | None:
        """Smallest (height, width) a JPEG of this (oriented) size may be decoded at; None: full size."""
        if not self.fast_jpeg:
            return None
        target = self.target_size(height, width)
        return target if target[0] * 2 <= height and target[1] * 2 <= width else None

    # ---- host half: decode threads, Pillow/numpy only -------------------------------------------

    def resize_array(self, img: Image.Image, full_size: tuple[int, int]) -> np.ndarray:
        """A decoded image -> uint8 ``(h, w, C)`` at the target size for an upload of ``full_size``
        (the size before any draft decode). Pillow and numpy only: safe in the decode threads."""
        height, width = self.target_size(*full_size)
        if img.size != (width, height):
            if self.reference:
                img = img.resize((width, height), resample=Image.Resampling.BICUBIC)
            elif self._resample == "nearest":
                return _nearest(np.asarray(img, dtype=np.uint8), height, width)
            else:
                img = img.resize((width, height), resample=_PIL_MODES[self._resample])
        return _hwc(img)

    # ---- device half: the inference thread, one batch at a time ---------------------------------

    def normalize_batch(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, C, h, w)`` -> float32 as the model expects, on ``batch``'s device.

        Keeps ``batch``'s memory layout (the U-Net reference's channels-last input stays so, which
        its bit-exact logits depend on); other models get a contiguous tensor, as before.
        """
        if self.reference:
            out = batch.to(torch.float32)
            over_one = batch.flatten(1).amax(dim=1) > 1  # the reference's rule, per image
            if bool(over_one.all()):
                out.div_(255.0)
            elif bool(over_one.any()):
                out = torch.where(over_one.view(-1, 1, 1, 1), out / 255.0, out)
            if not self._identity:
                out.sub_(self._mean.to(out.device)).div_(self._std.to(out.device))
            return out
        out = batch.to(torch.float32, memory_format=torch.contiguous_format)
        return out.mul_(self._scale.to(out.device)).add_(self._shift.to(out.device))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``(C, H, W)`` -> float32 ``(C, h, w)``: both halves for one image (what the service
        computes for it in a batch; the v2 protocol's pre-processed ``image`` is this)."""
        if image.device.type == "cpu" or self.reference:
            array = np.ascontiguousarray(image.permute(1, 2, 0).cpu().numpy())
            pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
            hwc = torch.from_numpy(self.resize_array(pil, (image.shape[-2], image.shape[-1])))
            return self.normalize_batch(hwc.to(image.device).permute(2, 0, 1).unsqueeze(0))[0]
        return self.normalize_batch(self.resize_on_device(image).unsqueeze(0))[0]

    def resize_on_device(self, image: torch.Tensor) -> torch.Tensor:
        """uint8 ``(C, H, W)`` on a GPU -> uint8 at the target size, resized there (torchvision)."""
        size = self.target_size(image.shape[-2], image.shape[-1])
        if tuple(image.shape[-2:]) == size:
            return image
        if size == (1, 1):  # torch's uint8 antialias kernel asserts on a 1x1 output (2x2 -> 1x1); float works
            out = F.resize(image.float(), [1, 1], interpolation=self._mode, antialias=True)
            return out.round_().clamp_(0, 255).to(torch.uint8)
        return F.resize(image, list(size), interpolation=self._mode, antialias=True)


def _hwc(img: Image.Image) -> np.ndarray:
    array = np.array(img, dtype=np.uint8)  # a writable copy: torch.from_numpy refuses read-only arrays
    return array[:, :, None] if array.ndim == 2 else array


def _nearest(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """torchvision's ``nearest`` (source index ``floor(i * in / out)`` in float32), in numpy."""
    rows = np.minimum((np.arange(height, dtype=np.float32) * np.float32(array.shape[0] / height)).astype(np.int64),
                      array.shape[0] - 1)
    cols = np.minimum((np.arange(width, dtype=np.float32) * np.float32(array.shape[1] / width)).astype(np.int64),
                      array.shape[1] - 1)
    picked = array[rows][:, cols]
    return picked[:, :, None] if picked.ndim == 2 else picked
