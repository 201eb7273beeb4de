"""What the registry knows about each model, as plain data: its state, the events it publishes,
the live model with its lease count, and the read-only view that listings, probes and metrics read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from app.batching import DynamicBatcher
from app.errors import ModelNotFound, ModelNotReady
from app.runtime.base import ModelRuntime


class ModelState(str, Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"
    UNLOADED = "UNLOADED"

    def __str__(self) -> str:
        return self.value


READY, UNAVAILABLE, LOADING, UNLOADED = (
    ModelState.READY, ModelState.UNAVAILABLE, ModelState.LOADING, ModelState.UNLOADED,
)


@dataclass(frozen=True)
class ModelEvent:
    """What happened to a model: ``loaded``, ``swapped``, ``fallback``, ``failed``, ``unloaded`` or
    ``batch`` (one forward of ``size`` items)."""

    kind: str
    model: str
    version: str | None
    seconds: float | None = None
    error: str | None = None
    size: int | None = None


Listener = Callable[[ModelEvent], None]


@dataclass
class LiveModel:
    runtime: ModelRuntime
    batcher: DynamicBatcher
    inflight: int = 0
    idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.idle.set()


@dataclass
class ModelStatus:
    name: str
    state: ModelState = ModelState.LOADING
    version: str | None = None
    reason: str | None = None
    """Why the model is not ready."""
    last_error: str | None = None
    """The last failed (re)load, also while an older model keeps serving."""
    live: LiveModel | None = None
    loaded_at: float | None = None
    warnings: list[str] = field(default_factory=list)
    """Version folders that discovery skipped, and why."""


@dataclass(frozen=True)
class ModelView:
    """A read-only snapshot of one model for listings, probes and metrics."""

    name: str
    state: ModelState
    version: str | None
    reason: str | None
    last_error: str | None
    warnings: tuple[str, ...]
    runtime: ModelRuntime | None
    """The runtime serving now, to read its specs from (None when nothing serves)."""
    queue_depth: int = 0
    batching: dict[str, Any] | None = None

    @property
    def ready(self) -> bool:
        return self.runtime is not None


def view_of(status: ModelStatus) -> ModelView:
    live = status.live
    batching = None
    if live is not None:
        stats, policy = live.batcher.stats, live.batcher.policy
        batching = {
            "max_batch_size": policy.max_batch_size,
            "max_batch_delay_ms": policy.max_batch_delay_ms,
            "max_queue_size": policy.max_queue_size,
            "queue_depth": live.batcher.queue_depth,
            "batches_run": stats.batches_run,
            "items_run": stats.items_run,
            "batch_sizes": {str(k): v for k, v in sorted(stats.batch_sizes.items())},
            "rejected_full": stats.rejected_full,
            "expired": stats.expired,
        }
    return ModelView(
        name=status.name, state=status.state, version=status.version, reason=status.reason,
        last_error=status.last_error, warnings=tuple(status.warnings),
        runtime=live.runtime if live is not None else None,
        queue_depth=live.batcher.queue_depth if live is not None else 0, batching=batching,
    )


def readiness(views: list[ModelView], strict: bool) -> list[ModelView]:
    """The models that keep the server from being ready (empty: ready).

    Models unloaded on purpose do not count. Strict: every other model must serve.
    Not strict: at least one of them serves and none is still loading for the first time.
    """
    wanted = [s for s in views if s.state != UNLOADED]
    waiting = [s for s in wanted if not s.ready]
    if strict:
        return waiting
    loading = [s for s in waiting if s.state == LOADING]
    if loading:
        return loading
    if wanted and len(waiting) == len(wanted):
        return waiting
    return []


def serving(status: ModelStatus, version: str | None) -> LiveModel:
    """The live model of ``status`` (at ``version`` when given), or the error a client should see."""
    if status.live is None:
        reason = status.reason or status.state.lower()
        raise ModelNotReady(f"model {status.name!r} is not ready: {reason}", reason=reason)
    if version is not None and version != status.live.runtime.version:
        raise ModelNotFound(
            f"model {status.name!r} version {version} is not loaded (serving version {status.live.runtime.version})"
        )
    return status.live
