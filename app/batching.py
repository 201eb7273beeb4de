"""Dynamic batching of single inference requests into model-sized batches.

Generic on purpose (no web framework, no torch): the runner is any blocking
callable ``list[item] -> list[result]``. It runs on one dedicated worker thread
per batcher so a model on a device never sees two batches at once, while the
event loop stays free to accept, group and time out requests.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from app.errors import DeadlineExceeded, Overloaded, ServiceError

log = logging.getLogger(__name__)

RunBatch = Callable[[list[Any]], list[Any]]
"""Blocking; one result per item in order. An exception *instance* as a result fails only that item."""


@dataclass(frozen=True)
class BatchPolicy:
    max_batch_size: int = 8  # >= 1
    max_batch_delay_ms: float = 2.0  # how long the first item of a batch may wait for company
    max_queue_size: int = 256  # items waiting (not yet in a running batch); beyond -> Overloaded
    adaptive_delay: bool = False
    """Wait for company only under concurrent load: a lone request on an idle model runs at once."""

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        if self.max_batch_delay_ms < 0:
            raise ValueError("max_batch_delay_ms must be >= 0")
        if self.max_queue_size < 1:
            raise ValueError("max_queue_size must be >= 1")


@dataclass
class BatchStats:
    batches_run: int = 0
    items_run: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    rejected_full: int = 0
    expired: int = 0


@dataclass(eq=False)  # identity equality: deque.remove must find this exact entry
class _Pending:
    item: Any
    key: Hashable
    future: asyncio.Future[Any]
    deadline: float | None
    running: bool = False


class DynamicBatcher:
    """Collects concurrent ``submit`` calls into batches and runs them one at a time."""

    def __init__(
        self,
        name: str,
        run_batch: RunBatch,
        policy: BatchPolicy,
        *,
        group_key: Callable[[Any], Hashable] | None = None,
        executor: concurrent.futures.Executor | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.stats = BatchStats()
        self.on_batch: Callable[[int, float], None] | None = None
        self._run_batch = run_batch
        self._group_key = group_key
        self._owns_executor = executor is None
        self._executor: concurrent.futures.Executor = executor or concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"infer-{name}"
        )
        self._queue: collections.deque[_Pending] = collections.deque()
        self._forming: list[_Pending] = []  # taken from the queue, batch not started yet
        self._inflight: list[_Pending] = []  # handed to run_batch
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._recently_busy = False

    @property
    def queue_depth(self) -> int:
        """Live items not yet in a running batch (abandoned ones do not count)."""
        return sum(not p.future.done() for p in (*self._queue, *self._forming))

    async def start(self) -> None:
        if self._stopping:
            raise RuntimeError(f"batcher {self.name} was stopped; create a new one")
        if self._task is None:
            loop = asyncio.get_running_loop()
            self._task = loop.create_task(self._collect_loop(), name=f"batcher-{self.name}")

    async def stop(self) -> None:
        """Refuse new work, let everything already accepted finish, then release the thread."""
        self._stopping = True
        self._wakeup.set()
        if self._task is not None:
            # asyncio.wait: a cancelled caller of stop() must not abort the drain half-way,
            # and a crashed collector (already logged) must not make stop() raise.
            await asyncio.wait([self._task])
        else:
            self._fail_all(Overloaded(f"model {self.name} is shutting down; retry later", retry_after=1))
        if self._owns_executor:
            self._executor.shutdown(wait=True)  # idle by now, so this does not block the loop

    async def submit(self, item: Any, *, deadline: float | None = None) -> Any:
        return (await self.submit_many([item], deadline=deadline))[0]

    async def submit_many(self, items: Sequence[Any], *, deadline: float | None = None) -> list[Any]:
        """All-or-nothing admission, so a rejected request never leaves half its items queued."""
        if self._stopping:
            raise Overloaded(f"model {self.name} is shutting down; retry later", retry_after=1)
        if not items:
            return []
        max_q = self.policy.max_queue_size
        if self.queue_depth + len(items) > max_q:
            self.stats.rejected_full += 1
            raise Overloaded(f"model {self.name} queue is full ({max_q} waiting); retry later", retry_after=1)
        loop = asyncio.get_running_loop()
        key = self._group_key
        pending = [_Pending(x, key(x) if key else None, loop.create_future(), deadline) for x in items]
        self._queue.extend(pending)
        self._wakeup.set()
        return await self._wait_all(pending, deadline)

    async def _wait_all(self, pending: list[_Pending], deadline: float | None) -> list[Any]:
        futures = [p.future for p in pending]
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            # asyncio.wait never cancels the futures itself; we decide below what they become.
            await asyncio.wait(futures, timeout=timeout)
        except asyncio.CancelledError:  # client went away: its items must not reach the model
            for p in pending:
                if not p.future.cancel() and not p.future.cancelled():
                    p.future.exception()  # already failed: mark retrieved, nobody will read it
                self._discard(p)
            raise
        for p in pending:
            if not p.future.done():
                self._expire(p)
                self._discard(p)
        first_error: BaseException | None = None
        for p in pending:  # retrieve every exception so none is logged as "never retrieved"
            exc = asyncio.CancelledError() if p.future.cancelled() else p.future.exception()
            if exc is not None and first_error is None:
                first_error = exc
        if first_error is not None:
            raise first_error
        return [f.result() for f in futures]

    def _discard(self, p: _Pending) -> None:
        try:
            self._queue.remove(p)
        except ValueError:
            pass  # already taken by the collector, which skips done futures

    def _expire(self, p: _Pending) -> None:
        self.stats.expired += 1
        if p.running:
            msg = f"request deadline exceeded while model {self.name} was running its batch"
        else:
            msg = f"request deadline exceeded after waiting in the queue for model {self.name}"
        p.future.set_exception(DeadlineExceeded(msg))

    def _fail_all(self, exc: BaseException) -> None:
        for p in [*self._queue, *self._forming, *self._inflight]:
            if not p.future.done():
                p.future.set_exception(exc)
        self._queue.clear()
        self._forming = []

    async def _collect_loop(self) -> None:
        try:
            while True:
                batch = await self._next_batch()
                if batch is None:
                    return
                await self._run(batch)
        except BaseException as exc:  # a bug or loop shutdown must not leave callers hanging forever
            if not isinstance(exc, asyncio.CancelledError):
                log.exception("batcher %s collector crashed", self.name)
            self._stopping = True
            self._fail_all(ServiceError(f"batcher for model {self.name} stopped unexpectedly"))
            raise

    async def _next_batch(self) -> list[_Pending] | None:
        """Oldest live item first, then same-key items until full or its delay is up."""
        while True:
            self._take(self._forming)
            if self._forming:
                break
            if self._stopping:
                return None
            self._wakeup.clear()
            await self._wakeup.wait()
        batch = self._forming
        until = time.monotonic() + self.policy.max_batch_delay_ms / 1000.0
        idle = self.policy.adaptive_delay and not self._recently_busy
        while True:
            self._take(batch)
            if len(batch) >= self.policy.max_batch_size or self._stopping or idle:
                break  # when draining no new company can come, so do not wait for it
            remaining = until - time.monotonic()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                await asyncio.wait_for(self._wakeup.wait(), remaining)
            except TimeoutError:
                pass
        return batch

    def _take(self, batch: list[_Pending]) -> None:
        """Move live items with the batch's key (the oldest's, if empty) into ``batch``; keep FIFO."""
        now, keep = time.monotonic(), collections.deque[_Pending]()
        while self._queue:
            p = self._queue.popleft()
            if p.future.done():
                continue
            if p.deadline is not None and now >= p.deadline:
                self._expire(p)
            elif len(batch) < self.policy.max_batch_size and (not batch or p.key == batch[0].key):
                batch.append(p)
            else:
                keep.append(p)
        self._queue = keep

    async def _run(self, batch: list[_Pending]) -> None:
        now = time.monotonic()
        live: list[_Pending] = []
        for p in batch:
            if p.future.done():
                continue
            if p.deadline is not None and now >= p.deadline:
                self._expire(p)  # never spend model time on an answer nobody waits for
            else:
                p.running = True
                live.append(p)
        self._forming, self._inflight = [], live
        if not live:
            return
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self._run_batch, [p.item for p in live])
        except Exception as exc:
            outcome: BaseException | Sequence[Any] = exc
        else:
            outcome = results
            if not isinstance(results, (list, tuple)) or len(results) != len(live):
                n = len(results) if isinstance(results, (list, tuple)) else type(results).__name__
                outcome = ServiceError(f"batch runner returned {n} results for {len(live)} items")
        elapsed = time.perf_counter() - started
        for i, p in enumerate(live):
            if p.future.done():  # cancelled or timed out while running: drop the result
                continue
            result = outcome if isinstance(outcome, BaseException) else outcome[i]
            if isinstance(result, BaseException):  # the whole batch failed, or just this item
                p.future.set_exception(result)
            else:
                p.future.set_result(result)
        self._inflight = []
        # Traffic is concurrent when a batch had company or requests queued up while it ran.
        self._recently_busy = len(live) > 1 or any(not p.future.done() for p in self._queue)
        self.stats.batches_run += 1
        self.stats.items_run += len(live)
        self.stats.batch_sizes[len(live)] += 1
        if self.on_batch is not None:
            try:
                self.on_batch(len(live), elapsed)
            except Exception:
                log.exception("on_batch hook failed for model %s", self.name)
