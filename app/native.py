"""Native (v1) API documents: response headers and the model description. The per-item
response format belongs to each runtime family (``format_native``)."""

from __future__ import annotations

from typing import Any

from app.runtime.base import ModelRuntime


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
            **rt.describe(),
            max_processed_pixels=rt.max_processed_pixels,
            batching=_batching(status.live),
        )
    return info
