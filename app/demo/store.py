"""The demo store: one seeded model per architecture, so a fresh machine has something to serve,
plus two small trained models (``shapes_unet``, ``shapes_extra``) that show real masks and answers.

The seeded checkpoints are generated, never committed; the trained ones ship in
``app/demo_models/`` (sha256-checked). The U-Net is narrow so it serves quickly on a CPU.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from app import nets
from app.demo.trained import write_trained_models
from app.store import ModelStore
from app.store.writer import write_model

log = logging.getLogger("modserve.demo")

IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
RUNTIME = {"device": "auto", "dtype": "float32", "max_batch_size": 8, "max_batch_delay_ms": 2.0}


def demo_configs() -> dict[str, dict[str, Any]]:
    classifier_pre = {"resize": [224, 224], "resample": "bilinear", "color_mode": "RGB", **IMAGENET}
    labels = [f"class_{i}" for i in range(10)]
    configs: dict[str, dict[str, Any]] = {
        "unet": {
            "architecture": "unet",
            "description": "Narrow U-Net (base_channels 16), two classes, seeded random weights.",
            "arguments": {"n_channels": 3, "n_classes": 2, "bilinear": False, "base_channels": 16},
            "checkpoint": {"file": "model.pth", "format": "state_dict"},
            "runtime": RUNTIME,
            "preprocess": {"scale": 0.5, "resample": "bicubic", "color_mode": "RGB", "warmup_size": [128, 128]},
            "postprocess": {"mask_values": [0, 255], "labels": ["background", "object"]},
        },
    }
    for arch in ("resnet50_head", "resnet50_extra", "resnet50_dual", "resnet50_extra_dual"):
        arguments: dict[str, Any] = {"num_classes": 10, "backbone": "resnet50"}
        if nets.net_spec(arch).takes_extra:
            arguments["n_extra"] = 1
        configs[arch] = {
            "architecture": arch,
            "description": f"torchvision ResNet50 modified as {arch}, seeded random weights.",
            "arguments": arguments,
            "checkpoint": {"file": "model.pth", "format": "state_dict"},
            "runtime": RUNTIME,
            "preprocess": classifier_pre,
            "postprocess": {"labels": labels},
        }
    return configs


def write_demo_store(root: Path, *, force: bool = False) -> list[str]:
    written = []
    for seed, (name, config) in enumerate(demo_configs().items()):
        if (root / name / "model.toml").exists() and not force:
            continue
        torch.manual_seed(seed)
        model = nets.get_net(config["architecture"], **config["arguments"])
        write_model(root, name, config, model.state_dict())
        written.append(name)
    written += write_trained_models(root, force=force)
    return written


def ensure_demo_store(root: Path) -> None:
    if ModelStore(root).names():
        return
    log.warning("store %s holds no models: writing the demo store", root)
    print(f"modserve: {root} holds no models; writing the demo store (one model per architecture"
          " and two trained shape models)", flush=True)
    write_demo_store(root)
