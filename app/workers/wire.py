"""What crosses between an HTTP process and the device process, besides payload bytes.

Control messages are length-prefixed JSON on a Unix socket. Batch items and results travel as
arrays in payload files (payload.py) plus a small description each, so nothing is pickled: a
message can carry only plain data, never an object to rebuild.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import numpy as np
import orjson
import torch

from app.runtime.base import InferenceItem, ModelRuntime

MAX_MESSAGE = 8 << 20
"""Control messages are small; a larger length prefix means a broken peer."""


def pack(doc: dict[str, Any]) -> bytes:
    data = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    return len(data).to_bytes(4, "big") + data


async def read_message(reader: asyncio.StreamReader) -> dict[str, Any] | None:
    """The next message, or None when the peer closed the connection."""
    try:
        size = int.from_bytes(await reader.readexactly(4), "big")
        if size > MAX_MESSAGE:
            raise ConnectionError(f"control message of {size} bytes")
        doc = orjson.loads(await reader.readexactly(size))
    except (asyncio.IncompleteReadError, ConnectionError, orjson.JSONDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def items_to_wire(items: Sequence[InferenceItem]) -> tuple[list[np.ndarray], list[dict[str, Any]]]:
    """Arrays for the payload file, and per item where its arrays are and what else it holds."""
    arrays: list[np.ndarray] = []
    described: list[dict[str, Any]] = []
    for item in items:
        doc: dict[str, Any] = {
            "scalar": item.scalar.tolist() if item.scalar is not None else None,
            "size": list(item.orig_size) if item.orig_size is not None else None,
            "outputs": sorted(item.outputs) if item.outputs is not None else None,
            "solo": item.solo,
        }
        image = item.image
        if image.device.type == "meta":  # a JPEG the device decodes: only its future shape
            doc["placeholder"] = list(image.shape)
        else:
            doc["image"], doc["hwc"] = len(arrays), False
            if image.dim() == 3 and not image.is_contiguous() and image.permute(1, 2, 0).is_contiguous():
                image, doc["hwc"] = image.permute(1, 2, 0), True  # an upload: the decoder's own HWC array
            arrays.append(image.contiguous().numpy())
        if item.encoded is not None:
            doc["encoded"] = len(arrays)
            arrays.append(item.encoded.numpy())
        described.append(doc)
    return arrays, described


def items_from_wire(
    runtime: ModelRuntime, arrays: Sequence[np.ndarray], described: Sequence[dict[str, Any]]
) -> list[InferenceItem]:
    items = []
    for doc in described:
        if "placeholder" in doc:
            image = torch.empty(tuple(doc["placeholder"]), dtype=torch.uint8, device="meta")
        else:
            image = torch.from_numpy(arrays[doc["image"]])
            if doc.get("hwc"):
                image = image.permute(2, 0, 1)
        scalar = torch.tensor(doc["scalar"], dtype=torch.float32) if doc.get("scalar") is not None else None
        outputs = frozenset(doc["outputs"]) if doc.get("outputs") is not None else None
        size = tuple(doc["size"]) if doc.get("size") is not None else None
        item = runtime.make_item(image, size=size, scalar=scalar, outputs=outputs)  # type: ignore[arg-type]
        if "encoded" in doc:
            item.encoded = torch.from_numpy(arrays[doc["encoded"]])
        item.solo = bool(doc.get("solo"))
        items.append(item)
    return items


def results_to_wire(results: Sequence[dict[str, np.ndarray]]) -> tuple[list[np.ndarray], list[list[str]]]:
    arrays: list[np.ndarray] = []
    names: list[list[str]] = []
    for result in results:
        names.append(list(result))
        arrays.extend(np.asarray(v) for v in result.values())
    return arrays, names


def results_from_wire(arrays: Sequence[np.ndarray], names: Sequence[Sequence[str]]) -> list[dict[str, np.ndarray]]:
    out, i = [], 0
    for keys in names:
        out.append({k: arrays[i + j] for j, k in enumerate(keys)})
        i += len(keys)
    return out


def timing_of(items: Sequence[InferenceItem]) -> list[list[float]]:
    """Batch size, start and duration of each item's forward (the monotonic clock is shared by
    every process of the machine, so the HTTP process can compute its queue time)."""
    return [[it.batch_size, it.started_at, it.inference_s] for it in items]


def set_timing(items: Sequence[InferenceItem], timing: Sequence[Sequence[float]]) -> None:
    for item, (size, started, seconds) in zip(items, timing):
        item.batch_size, item.started_at, item.inference_s = int(size), float(started), float(seconds)
