"""Native model listing and description (``/v1/models``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from app.api.deps import RegistryDep
from app.native import describe
from app.store.store import check_name

router = APIRouter(prefix="/v1/models", tags=["models"])

_EXAMPLE = {
    "name": "resnet50_extra", "version": "1", "state": "READY", "ready": True, "reason": None,
    "last_error": None, "architecture": "resnet50_extra", "device": "cpu", "dtype": "float32",
    "sha256": "9f2c...", "inputs": [{"name": "image", "datatype": "FP32", "shape": [-1, 3, 224, 224]},
                                   {"name": "scalar", "datatype": "FP32", "shape": [-1]}],
    "outputs": [{"name": "probs", "datatype": "FP32", "shape": [-1, 10]}],
}


@router.get("", summary="List every model in the store with its state",
            responses={200: {"content": {"application/json": {"example": {"models": [_EXAMPLE]}}}}})
async def list_models(registry: RegistryDep) -> dict[str, Any]:
    return {"models": [describe(v) for v in registry.views()]}


@router.get("/{name}", summary="Describe one model: version, device, tensors, checkpoint sha256",
            responses={200: {"content": {"application/json": {"example": _EXAMPLE}}},
                       404: {"description": "Unknown model"}})
async def get_model(name: str, registry: RegistryDep) -> dict[str, Any]:
    return describe(registry.view(check_name(name)))
