"""An ASGI guard in front of every route: body-size limit, draining and concurrency limit.

Pure ASGI (no BaseHTTPMiddleware) so the body limit is enforced while the
body streams in: a chunked upload without Content-Length is cut off too.
"""

from __future__ import annotations

import re
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import PayloadTooLarge
from app.lifecycle import ServerState

_INFERENCE = re.compile(r"^/(v1/models/[^/]+/predict|v2/models/[^/]+(/versions/[^/]+)?/infer)$")


async def _reply(send: Send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    body = orjson.dumps({"error": message})
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


class RequestGuard:
    def __init__(self, app: ASGIApp, settings: Settings, state: ServerState) -> None:
        self.app, self.settings, self.state = app, settings, state

    def _limit(self, path: str) -> int:
        if path.startswith("/admin/"):
            return self.settings.max_upload_bytes
        return self.settings.max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, limit = scope["path"], self._limit(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reply(send, 413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            return
        inference = bool(_INFERENCE.match(path))
        if inference and self.state.draining:
            await _reply(send, 503, "server is shutting down; retry on another replica", {"Retry-After": "1"})
            return
        if inference and self.state.inflight >= self.settings.max_concurrency:
            await _reply(
                send, 503, f"server is at its concurrency limit ({self.settings.max_concurrency}); retry later",
                {"Retry-After": "1"},
            )
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
            return message

        if inference:
            self.state.inflight += 1
        try:
            await self.app(scope, limited_receive, send)
        finally:
            if inference:
                self.state.inflight -= 1


def _content_length(scope: dict[str, Any]) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
