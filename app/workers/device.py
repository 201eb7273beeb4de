"""The device process: the store's models, their batchers, and every forward, for all HTTP processes.

It listens on a Unix socket in the run folder. Each HTTP process keeps one connection and sends
inference requests (items in a payload file), admin loads and unloads, and cancellations. The
batcher sees the requests of every HTTP process, so batches fill as they do in one process.
On SIGTERM it keeps serving until the HTTP processes have drained and disconnected (or the
grace period is over), then stops its batchers and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from typing import Any

from app.config import Settings
from app.errors import ClientClosedRequest, DeviceFault, ServiceError, StaleModel, to_wire
from app.observability.logs import configure_logging
from app.observability.metrics import Metrics
from app.registry import ModelRegistry
from app.store import ModelStore
from app.workers import wire
from app.workers.payload import discard, read_arrays, write_arrays
from app.workers.run_dir import RunDir
from app.workers.snapshot import SnapshotWriter, snapshot_of

log = logging.getLogger("modserve.device")


class DeviceServer:
    def __init__(self, settings: Settings, run: RunDir) -> None:
        self.settings, self.run = settings, run
        self.store = ModelStore(settings.store)
        self.registry = ModelRegistry(self.store, settings)
        self.metrics = Metrics()
        self.metrics.attach(self.registry)
        self.snapshots = SnapshotWriter(run.snapshot)
        self.fatal: str | None = None
        self.connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.registry.subscribe(lambda event: event.kind != "batch" and self.publish())

    def publish(self, force: bool = False) -> None:
        self.snapshots.write(snapshot_of(self.registry, self.fatal), force=force)

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        self.publish(force=True)
        discard(self.run.socket)
        server = await asyncio.start_unix_server(self._connection, path=str(self.run.socket))
        self.registry.discover()
        self.publish()
        loader = loop.create_task(self.registry.load_all())
        ticker = loop.create_task(self._tick())
        try:
            await stop.wait()
            log.info("device process: draining (%d HTTP process(es) connected)", len(self.connections))
            deadline = loop.time() + self.settings.graceful_timeout + 5
            while self.connections and loop.time() < deadline:
                await asyncio.sleep(0.05)
        finally:
            server.close()
            for writer in self.connections.values():
                writer.close()  # its reader sees the end and the connection's task ends by itself
            if self.connections:
                await asyncio.wait(list(self.connections), timeout=5)
            for task in (loader, ticker):
                task.cancel()
            await asyncio.gather(loader, ticker, return_exceptions=True)
            await self.registry.close()
            discard(self.run.socket)

    async def _tick(self) -> None:
        """Queue depths and batch counts change with every batch: publish them now and then (and
        retry a state that could not be written)."""
        while True:
            await asyncio.sleep(0.5)
            try:
                self.publish()
            except Exception:  # noqa: BLE001 - the ticker must outlive any one failure
                log.exception("publishing the model state failed")

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = asyncio.current_task()
        assert me is not None
        self.connections[me] = writer
        tasks: dict[int, asyncio.Task[None]] = {}
        pid = 0
        try:
            while (doc := await wire.read_message(reader)) is not None:
                op = doc.get("op")
                if op == "hello":
                    pid = int(doc.get("pid", 0))
                elif op == "cancel":
                    task = tasks.pop(int(doc.get("id", -1)), None)
                    if task is not None:
                        task.cancel()
                elif op in ("infer", "load", "unload"):
                    request = int(doc["id"])
                    task = asyncio.get_running_loop().create_task(self._answer(writer, pid, doc))
                    tasks[request] = task
                    task.add_done_callback(lambda _t, r=request: tasks.pop(r, None))
        finally:
            for task in list(tasks.values()):
                task.cancel()
            writer.close()
            self.connections.pop(me, None)

    async def _answer(self, writer: asyncio.StreamWriter, pid: int, doc: dict[str, Any]) -> None:
        request = int(doc["id"])
        out = self.run.payload.path(pid, request, "out")
        try:
            reply = await self._handle(pid, doc)
        except ServiceError as exc:
            reply = {"error": to_wire(exc)}
        except asyncio.CancelledError:
            discard(out)
            raise
        except Exception as exc:  # noqa: BLE001 - a bug here must still answer, and be logged
            log.exception("device process failed on %s", doc.get("op"))
            reply = {"error": to_wire(ServiceError(f"internal error: {type(exc).__name__}"))}
        if writer.is_closing():
            discard(out)
            return
        writer.write(wire.pack({**reply, "id": request}))

    async def _handle(self, pid: int, doc: dict[str, Any]) -> dict[str, Any]:
        op = doc["op"]
        if op in ("load", "unload"):  # checked and audited by the HTTP process that was asked
            try:
                if op == "load":
                    await self.registry.load(str(doc["name"]), doc.get("version"))
                else:
                    await self.registry.unload(str(doc["name"]))
            finally:
                self.publish(force=True)  # before the answer: every HTTP process sees the change from now on
            return {}
        return await self._infer(pid, doc)

    async def _infer(self, pid: int, doc: dict[str, Any]) -> dict[str, Any]:
        request = int(doc["id"])
        try:
            arrays = read_arrays(self.run.payload.path(pid, request, "in"), doc["layouts"]) if doc["layouts"] else []
        except FileNotFoundError:  # the client went away and its HTTP process withdrew the request
            raise ClientClosedRequest("the request was withdrawn before the device process read it") from None
        name = str(doc["model"])
        async with self.registry.lease(name) as live:
            runtime = live.runtime
            if runtime.load_id != doc["load"]:  # reloaded since (perhaps the same version, another model.toml)
                raise StaleModel(f"model {name} was reloaded (version {runtime.version})")
            items = wire.items_from_wire(runtime, arrays, doc["items"])
            try:
                results = await live.batcher.submit_many(items, deadline=doc.get("deadline"))
            except DeviceFault as exc:
                self.fatal = exc.message
                self.registry.mark_unavailable(name, live, exc.message)
                self.publish(force=True)
                raise
        arrays_out, names = wire.results_to_wire(results)
        layouts = write_arrays(self.run.payload.path(pid, request, "out"), arrays_out)
        return {"version": runtime.version, "layouts": layouts, "results": names, "timing": wire.timing_of(items)}


def device_main(settings: Settings, run: RunDir) -> None:
    """Entry point of the device process (started by the supervisor)."""
    configure_logging(settings.log_level, settings.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group: drain through SIGTERM
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(DeviceServer(settings, run).serve())
    log.info("device process %d exits", os.getpid())
