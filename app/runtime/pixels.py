"""Bounds on decoded pixels: per request, and in flight across the whole process.

Decoding a 40 MP image costs hundreds of MB for a moment; a small PNG can declare that many
pixels. Each request may decode at most ``max_request_pixels`` in total (413 past it), and the
decode threads together hold at most ``in_flight`` pixels at once: a thread whose image does not
fit waits for others to finish instead of adding its peak to theirs, so peak memory no longer
grows with the number of cores or concurrent requests.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from app.errors import PayloadTooLarge


class PixelBudget:
    """A counting semaphore measured in pixels (thread-safe; used by the decode threads)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._used = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int) -> Iterator[None]:
        want = min(pixels, self.capacity)  # one image larger than the budget runs alone
        with self._cond:
            self._cond.wait_for(lambda: self._used + want <= self.capacity)
            self._used += want
        try:
            yield
        finally:
            with self._cond:
                self._used -= want
                self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


class RequestPixels:
    """What one request has decoded so far (its images decode in parallel threads)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.total = limit, 0
        self._lock = threading.Lock()

    def add(self, pixels: int) -> None:
        with self._lock:
            self.total += pixels
            if self.total > self.limit:
                raise PayloadTooLarge(
                    f"the request's images hold more than {self.limit} pixels in total; send fewer or smaller"
                    " images per request"
                )
