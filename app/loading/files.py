"""File-level checks done before anything is unpickled: existence, digest, container sniffing.

Every check here reads bytes only, so a malicious pickle can be refused (wrong
digest, not a checkpoint) before any of its opcodes are interpreted.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import threading
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch

from app.errors import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointFormatMismatch,
    CheckpointNotFound,
    UnsafeCheckpoint,
)

Container = Literal["zip", "legacy", "safetensors", "exported"]

# torch.serialization.safe_globals mutates one process-wide set: hold this lock around
# every scan/load that depends on it so concurrent loads cannot see each other's allowlist.
TORCH_LOAD_LOCK = threading.RLock()

_ZIP_MAGIC = b"PK\x03\x04"


_PICKLE_PROTO = 0x80


def file_sha256(path: Path | BinaryIO) -> str:
    """Hex SHA-256 of a file (or of an open one, from its start), streamed: GBs never sit in memory."""
    if not isinstance(path, (str, Path)):
        path.seek(0)
        return _digest(path)
    with open(path, "rb") as fh:
        return _digest(fh)


def _digest(fh: BinaryIO) -> str:
    digest = hashlib.sha256()
    for chunk in iter(lambda: fh.read(1 << 20), b""):
        digest.update(chunk)
    return digest.hexdigest()


def where(fh: BinaryIO) -> str:
    """The path of an open checkpoint, for messages."""
    return str(getattr(fh, "name", "<checkpoint>"))


def require_file(path: Path) -> int:
    """Raise CheckpointNotFound / CheckpointCorrupt("empty file"); return the size."""
    if not path.exists():
        raise CheckpointNotFound(f"checkpoint file not found: {path}")
    if not path.is_file():
        raise CheckpointNotFound(f"checkpoint path is not a regular file: {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointCorrupt(f"{path}: empty file (0 bytes), not a torch checkpoint")
    return size


def sniff_container(fh: BinaryIO) -> Container:
    """Tell torch's zip format from the legacy pickle stream and safetensors, refusing anything else.

    torch.load's own error for a half-copied zip is an obscure PytorchStreamReader
    message; checking the central directory here gives an actionable one instead.
    """
    path = where(fh)
    if _looks_like_safetensors(fh):  # first: a header length's low byte may well be 0x80
        return "safetensors"
    fh.seek(0)
    head = fh.read(4)
    if head.startswith(_ZIP_MAGIC):
        try:
            with zipfile.ZipFile(fh) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise CheckpointCorrupt(
                f"{path}: truncated or not a torch checkpoint (zip archive without a readable "
                f"central directory: {exc}); was the download or copy cut short?"
            ) from None
        if any(n.endswith("/constants.pkl") or n == "constants.pkl" for n in names):
            raise CheckpointFormatMismatch(
                f"{path} is a TorchScript archive (torch.jit.save), which is not served; "
                "save the model or its state_dict with torch.save"
            )
        if any(n.split("/", 1)[-1] == "models/model.json" for n in names):
            return "exported"  # torch.export.save's archive: read by app/loading/exported.py, never unpickled
        if not any(n == "data.pkl" or n.endswith("/data.pkl") for n in names):
            raise CheckpointCorrupt(
                f"{path}: not a torch checkpoint (a zip archive without data.pkl); "
                "save the model or its state_dict with torch.save"
            )
        return "zip"
    if head and head[0] == _PICKLE_PROTO:
        return "legacy"
    if path.endswith(".safetensors"):
        return "safetensors"  # a broken one is refused by read_safetensors with safetensors' own reason
    raise CheckpointCorrupt(
        f"{path}: not a torch checkpoint (neither a torch zip archive nor a pickle stream; "
        f"starts with {head!r})"
    )


def pickle_protocol(fh: BinaryIO) -> int | None:
    """Protocol of the object pickle (from its PROTO opcode), without unpickling anything."""
    fh.seek(0)
    head = fh.read(2)
    if head.startswith(_ZIP_MAGIC[:2]):
        with zipfile.ZipFile(fh) as zf:
            name = next((n for n in zf.namelist() if n.endswith("data.pkl")), None)
            head = zf.open(name).read(2) if name else b""
    return head[1] if len(head) == 2 and head[0] == _PICKLE_PROTO else None


_WO_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|\nCheck the documentation|$)", re.S)
_WO_GLOBAL = re.compile(r"GLOBAL (\S+) ")


def weights_only_reason(exc: BaseException) -> str:
    """The one useful line of torch's long weights_only refusal."""
    text = str(exc)
    match = _WO_REASON.search(text)
    reason = match.group(1) if match else text
    return " ".join(reason.split())[:300]


def torch_load(
    fh: BinaryIO,
    *,
    safe: Iterable[Any] = (),
    needed: Callable[[], list[str]] = list,
    weights_only: bool = True,
) -> Any:
    """torch.load onto the CPU, translating torch's errors into typed CheckpointErrors.

    ``safe`` are extra safe_globals entries (objects or ``(obj, "module.Name")`` tuples);
    ``needed`` lists the checkpoint's globals for the UnsafeCheckpoint message. Loading
    from the already open (and digested) file means a swapped path cannot sneak in.
    """
    path = where(fh)
    try:
        with TORCH_LOAD_LOCK, torch.serialization.safe_globals(list(safe)):
            fh.seek(0)
            return torch.load(fh, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as exc:
        if not weights_only:
            raise CheckpointCorrupt(f"{path}: cannot unpickle: {exc}") from None
        reason = weights_only_reason(exc)
        if "Unsupported operand" in reason and "GLOBAL" not in reason:
            protocol = pickle_protocol(fh)
            if protocol and protocol > 2:
                raise CheckpointCorrupt(
                    f"{path} was saved with pickle protocol {protocol}, which torch's weights-only "
                    "loader cannot read; re-save it with torch.save's default protocol (2)"
                ) from None
            raise CheckpointCorrupt(f"{path}: truncated or not a torch checkpoint ({reason})") from None
        found = needed()
        match = _WO_GLOBAL.search(reason)
        if match and match.group(1) not in found:
            found.append(match.group(1))
        raise UnsafeCheckpoint(
            f"{path}: refused by torch's weights-only unpickler ({reason}); "
            f"globals in the file: {', '.join(sorted(found)) or 'none'}",
            globals_needed=sorted(found),
        ) from None
    except (EOFError, zipfile.BadZipFile) as exc:
        raise CheckpointCorrupt(
            f"{path}: truncated or not a torch checkpoint ({exc or 'unexpected end of file'})"
        ) from None
    except RuntimeError as exc:
        msg = " ".join(str(exc).split())[:300]
        if "PytorchStreamReader" in msg or "magic number" in msg or "unexpected EOF" in msg:
            raise CheckpointCorrupt(f"{path}: truncated or not a torch checkpoint ({msg})") from None
        raise CheckpointCorrupt(f"{path}: torch.load failed: {msg}") from None
    except (AttributeError, ModuleNotFoundError, ImportError) as exc:
        # Only reachable with weights_only=False: the pickled class is not importable here.
        raise CheckpointError(
            f"{path}: trusted full unpickling failed: {exc}; the pickled classes must be importable "
            "by the server (use pickled_class_names with weights-only loading instead)"
        ) from None
    except (ValueError, TypeError, KeyError, IndexError, UnicodeDecodeError, OverflowError) as exc:
        raise CheckpointCorrupt(
            f"{path}: unpickling failed ({type(exc).__name__}: {exc}); the file is corrupt or its "
            "pickled classes do not match the configured architecture"
        ) from None


# --- safetensors: a JSON header and raw tensor bytes; nothing in it is ever unpickled -------------

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024
"""safetensors' own limit on the JSON header."""


def _looks_like_safetensors(fh: BinaryIO) -> bool:
    """8-byte little-endian header length, then a JSON object that fits in the file."""
    fh.seek(0)
    head = fh.read(9)
    if len(head) < 9 or head[8:9] != b"{":
        return False
    length = int.from_bytes(head[:8], "little")
    size = fh.seek(0, os.SEEK_END)
    return 2 <= length <= min(SAFETENSORS_MAX_HEADER, size - 8)


def _same_file(fh: BinaryIO) -> str:
    """A path to the very file ``fh`` has open (so what was digested is what is read), where the
    system offers one; else the file's name."""
    try:
        fd_path = f"/proc/self/fd/{fh.fileno()}"
    except (AttributeError, OSError, ValueError):
        return where(fh)
    return fd_path if os.path.exists(fd_path) else where(fh)


def _header_metadata(raw: dict[str, str] | None) -> dict[str, Any]:
    """The header's ``__metadata__`` (strings only); values that are JSON (``"[0, 255]"``) are decoded."""
    out: dict[str, Any] = {}
    for key, value in (raw or {}).items():
        try:
            out[str(key)] = json.loads(value)
        except (TypeError, ValueError, RecursionError):
            out[str(key)] = value
    return out


def _safetensors_error(fh: BinaryIO, exc: BaseException) -> CheckpointCorrupt:
    msg = " ".join(str(exc).split())[:300]
    return CheckpointCorrupt(f"{where(fh)}: not a valid safetensors file ({msg}); was the download or copy cut short?")


def read_safetensors(fh: BinaryIO) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """All tensors of a ``.safetensors`` file (safetensors.torch.load_file: no pickle) and its metadata."""
    import safetensors
    import safetensors.torch

    source = _same_file(fh)
    try:
        with safetensors.safe_open(source, framework="pt") as handle:
            metadata = handle.metadata()
        tensors = safetensors.torch.load_file(source, device="cpu")
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _safetensors_error(fh, exc) from None
    return tensors, _header_metadata(metadata)


def safetensors_shapes(fh: BinaryIO) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Meta-device tensors of each entry's shape and dtype, from the header alone (for inspection)."""
    import safetensors

    source = _same_file(fh)
    out: dict[str, torch.Tensor] = {}
    try:
        with safetensors.safe_open(source, framework="pt") as handle:
            metadata = handle.metadata()
            for key in handle.keys():
                part = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(part.get_dtype(), torch.uint8)
                out[key] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _safetensors_error(fh, exc) from None
    return out, _header_metadata(metadata)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
