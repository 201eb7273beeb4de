"""Request and result payloads between processes: raw array bytes in files of a tmpfs folder.

A file in ``/dev/shm`` is POSIX shared memory; writing an array there and reading it back are the
two copies any shared-memory transport makes, with no pickling and no mapping to leak. Each file is
named after the HTTP process and the request (``<pid>-<n>.in`` / ``.out``), so the request that
made it removes it when it ends (answer, error or disconnect), and the supervisor removes a dead
process's files by their prefix.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import Overloaded, ServiceError

_DTYPES = frozenset(np.dtype(t).str for t in (
    "uint8", "int8", "int16", "int32", "int64", "float16", "float32", "float64", "bool",
))
_ALIGN = 64

Layout = dict[str, Any]
"""One array in a payload file: ``dtype`` (numpy ``str``), ``shape``, ``offset``, ``nbytes``."""


class PayloadDir:
    """The folder of payload files, shared by every process of one server."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._prefix = f"{root}{os.sep}"

    def path(self, pid: int, request: int, kind: str) -> str:
        return f"{self._prefix}{pid}-{request}.{kind}"  # a str: pathlib costs more than the write

    def files(self) -> list[Path]:
        return sorted(self.root.iterdir())

    def sweep(self, pid: int) -> int:
        """Remove every payload file of process ``pid`` (it died); returns how many there were."""
        removed = 0
        for path in self.root.glob(f"{pid}-*"):
            removed += discard(path)
        return removed


def discard(path: str | Path) -> int:
    try:
        os.unlink(path)
        return 1
    except FileNotFoundError:
        return 0


def write_arrays(path: str | Path, arrays: Sequence[np.ndarray]) -> list[Layout]:
    """Write ``arrays`` one after another into a new file; their layouts say where each lies."""
    layouts: list[Layout] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        offset = 0
        for array in arrays:
            array = np.require(array, requirements="C")  # (ascontiguousarray makes a 0-d array 1-d)
            raw = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(b"")
            done = 0
            while done < len(raw):
                done += os.pwrite(fd, raw[done:], offset + done)
            layouts.append({"dtype": array.dtype.str, "shape": list(array.shape), "offset": offset,
                            "nbytes": array.nbytes})
            offset += -(-array.nbytes // _ALIGN) * _ALIGN
    except OSError as exc:
        os.close(fd)
        discard(path)
        if exc.errno == errno.ENOSPC:  # a container's small /dev/shm (docs/workers.md: shm_size)
            raise Overloaded("shared memory for request payloads is full; retry later") from None
        raise
    os.close(fd)
    return layouts


def read_arrays(path: str | Path, layouts: Sequence[Layout]) -> list[np.ndarray]:
    """Copy the arrays out of a payload file (the file may be removed right after)."""
    out: list[np.ndarray] = []
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        for layout in layouts:
            array = _empty(layout, size)
            raw = memoryview(array.reshape(-1).view(np.uint8)) if array.size else memoryview(bytearray())
            done = 0
            while done < len(raw):
                n = os.preadv(fd, [raw[done:]], layout["offset"] + done)
                if n == 0:
                    raise ServiceError(f"payload file {os.path.basename(path)} ends early")
                done += n
            out.append(array)
    finally:
        os.close(fd)
    return out


def _empty(layout: Layout, file_size: int) -> np.ndarray:
    dtype, shape = str(layout["dtype"]), tuple(int(d) for d in layout["shape"])
    if dtype not in _DTYPES or any(d < 0 for d in shape):
        raise ServiceError(f"payload layout not understood: {dtype} {shape}")
    array = np.empty(shape, dtype=np.dtype(dtype))
    if array.nbytes != layout["nbytes"] or layout["offset"] + array.nbytes > file_size:
        raise ServiceError("payload layout does not match its file")
    return array
