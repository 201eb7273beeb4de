"""Process-wide serving state shared by the HTTP guard, health probes and the service."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


class ServerState:
    """Draining, fatal errors and inference slots of one HTTP process.

    With several HTTP processes (``MODSERVE_WORKERS``) the concurrency limit holds per server:
    ``slots`` is then a shared array with one cell per HTTP process (so the supervisor can give
    back a dead process's slots), and ``probe`` reports the device process's failures.
    """

    def __init__(self, slots: Any = None, index: int = 0, probe: Callable[[], str | None] | None = None) -> None:
        self.draining = False
        """Set on SIGTERM: readiness fails and new inference requests get 503."""
        self.inflight = 0
        """Inference requests this process handles now."""
        self._fatal: str | None = None
        self._slots, self._index, self.probe = slots, index, probe

    @property
    def fatal(self) -> str | None:
        """An unrecoverable device error (or an unreachable device process): liveness fails so the
        orchestrator restarts us."""
        return self._fatal or (self.probe() if self.probe is not None else None)

    @fatal.setter
    def fatal(self, value: str | None) -> None:
        self._fatal = value

    def take_slot(self, limit: int) -> bool:
        """One of the server's ``limit`` inference slots, or False when all are taken.

        Shared slots take no lock: each process writes only its own cell (the supervisor zeroes a
        dead one's), so a process killed at any instant can never leave the others blocked. The price:
        requests that arrive in several processes in the same microsecond may pass the limit by at
        most one per process."""
        if self._slots is None:
            if self.inflight >= limit:
                return False
        else:
            if sum(self._slots) >= limit:
                return False
            self._slots[self._index] += 1
        self.inflight += 1
        return True

    def release_slot(self) -> None:
        self.inflight -= 1
        if self._slots is not None:
            self._slots[self._index] -= 1
