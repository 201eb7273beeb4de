"""uvicorn with a drain step: on SIGTERM readiness fails and new inference gets 503 at once,
while requests already in flight finish (bounded by ``graceful_timeout``)."""

from __future__ import annotations

import logging
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from app.config import Settings
from app.http_protocol import protocol_for

log = logging.getLogger("modserve.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        state = self._app.state.server_state
        if not state.draining:
            log.info("signal %s: draining (%d inference request(s) in flight)", sig, state.inflight)
        state.draining = True
        # Not uvicorn's own handler: it re-raises the signal after shutdown, so the process
        # would die of SIGTERM (exit -15) instead of exiting 0 after a clean drain.
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True


def serve(app: FastAPI, settings: Settings, sockets: list[socket.socket] | None = None) -> None:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        log_config=None,  # keep the handlers configure_logging installed
        access_log=False,  # the request log line comes from our middleware
        timeout_graceful_shutdown=int(settings.graceful_timeout) or None,
        timeout_keep_alive=int(max(1, round(settings.keep_alive_timeout))),
        http=protocol_for(settings),
    )
    DrainingServer(config, app).run(sockets=sockets)
