"""Load ``.pt2`` archives written by ``torch.export.save`` without running anything they carry.

What ``torch.export.load`` deserialises, and where a crafted archive could run code (torch 2.14):

- the program (``models/model.json``): JSON, but its symbolic-shape strings (``expr_str``,
  ``range_constraints``) go through ``sympy.sympify``, i.e. ``eval``; its ``guards_code`` strings are
  compiled with ``exec`` by ``ExportedProgram.module()``; each node's ``target`` is resolved by
  ``getattr`` from ``torch`` (``torch.os.system`` resolves) and called at forward time;
- weights and constants flagged ``use_pickle`` are read with ``torch.load(weights_only=False)``,
  custom and opaque objects with ``torch._C._pickle_load_obj`` / ``pickle.loads``;
- the sample inputs are read weights-only, falling back to ``weights_only=False`` on failure;
- ``data/aotinductor/`` holds compiled shared libraries that are dlopen-ed;
- a record of 0 bytes becomes ``torch.zeros`` of whatever size its table claims.

So nothing goes to torch as the user wrote it. The archive's records are read as bytes (stored, not
compressed: no zip bombs), checked here and in exported_program.py, and a new archive is written
from the parts that passed: the cleaned program, raw weights and tensor constants whose bytes cover
the shapes the program expects (on the CPU; moved to the serving device afterwards), and empty
sample inputs (modserve never uses them). Anything else is refused with the reason.
"""

from __future__ import annotations

import io
import json
import math
import re
import zipfile
from typing import Any, BinaryIO

import torch

from app.errors import CheckpointCorrupt, CheckpointFormatMismatch, UnsafeCheckpoint
from app.loading.exported_program import NAME, checked_program, parameter_sizes, refuse, tensor_sizes
from app.loading.files import where
from app.nets.declared import ExportedNet

_CONFIGS = {"weights": "data/weights/model_weights_config.json", "constants": "data/constants/model_constants_config.json"}
_PAYLOAD_NAME = {"weights": re.compile(r"^weight_\d{1,6}$"), "constants": re.compile(r"^tensor_\d{1,6}$")}
_PROGRAM = "models/model.json"
_SAMPLE_INPUTS = "data/sample_inputs/model.pt"
_KNOWN = re.compile(
    r"^(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|models/model\.json"
    r"|data/weights/model_weights_config\.json|data/weights/weight_\d{1,6}"
    r"|data/constants/model_constants_config\.json|data/constants/tensor_\d{1,6}"
    r"|data/sample_inputs/model\.pt|extra/[A-Za-z0-9_.-]{1,64})$"
)
MAX_PROGRAM_BYTES = 64 << 20
_ERRORS = (RuntimeError, AssertionError, KeyError, ValueError, TypeError, AttributeError, IndexError, OverflowError)


def _check_zip(path: str, fh: BinaryIO) -> None:
    """torch.export.save stores every record uncompressed: a compressed one could expand 1000-fold."""
    fh.seek(0)
    try:
        with zipfile.ZipFile(fh) as zf:
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED or info.file_size != info.compress_size:
                    raise refuse(path, f"record {info.filename[:80]!r} is compressed (torch.export.save stores records as they are)")
                if info.filename.endswith("models/model.json") and info.file_size > MAX_PROGRAM_BYTES:
                    raise refuse(path, f"its program is {info.file_size} bytes")
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise CheckpointCorrupt(f"{path}: not a readable zip archive ({exc})") from None


def _tensor_bytes(meta: dict[str, Any]) -> tuple[list[int], int]:
    """The shape a payload's table declares, and the bytes its record must hold for it."""
    from torch._export.serde.serialize import _SERIALIZE_TO_TORCH_DTYPE
    from torch._export.serde.schema import ScalarType

    sizes = [int(d["as_int"]) for d in meta["sizes"]]
    strides = [int(d["as_int"]) for d in meta["strides"]]
    offset = int(meta.get("storage_offset", {}).get("as_int", 0))
    element = torch._utils._element_size(_SERIALIZE_TO_TORCH_DTYPE[ScalarType(int(meta["dtype"]))])
    if len(sizes) != len(strides) or min([offset, *sizes, *strides], default=0) < 0:
        raise ValueError(f"sizes {sizes}, strides {strides}, offset {offset}")
    if math.prod(sizes) == 0:
        return sizes, 0
    return sizes, (offset + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1) * element


def _checked_payloads(path: str, reader: Any, kind: str, expected: dict[str, list[int]]) -> dict[str, bytes]:
    """Raw tensor records only, each long enough for its shape, which is the one the program expects."""
    raw = reader.read_bytes(_CONFIGS[kind])
    table = json.loads(raw)
    records: dict[str, bytes] = {}
    for fqn, meta in table.get("config", {}).items():
        file = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or not _PAYLOAD_NAME[kind].match(file) or not isinstance(meta.get("tensor_meta"), dict):
            raise refuse(path, f"{kind[:-1]} {fqn[:80]!r} is stored as a pickle or custom object ({file[:40]!r})")
        if not NAME.match(fqn):
            raise refuse(path, f"{kind[:-1]} name {fqn[:80]!r} is not a plain name")
        sizes, needed = _tensor_bytes(meta["tensor_meta"])
        name = f"data/{kind}/{file}"
        data = records.get(name) or reader.read_bytes(name)
        if len(data) < needed:
            raise refuse(path, f"{kind[:-1]} {fqn[:80]!r} claims {sizes} but its record holds {len(data)} bytes")
        if fqn in expected and expected[fqn] != sizes:
            raise refuse(path, f"{kind[:-1]} {fqn[:80]!r} has shape {sizes}; the program expects {expected[fqn]}")
        meta["tensor_meta"]["device"] = {"type": "cpu", "index": None}  # moved to the serving device after
        records[name] = data
    records[_CONFIGS[kind]] = json.dumps(table).encode()
    return records


def _checked_records(path: str, fh: BinaryIO) -> tuple[dict[str, bytes], int, int]:
    """The records of the archive to rebuild, and the program's number of user inputs and outputs."""
    from torch.export.pt2_archive._package import PT2ArchiveReader

    _check_zip(path, fh)
    fh.seek(0)
    reader = PT2ArchiveReader(io.BytesIO(fh.read()))
    unknown = [n for n in reader.get_file_names() if not _KNOWN.match(n)]
    if unknown:
        raise refuse(path, f"it holds {', '.join(sorted(unknown)[:5])} (compiled code, pickles or other"
                     " programs are not served; save with torch.export.save)")
    program, inputs, n_out = checked_program(path, reader.read_bytes(_PROGRAM))
    records = {_PROGRAM: json.dumps(program).encode(), _SAMPLE_INPUTS: b""}  # empty: example_inputs = None
    expected = parameter_sizes(program)
    for kind in _CONFIGS:
        records.update(_checked_payloads(path, reader, kind, expected))
    return records, len(inputs), n_out


def read_exported(fh: BinaryIO, device: torch.device, *, check_only: bool = False) -> ExportedNet | None:
    """Check the archive, rebuild it from its checked parts, load that, move it to ``device``
    (``check_only``: stop after the checks, load nothing)."""
    from torch.export.passes import move_to_device_pass
    from torch.export.pt2_archive._package import PT2ArchiveWriter

    path = where(fh)
    try:
        records, n_in, n_out = _checked_records(path, fh)
    except (UnsafeCheckpoint, CheckpointCorrupt, CheckpointFormatMismatch):
        raise
    except _ERRORS as exc:
        raise CheckpointCorrupt(f"{path}: not a readable torch.export archive ({str(exc).splitlines()[0][:200]})") from None
    if check_only:
        return None
    clean = io.BytesIO()
    with PT2ArchiveWriter(clean) as writer:
        for name, data in records.items():
            writer.write_bytes(name, data)
    clean.seek(0)
    try:
        program = move_to_device_pass(torch.export.load(clean), device)
        module = program.module()
    except Exception as exc:  # noqa: BLE001 - torch's deserialiser raises many types for bad input
        raise CheckpointCorrupt(f"{path}: the torch.export program does not load ({str(exc).splitlines()[0][:200]})") from None
    return ExportedNet(module, inputs=n_in, outputs=n_out)


def _shape(program: dict[str, Any], spec: dict[str, Any], kind: str) -> list[int | str]:
    name = spec[kind].get("arg", {}).get("as_tensor", {}).get("name")
    return [d.get("as_int", "dynamic") for d in tensor_sizes(program, name)]


def describe_exported(fh: BinaryIO) -> tuple[dict[str, Any], str | None]:
    """Inputs and outputs (shapes, dynamic dimensions as "dynamic") read from the archive's program
    without loading it, and why the loader would refuse it (None: it would load)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader

    path = where(fh)
    try:
        _check_zip(path, fh)
        fh.seek(0)
        program = json.loads(PT2ArchiveReader(io.BytesIO(fh.read())).read_bytes(_PROGRAM))
        signature = program["graph_module"]["signature"]
        facts = {
            "inputs": [_shape(program, s, "user_input") for s in signature["input_specs"] if "user_input" in s],
            "outputs": [_shape(program, s, "user_output") for s in signature["output_specs"] if "user_output" in s],
            "operators": len(program["graph_module"]["graph"].get("nodes", [])),
        }
    except (UnsafeCheckpoint, CheckpointCorrupt) as exc:
        return {"inputs": [], "outputs": [], "operators": 0}, exc.message
    except (*_ERRORS, RecursionError) as exc:
        raise CheckpointCorrupt(f"{path}: not a readable torch.export archive ({str(exc).splitlines()[0][:200]})") from None
    try:
        read_exported(fh, torch.device("meta"), check_only=True)
    except (UnsafeCheckpoint, CheckpointCorrupt, CheckpointFormatMismatch) as exc:
        return facts, exc.message
    return facts, None
