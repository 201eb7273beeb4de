"""The native (v1) model description. The per-item response format belongs to each runtime
family (``format_native``)."""

from __future__ import annotations

from typing import Any

from app.registry import ModelView


def describe(view: ModelView) -> dict[str, Any]:
    """The native model description; works for models that failed to load too."""
    info: dict[str, Any] = {
        "name": view.name,
        "version": view.version,
        "state": view.state,
        "ready": view.ready,
        "reason": view.reason,
        "last_error": view.last_error,
        "warnings": list(view.warnings),
    }
    rt = view.runtime
    if rt is not None:
        info.update(
            architecture=rt.config.architecture,
            arguments=rt.arguments,
            task=rt.task,
            device=str(rt.device),
            dtype=rt.dtype_name,
            sha256=rt.sha256,
            inputs=[s.to_dict() for s in rt.input_specs()],
            outputs=[s.to_dict() for s in rt.output_specs()],
            **rt.describe(),
            max_processed_pixels=rt.max_processed_pixels,
            batching=view.batching,
        )
    return info
