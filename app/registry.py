"""Live models: what serves now, and atomic swaps when a model (re)loads.

The store says what exists on disk; the registry holds what is loaded. A new
model is fully built off the event loop before it is swapped in under a lock;
requests already admitted keep their lease on the old one, which is drained
and released only after they finish.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from app.batching import BatchPolicy, DynamicBatcher
from app.config import Settings
from app.errors import Conflict, ModelNotFound, ModelNotReady, ServiceError
from app.observability.metrics import Metrics
from app.runtime.factory import build_runtime, release
from app.runtime.model_runtime import ModelRuntime
from app.store import ModelStore

log = logging.getLogger("modserve.registry")

READY, UNAVAILABLE, LOADING, UNLOADED = "READY", "UNAVAILABLE", "LOADING", "UNLOADED"


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
    state: str = LOADING
    version: str | None = None
    reason: str | None = None
    """Why the model is not ready."""
    last_error: str | None = None
    """The last failed (re)load, also while an older model keeps serving."""
    live: LiveModel | None = None
    loaded_at: float | None = None


Builder = Callable[[ModelStore, object, str, Settings], ModelRuntime]


class ModelRegistry:
    def __init__(
        self, store: ModelStore, settings: Settings, builder: Builder = build_runtime,
        metrics: Metrics | None = None,
    ) -> None:
        self.store, self.settings, self._build, self.metrics = store, settings, builder, metrics
        self._status: dict[str, ModelStatus] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    # ---- queries ----------------------------------------------------------------

    def statuses(self) -> list[ModelStatus]:
        return [self._status[n] for n in sorted(self._status)]

    def status(self, name: str) -> ModelStatus:
        try:
            return self._status[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} not found") from None

    def all_ready(self) -> bool:
        return all(s.state == READY for s in self._status.values())

    def get(self, name: str, version: str | None = None) -> LiveModel:
        status = self.status(name)
        if status.live is None:
            reason = status.reason or status.state.lower()
            raise ModelNotReady(f"model {name!r} is not ready: {reason}", reason=reason)
        if version is not None and version != status.live.runtime.version:
            raise ModelNotFound(
                f"model {name!r} version {version} is not loaded (serving version {status.live.runtime.version})"
            )
        return status.live

    @asynccontextmanager
    async def lease(self, name: str, version: str | None = None) -> AsyncIterator[LiveModel]:
        """Hold the current model for one request, so a swap waits for it to finish."""
        live = self.get(name, version)
        live.inflight += 1
        live.idle.clear()
        try:
            yield live
        finally:
            live.inflight -= 1
            if live.inflight == 0:
                live.idle.set()

    # ---- lifecycle ---------------------------------------------------------------

    async def load_all(self) -> None:
        for name in self.store.names():
            self._status.setdefault(name, ModelStatus(name))
        for name in self.store.names():
            try:
                await self.load(name)
            except ServiceError as exc:
                log.warning("model %s not loaded: %s", name, exc.message)

    async def load(self, name: str, version: str | None = None) -> ModelStatus:
        """Load or reload ``name``; on failure the previous model keeps serving."""
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise Conflict(f"model {name!r} is already being loaded; try again when it finishes")
        async with lock:
            status = self._status.setdefault(name, ModelStatus(name))
            try:
                entry = self.store.entry(name)
                if entry.config is None:
                    raise ServiceError(entry.error or "invalid model.toml", status_code=422)
                chosen = entry.resolve_version(version)
                started = time.perf_counter()
                runtime = await asyncio.to_thread(self._build, self.store, entry, chosen, self.settings)
            except Exception as exc:  # noqa: BLE001 - any failure must leave the old model serving
                err = exc if isinstance(exc, ServiceError) else ServiceError(f"{type(exc).__name__}: {exc}")
                if self.metrics is not None:
                    self.metrics.observe_load(name, False, None)
                status.last_error = f"load failed: {err.message}"
                if status.live is None:
                    status.state, status.reason = UNAVAILABLE, status.last_error
                log.warning("loading %s failed: %s", name, err.message)
                raise err from exc
            if self.metrics is not None:
                self.metrics.observe_load(name, True, time.perf_counter() - started)
            new = self._make_live(runtime)
            await new.batcher.start()
            old, status.live = status.live, new
            status.state, status.version = READY, runtime.version
            status.reason = status.last_error = None
            status.loaded_at = time.time()
            log.info(
                "model %s version %s ready on %s in %.2fs",
                name, runtime.version, runtime.device, time.perf_counter() - started,
            )
        if old is not None:
            await self._retire(old)
        return status

    def mark_unavailable(self, name: str, live: LiveModel, reason: str) -> None:
        """Take a model whose device failed out of service (if it is still the current one)."""
        status = self.status(name)
        if status.live is live:
            status.live, status.state, status.reason = None, UNAVAILABLE, reason
            status.last_error = reason

    async def unload(self, name: str) -> ModelStatus:
        status = self.status(name)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            old, status.live = status.live, None
            status.state, status.reason = UNLOADED, "unloaded by an administrator"
        if old is not None:
            await self._retire(old)
        return status

    def _make_live(self, runtime: ModelRuntime) -> LiveModel:
        rt = runtime.config.runtime
        policy = BatchPolicy(
            max_batch_size=rt.max_batch_size,
            max_batch_delay_ms=rt.max_batch_delay_ms,
            max_queue_size=rt.max_queue_size,
            adaptive_delay=rt.adaptive_batch_delay,
        )
        batcher = DynamicBatcher(
            f"{runtime.name}-v{runtime.version}", runtime.run_batch, policy,
            group_key=lambda item: item.group_key(),
        )
        if self.metrics is not None:
            metrics, name = self.metrics, runtime.name
            batcher.on_batch = lambda size, seconds: metrics.observe_batch(name, size, seconds)
        return LiveModel(runtime, batcher)

    async def _retire(self, old: LiveModel) -> None:
        """Let requests admitted on the old model finish, then free it."""
        await old.idle.wait()
        await old.batcher.stop()
        release(old.runtime)

    async def close(self) -> None:
        for status in self._status.values():
            if status.live is not None:
                live, status.live = status.live, None
                await live.batcher.stop()
