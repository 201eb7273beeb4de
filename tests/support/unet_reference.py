"""The U-Net reference prediction, as a yardstick for the service's U-Net path.

Behaviour of milesial/Pytorch-UNet (GPL-3.0): ``predict.py`` (``predict_img``, ``mask_to_image``)
and ``utils/data_loading.py`` (``BasicDataset.preprocess``). Written here from a description of
those steps, not copied; keep it step for step with the reference, quirks included (the
divide-by-255 only when some pixel exceeds 1, the numpy layout handed to the net).
"""

from __future__ import annotations

from typing import Any

import warnings

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def reference_preprocess(pil_img: Image.Image, scale: float, *, is_mask: bool = False) -> np.ndarray:
    """``BasicDataset.preprocess``: resize by ``scale`` with Pillow, HWC -> CHW, /255 if any pixel > 1."""
    w, h = pil_img.size
    new_w, new_h = int(scale * w), int(scale * h)
    assert new_w > 0 and new_h > 0, "Scale is too small, resized images would have no pixel"
    pil_img = pil_img.resize((new_w, new_h), resample=Image.NEAREST if is_mask else Image.BICUBIC)
    img = np.asarray(pil_img)
    if img.ndim == 2:
        img = img[np.newaxis, ...]
    else:
        img = img.transpose((2, 0, 1))
    if (img > 1).any():
        img = img / 255.0
    return img


def reference_input(full_img: Image.Image, scale: float) -> torch.Tensor:
    """The float32 ``(1, C, h, w)`` batch ``predict_img`` hands to the net."""
    with warnings.catch_warnings():  # undivided 0/1 images stay Pillow's read-only array; torch warns
        warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
        img = torch.from_numpy(reference_preprocess(full_img, scale, is_mask=False))
    return img.unsqueeze(0).to(device="cpu", dtype=torch.float32)


def reference_predict(
    net: torch.nn.Module, full_img: Image.Image, *, scale: float, out_threshold: float = 0.5,
) -> np.ndarray:
    """``predict_img``: the mask (class indices, or 0/1 for one class) at the image's size."""
    net.eval()
    img = reference_input(full_img, scale)
    with torch.no_grad():
        output = net(img).cpu()
        output = F.interpolate(output, (full_img.size[1], full_img.size[0]), mode="bilinear")
        if net.n_classes > 1:
            mask = output.argmax(dim=1)
        else:
            mask = torch.sigmoid(output) > out_threshold
    return mask[0].long().squeeze().numpy()


def reference_mask_image(mask: np.ndarray, mask_values: list[Any]) -> Image.Image:
    """``mask_to_image``: [0, 1] gives a 1-bit image, [r, g, b] lists RGB, anything else uint8 grey."""
    if isinstance(mask_values[0], list):
        out = np.zeros((mask.shape[-2], mask.shape[-1], len(mask_values[0])), dtype=np.uint8)
    elif mask_values == [0, 1]:
        out = np.zeros((mask.shape[-2], mask.shape[-1]), dtype=bool)
    else:
        out = np.zeros((mask.shape[-2], mask.shape[-1]), dtype=np.uint8)
    if mask.ndim == 3:
        mask = np.argmax(mask, axis=0)
    for i, v in enumerate(mask_values):
        out[mask == i] = v
    return Image.fromarray(out)
