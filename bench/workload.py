"""What one benchmark configuration serves: model.toml, seeded weights, JPEG payloads.

Also the torch helpers the peers and the ceiling share, so all of them load the
same weights file and run the forward the way the service does (eval mode,
``inference_mode``, the service's autocast rule, channels_last when asked).
"""

from __future__ import annotations

import contextlib
import copy
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS: dict[str, dict[str, Any]] = {
    # compute-bound: the reference's ResNet50 + scalar wrapper at 224 x 224
    "compute": {"model": "resnet50_extra", "base": "resnet50_extra", "backbone": "resnet50", "size": 224},
    # overhead-bound: the same wrapper on a ResNet18 at 64 x 64, so HTTP/decode/batching costs dominate
    "overhead": {"model": "resnet18_extra_64", "base": "resnet50_extra", "backbone": "resnet18", "size": 64},
    # for completeness: a narrow U-Net at 256 x 256 (mask PNG answers)
    "unet": {"model": "unet256", "base": "unet", "size": 256},
}
PAYLOAD_SIZE = (480, 640)
"""(height, width) of the JPEG uploads by default: a 640 x 480 photo (issue 16's targets)."""
SCALAR = "0.5"
"""Scalar sent with every request to the extra-input models (form field ``scalar``)."""


@dataclass
class Workload:
    config: str
    model: str
    toml: dict[str, Any]
    size: tuple[int, int]  # model input (preprocess.resize)
    payload_size: tuple[int, int]  # JPEG (height, width) sent by the clients
    takes_extra: bool
    task: str

    def describe(self) -> dict[str, Any]:
        rt = self.toml["runtime"]
        return {
            "name": self.model,
            "architecture": self.toml["architecture"],
            "arguments": self.toml["arguments"],
            "input_size": list(self.size),
            "payload_size": list(self.payload_size),
            "takes_scalar": self.takes_extra,
            "device": rt["device"],
            "dtype": rt["dtype"],
            "channels_last": rt["channels_last"],
            "max_batch_size": rt["max_batch_size"],
            "max_batch_delay_ms": rt["max_batch_delay_ms"],
        }


def build_workload(
    config: str,
    *,
    device: str,
    dtype: str,
    channels_last: bool,
    max_batch_size: int,
    max_batch_delay_ms: float,
    image_size: int | None,
    payload_size: int | tuple[int, int] | None,
    base_channels: int,
) -> Workload:
    """``payload_size``: the JPEG's (height, width), or one side for a square; None: 480 x 640."""
    from app import nets
    from app.demo.store import demo_configs

    spec = CONFIGS[config]
    toml = copy.deepcopy(demo_configs()[spec["base"]])
    side = image_size or spec["size"]
    toml["description"] = f"modserve bench configuration {config!r}"
    if "backbone" in spec:
        toml["arguments"]["backbone"] = spec["backbone"]
    if toml["architecture"] == "unet":
        toml["arguments"]["base_channels"] = base_channels
    pre = toml["preprocess"]
    pre.pop("scale", None)
    pre.pop("warmup_size", None)
    pre["resize"] = [side, side]
    toml["runtime"] = {
        "device": device,
        "dtype": dtype,
        "channels_last": channels_last,
        "max_batch_size": max_batch_size,
        "max_batch_delay_ms": float(max_batch_delay_ms),
    }
    net = nets.net_spec(toml["architecture"])
    psize = payload_size or PAYLOAD_SIZE
    return Workload(
        config=config,
        model=spec["model"],
        toml=toml,
        size=(side, side),
        payload_size=psize if isinstance(psize, tuple) else (psize, psize),
        takes_extra=net.takes_extra,
        task=net.task,
    )


def write_store(root: Path, wl: Workload, seed: int = 0) -> Path:
    """Seeded random weights written with the service's own store writer."""
    import torch

    from app import nets
    from app.store.writer import write_model

    torch.manual_seed(seed)
    model = nets.get_net(wl.toml["architecture"], **wl.toml["arguments"])
    return write_model(root, wl.model, wl.toml, model.state_dict())


def make_jpegs(folder: Path, size: tuple[int, int], count: int = 8, seed: int = 0) -> list[Path]:
    """Photo-like JPEGs (smooth gradients, blobs, sensor noise) so decode cost is realistic."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    paths = []
    for i in range(count):
        img = np.zeros((h, w, 3), np.float32)
        for c in range(3):
            a, b = rng.uniform(-1, 1, 2)
            img[..., c] = 128 + 60 * (a * xx / w + b * yy / h)
        for _ in range(6):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(0.05, 0.3) * max(h, w)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
            img += blob[..., None] * rng.uniform(-80, 80, 3)
        img += rng.normal(0, 6, img.shape)
        path = folder / f"img{i}.jpg"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, format="JPEG", quality=90)
        paths.append(path)
    return paths


# ---- shared torch helpers (peers and ceiling) ----------------------------------------------


def set_threads(n: int) -> None:
    import torch

    if n > 0:
        torch.set_num_threads(n)


def autocast(device_type: str, dtype_name: str) -> contextlib.AbstractContextManager[Any]:
    """The service's rule (ModelRuntime._autocast): fp32 plain, bf16 autocast on CPU, any on GPU."""
    import torch

    dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype_name]
    if dtype == torch.float32 or (device_type == "cpu" and dtype != torch.bfloat16):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


@dataclass
class LoadedNet:
    model: Any
    config: Any  # app.store.model_config.ModelConfig
    device: Any  # torch.device
    takes_extra: bool
    task: str


def load_net(store: Path, name: str, device: str) -> LoadedNet:
    """Same model.toml and weights file the service loads, as a plain eval-mode module."""
    import torch

    from app import nets
    from app.store.model_config import load_model_config

    cfg = load_model_config(store / name / "model.toml")
    spec = nets.net_spec(cfg.architecture)
    model = nets.get_net(cfg.architecture, **cfg.arguments)
    state = torch.load(store / name / "1" / (cfg.checkpoint.file or "model.pth"), map_location="cpu",
                       weights_only=True)
    model.load_state_dict(state)
    dev = torch.device("cuda:0" if device.startswith("cuda") else "cpu")
    model = model.to(dev).eval()
    if cfg.runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return LoadedNet(model, cfg, dev, spec.takes_extra, spec.task)


def forward(net: LoadedNet, images: Any, scalars: Any | None) -> Any:
    """One forward exactly as the service runs it (caller holds ``torch.inference_mode``)."""
    import torch

    x = images.to(net.device, non_blocking=True)
    if net.config.runtime.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(net.device.type, net.config.runtime.dtype):
        if net.takes_extra:
            return net.model(x, scalars.to(net.device))
        return net.model(x)


def png_b64(mask: np.ndarray) -> str:
    import base64

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask).save(buf, format="PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode("ascii")
