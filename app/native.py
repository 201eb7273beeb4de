"""The native (v1) response formats: per-instance JSON heads and U-Net mask PNGs."""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from app.runtime.images import encode_png
from app.runtime.model_runtime import ModelRuntime


def mask_image(runtime: ModelRuntime, mask: np.ndarray) -> np.ndarray:
    """Paint class index i as ``mask_values[i]`` (grey levels, or RGB triples)."""
    lut = np.asarray(runtime.mask_values, dtype=np.uint8)
    if lut.shape[0] < runtime.num_classes + (runtime.num_classes == 1):
        raise ValueError(f"model {runtime.name}: mask_values has fewer entries than classes")
    return lut[mask]


def mask_png(runtime: ModelRuntime, mask: np.ndarray) -> bytes:
    return encode_png(mask_image(runtime, mask))


def _classification(runtime: ModelRuntime, result: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = dict(result)  # numpy arrays: orjson writes them without a Python loop
    first = runtime.head_names[0]
    if first in result:
        index = int(np.argmax(result[first]))
        out["label"] = {"index": index, "name": runtime.labels[index]}
    return out


def _segmentation(runtime: ModelRuntime, result: dict[str, np.ndarray]) -> dict[str, Any]:
    mask = result["mask"]
    height, width = mask.shape
    counts = np.bincount(mask.ravel(), minlength=max(runtime.num_classes, 2))
    names = runtime.labels if runtime.num_classes > 1 else ["background", "foreground"]
    return {
        "mask": base64.b64encode(mask_png(runtime, mask)).decode("ascii"),
        "mask_format": "png",
        "width": int(width),
        "height": int(height),
        "class_fractions": {
            names[i]: float(c) / mask.size for i, c in enumerate(counts[: len(names)])
        },
    }


def format_predictions(runtime: ModelRuntime, results: list[dict[str, np.ndarray]]) -> list[dict[str, Any]]:
    fmt = _segmentation if runtime.task == "segmentation" else _classification
    return [fmt(runtime, r) for r in results]


def model_headers(runtime: ModelRuntime) -> dict[str, str]:
    return {
        "X-Model-Name": runtime.name,
        "X-Model-Version": runtime.version,
        "X-Model-Sha256": runtime.sha256,
    }


def _batching(live: Any) -> dict[str, Any]:
    """Policy and counters of the live batcher: shows whether requests really get batched."""
    stats, policy = live.batcher.stats, live.batcher.policy
    return {
        "max_batch_size": policy.max_batch_size,
        "max_batch_delay_ms": policy.max_batch_delay_ms,
        "max_queue_size": policy.max_queue_size,
        "queue_depth": live.batcher.queue_depth,
        "batches_run": stats.batches_run,
        "items_run": stats.items_run,
        "batch_sizes": {str(k): v for k, v in sorted(stats.batch_sizes.items())},
        "rejected_full": stats.rejected_full,
        "expired": stats.expired,
    }


def describe(status: Any) -> dict[str, Any]:
    """The native model description; works for models that failed to load too."""
    info: dict[str, Any] = {
        "name": status.name,
        "version": status.version,
        "state": status.state,
        "ready": status.live is not None,
        "reason": status.reason,
        "last_error": status.last_error,
        "warnings": list(status.warnings),
    }
    if status.live is not None:
        rt = status.live.runtime
        info.update(
            architecture=rt.config.architecture,
            arguments=rt.arguments,
            task=rt.task,
            device=str(rt.device),
            dtype=rt.config.runtime.dtype,
            sha256=rt.sha256,
            inputs=[s.to_dict() for s in rt.input_specs()],
            outputs=[s.to_dict() for s in rt.output_specs()],
            labels=rt.labels,
            max_processed_pixels=rt.max_processed_pixels,
            batching=_batching(status.live),
        )
    return info
