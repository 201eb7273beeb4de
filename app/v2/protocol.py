"""Open Inference Protocol v2 documents: server and model metadata, Triton-style
model config, repository index. Plain dicts out, so routes stay thin and the
shapes can be checked against the protocol's schemas.
"""

from __future__ import annotations

import json
from typing import Any

from app import __version__
from app.errors import BadRequest, ModelNotFound
from app.store.store import VERSION_RE
from app.registry import LOADING, READY, UNAVAILABLE, ModelRegistry, ModelView
from app.runtime.base import ModelRuntime, TensorSpec

SERVER_NAME = "modserve"
# Only what is implemented end to end (load/unload of ``model_repository`` need the admin token).
EXTENSIONS = ("binary_tensor_data", "model_configuration", "model_repository")
PLATFORM = "pytorch_eager"

_TRITON_TYPES = {"BYTES": "TYPE_STRING"}


def server_metadata() -> dict[str, Any]:
    return {"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)}


def resolve_version(version: str | None) -> str | None:
    """Versions are decimal integers (as in Triton); anything else cannot exist, hence 404."""
    if version is None:
        return None
    if not VERSION_RE.match(version):
        raise ModelNotFound(f"model version {version!r} not found: versions are decimal integers")
    return version


def input_specs(runtime: ModelRuntime) -> list[TensorSpec]:
    """The model's own inputs plus its alternatives (``image_bytes``, the encoded-image alternative to
    ``image``, for image models)."""
    specs = runtime.input_specs()
    return [specs[0], *runtime.v2_alternatives(), *specs[1:]]


def model_ready(name: str) -> dict[str, Any]:
    return {"name": name, "ready": True}


def model_metadata(runtime: ModelRuntime) -> dict[str, Any]:
    properties = {
        "architecture": runtime.config.architecture,
        "task": runtime.task,
        "device": str(runtime.device),
        "sha256": runtime.sha256,
        "labels": json.dumps(runtime.labels),
        "inputs": runtime.input_hint(),
    }
    if runtime.spec.ignored_inputs:
        properties["ignored_inputs"] = ", ".join(runtime.spec.ignored_inputs) + " (accepted for the model class's signature, not used)"
    return {
        "name": runtime.name,
        "versions": [runtime.version],
        "platform": PLATFORM,
        "inputs": [s.to_dict() for s in input_specs(runtime)],
        "outputs": [s.to_dict() for s in runtime.output_specs()],
        "properties": properties,
    }


def _config_tensor(spec: TensorSpec) -> dict[str, Any]:
    """Triton convention with ``max_batch_size > 0``: dims leave out the batch dimension."""
    dims = list(spec.shape[1:])
    tensor: dict[str, Any] = {
        "name": spec.name,
        "data_type": _TRITON_TYPES.get(spec.datatype, f"TYPE_{spec.datatype}"),
        "dims": dims or [1],
    }
    if not dims:
        tensor["reshape"] = {"shape": []}  # one value per batch item, as Triton spells it
    return tensor


def _int_or_str(version: str) -> int | str:
    return int(version) if version.isdigit() else version


def model_config(runtime: ModelRuntime) -> dict[str, Any]:
    rt = runtime.config.runtime
    return {
        "name": runtime.name,
        "platform": PLATFORM,
        "backend": "pytorch",
        "version_policy": {"specific": {"versions": [_int_or_str(runtime.version)]}},
        "max_batch_size": rt.max_batch_size,
        "input": [_config_tensor(s) for s in input_specs(runtime)],
        "output": [_config_tensor(s) for s in runtime.output_specs()],
        "dynamic_batching": {
            "max_queue_delay_microseconds": int(rt.max_batch_delay_ms * 1000),
            "default_queue_policy": {"max_queue_size": rt.max_queue_size},
        },
        "instance_group": [{"kind": "KIND_GPU" if runtime.device.type == "cuda" else "KIND_CPU", "count": 1}],
        "parameters": {
            "architecture": {"string_value": runtime.config.architecture},
            "dtype": {"string_value": rt.dtype},
            "sha256": {"string_value": runtime.sha256},
        },
    }


def _index_entry(status: ModelView) -> dict[str, Any]:
    # The protocol's states are UNKNOWN/READY/UNAVAILABLE/LOADING/UNLOADING; an unloaded
    # model is UNAVAILABLE with a reason, as in Triton.
    state = (
        status.state
        if status.state in (READY, UNAVAILABLE, LOADING)
        else (UNAVAILABLE if status.state == "UNLOADED" else "UNKNOWN")
    )
    entry: dict[str, Any] = {"name": status.name}
    if status.version is not None:
        entry["version"] = status.version
    entry["state"] = state
    entry["reason"] = status.reason or status.last_error or ""  # a failed reload shows while the old one serves
    return entry


def repository_index(registry: ModelRegistry, request: Any) -> list[dict[str, Any]]:
    """``request`` is the parsed body: ``None`` (empty body) or ``{"ready": bool}``."""
    ready_only = False
    if request is not None:
        if not isinstance(request, dict):
            raise BadRequest('repository index body must be a JSON object such as {"ready": true}')
        value = request.get("ready", False)
        if not isinstance(value, bool):
            raise BadRequest(f"'ready' must be a boolean, got {value!r}")
        ready_only = value
    statuses = registry.views()
    if ready_only:
        statuses = [s for s in statuses if s.ready]
    return [_index_entry(s) for s in statuses]
