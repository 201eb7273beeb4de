"""An HTTP process of a multi-process server: the whole HTTP service, with the models elsewhere.

It parses, validates and decodes requests (on the CPU, for CPU models; GPU models get the JPEG's
bytes), sends the items to the device process, and encodes the answers. It shares the listening
socket with the other HTTP processes, so the kernel hands each connection to one that accepts.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from typing import Any

from app.config import Settings
from app.store import ModelStore
from app.workers.link import DeviceLink
from app.workers.mirror import MirrorRegistry
from app.workers.run_dir import RunDir

log = logging.getLogger("modserve.workers")


@dataclass
class WorkerSetup:
    run: RunDir
    slots: tuple[Any, int]
    """The server's shared slot array and this process's cell in it."""

    async def open_registry(self, store: ModelStore) -> MirrorRegistry:
        link = DeviceLink(self.run.socket, self.run.payload)
        registry = MirrorRegistry(self.run.snapshot, link, store)
        await link.start(wait=5.0)
        return registry


def worker_main(settings: Settings, run: RunDir, index: int, sock: socket.socket, slots: Any) -> None:
    """Entry point of an HTTP process (started by the supervisor)."""
    import torch

    from app.main import create_app
    from app.observability.logs import configure_logging
    from app.server import serve

    configure_logging(settings.log_level, settings.log_format)
    torch.set_num_threads(1)  # no forward runs here: no OpenMP team to compete with the device process
    app = create_app(settings, worker=WorkerSetup(run, (slots, index)))
    serve(app, settings, sockets=[sock])
