"""One JSON log line and the request metrics per request; ``X-Request-ID`` on every response."""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.observability.context import RequestInfo, current, family_of, request_id_from
from app.observability.metrics import Metrics

access_log = logging.getLogger("modserve.access")


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        info = RequestInfo(request_id=request_id_from(header), family=family_of(scope["path"]))
        token = current.set(info)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", info.request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            model = info.model or ""
            self.metrics.requests.labels(model, info.family, str(status)).inc()
            if info.family in ("native", "v2") and info.model:
                self.metrics.observe_stages(model, info.family, total=elapsed)
            client = scope.get("client")
            access_log.info(
                "%s %s %d", scope["method"], scope["path"], status,
                extra={
                    "client": f"{client[0]}:{client[1]}" if client else None,
                    "method": scope["method"], "path": scope["path"], "status": status,
                    "model": info.model, "version": info.version, "batch_size": info.batch_size,
                    "latency_ms": round(elapsed * 1000, 3),
                },
            )
            current.reset(token)
