"""The U-Net of milesial/Pytorch-UNet, with a width knob and support for tiny inputs.

With the default ``base_channels=64`` the modules, state_dict keys and outputs
are those of the reference, so its checkpoints load with ``strict=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from app.nets import register_net
from app.nets.unet_parts import DoubleConv, Down, OutConv, Up

DEPTH = 4
MIN_SIZE = 2**DEPTH
"""Smallest side the four max-pools accept; smaller inputs are padded up to it."""


class UNet(nn.Module):
    """Encoder-decoder with skip connections; returns per-pixel logits of the input's H x W."""

    def __init__(
        self, n_channels: int, n_classes: int, bilinear: bool = False, base_channels: int = 64
    ) -> None:
        super().__init__()
        if n_channels < 1 or n_classes < 1 or base_channels < 1:
            raise ValueError("n_channels, n_classes and base_channels must be positive")
        self.n_channels = n_channels
        self.n_classes = n_classes
        self.bilinear = bilinear
        self.base_channels = base_channels

        b = base_channels
        factor = 2 if bilinear else 1
        self.inc = DoubleConv(n_channels, b)
        self.down1 = Down(b, 2 * b)
        self.down2 = Down(2 * b, 4 * b)
        self.down3 = Down(4 * b, 8 * b)
        self.down4 = Down(8 * b, 16 * b // factor)
        self.up1 = Up(16 * b, 8 * b // factor, bilinear)
        self.up2 = Up(8 * b, 4 * b // factor, bilinear)
        self.up3 = Up(4 * b, 2 * b // factor, bilinear)
        self.up4 = Up(2 * b, b, bilinear)
        self.outc = OutConv(b, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        # The reference fails below 16 px (a pool would give size 0). Zero-pad such
        # inputs and crop the logits back; inputs of 16 px and more are untouched.
        pad_y, pad_x = max(MIN_SIZE - height, 0), max(MIN_SIZE - width, 0)
        top, left = pad_y // 2, pad_x // 2
        if pad_y or pad_x:
            x = F.pad(x, [left, pad_x - left, top, pad_y - top])

        x1 = self.inc(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        logits = self.outc(x)

        if pad_y or pad_x:
            logits = logits[..., top : top + height, left : left + width]
        return logits


@register_net("unet", task="segmentation", heads=("logits",), head_shapes=(("n_classes", -1, -1),), classes="n_classes")
def unet(*, n_channels: int = 3, n_classes: int = 2, bilinear: bool = False, base_channels: int = 64) -> UNet:
    """Reference U-Net; ``base_channels`` below 64 gives a narrow net that serves fast on CPU."""
    return UNet(n_channels, n_classes, bilinear=bilinear, base_channels=base_channels)
