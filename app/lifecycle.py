"""Process-wide serving state shared by the HTTP guard, health probes and the service."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ServerState:
    draining: bool = False
    """Set on SIGTERM: readiness fails and new inference requests get 503."""
    fatal: str | None = None
    """An unrecoverable device error: liveness fails so the orchestrator restarts us."""
    inflight: int = 0
    """Inference requests being handled now (the server-wide concurrency limit)."""
