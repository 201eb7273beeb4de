"""Admin API: load/unload on the v2 repository paths, checkpoint upload under /admin.

Included with the ``require_admin`` dependency in ``create_app``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile

from app.admin import AdminService
from app.errors import BadRequest, InvalidInput

router = APIRouter(tags=["admin"])

_AUTH = {401: {"description": "Missing or wrong token"}, 403: {"description": "Admin API disabled (no token configured)"}}


def _admin(request: Request) -> AdminService:
    return request.app.state.admin


def _client(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def _optional_json(request: Request) -> dict[str, Any]:
    """The official clients send an empty body, ``{}`` or ``{"parameters": {...}}``."""
    body = await request.body()
    if not body.strip():
        return {}
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        raise BadRequest("request body must be empty or a JSON object") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("parameters", {}), dict):
        raise BadRequest('request body must be {"parameters": {...}}')
    return doc


@router.post("/v2/repository/models/{name}/load", summary="Load or reload a model from the store",
             responses={**_AUTH, 409: {"description": "A load of this model is already running"},
                        422: {"description": "Bad checkpoint or model.toml: the old model keeps serving"}})
async def load(name: str, request: Request) -> dict[str, Any]:
    params = (await _optional_json(request)).get("parameters", {})
    _refuse_unsupported(params, allowed={"version"}, action="load")
    version = params.get("version")
    if version is not None and not isinstance(version, (str, int)):
        raise BadRequest("parameters.version must be a string of digits")
    status = await _admin(request).load(name, None if version is None else str(version), _client(request))
    runtime = status.live.runtime if status.live else None
    body = {"name": name, "load": True, "version": status.version, "sha256": runtime.sha256 if runtime else None}
    if status.last_error:  # the newest version failed and an older one serves
        body["warning"] = status.last_error
    return body


@router.post("/v2/repository/models/{name}/unload", summary="Stop serving a model (in-flight requests finish)",
             responses=_AUTH)
async def unload(name: str, request: Request) -> dict[str, Any]:
    params = (await _optional_json(request)).get("parameters", {})
    _refuse_unsupported(params, allowed={"unload_dependents"}, action="unload")
    await _admin(request).unload(name, _client(request))
    return {"name": name, "unload": True}


def _refuse_unsupported(params: dict[str, Any], *, allowed: set[str], action: str) -> None:
    """A parameter that would change what happens (tritonclient's ``config=`` or ``files=``) is not
    silently ignored: the caller would believe its configuration was applied."""
    unknown = sorted(set(params) - allowed)
    if not unknown:
        return
    hint = ""
    if "config" in unknown or any(k.startswith("file:") for k in unknown):
        hint = ": model configuration comes from model.toml in the store (upload it with PUT /admin/models/...)"
    raise BadRequest(f"unsupported {action} parameter(s) {', '.join(unknown)}{hint}")


async def _file_chunks(upload: UploadFile) -> AsyncIterator[bytes]:
    while chunk := await upload.read(1 << 20):
        yield chunk


@router.put(
    "/admin/models/{name}/versions/{version}",
    summary="Upload a state_dict checkpoint as a new version (atomic write)",
    responses=_AUTH,
    openapi_extra={"requestBody": {"content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {"schema": {"type": "object", "required": ["checkpoint"], "properties": {
            "checkpoint": {"type": "string", "format": "binary"},
            "model_toml": {"type": "string", "description": "model.toml text, required for a new model"}}}},
    }}},
)
async def upload(name: str, version: str, request: Request) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    admin, client = _admin(request), _client(request)
    if content_type == "multipart/form-data":
        form = await request.form(max_files=2, max_fields=4, max_part_size=1024 * 1024)
        try:
            checkpoint = form.get("checkpoint")
            if not isinstance(checkpoint, UploadFile):
                raise InvalidInput("multipart upload needs a 'checkpoint' file field")
            toml = form.get("model_toml")
            if isinstance(toml, UploadFile):
                toml_bytes: bytes | None = await toml.read()
            else:
                toml_bytes = toml.encode() if isinstance(toml, str) else None
            result = await admin.upload(name, version, _file_chunks(checkpoint), toml_bytes, client)
        finally:
            await form.close()
    else:
        result = await admin.upload(name, version, request.stream(), None, client)
    return {"name": result.name, "version": result.version, "sha256": result.sha256}
