"""Small real models and real image bytes shared by the tests."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from app import nets
from app.store.writer import write_model

TINY_RESIZE = [32, 32]


def small_configs() -> dict[str, dict[str, Any]]:
    """One narrow model per architecture: same code paths as the demo store, a fraction of the cost."""
    runtime = {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 5.0}
    configs: dict[str, dict[str, Any]] = {
        "unet": {
            "architecture": "unet",
            "arguments": {"n_channels": 3, "n_classes": 3, "bilinear": False, "base_channels": 4},
            "checkpoint": {"file": "model.pth"},
            "runtime": runtime,
            "preprocess": {"scale": 0.5, "resample": "bicubic", "warmup_size": [16, 16]},
            "postprocess": {"mask_values": [0, 100, 200], "labels": ["bg", "a", "b"]},
        }
    }
    for arch in ("resnet50_head", "resnet50_extra", "resnet50_dual", "resnet50_extra_dual"):
        args: dict[str, Any] = {"num_classes": 4, "backbone": "resnet18"}
        if nets.net_spec(arch).takes_extra:
            args["n_extra"] = 1
        configs[arch] = {
            "architecture": arch,
            "arguments": args,
            "checkpoint": {"file": "model.pt"},
            "runtime": runtime,
            "preprocess": {"resize": TINY_RESIZE, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
            "postprocess": {"labels": ["cat", "dog", "bird", "fish"]},
        }
    return configs


def build_small(name: str, seed: int = 0) -> torch.nn.Module:
    cfg = small_configs()[name]
    torch.manual_seed(seed)
    return nets.get_net(cfg["architecture"], **cfg["arguments"]).eval()


def write_small_store(root: Path, names: list[str] | None = None, seed: int = 0) -> Path:
    for name, cfg in small_configs().items():
        if names is None or name in names:
            write_model(root, name, cfg, build_small(name, seed).state_dict())
    return root


def image_bytes(width: int = 40, height: int = 30, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    arr = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
    img = Image.fromarray(arr[:, :, 0] if channels == 1 else arr, mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()

