"""Durable writes into the store: temporary file, fsync, rename, fsync the folder.

A reader (or a crash) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import tomli_w

from app.errors import Conflict


def atomic_write(path: Path, write: Callable[[IO[bytes]], None]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename inside ``folder`` durable."""
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    atomic_write(path, lambda fh: fh.write(data))


def _without_none(doc: Mapping[str, Any]) -> dict[str, Any]:
    """TOML has no null: unset optional keys are left out."""
    return {k: _without_none(v) if isinstance(v, Mapping) else v for k, v in doc.items() if v is not None}


def to_toml(doc: Mapping[str, Any]) -> str:
    """A ``model.toml`` document as TOML text (tomli-w; ``None`` values left out)."""
    return tomli_w.dumps(_without_none(doc))


def write_model(root: Path, name: str, config: Mapping[str, Any], state_dict: Mapping[str, Any],
                version: str = "1") -> Path:
    """Write ``root/name/model.toml`` and ``root/name/version/<file>`` with ``torch.save``, atomically.

    For tools and tests that build a store on disk (the demo store, bench); the admin API has its own
    staged, validated path.
    """
    import torch

    folder = root / name
    buf = io.BytesIO()
    torch.save(state_dict, buf)
    file_name = config.get("checkpoint", {}).get("file", "model.pth")
    atomic_write_bytes(folder / version / file_name, buf.getvalue())
    atomic_write_bytes(folder / "model.toml", to_toml(config).encode())
    return folder


@contextlib.contextmanager
def upload_lock(staging: Path, name: str) -> Iterator[None]:
    """One upload per model at a time across the HTTP processes of one server (MODSERVE_WORKERS):
    a lock file in the staging folder, removed by its holder so the store keeps nothing; an upload
    already running in another process is a 409."""
    path = staging / f".upload-{name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise Conflict(f"an upload of model {name!r} is running; try again when it finishes") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break  # else the previous holder removed this file after we opened it: open the new one
        except FileNotFoundError:
            pass
        os.close(fd)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
