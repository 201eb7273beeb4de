"""The app factory: settings in, a FastAPI app whose lifespan loads the store out."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import Depends, FastAPI

from app import __version__
from app.api.errors import install_error_handlers
from app.api.guard import RequestGuard
from app.admin import AdminService
from app.api.auth import require_admin
from app.api.routes import admin, health, models, predict, ui, v2
from app.api.routes import metrics as metrics_route
from app.config import Settings, get_settings
from app.lifecycle import ServerState
from app.observability.metrics import Metrics
from app.observability.middleware import ObservabilityMiddleware
from app.registry import ModelRegistry
from app.service import InferenceService
from app.store import ModelStore

if TYPE_CHECKING:
    from app.workers.worker import WorkerSetup

log = logging.getLogger("modserve")


def create_app(settings: Settings | None = None, *, worker: WorkerSetup | None = None) -> FastAPI:
    """The service. With ``worker`` set it is one of several HTTP processes: its registry mirrors
    the device process's, and its batches run there (app/workers)."""
    settings = settings or get_settings()
    state = ServerState(*worker.slots) if worker is not None else ServerState()
    metrics = Metrics(aggregate=worker is not None)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = ModelStore(settings.store)
        if worker is None:
            store.clear_staging()
            registry: ModelRegistry = ModelRegistry(store, settings)
        else:
            registry = await worker.open_registry(store)  # type: ignore[assignment]
            state.probe = registry.down_reason  # type: ignore[attr-defined]
        metrics.attach(registry)
        service = InferenceService(registry, settings, state, metrics)
        app.state.settings, app.state.registry, app.state.service = settings, registry, service
        app.state.admin = AdminService(registry, store)
        if worker is None:
            names = store.names()
            if not names:
                log.warning("no models in store %s: serving with none", settings.store)
            await registry.load_all()
            ready = sum(v.ready for v in registry.views())
            log.info("modserve ready: %d of %d model(s) serving", ready, len(names))
        try:
            yield
        finally:
            await registry.close()
            service.close()

    app = FastAPI(
        title="modserve",
        version=__version__,
        description="Inference for modified PyTorch models: native API and the Open Inference Protocol v2.",
        lifespan=lifespan,
    )
    app.state.settings, app.state.server_state, app.state.metrics = settings, state, metrics
    install_error_handlers(app)
    app.add_middleware(RequestGuard, settings=settings, state=state)
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)  # outermost: sees every answer
    app.include_router(health.router)
    app.include_router(metrics_route.router)
    app.include_router(models.router)
    app.include_router(predict.router)
    app.include_router(v2.router)
    app.include_router(admin.router, dependencies=[Depends(require_admin)])
    app.include_router(ui.router)
    return app
