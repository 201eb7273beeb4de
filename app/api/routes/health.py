"""Liveness and readiness on the Open Inference Protocol's paths (Docker/Kubernetes probes)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import RegistryDep, ServerStateDep, SettingsDep

router = APIRouter(prefix="/v2/health", tags=["health"])


@router.head("/live", include_in_schema=False)  # HEAD-based checkers (RFC 9110: HEAD wherever GET)
@router.get(
    "/live",
    summary="Liveness: the process can serve",
    responses={503: {"description": "An unrecoverable device error: restart the process"}},
)
async def live(state: ServerStateDep) -> JSONResponse:
    if state.fatal:
        return JSONResponse({"live": False, "error": f"unrecoverable device error: {state.fatal}"}, status_code=503)
    return JSONResponse({"live": True})


@router.head("/ready", include_in_schema=False)
@router.get(
    "/ready",
    summary="Readiness: the models serve (MODSERVE_STRICT_READINESS: all of them, else at least one)",
    responses={503: {"description": "Some model is not ready", "content": {"application/json": {"example": {"ready": False, "error": "model unet is not ready: load failed"}}}}},
)
async def ready(registry: RegistryDep, state: ServerStateDep, settings: SettingsDep) -> JSONResponse:
    if state.draining:
        return JSONResponse({"ready": False, "error": "server is shutting down"}, status_code=503)
    if state.fatal:
        return JSONResponse({"ready": False, "error": f"unrecoverable device error: {state.fatal}"}, status_code=503)
    not_ready = registry.readiness(strict=settings.strict_readiness)
    if not not_ready:
        return JSONResponse({"ready": True})
    reasons = "; ".join(f"{s.name}: {s.reason or s.state.lower()}" for s in not_ready)
    rule = "not every model is ready" if settings.strict_readiness else "no model is ready yet"
    return JSONResponse(
        {"ready": False, "error": f"{rule} ({reasons})",
         "models": {s.name: s.reason or s.state for s in not_ready}},
        status_code=503,
    )
