"""An ASGI guard in front of every route: body size and receive deadline, and draining.

Pure ASGI (no BaseHTTPMiddleware) so the limits are enforced while the body
streams in: a chunked upload without Content-Length is cut off too, and a client
that trickles its body gets 408 instead of holding the request open. Inference
slots (the concurrency limit) are taken by the service once the body is in, so
slow senders cannot hold them.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.config import Settings
from app.errors import PayloadTooLarge, RequestTimeout
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

    def _limits(self, path: str) -> tuple[int, float]:
        """Largest body and seconds to receive it, for this path."""
        if path.startswith("/admin/"):
            return self.settings.max_upload_bytes, self.settings.upload_timeout
        return self.settings.max_body_bytes, self.settings.body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit, seconds = self._limits(path)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _reply(send, 413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            return
        if self.state.draining and _INFERENCE.match(path):
            await _reply(send, 503, "server is shutting down; retry on another replica", {"Retry-After": "1"})
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        received, body_done = 0, False

        async def limited_receive() -> Message:
            nonlocal received, body_done
            if body_done:  # afterwards only a disconnect can come: no deadline on waiting for it
                return await receive()
            remaining = deadline - loop.time()
            try:
                if remaining <= 0:
                    raise TimeoutError
                message = await asyncio.wait_for(receive(), remaining)
            except TimeoutError:
                raise RequestTimeout(f"request body not received within {seconds:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
                body_done = not message.get("more_body", False)
            return message

        await self.app(scope, limited_receive, send)


def _content_length(scope: dict[str, Any]) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
