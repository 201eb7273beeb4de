"""Live models: what serves now, and atomic swaps when a model (re)loads.

The store says what exists on disk; the registry holds what is loaded. A new
model is fully built off the event loop before it is swapped in under a lock;
requests already admitted keep their lease on the old one, which is drained
and released only after they finish. It publishes ``ModelEvent``s to whoever
subscribed (metrics, logs) and knows nothing about them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from app.batching import BatchPolicy, DynamicBatcher
from app.config import Settings
from app.errors import ConfigError, Conflict, ModelLoadFailed, ModelNotFound, ServiceError
from app.model_state import (
    LOADING,
    READY,
    UNAVAILABLE,
    UNLOADED,
    Listener,
    LiveModel,
    ModelEvent,
    ModelState,
    ModelStatus,
    ModelView,
    readiness,
    serving,
    view_of,
)
from app.runtime.base import ModelRuntime
from app.runtime.factory import build_runtime, release
from app.runtime.own_thread import in_own_thread
from app.store import ModelStore

log = logging.getLogger("modserve.registry")

__all__ = [
    "LOADING", "READY", "UNAVAILABLE", "UNLOADED", "LiveModel", "ModelEvent", "ModelRegistry", "ModelState",
    "ModelStatus", "ModelView",
]

Builder = Callable[[ModelStore, object, str, Settings], ModelRuntime]


class ModelRegistry:
    def __init__(self, store: ModelStore, settings: Settings, builder: Builder = build_runtime) -> None:
        self.store, self.settings, self._build = store, settings, builder
        self._status: dict[str, ModelStatus] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._listeners: list[Listener] = []

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener`` with every ``ModelEvent`` (on the thread that caused it)."""
        self._listeners.append(listener)

    def _emit(self, event: ModelEvent) -> None:
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # noqa: BLE001 - a listener's bug must not fail a load or a batch
                log.exception("event listener failed on %s", event)

    # ---- queries ----------------------------------------------------------------

    def statuses(self) -> list[ModelStatus]:
        return [self._status[n] for n in sorted(self._status)]

    def views(self) -> list[ModelView]:
        """Snapshots of every model, by name."""
        return [view_of(self._status[n]) for n in sorted(self._status)]

    def view(self, name: str) -> ModelView:
        return view_of(self.status(name))

    def status(self, name: str) -> ModelStatus:
        try:
            return self._status[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} not found") from None

    def all_ready(self) -> bool:
        return all(s.state == READY for s in self._status.values())

    def readiness(self, strict: bool) -> list[ModelView]:
        """The models that keep the server from being ready (empty: ready)."""
        return readiness(self.views(), strict)

    def get(self, name: str, version: str | None = None) -> LiveModel:
        return serving(self.status(name), version)

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

    def discover(self) -> None:
        """List every model of the store (LOADING until its first load ends)."""
        for name in self.store.names():
            self._status.setdefault(name, ModelStatus(name))

    async def load_all(self) -> None:
        self.discover()
        for name in self.store.names():
            try:
                await self.load(name)
            except ServiceError as exc:
                log.warning("model %s not loaded: %s", name, exc.message)

    async def load(self, name: str, version: str | None = None) -> ModelStatus:
        """Load or reload ``name``; on failure the previous model keeps serving.

        Unpinned (no ``version`` here or in model.toml): when the newest version fails, the
        newest one that loads serves instead, and ``last_error`` says why. Pinned: strict.
        """
        if name not in self._status and not self.store.has(name):
            raise ModelNotFound(f"model {name!r} is not in the store")  # and leaves no trace
        lock = self._locks.setdefault(name, asyncio.Lock())
        if lock.locked():
            raise Conflict(f"model {name!r} is already being loaded; try again when it finishes")
        async with lock:
            status = self._status.setdefault(name, ModelStatus(name))
            started = time.perf_counter()
            try:
                runtime, failures = await self._build_newest(status, version)
            except Exception as exc:  # noqa: BLE001 - any failure must leave the old model serving
                err = exc if isinstance(exc, ServiceError) else ServiceError(f"{type(exc).__name__}: {exc}")
                self._emit(ModelEvent("failed", name, None, error=err.message))
                status.last_error = f"load failed: {err.message}"
                if status.live is None:
                    status.state, status.reason = UNAVAILABLE, status.last_error
                log.warning("loading %s failed: %s", name, err.message)
                raise err from exc
            if failures:
                status.last_error = "load failed: " + _describe(failures)
                served = runtime.version if runtime is not None else status.version
                log.warning("model %s: newest version(s) failed, serving version %s (%s)",
                            name, served, status.last_error)
                self._emit(ModelEvent("fallback", name, served, error=status.last_error))
            if runtime is None:  # the version already serving is the newest that loads
                raise ModelLoadFailed(
                    f"model {name!r}: {status.last_error}; version {status.version} keeps serving",
                    status_code=failures[0][1].status_code, serving_version=status.version,
                )
            new = self._make_live(runtime)
            await new.batcher.start()
            old, status.live = status.live, new
            status.state, status.version = READY, runtime.version
            status.reason = None
            if not failures:
                status.last_error = None
            status.loaded_at = time.time()
            seconds = time.perf_counter() - started
            self._emit(ModelEvent("swapped" if old is not None else "loaded", name, runtime.version, seconds))
            log.info("model %s version %s ready on %s in %.2fs", name, runtime.version, runtime.device, seconds)
        if old is not None:
            await self._retire(old)
        return status

    def _inside_store(self, message: str) -> str:
        """Store-relative paths in messages that unauthenticated clients read (listings, probes)."""
        for root in {str(self.store.real_root), str(self.store.root.absolute()), str(self.store.root)}:
            message = message.replace(root.rstrip("/") + "/", "")
        return message

    async def _build_newest(
        self, status: ModelStatus, version: str | None
    ) -> tuple[ModelRuntime | None, list[tuple[str, ServiceError]]]:
        """Build the asked-for version, or the newest that builds; None: the live one is that version."""
        entry = self.store.entry(status.name)
        status.warnings = list(entry.warnings)
        if entry.config is None:
            raise ConfigError(entry.error or "invalid model.toml")
        chosen = entry.resolve_version(version)
        strict = version is not None or entry.pinned is not None
        candidates = [chosen] if strict else list(reversed(entry.versions))
        failures: list[tuple[str, ServiceError]] = []
        for candidate in candidates:
            if failures and status.live is not None and status.live.runtime.version == candidate:
                return None, failures
            try:
                # a thread that exits afterwards: its OpenMP team must not outlive the build (own_thread.py)
                runtime = await in_own_thread(self._build, self.store, entry, candidate, self.settings)
                return runtime, failures
            except Exception as exc:  # noqa: BLE001 - recorded; then the next older version is tried
                err = exc if isinstance(exc, ServiceError) else ServiceError(f"{type(exc).__name__}: {exc}")
                err.message = self._inside_store(err.message)
                failures.append((candidate, err))
        if len(failures) == 1:
            raise failures[0][1]
        raise ModelLoadFailed("no version loads: " + _describe(failures), status_code=failures[0][1].status_code)

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
        self._emit(ModelEvent("unloaded", name, status.version))
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
        name, version = runtime.name, runtime.version
        batcher.on_batch = lambda size, seconds: self._emit(ModelEvent("batch", name, version, seconds, size=size))
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


def _describe(failures: list[tuple[str, ServiceError]]) -> str:
    return "; ".join(f"version {v}: {e.message}" for v, e in failures)
