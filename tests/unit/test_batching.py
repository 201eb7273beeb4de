"""Unit tests for app.batching with a fake runner.

Plain sync tests driving ``asyncio.run`` (no pytest-asyncio). Wherever a batch
must be "running", the fake runner blocks on a threading.Event, so the
assertions are about batch composition, never about wall-clock timing.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from app.batching import BatchPolicy, BatchStats, DynamicBatcher
from app.errors import DeadlineExceeded, Overloaded, ServiceError


class FakeRunner:
    """Records every batch; doubles the items; can hold a batch until released or fail it."""

    def __init__(
        self, *, hold: bool = False, fail_on_negative: bool = False, drop_last: bool = False
    ) -> None:
        self.batches: list[list[Any]] = []
        self.threads: list[str] = []
        self.started = threading.Event()
        self.release = threading.Event()
        if not hold:
            self.release.set()
        self.fail_on_negative = fail_on_negative
        self.drop_last = drop_last

    def __call__(self, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        self.threads.append(threading.current_thread().name)
        self.started.set()
        assert self.release.wait(timeout=10), "test never released the held batch"
        if self.fail_on_negative and any(x < 0 for x in items):
            raise ValueError("boom")
        out = [x * 2 for x in items]
        return out[:-1] if self.drop_last else out


def run(test: Callable[[], Awaitable[None]]) -> None:
    """asyncio.run plus a check that nothing went to the loop's exception handler."""
    errors: list[dict[str, Any]] = []

    async def main() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: errors.append(ctx))
        await test()

    asyncio.run(main())
    assert errors == []


async def until(pred: Callable[[], bool], timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < end, "condition not reached"
        await asyncio.sleep(0.001)


async def make(runner: FakeRunner, name: str = "m", **policy: Any) -> DynamicBatcher:
    kw = {k: policy.pop(k) for k in ("group_key", "executor") if k in policy}
    b = DynamicBatcher(name, runner, BatchPolicy(**policy), **kw)
    await b.start()
    return b


async def started_and_held(b: DynamicBatcher, runner: FakeRunner, item: Any, **kw: Any) -> asyncio.Task[Any]:
    """Submit ``item`` and return once its batch is running (blocked in the runner)."""
    task = asyncio.create_task(b.submit(item, **kw))
    await until(runner.started.is_set)
    return task


def test_policy_validation() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_batch_size=0)
    with pytest.raises(ValueError):
        BatchPolicy(max_queue_size=0)
    assert BatchPolicy() == BatchPolicy(8, 2.0, 256)


def test_batches_formed_by_size_and_results_in_order() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=4, max_batch_delay_ms=5000)  # full batches never wait
        results = await asyncio.gather(*(b.submit(i) for i in range(8)))
        assert results == [i * 2 for i in range(8)]
        assert r.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert r.threads and all(n.startswith("infer-m") for n in r.threads)
        await b.stop()
        assert b.stats.batches_run == 2 and b.stats.items_run == 8
        assert b.stats.batch_sizes == collections.Counter({4: 2})

    run(t)


def test_lone_item_runs_after_delay() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=8, max_batch_delay_ms=100)
        t0 = time.monotonic()
        assert await b.submit(21) == 42
        assert time.monotonic() - t0 >= 0.08  # it waited for company (lower bound only: not flaky)
        assert r.batches == [[21]]
        await b.stop()

    run(t)


def test_items_within_delay_share_a_batch_but_not_after_a_gap() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=8, max_batch_delay_ms=300)
        first = asyncio.create_task(b.submit(1))
        await asyncio.sleep(0.01)  # well inside the 300 ms window
        second = asyncio.create_task(b.submit(2))
        assert await asyncio.gather(first, second) == [2, 4]
        assert r.batches == [[1, 2]]
        # after the first batch finished, a new item starts its own batch
        assert await b.submit(3) == 6
        assert r.batches == [[1, 2], [3]]
        await b.stop()

    run(t)


def test_no_waiting_with_delay_zero_or_size_one() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=1, max_batch_delay_ms=5000)
        assert await asyncio.gather(*(b.submit(i) for i in range(3))) == [0, 2, 4]
        assert r.batches == [[0], [1], [2]]
        await b.stop()

        r = FakeRunner(hold=True)
        b = await make(r, max_batch_size=8, max_batch_delay_ms=0)
        a = await started_and_held(b, r, 1)
        rest = asyncio.gather(b.submit(2), b.submit(3))
        await until(lambda: b.queue_depth == 2)
        r.release.set()
        assert await a == 2 and await rest == [4, 6]
        assert r.batches == [[1], [2, 3]]  # what was queued is taken together, no extra wait
        await b.stop()

    run(t)


def test_submit_many_order_and_split_across_batches() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=4, max_batch_delay_ms=1)  # all 10 enqueued at once
        assert await b.submit_many(list(range(10))) == [i * 2 for i in range(10)]
        assert await b.submit_many([]) == []
        assert r.batches[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert [x for batch in r.batches for x in batch] == list(range(10))
        await b.stop()

    run(t)


def test_concurrent_submits_get_their_own_results() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=3, max_batch_delay_ms=1)
        items = list(range(25))
        assert await asyncio.gather(*(b.submit(i) for i in items)) == [i * 2 for i in items]
        assert sorted(x for batch in r.batches for x in batch) == items
        assert max(len(batch) for batch in r.batches) <= 3
        await b.stop()

    run(t)


def test_runner_error_fans_out_and_next_batch_succeeds() -> None:
    async def t() -> None:
        r = FakeRunner(fail_on_negative=True)
        b = await make(r, max_batch_size=3, max_batch_delay_ms=5000)
        outs = await asyncio.gather(b.submit(1), b.submit(-2), b.submit(3), return_exceptions=True)
        assert all(isinstance(o, ValueError) and str(o) == "boom" for o in outs)
        assert r.batches == [[1, -2, 3]]
        assert await b.submit_many([4, 5, 6]) == [8, 10, 12]
        assert b.stats.batches_run == 2
        await b.stop()

    run(t)


def test_submit_many_raises_after_all_items_complete() -> None:
    async def t() -> None:
        r = FakeRunner(fail_on_negative=True)
        b = await make(r, max_batch_size=2, max_batch_delay_ms=5000)
        with pytest.raises(ValueError, match="boom"):
            await b.submit_many([1, 2, -3, 4, 5, 6])
        assert r.batches == [[1, 2], [-3, 4], [5, 6]]  # every batch ran before the call raised
        await b.stop()

    run(t)


def test_wrong_result_length_is_a_500() -> None:
    async def t() -> None:
        r = FakeRunner(drop_last=True)
        b = await make(r, max_batch_size=3, max_batch_delay_ms=5000)
        outs = await asyncio.gather(*(b.submit(i) for i in range(3)), return_exceptions=True)
        for o in outs:
            assert isinstance(o, ServiceError) and o.status_code == 500
            assert str(o) == "batch runner returned 2 results for 3 items"
        await b.stop()

    run(t)


def test_queue_full_rejects_whole_request() -> None:
    async def t() -> None:
        r = FakeRunner(hold=True)
        b = await make(r, max_batch_size=1, max_batch_delay_ms=0, max_queue_size=4)
        running = await started_and_held(b, r, 0)  # in a running batch: not counted as waiting
        queued = [asyncio.create_task(b.submit(i)) for i in (1, 2, 3)]
        await until(lambda: b.queue_depth == 3)
        with pytest.raises(Overloaded) as exc:
            await b.submit_many([4, 5])
        err = exc.value
        assert err.status_code == 503 and err.headers == {"Retry-After": "1"}
        assert str(err) == "model m queue is full (4 waiting); retry later"
        assert b.queue_depth == 3 and b.stats.rejected_full == 1  # nothing partial enqueued
        last = asyncio.create_task(b.submit(6))  # exactly fills the queue: accepted
        await until(lambda: b.queue_depth == 4)
        r.release.set()
        assert await asyncio.gather(running, *queued, last) == [0, 2, 4, 6, 12]
        assert [x for batch in r.batches for x in batch] == [0, 1, 2, 3, 6]
        await b.stop()

    run(t)


def test_deadline_exceeded_in_queue_never_reaches_runner() -> None:
    async def t() -> None:
        r = FakeRunner(hold=True)
        b = await make(r, max_batch_size=4, max_batch_delay_ms=0)
        running = await started_and_held(b, r, 1)
        with pytest.raises(DeadlineExceeded) as exc:
            await b.submit(2, deadline=time.monotonic() + 0.05)
        assert exc.value.status_code == 504
        assert str(exc.value) == "request deadline exceeded after waiting in the queue for model m"
        assert b.queue_depth == 0
        r.release.set()
        assert await running == 2
        assert await b.submit(3) == 6
        assert r.batches == [[1], [3]]
        assert b.stats.expired == 1
        await b.stop()

    run(t)


def test_deadline_already_past_is_dropped() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=4, max_batch_delay_ms=0)
        with pytest.raises(DeadlineExceeded, match="waiting in the queue"):
            await b.submit_many([1, 2], deadline=time.monotonic() - 1)
        assert await b.submit(3) == 6
        assert r.batches == [[3]]
        assert b.stats.expired == 2
        await b.stop()

    run(t)


def test_deadline_while_batch_running_discards_late_result() -> None:
    async def t() -> None:
        r = FakeRunner(hold=True)
        b = await make(r, max_batch_size=4, max_batch_delay_ms=0)
        slow = await started_and_held(b, r, 1, deadline=time.monotonic() + 0.5)
        with pytest.raises(DeadlineExceeded, match="while model m was running"):
            await slow
        r.release.set()  # the late result arrives now and must be dropped quietly
        assert await b.submit(2) == 4
        assert r.batches == [[1], [2]]
        assert b.stats.expired == 1 and b.stats.items_run == 2
        await b.stop()

    run(t)


def test_cancelled_caller_is_skipped() -> None:
    async def t() -> None:
        r = FakeRunner(hold=True)
        b = await make(r, max_batch_size=4, max_batch_delay_ms=0)
        running = await started_and_held(b, r, 1)
        gone = asyncio.create_task(b.submit(2))
        await until(lambda: b.queue_depth == 1)
        gone.cancel()
        with pytest.raises(asyncio.CancelledError):
            await gone
        assert b.queue_depth == 0
        r.release.set()
        assert await running == 2
        assert await b.submit(3) == 6
        assert r.batches == [[1], [3]]
        await b.stop()

    run(t)


def test_cancel_during_running_batch_drops_result() -> None:
    async def t() -> None:
        r = FakeRunner(hold=True)
        b = await make(r, max_batch_size=4, max_batch_delay_ms=0)
        running = await started_and_held(b, r, 1)
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        r.release.set()
        assert await b.submit(2) == 4
        assert b.stats.batches_run == 2
        await b.stop()

    run(t)


def test_group_key_keeps_shapes_apart() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=8, max_batch_delay_ms=20, group_key=lambda x: x % 2)
        assert await asyncio.gather(*(b.submit(i) for i in (10, 21, 12, 23))) == [20, 42, 24, 46]
        assert r.batches == [[10, 12], [21, 23]]
        await b.stop()

    run(t)


def test_group_key_next_batch_starts_with_oldest_remaining() -> None:
    async def t() -> None:
        r = FakeRunner(hold=True)
        b = await make(r, max_batch_size=2, max_batch_delay_ms=0, group_key=lambda x: x[0])
        items = [("a", 1), ("b", 1), ("a", 2), ("a", 3), ("b", 2)]
        running = await started_and_held(b, r, ("z", 0))
        rest = asyncio.gather(*(b.submit(x) for x in items))
        await until(lambda: b.queue_depth == 5)
        r.release.set()
        await running
        assert await rest == [x * 2 for x in items]
        assert r.batches[1:] == [[("a", 1), ("a", 2)], [("b", 1), ("b", 2)], [("a", 3)]]
        await b.stop()

    run(t)


def test_stop_drains_then_rejects() -> None:
    async def t() -> None:
        r = FakeRunner(hold=True)
        b = await make(r, name="drain", max_batch_size=2, max_batch_delay_ms=5000)
        t0 = time.monotonic()
        accepted = asyncio.gather(*(b.submit(i) for i in (1, 2, 3)))  # [1, 2] is full and runs at once
        await until(r.started.is_set)
        await until(lambda: b.queue_depth == 1)
        stopping = asyncio.create_task(b.stop())
        await asyncio.sleep(0.01)
        assert not stopping.done()  # still waiting for the held batch and the queue
        with pytest.raises(Overloaded, match="shutting down") as exc:
            await b.submit(4)
        assert exc.value.status_code == 503 and exc.value.headers["Retry-After"] == "1"
        r.release.set()
        await stopping
        assert await accepted == [2, 4, 6]
        assert r.batches == [[1, 2], [3]]
        assert time.monotonic() - t0 < 4  # draining did not wait the 5 s for company for [3]
        assert not any(th.name.startswith("infer-drain") for th in threading.enumerate())
        with pytest.raises(Overloaded, match="shutting down"):
            await b.submit_many([5])
        await b.stop()  # idempotent

    run(t)


def test_stop_cuts_the_delay_short() -> None:
    async def t() -> None:
        r = FakeRunner()
        b = await make(r, max_batch_size=8, max_batch_delay_ms=5000)
        accepted = asyncio.gather(b.submit(1), b.submit(2))
        await until(lambda: b.queue_depth == 2)  # being collected, waiting for company
        await b.stop()
        assert await accepted == [2, 4]
        assert r.batches == [[1, 2]]

    run(t)


def test_stats_and_on_batch_hook() -> None:
    async def t() -> None:
        r = FakeRunner(hold=True)
        b = await make(r, max_batch_size=2, max_batch_delay_ms=0, max_queue_size=3)
        calls: list[tuple[int, float]] = []
        b.on_batch = lambda n, s: calls.append((n, s))
        running = await started_and_held(b, r, 1)
        queued = asyncio.gather(*(b.submit(i) for i in (2, 3, 4)))
        await until(lambda: b.queue_depth == 3)
        with pytest.raises(Overloaded):
            await b.submit(5)
        r.release.set()
        await running, await queued
        with pytest.raises(DeadlineExceeded):
            await b.submit(6, deadline=time.monotonic() - 1)
        b.on_batch = lambda n, s: 1 / 0  # a broken hook must not break batching
        assert await b.submit(7) == 14
        await b.stop()
        assert b.stats == BatchStats(
            batches_run=4,
            items_run=5,
            batch_sizes=collections.Counter({1: 3, 2: 1}),
            rejected_full=1,
            expired=1,
        )
        assert [n for n, _ in calls] == [1, 2, 1] and all(s >= 0 for _, s in calls)

    run(t)


def test_external_executor_is_used_and_not_shut_down() -> None:
    async def t() -> None:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="shared") as pool:
            r = FakeRunner()
            b = await make(r, executor=pool, max_batch_size=2, max_batch_delay_ms=0)
            assert await b.submit(1) == 2
            await b.stop()
            assert r.threads[0].startswith("shared")
            assert pool.submit(lambda: 5).result() == 5

    run(t)


def test_exception_instance_as_result_fails_only_that_item() -> None:
    def runner(items: list[int]) -> list[object]:
        return [ValueError(f"bad {x}") if x < 0 else x * 2 for x in items]

    async def main() -> tuple[object, object]:
        batcher = DynamicBatcher("per-item", runner, BatchPolicy(max_batch_size=2, max_batch_delay_ms=200))
        await batcher.start()
        good, bad = await asyncio.gather(batcher.submit(3), batcher.submit(-1), return_exceptions=True)
        await batcher.stop()
        return good, bad

    good, bad = asyncio.run(main())
    assert good == 6
    assert isinstance(bad, ValueError) and "bad -1" in str(bad)


def test_adaptive_delay_runs_a_lone_request_at_once_and_batches_under_load() -> None:
    seen: list[list[int]] = []
    gate = threading.Event()

    def runner(items: list[int]) -> list[int]:
        seen.append(list(items))
        if items == [10]:
            gate.wait(5)  # hold this batch so the others queue up behind it
        return items

    async def main() -> None:
        idle = DynamicBatcher("idle", runner, BatchPolicy(max_batch_size=8, max_batch_delay_ms=60_000,
                                                          adaptive_delay=True))
        await idle.start()
        assert await asyncio.wait_for(idle.submit(0), 10) == 0  # never waits out the 60 s delay
        await idle.stop()
        busy = DynamicBatcher("busy", runner, BatchPolicy(max_batch_size=8, max_batch_delay_ms=200,
                                                          adaptive_delay=True))
        await busy.start()
        first = asyncio.ensure_future(busy.submit(10))
        await asyncio.sleep(0.1)
        rest = [asyncio.ensure_future(busy.submit(i)) for i in range(11, 15)]
        await asyncio.sleep(0.1)
        gate.set()
        await asyncio.gather(first, *rest)
        await busy.stop()

    asyncio.run(main())
    assert seen == [[0], [10], [11, 12, 13, 14]]  # queued behind a busy model: batched together
