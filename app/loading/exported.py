"""Load ``.pt2`` archives written by ``torch.export.save`` without running anything they carry.

What ``torch.export.load`` deserialises, and where a crafted archive could run code (torch 2.14):

- the program (``models/model.json``): JSON, but its symbolic-shape strings (``expr_str``,
  ``range_constraints``) go through ``sympy.sympify``, i.e. ``eval``; its ``guards_code`` strings are
  compiled with ``exec`` by ``ExportedProgram.module()``; each node's ``target`` is resolved by
  ``getattr`` from ``torch`` (``torch.os.system`` resolves) and called at forward time;
- weights and constants flagged ``use_pickle`` are read with ``torch.load(weights_only=False)``,
  custom and opaque objects with ``torch._C._pickle_load_obj`` / ``pickle.loads``;
- the sample inputs are read weights-only, falling back to ``weights_only=False`` on failure;
- ``data/aotinductor/`` holds compiled shared libraries that are dlopen-ed.

So nothing goes to torch as the user wrote it. The archive's records are read as bytes, checked
here, and a new archive is written from the parts that passed: the program with its node metadata
dropped, every symbolic expression, name and guard matched against a strict grammar, every operator
an ATen operator without file access; raw (non-pickled) weights and tensor constants only; sample
inputs loaded weights-only by us and saved again. Anything else is refused with the reason.
"""

from __future__ import annotations

import io
import json
import re
from typing import Any, BinaryIO

import torch

from app.errors import CheckpointCorrupt, CheckpointFormatMismatch, UnsafeCheckpoint
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
_NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,199}(\.[A-Za-z0-9_]{1,200}){0,32})?$")
_OPERATOR = re.compile(r"^torch\.ops\.aten\.([a-z_][a-z0-9_]{0,99})\.([a-zA-Z_][A-Za-z0-9_]{0,99})$")
_SYMINT_OPS = {f"_operator.{op}" for op in ("getitem", "add", "sub", "mul", "floordiv", "mod", "neg", "eq", "ge", "le", "gt", "lt")}
_NO_FILE_OPS = frozenset({"save", "from_file", "_print", "warn"})
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z][A-Za-z0-9]*)|'([su]\d{1,6})'|(\d{1,19})|(//|==|<=|>=|[-+*/%(),<>=]))")
MAX_EXPR_CHARS = 1024
"""Longest shape expression (a U-Net's are about 250); with no powers and at most MAX_EXPR_SYMBOLS
symbols, evaluating one stays cheap (sympy compares a Max's arguments pairwise)."""
MAX_EXPR_SYMBOLS = 8
_EXPR_WORDS = frozenset({
    "Symbol", "Integer", "Rational", "Float", "positive", "integer", "True", "False", "Add", "Mul",
    "Mod", "FloorDiv", "CeilDiv", "PythonMod", "Max", "Min", "Abs", "IntTrueDiv", "CleanDiv", "TruncToInt", "oo",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
})
_GUARD_TERM = r"(?:L\['[A-Za-z_][A-Za-z0-9_]{0,99}'\](?:\.size\(\)\[\d{1,2}\]|\[\d{1,3}\])*|-?\d{1,19})"
_GUARD = re.compile(rf"^{_GUARD_TERM}\s*(?:==|!=|<=|>=|<|>)\s*{_GUARD_TERM}$")
MAX_PROGRAM_BYTES = 64 << 20


def _refuse(path: str, why: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{path}: refusing this torch.export archive: {why} (nothing in it was run)", globals_needed=[])


def _check_expr(path: str, text: str) -> None:
    """Symbolic-shape expressions reach sympy's eval: only symbols, integers, arithmetic and a few
    sympy functions by name pass; no attribute access, subscripts, strings or underscores, and no
    powers (``9**9**9`` would hang sympy)."""
    if len(text) > MAX_EXPR_CHARS or "**" in text:
        raise _refuse(path, f"symbolic expression {text[:80]!r} is too long or raises to a power")
    pos, symbols = 0, set()
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise _refuse(path, f"symbolic expression {text[:80]!r} is not a plain shape expression")
        word = m.group(1)
        if word and word not in _EXPR_WORDS and not re.fullmatch(r"[su]\d{1,6}", word):
            raise _refuse(path, f"symbolic expression {text[:80]!r} names {word!r}")
        symbols.add(m.group(2) or (word if word and word[0] in "su" and word[1:].isdigit() else None))
        if len(symbols - {None}) > MAX_EXPR_SYMBOLS:
            raise _refuse(path, f"symbolic expression {text[:80]!r} has more than {MAX_EXPR_SYMBOLS} symbols")
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1


def _check_target(path: str, target: str) -> None:
    """A node's operator: an ATen operator with no file access, or arithmetic on symbolic sizes."""
    if target in _SYMINT_OPS:
        return
    m = _OPERATOR.match(target)
    if not m:
        raise _refuse(path, f"operator {target[:100]!r} is not an ATen operator")
    name, overload = m.groups()
    if name in _NO_FILE_OPS or "file" in name:
        raise _refuse(path, f"operator {target!r} reads or writes files or the console")
    packet = getattr(torch.ops.aten, name, None)
    op = getattr(packet, overload, None) if packet is not None else None
    if op is None:
        raise _refuse(path, f"operator {target!r} does not exist in this torch")


def _walk(path: str, node: Any, key: str = "") -> Any:
    """Check every string that torch would resolve, evaluate or compile; drop node metadata."""
    if isinstance(node, dict):
        if "target" in node and "inputs" in node and "outputs" in node:  # a graph node
            _check_target(path, str(node["target"]))
            node = {**node, "metadata": {}}  # stack traces, module paths: resolved by getattr, not needed
        return {k: _walk(path, v, k) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(path, v, key) for v in node]
    if isinstance(node, str):
        if key == "expr_str":
            _check_expr(path, node)
        elif key in ("name", "fqn", "target", "forward_arg_names") or key.endswith("_name"):
            if not _NAME.match(node):
                raise _refuse(path, f"{key} {node[:80]!r} is not a plain name")
    return node


def _checked_program(path: str, raw: bytes) -> tuple[dict[str, Any], int, int]:
    """The program JSON, checked; with its number of user inputs and outputs."""
    try:
        program = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointCorrupt(f"{path}: the archive's program is not readable JSON") from None
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise CheckpointCorrupt(f"{path}: the archive's program has no graph")
    for expr in program.get("range_constraints") or {}:
        _check_expr(path, str(expr))
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _GUARD.match(guard):
            raise _refuse(path, f"guard {str(guard)[:100]!r} is not a plain size comparison")
    if program["graph_module"].get("treespec_namedtuple_fields"):
        raise _refuse(path, "its inputs or outputs use named tuples; return a plain tensor or tuple")
    program = _walk(path, program)
    signature = program["graph_module"].get("signature") or {}
    inputs = [s for s in signature.get("input_specs", []) if "user_input" in s]
    outputs = [s for s in signature.get("output_specs", []) if "user_output" in s]
    _require_dynamic_batch(path, program, inputs)
    return program, len(inputs), len(outputs)


def _require_dynamic_batch(path: str, program: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
    values = program["graph_module"]["graph"].get("tensor_values", {})
    for spec in inputs:
        name = spec["user_input"].get("arg", {}).get("as_tensor", {}).get("name")
        sizes = values.get(name, {}).get("sizes") if name else None
        if not sizes or "as_expr" not in sizes[0]:
            fixed = sizes[0].get("as_int") if sizes else None
            raise CheckpointFormatMismatch(
                f"{path}: input {name!r} was exported with a fixed batch size ({fixed}); modserve batches requests,"
                " so export with a dynamic batch dimension: batch = torch.export.Dim('batch', min=1, max=1024);"
                " torch.export.export(model, (x,), dynamic_shapes=({0: batch},)) (one entry per input)"
            )


def _checked_payloads(path: str, reader: Any, kind: str) -> dict[str, bytes]:
    """Raw tensor records only: a payload that needs unpickling is refused."""
    raw = reader.read_bytes(_CONFIGS[kind])
    try:
        config = json.loads(raw).get("config", {})
    except (ValueError, AttributeError, RecursionError):
        raise CheckpointCorrupt(f"{path}: the archive's {kind} table is not readable JSON") from None
    records = {_CONFIGS[kind]: raw}
    for fqn, meta in config.items():
        file = str(meta.get("path_name", ""))
        if meta.get("use_pickle") or not _PAYLOAD_NAME[kind].match(file):
            raise _refuse(path, f"{kind[:-1]} {fqn[:80]!r} is stored as a pickle or custom object ({file[:40]!r})")
        if not _NAME.match(fqn):
            raise _refuse(path, f"{kind[:-1]} name {fqn[:80]!r} is not a plain name")
        records[f"data/{kind}/{file}"] = reader.read_bytes(f"data/{kind}/{file}")
    return records


def _sample_inputs(path: str, raw: bytes) -> bytes:
    """Loaded weights-only (tensors and containers, nothing else) and written again by us."""
    try:
        value = torch.load(io.BytesIO(raw), weights_only=True, map_location="cpu")
    except Exception as exc:  # noqa: BLE001 - any refusal of the weights-only unpickler
        raise _refuse(path, f"its sample inputs are not plain tensors ({str(exc).splitlines()[0][:160]})") from None
    out = io.BytesIO()
    torch.save(value, out)
    return out.getvalue()


def _sizes(program: dict[str, Any], spec: dict[str, Any], kind: str) -> list[int | str]:
    name = spec[kind].get("arg", {}).get("as_tensor", {}).get("name")
    value = program["graph_module"]["graph"].get("tensor_values", {}).get(name, {})
    return [d.get("as_int", "dynamic") for d in value.get("sizes", [])]


def describe_exported(fh: BinaryIO) -> tuple[dict[str, Any], str | None]:
    """Inputs and outputs (shapes, dynamic dimensions as "dynamic") read from the archive's program
    without loading it, and why the loader would refuse it (None: it would load)."""
    from torch.export.pt2_archive._package import PT2ArchiveReader

    path = where(fh)
    fh.seek(0)
    try:
        reader = PT2ArchiveReader(io.BytesIO(fh.read()))
        program = json.loads(reader.read_bytes(_PROGRAM)[:MAX_PROGRAM_BYTES])
        signature = program["graph_module"]["signature"]
        facts = {
            "inputs": [_sizes(program, s, "user_input") for s in signature["input_specs"] if "user_input" in s],
            "outputs": [_sizes(program, s, "user_output") for s in signature["output_specs"] if "user_output" in s],
            "operators": len(program["graph_module"]["graph"].get("nodes", [])),
        }
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{path}: not a readable torch.export archive ({str(exc).splitlines()[0][:200]})") from None
    try:
        read_exported(fh, torch.device("meta"), check_only=True)
    except (UnsafeCheckpoint, CheckpointCorrupt, CheckpointFormatMismatch) as exc:
        return facts, exc.message
    return facts, None


def read_exported(fh: BinaryIO, device: torch.device, *, check_only: bool = False) -> ExportedNet | None:
    """Check the archive, rebuild it from its checked parts, load that, move it to ``device``
    (``check_only``: stop after the checks, load nothing)."""
    from torch.export.passes import move_to_device_pass
    from torch.export.pt2_archive._package import PT2ArchiveReader, PT2ArchiveWriter

    path = where(fh)
    fh.seek(0)
    try:
        reader = PT2ArchiveReader(io.BytesIO(fh.read()))
        names = reader.get_file_names()
        unknown = [n for n in names if not _KNOWN.match(n)]
        if unknown:
            raise _refuse(path, f"it holds {', '.join(sorted(unknown)[:5])} (compiled code, pickles or other"
                          " programs are not served; save with torch.export.save)")
        raw = reader.read_bytes(_PROGRAM)
        if len(raw) > MAX_PROGRAM_BYTES:
            raise _refuse(path, f"its program is {len(raw)} bytes")
        program, n_in, n_out = _checked_program(path, raw)
        records = {_PROGRAM: json.dumps(program).encode()}
        for kind in _CONFIGS:
            records.update(_checked_payloads(path, reader, kind))
        records[_SAMPLE_INPUTS] = _sample_inputs(path, reader.read_bytes(_SAMPLE_INPUTS))
    except (UnsafeCheckpoint, CheckpointCorrupt, CheckpointFormatMismatch):
        raise
    except (RuntimeError, AssertionError, KeyError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        raise CheckpointCorrupt(f"{path}: not a readable torch.export archive ({str(exc).splitlines()[0][:200]})") from None
    if check_only:
        return None
    clean = io.BytesIO()
    with PT2ArchiveWriter(clean) as writer:
        for name, data in records.items():
            writer.write_bytes(name, data)
    clean.seek(0)
    try:
        program_ = torch.export.load(clean)
        program_ = move_to_device_pass(program_, device)
        module = program_.module()
    except Exception as exc:  # noqa: BLE001 - torch's deserialiser raises many types for bad input
        raise CheckpointCorrupt(f"{path}: the torch.export program does not load ({str(exc).splitlines()[0][:200]})") from None
    return ExportedNet(module, inputs=n_in, outputs=n_out)
