"""Typed dependencies: state built in the lifespan lives on ``app.state``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.config import Settings
from app.lifecycle import ServerState
from app.registry import ModelRegistry
from app.service import InferenceService


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def get_server_state(request: Request) -> ServerState:
    return request.app.state.server_state


def get_service(request: Request) -> InferenceService:
    return request.app.state.service


SettingsDep = Annotated[Settings, Depends(get_settings)]
RegistryDep = Annotated[ModelRegistry, Depends(get_registry)]
ServerStateDep = Annotated[ServerState, Depends(get_server_state)]
ServiceDep = Annotated[InferenceService, Depends(get_service)]
