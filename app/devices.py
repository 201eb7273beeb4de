"""Device resolution: ``auto`` means the first GPU when CUDA is usable, else CPU."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def validate_device_string(value: str) -> str:
    value = value.strip().lower()
    if not _DEVICE_RE.match(value):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, not {value!r}")
    return value


def resolve_device(requested: str, default: str = "auto") -> torch.device:
    """Turn a configured device into a concrete one available on this host.

    A model asking for a GPU on a host without one is an error (the model is
    listed as not ready with this reason) rather than a silent CPU fallback.
    """
    import torch

    from app.errors import ConfigError

    requested = validate_device_string(requested)
    if requested == "auto":
        requested = validate_device_string(default)
    if requested == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if requested == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {requested} requested but CUDA is not available on this host")
    index = int(requested.split(":")[1]) if ":" in requested else 0
    if index >= torch.cuda.device_count():
        raise ConfigError(
            f"device {requested} requested but only {torch.cuda.device_count()} GPU(s) are visible"
        )
    return torch.device(f"cuda:{index}")
