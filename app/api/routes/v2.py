"""Open Inference Protocol v2 (REST) routes, thin: bytes in, the v2 layer, bytes out.

Bodies are read raw, never as a typed FastAPI body: tritonclient sends no
Content-Type and tritonclient.aio labels JSON as octet-stream, so JSON vs
JSON+binary is decided by ``Inference-Header-Content-Length`` alone. Every
success is exactly 200 and every failure ``{"error": ...}`` (tritonclient treats
anything else as an error or cannot decode it). Health routes live in health.py.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import RegistryDep, ServiceDep, SettingsDep
from app.api.disconnect import unless_disconnected
from app.api.responses import FastJSONResponse, model_headers
from app.errors import BadRequest
from app.v2 import infer as v2_infer
from app.v2 import protocol
from app.v2.body import inflate
from app.v2.codec import CodecError, load_json

router = APIRouter(prefix="/v2", tags=["open inference protocol v2"])

HEADER_LENGTH = "Inference-Header-Content-Length"
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "description": "Malformed request, wrong tensor shape or datatype",
        "content": {"application/json": {"example": {"error": "input 'image' must be FP32, got FP64"}}},
    },
    404: {"description": "Unknown model or version"},
    503: {"description": "Model not ready"},
}
_INFER_DOC = {
    "requestBody": {
        "required": True,
        "description": "JSON inference request; with the binary tensor extension the JSON is followed by raw"
        f" tensor bytes and its length is given in the `{HEADER_LENGTH}` header.",
        "content": {
            "application/json": {
                "example": {
                    "id": "1",
                    "inputs": [
                        {"name": "image", "datatype": "FP32", "shape": [1, 3, 2, 2], "data": [0.0] * 12},
                        {"name": "scalar", "datatype": "FP32", "shape": [1], "data": [0.5]},
                    ],
                    "outputs": [{"name": "probs"}],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    },
}


async def _read_body(request: Request, limit: int) -> bytes:
    """The raw body (its size is capped by RequestGuard while it streams), inflated if compressed."""
    body = await request.body()
    encoding = request.headers.get("content-encoding")
    if encoding and encoding.strip().lower() != "identity":
        body = await run_in_threadpool(inflate, body, encoding, limit)
    return body


@router.get("", summary="Server metadata: name, version, implemented extensions")
@router.get("/", include_in_schema=False)  # the OIP document spells it /v2/; no redirect round trip
async def server_metadata() -> FastJSONResponse:
    return FastJSONResponse(protocol.server_metadata())


@router.post(
    "/repository/index",
    summary='Every model in the store with its state (optional body {"ready": bool})',
    responses={400: _ERRORS[400]},
)
async def repository_index(request: Request, registry: RegistryDep) -> FastJSONResponse:
    body = await _read_body(request, 64 * 1024)
    try:
        parsed = load_json(body) if body.strip() else None
    except CodecError as exc:
        raise BadRequest(str(exc)) from None
    return FastJSONResponse(protocol.repository_index(registry, parsed))


def _version(request: Request) -> str | None:
    return protocol.resolve_version(request.path_params.get("version"))


async def _metadata(name: str, request: Request, registry: RegistryDep) -> FastJSONResponse:
    return FastJSONResponse(protocol.model_metadata(registry.get(name, _version(request)).runtime))


async def _ready(name: str, request: Request, registry: RegistryDep) -> FastJSONResponse:
    registry.get(name, _version(request))
    return FastJSONResponse(protocol.model_ready(name))


async def _config(name: str, request: Request, registry: RegistryDep) -> FastJSONResponse:
    return FastJSONResponse(protocol.model_config(registry.get(name, _version(request)).runtime))


async def _infer(
    name: str, request: Request, registry: RegistryDep, service: ServiceDep, settings: SettingsDep
) -> Response:
    body = await _read_body(request, settings.max_body_bytes)
    content, header_length, runtime = await unless_disconnected(request, v2_infer.infer(
        service, registry, name, _version(request), body, request.headers.get(HEADER_LENGTH)
    ))
    headers = model_headers(runtime)
    if header_length is None:
        return Response(content, media_type="application/json", headers=headers)
    headers[HEADER_LENGTH] = str(header_length)
    return Response(content, media_type="application/octet-stream", headers=headers)


_VERSION_PARAM = {
    "parameters": [{"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}]
}

_MODEL_ROUTES = (
    ("", _metadata, "GET", "metadata", "Model metadata: tensors with -1 for variable dimensions"),
    ("/ready", _ready, "GET", "ready", "Model readiness: 200 when it can serve, 503 when not"),
    ("/config", _config, "GET", "config", "Triton-style model configuration"),
    ("/infer", _infer, "POST", "infer", "Inference with JSON or binary tensor data"),
)
for _prefix, _tag, _extra in (("", "", {}), ("/versions/{version}", "_version", _VERSION_PARAM)):
    for _path, _endpoint, _method, _op, _summary in _MODEL_ROUTES:
        router.add_api_route(
            "/models/{name}" + _prefix + _path, _endpoint, methods=[_method], name=f"v2_model_{_op}{_tag}",
            summary=_summary, responses=_ERRORS,
            openapi_extra={**(_INFER_DOC if _op == "infer" else {}), **_extra} or None,
        )
