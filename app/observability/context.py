"""Per-request context (id, model, version, batch size) that log lines and metrics read."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar
from dataclasses import dataclass

_SAFE_ID = re.compile(r"[^A-Za-z0-9._:-]")
MAX_ID_LENGTH = 64


@dataclass
class RequestInfo:
    request_id: str
    family: str = "other"
    model: str | None = None
    version: str | None = None
    batch_size: int | None = None


current: ContextVar[RequestInfo | None] = ContextVar("modserve_request", default=None)


def request_id_from(header: str | None) -> str:
    """Keep a client's id when it is usable (sanitised, bounded), else make one."""
    if header:
        cleaned = _SAFE_ID.sub("", header)[:MAX_ID_LENGTH]
        if cleaned:
            return cleaned
    return uuid.uuid4().hex


def note_model(model: str, version: str, batch_size: int | None = None) -> None:
    info = current.get()
    if info is not None:
        info.model, info.version = model, version
        if batch_size is not None:
            info.batch_size = max(batch_size, info.batch_size or 0)


def family_of(path: str) -> str:
    """The endpoint family a path belongs to, for metrics labels."""
    if path.startswith("/v1/"):
        return "native"
    if path.startswith(("/admin/", "/v2/repository/")):
        return "admin"
    if path.startswith("/v2/health"):
        return "health"
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    if path == "/metrics":
        return "metrics"
    return "other"
