"""The ASGI request guard alone: body limit while streaming, body deadline, draining."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from app.api.guard import RequestGuard
from app.config import Settings
from app.errors import PayloadTooLarge, RequestTimeout
from app.lifecycle import ServerState


async def _drain_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def _run(guard: RequestGuard, path: str, chunks: list[bytes], *, gap: float = 0.0,
         headers: list[tuple[bytes, bytes]] | None = None) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def main() -> None:
        queue = list(chunks)

        async def receive() -> dict[str, Any]:
            if gap:
                await asyncio.sleep(gap)
            body = queue.pop(0) if queue else b""
            return {"type": "http.request", "body": body, "more_body": bool(queue)}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "path": path, "method": "POST", "headers": headers or []}
        await guard(scope, receive, send)

    asyncio.run(main())
    return sent


def _guard(**settings: Any) -> tuple[RequestGuard, ServerState]:
    state = ServerState()
    return RequestGuard(_drain_app, settings=Settings(**settings), state=state), state


def test_body_within_limits_passes() -> None:
    guard, _ = _guard(max_body_bytes=10)
    sent = _run(guard, "/v1/models/m/predict", [b"12345", b"67890"])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"10"


def test_declared_and_streamed_bodies_over_the_limit() -> None:
    guard, _ = _guard(max_body_bytes=10)
    sent = _run(guard, "/v1/models/m/predict", [b"x"], headers=[(b"content-length", b"11")])
    assert sent[0]["status"] == 413
    with pytest.raises(PayloadTooLarge):  # chunked: counted while it streams (the route's handler maps it)
        _run(guard, "/v1/models/m/predict", [b"123456", b"78901"])
    guard, _ = _guard(max_body_bytes=10, max_upload_bytes=100)
    assert _run(guard, "/admin/models/m/versions/2", [b"x" * 50])[0]["status"] == 200  # admin limit


def test_a_body_that_trickles_past_the_deadline_times_out() -> None:
    guard, _ = _guard(body_timeout=0.05)
    with pytest.raises(RequestTimeout):
        _run(guard, "/v1/models/m/predict", [b"a", b"b", b"c", b"d"], gap=0.03)
    guard, _ = _guard(body_timeout=0.05, upload_timeout=30)
    assert _run(guard, "/admin/models/m/versions/2", [b"a", b"b", b"c"], gap=0.03)[0]["status"] == 200


def test_draining_refuses_inference_but_not_health() -> None:
    guard, state = _guard()
    state.draining = True
    sent = _run(guard, "/v2/models/m/infer", [b"{}"])
    assert sent[0]["status"] == 503 and (b"retry-after", b"1") in sent[0]["headers"]
    assert _run(guard, "/v2/health/live", [b""])[0]["status"] == 200
