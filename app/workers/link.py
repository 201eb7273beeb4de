"""An HTTP process's connection to the device process: requests out, answers back.

One Unix-socket connection per HTTP process carries control messages; each inference request
writes its items to a payload file and finds its results in another (payload.py), both removed
when the request ends however it ends. While the device process is unreachable (restarting),
requests get 503 and liveness fails; the link reconnects by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from app.errors import DeadlineExceeded, DeviceUnavailable, from_wire
from app.runtime.base import InferenceItem, ModelRuntime
from app.workers import wire
from app.workers.payload import PayloadDir, discard, read_arrays, write_arrays

log = logging.getLogger("modserve.workers")

_SLACK_S = 5.0
"""How long past a request's deadline the HTTP process waits for the device process's own answer."""


class DeviceLink:
    def __init__(self, socket_path: Path, payload: PayloadDir) -> None:
        self.socket_path, self.payload = socket_path, payload
        self.pid = os.getpid()
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._down = "the device process has not answered yet"
        self.connected = asyncio.Event()

    def down_reason(self) -> str | None:
        """Why the device process cannot serve now (None: connected)."""
        return None if self._writer is not None else self._down

    async def start(self, wait: float = 0.0) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="device-link")
        if wait:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), wait)

    async def close(self) -> None:
        self._closing = True
        if self._writer is not None:
            self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        delay = 0.05
        while not self._closing:
            try:
                reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
            except OSError:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)
                continue
            delay = 0.05
            writer.write(wire.pack({"op": "hello", "pid": self.pid}))
            self._writer = writer
            self.connected.set()
            log.info("connected to the device process")
            try:
                await self._receive(reader)
            finally:
                self._writer = None
                self.connected.clear()
                self._down = "the device process is not reachable (restarting)"
                writer.close()
                self._fail_pending()
                if not self._closing:
                    log.warning("lost the device process; reconnecting")

    async def _receive(self, reader: asyncio.StreamReader) -> None:
        while (doc := await wire.read_message(reader)) is not None:
            future = self._pending.pop(int(doc.get("id", -1)), None)
            try:
                if doc.get("layouts") is not None and future is not None and not future.done():
                    doc["arrays"] = read_arrays(self.payload.path(self.pid, int(doc["id"]), "out"), doc["layouts"])
            except Exception as exc:  # noqa: BLE001 - one unreadable answer (out of descriptors, ...) fails
                log.warning("reading a result failed: %r", exc)  # its own request, not the connection
                if future is not None and not future.done():
                    future.set_exception(DeviceUnavailable("the answer could not be read; retry", retry_after=1))
                continue
            finally:
                if doc.get("layouts") is not None:  # results waited in a payload file: never left behind
                    discard(self.payload.path(self.pid, int(doc["id"]), "out"))
            if future is not None and not future.done():
                future.set_result(doc)

    def _fail_pending(self) -> None:
        pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(DeviceUnavailable("the device process went away; retry", retry_after=1))

    def _send(self, doc: dict[str, Any]) -> None:
        if self._writer is None:
            raise DeviceUnavailable(f"model server unavailable: {self._down}; retry", retry_after=1)
        self._writer.write(wire.pack(doc))

    async def call(
        self, doc: dict[str, Any], *, timeout: float | None = None, request: int | None = None
    ) -> dict[str, Any]:
        """Send ``doc`` and wait for its answer; a ServiceError from the device is raised here."""
        request = request or next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._send({**doc, "id": request})
        self._pending[request] = future
        try:
            reply = await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            self._cancel(request)
            raise DeadlineExceeded("the model server did not answer in time") from None
        except asyncio.CancelledError:  # the client went away: the device drops the items
            self._cancel(request)
            raise
        if "error" in reply:
            raise from_wire(reply["error"])
        return reply

    def _cancel(self, request: int) -> None:
        future = self._pending.pop(request, None)
        if future is not None and not future.done():
            future.cancel()
        with contextlib.suppress(DeviceUnavailable):
            self._send({"op": "cancel", "id": request})

    async def infer(
        self, runtime: ModelRuntime, items: list[InferenceItem], deadline: float | None
    ) -> list[dict[str, np.ndarray]]:
        """``items`` prepared by ``runtime`` (a weightless copy of one load of the model)."""
        request = next(self._ids)
        arrays, described = wire.items_to_wire(items)
        src = self.payload.path(self.pid, request, "in")
        try:
            layouts = write_arrays(src, arrays)
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic()) + _SLACK_S
            message = {"op": "infer", "model": runtime.name, "load": runtime.load_id, "deadline": deadline,
                       "layouts": layouts, "items": described}
            reply = await self.call(message, timeout=timeout, request=request)
        finally:
            discard(src)
            discard(self.payload.path(self.pid, request, "out"))
        wire.set_timing(items, reply["timing"])
        return wire.results_from_wire(reply["arrays"], reply["results"])
