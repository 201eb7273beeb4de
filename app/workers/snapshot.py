"""The device process's model state, as a file every HTTP process reads.

The device process rewrites ``state.json`` (atomically, by rename) whenever a model loads,
swaps, fails or unloads, before it answers the admin request that caused it, so any HTTP
process asked afterwards already sees the change. Each entry carries what an HTTP process needs
to validate, pre-process and answer for the model without its weights: the model.toml as
loaded, the checkpoint's digest and metadata, the device and the per-image pixel limit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import torch

from app.model_state import ModelView
from app.registry import ModelRegistry
from app.runtime.base import ModelRuntime
from app.runtime.factory import RUNTIMES
from app.nets import net_spec
from app.store.model_config import ModelConfig


def runtime_card(runtime: ModelRuntime) -> dict[str, Any]:
    return {
        "version": runtime.version, "sha256": runtime.sha256, "metadata": runtime.metadata,
        "device": str(runtime.device), "config": runtime.config.model_dump(mode="json"),
        "max_processed_pixels": runtime.max_processed_pixels,
    }


def weightless_runtime(name: str, card: dict[str, Any]) -> ModelRuntime:
    """The model's runtime without its net: validation, pre-processing and answers only."""
    config = ModelConfig.model_validate(card["config"])
    runtime = RUNTIMES[net_spec(config.architecture).task](
        name=name, version=card["version"], config=config, model=torch.nn.Module(),
        device=torch.device(card["device"]), sha256=card["sha256"], metadata=card.get("metadata") or {},
    )
    runtime.max_processed_pixels = card.get("max_processed_pixels")
    return runtime


def _view_doc(view: ModelView, loaded_at: float | None) -> dict[str, Any]:
    return {
        "name": view.name, "state": str(view.state), "version": view.version, "reason": view.reason,
        "last_error": view.last_error, "warnings": list(view.warnings), "queue_depth": view.queue_depth,
        "batching": view.batching, "loaded_at": loaded_at,
        "runtime": runtime_card(view.runtime) if view.runtime is not None else None,
    }


def snapshot_of(registry: ModelRegistry, fatal: str | None) -> dict[str, Any]:
    loaded = {s.name: s.loaded_at for s in registry.statuses()}
    return {
        "fatal": fatal,
        "models": [_view_doc(v, loaded.get(v.name)) for v in registry.views()],
        "gpu_memory": _gpu_memory(),
    }


def _gpu_memory() -> list[list[Any]]:
    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return []
    return [[f"cuda:{i}", torch.cuda.memory_allocated(i), torch.cuda.memory_reserved(i)]
            for i in range(torch.cuda.device_count())]


class SnapshotWriter:
    """Writes the snapshot when it changed (or when asked to), by rename so readers never see half."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = b""

    def write(self, doc: dict[str, Any], *, force: bool = False) -> None:
        data = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY, default=str)
        if data == self._last and not force:
            return
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, self.path)
        self._last = data


def read_snapshot(path: Path) -> tuple[tuple[int, int], dict[str, Any]] | None:
    """(the file's identity, its content), or None before the device process wrote one."""
    try:
        st = os.stat(path)
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns), orjson.loads(data)
