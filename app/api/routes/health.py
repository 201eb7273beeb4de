"""Liveness and readiness on the Open Inference Protocol's paths (Docker/Kubernetes probes)."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from app.api.deps import RegistryDep, ServerStateDep
from app.registry import UNLOADED

router = APIRouter(prefix="/v2/health", tags=["health"])


@router.get(
    "/live",
    summary="Liveness: the process can serve",
    responses={503: {"description": "An unrecoverable device error: restart the process"}},
)
async def live(state: ServerStateDep) -> JSONResponse:
    if state.fatal:
        return JSONResponse({"live": False, "error": f"unrecoverable device error: {state.fatal}"}, status_code=503)
    return JSONResponse({"live": True})


@router.get(
    "/ready",
    summary="Readiness: every model in the store is loaded",
    responses={503: {"description": "Some model is not ready", "content": {"application/json": {"example": {"ready": False, "error": "model unet is not ready: load failed"}}}}},
)
async def ready(registry: RegistryDep, state: ServerStateDep) -> JSONResponse:
    if state.draining:
        return JSONResponse({"ready": False, "error": "server is shutting down"}, status_code=503)
    # An unloaded model was taken out of service on purpose: it does not make the server unready.
    not_ready = [s for s in registry.statuses() if s.live is None and s.state != UNLOADED]
    if not not_ready:
        return JSONResponse({"ready": True})
    reasons = "; ".join(f"{s.name}: {s.reason or s.state.lower()}" for s in not_ready)
    return JSONResponse(
        {"ready": False, "error": f"not every model is ready ({reasons})",
         "models": {s.name: s.reason or s.state for s in not_ready}},
        status_code=503,
    )
