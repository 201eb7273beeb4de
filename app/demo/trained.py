"""The trained demo models: committed checkpoints in ``app/demo_models/``, written into a store.

Two models that show real answers on the synthetic shapes of :mod:`app.demo.train`:

``shapes_unet``
    a narrow U-Net (``base_channels`` 8, two classes: background and shape) whose colour mask the
    page overlays on the image. Its committed checkpoint is a plain float32 ``state_dict`` (2 MB),
    copied into the store byte for byte.
``shapes_extra``
    ``resnet50_extra`` over a resnet18 backbone whose class is the shape's colour (red, green or
    blue) x whether the scalar is above 0.5, so changing the scalar changes the answer. A float32
    resnet18 is 45 MB (23 MB in float16), too big to commit, so its weights are committed as int8
    with one float32 scale per output channel (12 MB); writing the store turns them back into a
    float32 ``state_dict`` (the accuracy the training script reports is measured on these
    dequantized weights).

``app/demo_models/checkpoints.toml`` records each committed file's sha256 (checked before the
file is read) and the held-out figures; every written ``model.toml`` carries the sha256 of the
checkpoint written next to it, which the loader checks before unpickling.
"""

from __future__ import annotations

import hashlib
import io
import logging
import tomllib
from pathlib import Path
from typing import Any

import torch

from app.errors import DemoModelsError

log = logging.getLogger("modserve.demo")

DEMO_DIR = Path(__file__).resolve().parents[1] / "demo_models"
MANIFEST = "checkpoints.toml"

SHAPES: tuple[str, ...] = ("disc", "square", "triangle")
"""Shape kinds; the U-Net's class for kind ``k`` is ``SHAPES.index(k) + 1`` (0 is background)."""
SEG_LABELS: tuple[str, ...] = ("background", "shape")
"""The U-Net's classes: every disc, square and triangle is ``shape`` (the classifier tells kinds apart)."""
SEG_COLOURS: tuple[tuple[int, int, int], ...] = ((0, 0, 0), (255, 214, 10))
"""Mask colour per U-Net class: background black (the page draws it transparent), shapes yellow,
a hue no shape has."""
COLOURS: tuple[str, ...] = ("red", "green", "blue")
HUES: dict[str, float] = {"red": 0.0, "green": 0.33, "blue": 0.62}
"""Hue (HSV, 0..1) at the centre of each colour family; shapes are drawn within HUE_SPREAD of it."""
HUE_SPREAD = 0.05
THRESHOLD = 0.5
"""The extra-input classifier answers ``<colour> / high`` when the scalar is above this, else ``/ low``."""
CLS_LABELS: tuple[str, ...] = tuple(f"{colour} / {level}" for colour in COLOURS for level in ("low", "high"))

UNET_NAME = "shapes_unet"
EXTRA_NAME = "shapes_extra"
UNET_SIZE = 64
"""The U-Net sees every image resized to UNET_SIZE x UNET_SIZE; its mask is scaled back."""
EXTRA_SIZE = 40
UNET_ARGS: dict[str, Any] = {
    "n_channels": 3, "n_classes": len(SEG_LABELS), "bilinear": False, "base_channels": 8,
}
EXTRA_ARGS: dict[str, Any] = {"num_classes": len(CLS_LABELS), "n_extra": 1, "backbone": "resnet18"}
EXTRA_MEAN = (0.485, 0.456, 0.406)
EXTRA_STD = (0.229, 0.224, 0.225)

CHECKPOINT_FILES = {UNET_NAME: "shapes_unet.pth", EXTRA_NAME: "shapes_extra.int8.pt"}
INT8_FORMAT = "modserve-int8/1"
MIN_QUANTIZED = 8192
"""Smaller tensors (the fc_add head, biases, BatchNorm) stay float32: they weigh next to nothing."""


def trained_configs(metrics: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """``model.toml`` contents of the trained models (sha256 is added when the file is written)."""
    metrics = metrics or {}
    iou = metrics.get(UNET_NAME, {}).get("mean_iou")
    acc = metrics.get(EXTRA_NAME, {}).get("accuracy")
    runtime = {"device": "auto", "dtype": "float32", "max_batch_size": 8, "max_batch_delay_ms": 2.0}
    return {
        UNET_NAME: {
            "architecture": "unet",
            "description": "Narrow U-Net trained to segment synthetic discs, squares and triangles"
            + (f" (held-out mean IoU {iou:.3f})" if iou is not None else "") + ".",
            "arguments": dict(UNET_ARGS),
            "checkpoint": {"file": "model.pth", "format": "state_dict"},
            "runtime": runtime,
            "preprocess": {"resize": [UNET_SIZE, UNET_SIZE], "resample": "bilinear", "color_mode": "RGB"},
            "postprocess": {"labels": list(SEG_LABELS), "mask_values": [list(c) for c in SEG_COLOURS]},
        },
        EXTRA_NAME: {
            "architecture": "resnet50_extra",
            "description": "resnet18 with an extra scalar input, trained on synthetic shapes: the class"
            f" is the shape's colour and whether the scalar is above {THRESHOLD}"
            + (f" (held-out accuracy {acc:.3f})" if acc is not None else "") + ".",
            "arguments": dict(EXTRA_ARGS),
            "checkpoint": {"file": "model.pth", "format": "state_dict"},
            "runtime": runtime,
            "preprocess": {"resize": [EXTRA_SIZE, EXTRA_SIZE], "resample": "bilinear", "color_mode": "RGB",
                           "mean": list(EXTRA_MEAN), "std": list(EXTRA_STD)},
            "postprocess": {"labels": list(CLS_LABELS)},
        },
    }


# ---- int8 weights ----------------------------------------------------------------------------


def quantize_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Floating tensors of 2+ dims and MIN_QUANTIZED+ elements become int8 with a float32 scale per
    output channel (symmetric); the rest (biases, BatchNorm, small layers, counters) is kept as it is."""
    tensors: dict[str, Any] = {}
    for key, value in state_dict.items():
        value = value.detach().cpu()
        if value.is_floating_point() and value.dim() >= 2 and value.numel() >= MIN_QUANTIZED:
            flat = value.float().reshape(value.shape[0], -1)
            scale = (flat.abs().amax(dim=1) / 127.0).clamp_min(1e-12)
            q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8).reshape(value.shape)
            tensors[key] = {"q": q.contiguous(), "scale": scale.contiguous()}
        else:
            tensors[key] = {"raw": value.contiguous()}
    return {"format": INT8_FORMAT, "tensors": tensors}


def dequantize_state_dict(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    if not isinstance(packed, dict) or packed.get("format") != INT8_FORMAT:
        raise DemoModelsError(f"not a {INT8_FORMAT} checkpoint")
    out: dict[str, torch.Tensor] = {}
    for key, entry in packed["tensors"].items():
        if "raw" in entry:
            out[key] = entry["raw"]
        else:
            q, scale = entry["q"], entry["scale"]
            shape = (-1,) + (1,) * (q.dim() - 1)
            out[key] = q.to(torch.float32) * scale.view(shape)
    return out


def state_dict_bytes(state_dict: dict[str, torch.Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    return buf.getvalue()


# ---- the committed files ---------------------------------------------------------------------


def read_manifest(demo_dir: Path = DEMO_DIR) -> dict[str, Any]:
    path = demo_dir / MANIFEST
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DemoModelsError(
            f"{path} is missing: the trained demo checkpoints are not there (run `python -m app.demo.train`)"
        ) from None


def _committed_bytes(name: str, manifest: dict[str, Any], demo_dir: Path) -> bytes:
    entry = manifest.get(name)
    if not isinstance(entry, dict) or "file" not in entry or "sha256" not in entry:
        raise DemoModelsError(f"{demo_dir / MANIFEST}: no [{name}] file and sha256")
    path = demo_dir / entry["file"]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DemoModelsError(f"{path} is missing (run `python -m app.demo.train`)") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise DemoModelsError(f"{path}: sha256 {digest} differs from {entry['sha256']} in {MANIFEST}")
    return data


def checkpoint_bytes(name: str, demo_dir: Path = DEMO_DIR) -> bytes:
    """The float32 ``state_dict`` file that serves ``name``, from its checked committed file."""
    manifest = read_manifest(demo_dir)
    data = _committed_bytes(name, manifest, demo_dir)
    if manifest[name].get("encoding", "state_dict") == "state_dict":
        return data
    packed = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state_dict_bytes(dequantize_state_dict(packed))


def write_trained_models(root: Path, *, force: bool = False, demo_dir: Path = DEMO_DIR) -> list[str]:
    """Write ``shapes_unet`` and ``shapes_extra`` into the store ``root``; skip existing ones unless
    ``force``. Returns the names written. Takes about a second (no training)."""
    from app.store.writer import atomic_write_bytes, to_toml

    manifest = read_manifest(demo_dir)
    metrics = {name: dict(manifest.get(name, {}).get("metrics", {})) for name in CHECKPOINT_FILES}
    written = []
    for name, config in trained_configs(metrics).items():
        folder = Path(root) / name
        if (folder / "model.toml").exists() and not force:
            continue
        data = checkpoint_bytes(name, demo_dir)
        config["checkpoint"]["sha256"] = hashlib.sha256(data).hexdigest()
        atomic_write_bytes(folder / "1" / config["checkpoint"]["file"], data)
        atomic_write_bytes(folder / "model.toml", to_toml(config).encode())
        written.append(name)
    if written:
        log.info("wrote trained demo models %s into %s", ", ".join(written), root)
    return written


__all__ = [
    "CLS_LABELS", "COLOURS", "DEMO_DIR", "EXTRA_NAME", "SEG_LABELS", "SHAPES", "THRESHOLD", "UNET_NAME",
    "DemoModelsError", "checkpoint_bytes", "dequantize_state_dict", "quantize_state_dict",
    "trained_configs", "write_trained_models",
]
