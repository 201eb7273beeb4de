"""Open Inference Protocol v2 tensors: JSON ``data`` and the binary tensor extension.

Pure numpy, no web framework: the routes hand in raw bytes and get raw bytes
back, so the wire format is unit-testable on its own. Every malformed tensor
raises ``CodecError`` with a message meant for the client (the caller maps it to
400); nothing here trusts a client-given size before checking it against the
bytes actually present.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from app.errors import CodecError

# OIP datatype -> little-endian numpy dtype; BYTES is variable-sized (object arrays of ``bytes``).
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<f4"),  # widened to float32 on decode; the wire holds the upper 2 bytes
}
BYTES = "BYTES"
DATATYPES = frozenset(DTYPES) | {BYTES}
_MAX_DIMS = 8
_MAX_ELEMENTS = 1 << 40
LEN_PREFIX = struct.Struct("<I")


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    array: np.ndarray  # numeric dtype, or object array of bytes for BYTES; already reshaped
    parameters: dict[str, Any]


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# ---- body framing ---------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """Split at ``Inference-Header-Content-Length``: the JSON part, then the binary part."""
    if header_length is None:
        return body, b""
    digits = header_length.strip(" \t")  # optional whitespace around a header value is HTTP's
    if not digits.isascii() or not digits.isdigit() or len(digits) > 12:
        raise CodecError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}")
    n = int(digits)
    if not 0 < n <= len(body):
        raise CodecError(
            f"Inference-Header-Content-Length {n} is out of range for a {len(body)}-byte body"
            " (raw binary requests without a JSON header are not supported)"
        )
    return body[:n], body[n:]


def load_json(raw: bytes) -> Any:
    """Parse JSON; NaN/Infinity tokens are read (so the value checks can name them), not choked on."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise CodecError(f"request JSON is not valid: {exc}") from None


# ---- input decoding -------------------------------------------------------------------


def _shape(value: Any, where: str) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > _MAX_DIMS:
        raise CodecError(f"{where}.shape must be a list of at most {_MAX_DIMS} integers")
    for d in value:
        if isinstance(d, bool) or not isinstance(d, int) or d < 0:
            raise CodecError(f"{where}.shape must hold non-negative integers, got {value!r}")
    if math.prod(d for d in value if d) > _MAX_ELEMENTS:
        # numpy cannot even describe an empty array whose other dimensions multiply past this
        raise CodecError(f"{where}.shape {value!r} is larger than any request body could hold")
    return tuple(value)


def _bytes_from_buffer(raw: bytes, count: int, where: str) -> np.ndarray:
    """Length-prefixed BYTES elements (4-byte little-endian length, then the bytes)."""
    if count * LEN_PREFIX.size > len(raw):
        raise CodecError(f"{where}: binary BYTES data is too short for the {count} elements of its shape")
    out = np.empty(count, dtype=object)
    pos = 0
    for i in range(count):
        if pos + 4 > len(raw):
            raise CodecError(f"{where}: binary BYTES data holds fewer than the {count} elements of its shape")
        (size,) = LEN_PREFIX.unpack_from(raw, pos)
        pos += 4
        if pos + size > len(raw):
            raise CodecError(f"{where}: BYTES element {i} claims {size} bytes but the data ends first")
        out[i] = raw[pos : pos + size]
        pos += size
    if pos != len(raw):
        raise CodecError(f"{where}: binary BYTES data has {len(raw) - pos} bytes beyond its {count} elements")
    return out


def decode_binary(raw: bytes, datatype: str, shape: tuple[int, ...], where: str) -> np.ndarray:
    count = numel(shape)
    if datatype == BYTES:
        return _bytes_from_buffer(raw, count, where).reshape(shape)
    if datatype == "BF16":
        itemsize, wire = 2, np.dtype("<u2")
    else:
        wire = DTYPES[datatype]
        itemsize = wire.itemsize
    if len(raw) != count * itemsize:
        raise CodecError(
            f"{where}: {len(raw)} bytes of binary data, but shape {list(shape)} of {datatype}"
            f" needs {count * itemsize}"
        )
    if datatype == "BOOL":
        values = np.frombuffer(raw, dtype=np.uint8)
        if values.size and values.max() > 1:
            raise CodecError(f"{where}: BOOL bytes must be 0 or 1")
        return values.astype(bool).reshape(shape)
    arr = np.frombuffer(raw, dtype=wire)
    if datatype == "BF16":
        arr = (arr.astype(np.uint32) << 16).view(np.float32)
    return arr.astype(arr.dtype.newbyteorder("="), copy=True).reshape(shape)  # writable, native order


def _int_range_ok(arr: np.ndarray, dtype: np.dtype[Any]) -> bool:
    info = np.iinfo(dtype)
    return arr.size == 0 or (int(arr.min()) >= info.min and int(arr.max()) <= info.max)


def decode_json_data(
    data: Any, datatype: str, shape: tuple[int, ...], where: str, params: dict[str, Any]
) -> np.ndarray:
    """``data`` flat or nested in row-major order; checked against the datatype and element count."""
    if not isinstance(data, list):
        data = [data]  # a lone scalar is a one-element tensor
    count = numel(shape)
    if datatype == BYTES:
        flat = _flatten(data, where)
        b64 = params.get("content_type") == "base64"
        out = np.empty(len(flat), dtype=object)
        for i, v in enumerate(flat):
            if not isinstance(v, str):
                raise CodecError(f"{where}: BYTES elements must be strings in JSON, got {type(v).__name__}")
            try:
                out[i] = base64.b64decode(v, validate=True) if b64 else v.encode("utf-8")
            except (binascii.Error, ValueError):
                raise CodecError(f"{where}: element {i} is not valid base64") from None
        arr = out
    else:
        if datatype == "BF16":
            raise CodecError(f"{where}: BF16 has no JSON representation; send it as binary data")
        try:
            arr = np.array(data)
        except ValueError:
            raise CodecError(f"{where}: data is ragged; nested lists must be regular") from None
        want = DTYPES[datatype]
        kind = arr.dtype.kind
        if datatype != "BOOL" and arr.size and (kind == "b" or (kind in "iuf" and _holds_bool(data))):
            raise CodecError(f"{where}: {datatype} data must be numbers, not true/false")
        if arr.size and datatype == "BOOL" and kind != "b":
            raise CodecError(f"{where}: BOOL data must be true/false")
        if arr.size and want.kind in "iu" and kind not in "iub":
            raise CodecError(f"{where}: {datatype} data must be integers")
        if arr.size and want.kind == "f" and kind not in "iubf":
            raise CodecError(f"{where}: {datatype} data must be numbers")
        if want.kind in "iu" and not _int_range_ok(arr, want):
            raise CodecError(f"{where}: a value is out of range for {datatype}")
        with np.errstate(over="ignore"):  # 1e39 -> inf in FP32 is refused later, with a message
            arr = arr.astype(want.newbyteorder("="))
    if arr.size != count:
        raise CodecError(f"{where}: data has {arr.size} elements but shape {list(shape)} needs {count}")
    return arr.reshape(shape)


def _holds_bool(data: list[Any]) -> bool:
    """Whether a (regular, nested) JSON list holds a JSON boolean: numpy would read it as 0 or 1."""
    types = set(map(type, data))
    if bool in types:
        return True
    return list in types and any(_holds_bool(v) for v in data if isinstance(v, list))


def _flatten(data: list[Any], where: str, depth: int = 0) -> list[Any]:
    if depth > _MAX_DIMS:
        raise CodecError(f"{where}: data is nested too deeply")
    out: list[Any] = []
    for v in data:
        out.extend(_flatten(v, where, depth + 1) if isinstance(v, list) else [v])
    return out


def decode_inputs(doc_inputs: Any, binary: bytes) -> list[Tensor]:
    """Decode the request's ``inputs``; binary chunks are consumed in input order."""
    if not isinstance(doc_inputs, list) or not doc_inputs:
        raise CodecError("'inputs' must be a non-empty list")
    tensors, offset, seen = [], 0, set()
    for i, item in enumerate(doc_inputs):
        if not isinstance(item, dict):
            raise CodecError(f"inputs[{i}] must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise CodecError(f"inputs[{i}].name must be a non-empty string")
        where = f"input {name!r}"
        if name in seen:
            raise CodecError(f"{where} is given more than once")
        seen.add(name)
        datatype = item.get("datatype")
        if not isinstance(datatype, str) or datatype not in DATATYPES:
            raise CodecError(f"{where}: unknown datatype {datatype!r}")
        shape = _shape(item.get("shape"), where)
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise CodecError(f"{where}: parameters must be an object")
        if any(k.startswith("shared_memory") for k in params):
            raise CodecError(f"{where}: the shared-memory extension is not supported")
        size = params.get("binary_data_size")
        has_data = "data" in item
        if size is not None and has_data:
            raise CodecError(f"{where} has both 'data' and binary_data_size")
        if size is not None:
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise CodecError(f"{where}: binary_data_size must be a non-negative integer")
            if offset + size > len(binary):
                raise CodecError(f"{where}: binary_data_size {size} goes past the end of the body")
            array = decode_binary(binary[offset : offset + size], datatype, shape, where)
            offset += size
        elif has_data:
            array = decode_json_data(item["data"], datatype, shape, where, params)
        else:
            raise CodecError(f"{where} has neither 'data' nor parameters.binary_data_size")
        tensors.append(Tensor(name, datatype, shape, array, params))
    if offset != len(binary):
        raise CodecError(f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    return tensors
