"""The device process's model state, as a file every HTTP process reads.

The device process rewrites ``state.json`` (atomically, by rename) whenever a model loads,
swaps, fails or unloads, before it answers the admin request that caused it, so any HTTP
process asked afterwards already sees the change. Each entry carries what an HTTP process needs
to validate, pre-process and answer for the model without its weights: the model.toml as
loaded, the checkpoint's digest and metadata, the device and the per-image pixel limit.
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
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

_GENERATION = struct.Struct("<Q")
log = logging.getLogger("modserve.device")


def runtime_card(runtime: ModelRuntime) -> dict[str, Any]:
    return {
        "version": runtime.version, "sha256": runtime.sha256, "metadata": runtime.metadata,
        "device": str(runtime.device), "config": runtime.config.model_dump(mode="json"),
        "max_processed_pixels": runtime.max_processed_pixels, "load_id": runtime.load_id,
    }


def weightless_runtime(name: str, card: dict[str, Any]) -> ModelRuntime:
    """The model's runtime without its net: validation, pre-processing and answers only."""
    config = ModelConfig.model_validate(card["config"])
    runtime = RUNTIMES[net_spec(config.architecture).task](
        name=name, version=card["version"], config=config, model=torch.nn.Module(),
        device=torch.device(card["device"]), sha256=card["sha256"], metadata=card.get("metadata") or {},
    )
    runtime.max_processed_pixels = card.get("max_processed_pixels")
    runtime.load_id = card["load_id"]
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


def _counter(path: Path, create: bool) -> mmap.mmap | None:
    """The snapshot's generation: 8 bytes of shared memory beside it, bumped after every write."""
    try:
        fd = os.open(path, (os.O_RDWR | os.O_CREAT) if create else os.O_RDONLY, 0o600)
    except FileNotFoundError:
        return None
    try:
        if create and os.fstat(fd).st_size < 8:
            os.pwrite(fd, bytes(8), 0)  # written, not truncated: the page exists before it is mapped
        return mmap.mmap(fd, 8, prot=mmap.PROT_READ | (mmap.PROT_WRITE if create else 0))
    finally:
        os.close(fd)


class SnapshotWriter:
    """Writes the snapshot when it changed (or when asked to), by rename so readers never see half,
    then bumps the generation that readers compare (a memory read per query, no system call)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._last = b""
        self._generation = _counter(path.with_suffix(".generation"), create=True)

    def write(self, doc: dict[str, Any], *, force: bool = False) -> bool:
        """False when it could not be written (a full /dev/shm): the next call tries again, and HTTP
        processes meanwhile answer 503 for what they cannot prepare."""
        data = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY, default=str)
        if data == self._last and not force:
            return True
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            self._last = b""
            log.warning("model state not published: %s; retrying", exc.strerror or exc)
            return False
        self._last = data
        assert self._generation is not None
        _GENERATION.pack_into(self._generation, 0, _GENERATION.unpack_from(self._generation)[0] + 1)
        return True


class SnapshotReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._generation: mmap.mmap | None = None
        self.seen = -1

    def read_if_changed(self) -> dict[str, Any] | None:
        """The snapshot when it changed since the last call (None: unchanged, or not written yet)."""
        if self._generation is None:
            self._generation = _counter(self.path.with_suffix(".generation"), create=False)
            if self._generation is None:
                return None
        generation = _GENERATION.unpack_from(self._generation)[0]
        if generation == self.seen:
            return None
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        self.seen = generation  # read before the file: a write in between is seen at the next call
        return orjson.loads(data)
