"""``--workers N``: start the device process and N HTTP processes, restart any that dies, and
stop them in order on SIGTERM (HTTP processes drain first, then the device process).

The listening socket is bound here and shared by the HTTP processes (one accept queue, so an
idle process takes the next connection). Children are started with ``spawn``: no process
inherits a half-initialised torch or CUDA state from a fork.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import time
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import FrameType
from typing import Any

from app.config import Settings
from app.store import ModelStore
from app.workers.device import device_main
from app.workers.run_dir import RunDir
from app.workers.worker import worker_main

log = logging.getLogger("modserve.supervisor")


def bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(address)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    def __init__(self, settings: Settings, run: RunDir, sock: socket.socket) -> None:
        self.settings, self.run, self.sock = settings, run, sock
        self.ctx = multiprocessing.get_context("spawn")
        self.slots = self.ctx.Array("i", settings.workers, lock=False)  # lifecycle.py: why no lock
        self.device: BaseProcess | None = None
        self.workers: list[BaseProcess | None] = [None] * settings.workers
        self.stopping = False
        self._starts: dict[str, list[float]] = {}

    def _on_signal(self, sig: int, frame: FrameType | None) -> None:
        """Drain at once: stop listening (the HTTP processes close their copies as they drain, so new
        connections are refused, not queued) and tell each HTTP process."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping (signal %s): draining %d HTTP process(es), then the device process", sig, len(self.workers))
        self.sock.close()
        for proc in self.workers:
            if proc is not None and proc.is_alive():
                proc.terminate()  # SIGTERM: the process drains (app/server.py)

    def _pace(self, key: str) -> None:
        """A process that keeps dying right after its start is restarted every 5 s, not in a spin."""
        now = time.monotonic()
        starts = self._starts[key] = [t for t in self._starts.get(key, []) if now - t < 60] + [now]
        if len(starts) > 5:
            time.sleep(5)

    def _start_device(self) -> None:
        self._pace("device")
        self.device = self.ctx.Process(target=device_main, args=(self.settings, self.run), name="modserve-device")
        self.device.start()
        log.info("device process %d started", self.device.pid)

    def _start_worker(self, index: int) -> None:
        self._pace(f"worker-{index}")
        self.slots[index] = 0  # a dead process's inference slots are free again
        proc = self.ctx.Process(target=worker_main, name=f"modserve-http-{index}",
                                args=(self.settings, self.run, index, self.sock, self.slots))
        proc.start()
        self.workers[index] = proc

    def _write_pids(self) -> None:
        try:
            self.run.write_pids(os.getpid(), self.device.pid if self.device else None,
                                [w.pid if w else None for w in self.workers])
        except OSError as exc:  # a full /dev/shm must not stop the supervision
            log.warning("pids.json not written: %s", exc.strerror or exc)

    def run_forever(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        failed = False
        try:
            self._start_device()
            for i in range(len(self.workers)):
                self._start_worker(i)
            self._write_pids()
            self._supervise()
        except Exception:  # noqa: BLE001 - whatever ended the loop, the children stop in order
            log.exception("supervision failed; stopping the server")
            failed = True
        self._on_signal(signal.SIGTERM, None)
        code = self._shutdown()
        return 1 if failed else code

    def _supervise(self) -> None:
        while not self.stopping:
            wait([p.sentinel for p in (self.device, *self.workers) if p is not None], timeout=0.5)
            if self.stopping:
                break
            changed = False
            if self.device is not None and not self.device.is_alive():
                log.error("device process %d exited with %s; restarting it", self.device.pid, self.device.exitcode)
                self._start_device()
                changed = True
            for i, proc in enumerate(self.workers):
                if proc is not None and not proc.is_alive():
                    removed = self.run.payload.sweep(proc.pid or 0)
                    log.error("HTTP process %d exited with %s (%d payload file(s) removed); restarting it",
                              proc.pid, proc.exitcode, removed)
                    self._start_worker(i)
                    changed = True
            if changed:
                self._write_pids()

    def _shutdown(self) -> int:
        try:
            _join(self.workers, self.settings.graceful_timeout + 10)
        finally:
            if self.device is not None and self.device.is_alive():
                self.device.terminate()
            _join([self.device], 30)
        codes = [p.exitcode for p in (*self.workers, self.device) if p is not None]
        log.info("all processes stopped (exit codes %s)", codes)
        # Killed by SIGTERM is a clean end too: a process still starting (nothing in flight yet), or one
        # that had drained when the process group's SIGTERM and then ours reached it (handlers restored).
        return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1


def _join(procs: list[Any], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for proc in procs:
        if proc is None:
            continue
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            log.error("process %d did not stop in time; killing it", proc.pid)
            proc.kill()
            proc.join(5)


def serve_workers(settings: Settings) -> int:
    try:
        sock = bind(settings.host, settings.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", settings.host, settings.port, exc.strerror)
        return 1
    run = RunDir.create(settings.run_dir, settings.port)
    # Before any child imports prometheus_client: every process then counts into files there. Not in
    # /dev/shm with the payloads: prometheus-client writes through mmap into sparse files, and a page
    # touched on a full tmpfs kills the process (SIGBUS); payloads fill /dev/shm, never the metrics.
    metrics = Path(tempfile.mkdtemp(prefix="modserve-metrics-"))
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics)
    # once, here: an HTTP process restarted later must not remove another's upload in progress
    ModelStore(settings.store).clear_staging()
    try:
        return Supervisor(settings, run, sock).run_forever()
    finally:
        sock.close()
        shutil.rmtree(metrics, ignore_errors=True)
        if settings.run_dir is None:
            run.remove()
