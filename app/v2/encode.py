"""Open Inference Protocol v2 response tensors: JSON ``data`` or binary chunks.

Non-finite floats have no JSON form (and the kserve client's orjson rejects the
``NaN`` token), so such a tensor is always sent binary, which both official
clients read whether or not binary was asked for.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from app.v2.codec import BYTES, DTYPES, LEN_PREFIX


def join_body(header: dict[str, Any], chunks: list[bytes]) -> tuple[bytes, int | None]:
    """JSON header + the binary outputs' chunks in output order.

    The JSON length (for ``Inference-Header-Content-Length``) is returned whenever
    some output is binary, even an empty one, so clients always find its offset.
    """
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not chunks:
        return head, None
    return b"".join([head, *chunks]), len(head)


def to_binary(array: np.ndarray, datatype: str) -> bytes:
    if datatype == BYTES:
        parts = []
        for v in array.reshape(-1):
            b = v if isinstance(v, bytes) else str(v).encode("utf-8")
            parts += [LEN_PREFIX.pack(len(b)), b]
        return b"".join(parts)
    if datatype == "BF16":
        return (np.ascontiguousarray(array, dtype="<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=DTYPES[datatype]).tobytes()


def encode_output(
    name: str, array: np.ndarray, datatype: str, *, binary: bool
) -> tuple[dict[str, Any], bytes | None]:
    """One response output and its binary chunk (``None`` when it is sent as JSON ``data``)."""
    shape = [int(d) for d in array.shape]
    out: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
    if datatype in ("FP16", "BF16"):
        binary = True  # no JSON form (as in Triton)
    elif not binary and array.dtype.kind == "f" and not np.isfinite(array).all():
        binary = True
    if binary:
        raw = to_binary(array, datatype)
        out["parameters"] = {"binary_data_size": len(raw)}
        return out, raw
    if datatype == BYTES:
        out["data"] = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in array.reshape(-1)
        ]
    else:
        out["data"] = np.ascontiguousarray(array, dtype=DTYPES[datatype].newbyteorder("=")).reshape(-1)
    return out, None
