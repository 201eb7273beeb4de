"""Native inference: ``POST /v1/models/{name}/predict`` with multipart or JSON bodies."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from app.api.deps import ServiceDep
from app.api.disconnect import unless_disconnected
from app.api.native_request import parse_predict_request
from app.api.responses import FastJSONResponse, model_headers
from app.service import Prediction

router = APIRouter(prefix="/v1/models", tags=["inference"])

_B64_PIXEL = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4z8AAAAMBAQDJ/pLvAAAAAElFTkSuQmCC"

_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["image"],
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "PNG, JPEG or WebP"},
                        "scalar": {"type": "string", "description": "extra input: a float, or comma-separated floats", "example": "0.5"},
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["instances"],
                    "properties": {"instances": {"type": "array", "items": {
                        "type": "object", "required": ["image"],
                        "properties": {
                            "image": {"type": "object", "required": ["b64"], "properties": {"b64": {"type": "string"}}},
                            "scalar": {"oneOf": [{"type": "number"}, {"type": "array", "items": {"type": "number"}}]},
                        }}}},
                },
                "example": {"instances": [{"image": {"b64": _B64_PIXEL}, "scalar": 0.5}]},
            },
        },
    },
    "responses": {
        "200": {
            "description": "One prediction per instance; a U-Net answers image/png when asked with Accept: image/png",
            "content": {
                "application/json": {"example": {"model_name": "resnet50_extra", "model_version": "1", "predictions": [
                    {"probs": [0.1] * 10, "label": {"index": 0, "name": "0"}}]}},
                "image/png": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "404": {"description": "Unknown model"},
        "413": {"description": "Too many instances or pixels"},
        "415": {"description": "Unsupported content type or image format"},
        "422": {"description": "Missing or invalid image or scalar"},
        "503": {"description": "Model not ready or overloaded"},
    },
}


@router.post("/{name}/predict", summary="Predict from an image (and scalar)", openapi_extra=_OPENAPI)
async def predict(name: str, request: Request, service: ServiceDep) -> Response:
    instances = await parse_predict_request(request)
    prediction = await unless_disconnected(request, service.predict(name, instances, native=True))
    accept = request.headers.get("accept", "")
    if prediction.runtime.encodes_answers:  # mask PNGs: neither the event loop nor the model waits on zlib
        return await run_in_threadpool(_answer, prediction, accept)
    return _answer(prediction, accept)


def _answer(prediction: Prediction, accept: str) -> Response:
    runtime = prediction.runtime
    headers = model_headers(runtime)
    file = runtime.native_file(prediction.results, accept)
    if file is not None:  # e.g. a U-Net's mask as image/png
        return Response(file[0], media_type=file[1], headers=headers)
    body = {
        "model_name": runtime.name,
        "model_version": runtime.version,
        "predictions": [runtime.format_native(r) for r in prediction.results],
    }
    return FastJSONResponse(body, headers=headers)
