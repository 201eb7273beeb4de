"""v2 inference: request bytes -> service instances -> response bytes.

The tensors are mapped onto the same ``Instance``s the native API builds, and
``InferenceService.predict`` runs them through the model's batcher, so both
protocols share one path to the model. The v2 protocol answers 400 for every
client-side fault, where the native API answers 422 or 415.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

from app.errors import BadRequest, InvalidInput, UnsupportedMediaType
from app.registry import ModelRegistry
from app.runtime.base import ModelRuntime
from app.service import InferenceService, Instance, Prediction
from app.v2.codec import BYTES, CodecError, Tensor, decode_inputs, load_json, split_body
from app.v2.encode import encode_output, join_body
from app.v2.protocol import input_specs

_OFFLOAD_BYTES = 256 * 1024  # parse/encode bigger bodies off the event loop
T = TypeVar("T")


@dataclass
class RequestedOutput:
    name: str
    binary: bool | None  # None: follow the request-level binary_data_output


@dataclass
class InferRequest:
    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None  # None: every output
    binary_output: bool
    timeout_ms: float | None = None


def _bool_param(params: dict[str, Any], key: str, where: str) -> bool | None:
    value = params.get(key)
    if value is not None and not isinstance(value, bool):
        raise CodecError(f"{where}: parameter {key!r} must be a boolean, got {value!r}")
    return value


def _params(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CodecError(f"{where}: 'parameters' must be an object")
    return value


def _request_options(params: dict[str, Any]) -> float | None:
    """Refuse request parameters whose meaning we cannot honour; return tritonclient's ``timeout``
    (microseconds) as a deadline in milliseconds."""
    sequence = sorted(k for k in params if k.startswith("sequence_"))
    if sequence:
        raise CodecError(f"request: {', '.join(sequence)}: stateful sequences are not supported (models are stateless)")
    if params.get("priority", 0) not in (0, None):
        raise CodecError("request: 'priority' is not supported: every request has the same priority")
    timeout = params.get("timeout")
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, int) or not 0 < timeout < 2**63:
        raise CodecError(f"request: parameter 'timeout' must be a positive integer (microseconds), got {timeout!r}")
    return timeout / 1000.0


def _requested_outputs(value: Any) -> list[RequestedOutput] | None:
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise CodecError("'outputs' must be a list of {\"name\": ...} objects")
    outputs: list[RequestedOutput] = []
    for i, item in enumerate(value):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise CodecError(f"outputs[{i}] must be an object with a string 'name'")
        where = f"output {item['name']!r}"
        if any(o.name == item["name"] for o in outputs):
            raise CodecError(f"{where} is requested more than once")
        params = _params(item.get("parameters"), where)
        if params.get("classification"):
            raise CodecError(f"{where}: the classification extension is not supported; request the tensor")
        if any(k.startswith("shared_memory") for k in params):
            raise CodecError(f"{where}: the shared-memory extension is not supported")
        outputs.append(RequestedOutput(item["name"], _bool_param(params, "binary_data", where)))
    return outputs


def parse_request(body: bytes, header_length: str | None) -> InferRequest:
    try:
        head, binary = split_body(body, header_length)
        doc = load_json(head)
        if not isinstance(doc, dict):
            raise CodecError("the inference request must be a JSON object")
        request_id = doc.get("id")
        if request_id is not None and not isinstance(request_id, str):
            raise CodecError("'id' must be a string")
        params = _params(doc.get("parameters"), "request")
        return InferRequest(
            id=request_id,
            inputs=decode_inputs(doc.get("inputs"), binary),
            outputs=_requested_outputs(doc.get("outputs")),
            binary_output=bool(_bool_param(params, "binary_data_output", "request")),
            timeout_ms=_request_options(params),
        )
    except CodecError as exc:
        raise BadRequest(str(exc)) from None


# ---- tensors -> instances ---------------------------------------------------------------


def _check(tensor: Tensor, datatype: str, ok: bool, expected: str) -> None:
    if tensor.datatype != datatype:
        raise BadRequest(f"input {tensor.name!r} must be {datatype}, got {tensor.datatype}")
    if not ok:
        raise BadRequest(f"input {tensor.name!r} must have shape {expected}, got {list(tensor.shape)}")


def _finite(tensor: Tensor) -> None:
    if not np.isfinite(tensor.array).all():
        raise BadRequest(f"input {tensor.name!r} holds NaN or infinite values; send finite numbers")


def _image_items(runtime: ModelRuntime, tensor: Tensor) -> list[Any]:
    want = runtime.input_specs()[0].shape
    shape = tensor.shape
    ok = (
        len(shape) == 4
        and shape[1] == want[1]
        and min(shape[2:]) > 0
        and all(w in (-1, s) for w, s in zip(want[2:], shape[2:], strict=True))
    )
    _check(tensor, "FP32", ok, str(list(want)))
    _finite(tensor)
    return list(tensor.array)


def _bytes_items(tensor: Tensor) -> list[Any]:
    ok = len(tensor.shape) == 1 or (len(tensor.shape) == 2 and tensor.shape[1] == 1)
    _check(tensor, BYTES, ok, "[-1]")
    return [bytes(v) for v in tensor.array.reshape(-1)]


def _scalar_items(runtime: ModelRuntime, tensor: Tensor, batch: int) -> list[Any]:
    n, shape = runtime.n_extra, tensor.shape
    expected = "[-1]" if n == 1 else f"[-1, {n}]"
    ok = (len(shape) == 2 and shape[1] == n) or (n == 1 and len(shape) == 1)
    _check(tensor, "FP32", ok, expected)
    if shape[0] != batch:
        raise BadRequest(f"input 'scalar' has batch size {shape[0]} but the image input has {batch}")
    _finite(tensor)
    return [[float(v) for v in row] for row in tensor.array.reshape(batch, n)]


def _tensor_instances(runtime: ModelRuntime, tensor: Tensor | None, spec: Any) -> list[Instance]:
    if tensor is None:
        raise BadRequest(f"missing input {spec.name!r} of shape {list(spec.shape)}")
    ok = len(tensor.shape) == len(spec.shape) and tensor.shape[0] > 0 and all(
        w in (-1, s) for w, s in zip(spec.shape, tensor.shape, strict=True))
    _check(tensor, "FP32", ok, str(list(spec.shape)))
    _finite(tensor)
    return [Instance(tensor=row) for row in tensor.array]


def to_instances(runtime: ModelRuntime, tensors: list[Tensor]) -> list[Instance]:
    by_name = {t.name: t for t in tensors}
    known = [s.name for s in input_specs(runtime)]
    unknown = sorted(set(by_name) - set(known))
    if unknown:
        raise BadRequest(
            f"unknown input(s) {', '.join(unknown)} for model {runtime.name};"
            f" its inputs are {', '.join(known)}"
        )
    first = runtime.input_specs()[0]
    if first.name != "image":  # a tensor-in model: its one input, batch first
        return _tensor_instances(runtime, by_name.get(first.name), first)
    image, files, scalar = by_name.get("image"), by_name.get("image_bytes"), by_name.get("scalar")
    if image is not None and files is not None:
        raise BadRequest("send either 'image' or 'image_bytes', not both")
    if image is None and files is None:
        raise BadRequest("missing input: send 'image' (pre-processed FP32) or 'image_bytes' (encoded files)")
    if runtime.takes_extra and scalar is None:
        raise BadRequest(
            f"missing input 'scalar': model {runtime.name} needs {runtime.n_extra} value(s) per image"
        )
    if image is not None:
        instances = [Instance(image=a) for a in _image_items(runtime, image)]
    else:
        instances = [Instance(image_bytes=b) for b in _bytes_items(files)]  # type: ignore[arg-type]
    if not instances:
        raise BadRequest("the batch is empty: send at least one image")
    if scalar is not None and runtime.takes_extra:
        for inst, values in zip(instances, _scalar_items(runtime, scalar, len(instances)), strict=True):
            inst.scalar = values
    elif scalar is not None:  # an input the user's class takes and ignores: checked, not used
        _check(scalar, "FP32", len(scalar.shape) in (1, 2) and scalar.shape[0] == len(instances), f"[{len(instances)}]")
    return instances


# ---- prediction -> response -------------------------------------------------------------


def build_response(request: InferRequest, prediction: Prediction) -> tuple[bytes, int | None]:
    runtime = prediction.runtime
    specs = {s.name: s for s in runtime.output_specs()}
    wanted = request.outputs or [RequestedOutput(name, None) for name in specs]
    outputs, chunks = [], []
    for req in wanted:
        arrays = [r[req.name] for r in prediction.results]
        if len({a.shape for a in arrays}) > 1:
            raise BadRequest(
                f"output {req.name!r} differs in shape across the batch (images of different sizes):"
                " send differently-sized images in separate requests"
            )
        binary = request.binary_output if req.binary is None else req.binary
        out, chunk = encode_output(req.name, np.stack(arrays), specs[req.name].datatype, binary=binary)
        outputs.append(out)
        if chunk is not None:
            chunks.append(chunk)
    header: dict[str, Any] = {"model_name": runtime.name, "model_version": runtime.version}
    if request.id is not None:
        header["id"] = request.id
    header["outputs"] = outputs
    return join_body(header, chunks)


async def _maybe_offload(big: bool, fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args) if big else fn(*args)


async def infer(
    service: InferenceService,
    registry: ModelRegistry,
    name: str,
    version: str | None,
    body: bytes,
    header_length: str | None,
) -> tuple[bytes, int | None, ModelRuntime]:
    """Returns the response body, for a binary response its JSON header length, and the runtime
    that answered (for the response headers)."""
    runtime = registry.get(name, version).runtime  # 404 / 503 before any parsing work
    big = len(body) > _OFFLOAD_BYTES
    request = await _maybe_offload(big, parse_request, body, header_length)
    if request.outputs is not None:
        known = [s.name for s in runtime.output_specs()]
        unknown = sorted({o.name for o in request.outputs} - set(known))
        if unknown:
            raise BadRequest(
                f"unknown output(s) {', '.join(unknown)} for model {name}; its outputs are {', '.join(known)}"
            )
    instances = to_instances(runtime, request.inputs)
    selected = frozenset(o.name for o in request.outputs) if request.outputs else None
    try:
        prediction = await service.predict(
            name, instances, outputs=selected, version=version, timeout_ms=request.timeout_ms
        )
    except (InvalidInput, UnsupportedMediaType) as exc:
        raise BadRequest(exc.message) from exc
    big = big or sum(r.nbytes for res in prediction.results for r in res.values()) > _OFFLOAD_BYTES
    content, header_length = await _maybe_offload(big, build_response, request, prediction)
    return content, header_length, prediction.runtime
