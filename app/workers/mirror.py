"""The registry as an HTTP process sees it: the device process's snapshot, and remote batches.

Same queries as ``ModelRegistry`` (listings, metadata, readiness, leases), answered from the
latest ``state.json`` (re-read whenever the file changed, a stat per query). A lease hands out
the model's weightless runtime with a batcher that sends the items to the device process. Loads
and unloads are done by the device process; the snapshot it writes before answering is read
here before this process answers in turn.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np

from app.batching import BatchPolicy, BatchStats
from app.errors import ModelNotFound, StaleModel
from app.model_state import LiveModel, ModelState, ModelStatus, ModelView, readiness, serving
from app.runtime.base import InferenceItem, ModelRuntime
from app.store import ModelStore
from app.workers.link import DeviceLink
from app.workers.snapshot import SnapshotReader, weightless_runtime

log = logging.getLogger("modserve.workers")


class RemoteBatcher:
    """Stands in for the model's DynamicBatcher: the batch forms in the device process."""

    def __init__(self, link: DeviceLink, runtime: ModelRuntime, batching: dict[str, Any] | None) -> None:
        self.link, self.runtime = link, runtime
        b = batching or {}
        rt = runtime.config.runtime
        self.policy = BatchPolicy(rt.max_batch_size, rt.max_batch_delay_ms, rt.max_queue_size, rt.adaptive_batch_delay)
        self.stats = BatchStats(b.get("batches_run", 0), b.get("items_run", 0))
        self.queue_depth = int(b.get("queue_depth", 0))

    async def submit_many(
        self, items: list[InferenceItem], *, deadline: float | None = None
    ) -> list[dict[str, np.ndarray]]:
        return await self.link.infer(self.runtime, items, deadline)


class MirrorRegistry:
    def __init__(self, snapshot: Path, link: DeviceLink, store: ModelStore) -> None:
        self.snapshot_path, self.link, self.store = snapshot, link, store
        self._reader = SnapshotReader(snapshot)
        self._status: dict[str, ModelStatus] = {}
        self._views: dict[str, ModelView] = {}
        self._runtimes: dict[tuple[str, str, str], ModelRuntime] = {}
        self.fatal: str | None = None
        self.gpu: list[list[Any]] = []

    # ---- the snapshot ------------------------------------------------------------

    def refresh(self) -> None:
        doc = self._reader.read_if_changed()
        if doc is None:
            return
        self.fatal, self.gpu = doc.get("fatal"), doc.get("gpu_memory") or []
        status, views, runtimes = {}, {}, {}
        for m in doc.get("models", []):
            runtime = None
            if m.get("runtime") is not None:
                card = m["runtime"]
                key = (m["name"], card["version"], card["load_id"])
                runtime = self._runtimes.get(key)
                if runtime is None:
                    try:
                        runtime = weightless_runtime(m["name"], card)
                    except Exception:  # noqa: BLE001 - that model answers 503 here, the others serve
                        log.exception("model %s: cannot describe version %s in this process", m["name"], card["version"])
                if runtime is not None:
                    runtimes[key] = runtime
            reason = m.get("reason")
            if m.get("runtime") is not None and runtime is None:
                reason = "this HTTP process cannot describe the model (see its log)"
            live = None
            if runtime is not None:
                live = LiveModel(runtime, RemoteBatcher(self.link, runtime, m.get("batching")))  # type: ignore[arg-type]
            status[m["name"]] = ModelStatus(
                m["name"], ModelState(m["state"]), m.get("version"), reason, m.get("last_error"),
                live, m.get("loaded_at"), list(m.get("warnings") or []),
            )
            views[m["name"]] = ModelView(
                m["name"], ModelState(m["state"]), m.get("version"), reason, m.get("last_error"),
                tuple(m.get("warnings") or ()), runtime, int(m.get("queue_depth") or 0), m.get("batching"),
            )
        self._status, self._views, self._runtimes = status, views, runtimes

    def down_reason(self) -> str | None:
        """Liveness: the device process is unreachable or hit an unrecoverable device error."""
        reason = self.link.down_reason()
        if reason is not None:
            return reason
        self.refresh()
        return self.fatal

    # ---- the queries of ModelRegistry ------------------------------------------------

    def subscribe(self, listener: Any) -> None:
        """Model events happen in the device process, whose listeners count them."""

    def statuses(self) -> list[ModelStatus]:
        self.refresh()
        return [self._status[n] for n in sorted(self._status)]

    def views(self) -> list[ModelView]:
        self.refresh()
        return [self._views[n] for n in sorted(self._views)]

    def view(self, name: str) -> ModelView:
        self.refresh()
        try:
            return self._views[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} not found") from None

    def status(self, name: str) -> ModelStatus:
        self.refresh()
        try:
            return self._status[name]
        except KeyError:
            raise ModelNotFound(f"model {name!r} not found") from None

    def all_ready(self) -> bool:
        return all(v.ready for v in self.views())

    def readiness(self, strict: bool) -> list[ModelView]:
        return readiness(self.views(), strict)

    def get(self, name: str, version: str | None = None) -> LiveModel:
        return serving(self.status(name), version)

    @asynccontextmanager
    async def lease(self, name: str, version: str | None = None) -> AsyncIterator[LiveModel]:
        """The model as last seen; the device process answers StaleModel when it has swapped it
        since, and the service then prepares the request again for the new one."""
        live = self.get(name, version)
        try:
            yield live
        except StaleModel:
            self._reader.seen = -1  # read the snapshot again, whatever its generation says
            raise

    def mark_unavailable(self, name: str, live: LiveModel, reason: str) -> None:
        """The device process takes a failed model out of service itself."""

    # ---- admin: done by the device process ----------------------------------------------

    async def load(self, name: str, version: str | None = None) -> ModelStatus:
        await self.link.call({"op": "load", "name": name, "version": version})
        self._reader.seen = -1
        return self.status(name)

    async def unload(self, name: str) -> ModelStatus:
        await self.link.call({"op": "unload", "name": name})
        self._reader.seen = -1
        return self.status(name)

    async def close(self) -> None:
        await self.link.close()
