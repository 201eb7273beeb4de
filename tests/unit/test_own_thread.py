"""Model builds run in a thread that exits afterwards, taking its OpenMP team with it (an idle second
team slows every forward of the inference thread: app/runtime/own_thread.py)."""

from __future__ import annotations

import asyncio
import contextvars
import os
import threading
import time
from pathlib import Path

import pytest
import torch

from app.runtime.own_thread import in_own_thread

LABEL: contextvars.ContextVar[str] = contextvars.ContextVar("label", default="unset")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_the_call_runs_in_a_thread_that_then_exits_with_the_callers_context() -> None:
    async def main() -> tuple[threading.Thread, str]:
        LABEL.set("request-7")
        return await in_own_thread(lambda: (threading.current_thread(), LABEL.get()))

    thread, label = asyncio.run(main())
    assert thread is not threading.main_thread() and label == "request-7"
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_errors_reach_the_caller() -> None:
    def fail() -> None:
        raise ValueError("no such checkpoint")

    with pytest.raises(ValueError, match="no such checkpoint"):
        asyncio.run(in_own_thread(fail))


@pytest.mark.skipif(not Path("/proc/self/task").exists() or torch.get_num_threads() < 2,
                    reason="needs Linux /proc and torch running more than one intra-op thread")
def test_the_openmp_team_of_a_build_does_not_outlive_it() -> None:
    def parallel_work() -> None:  # what a smoke test or warm-up forward does: an intra-op parallel region
        torch.ones(8_000_000).add_(1).sum()

    async def main() -> tuple[int, int]:  # counted while the loop (and its default executor) lives
        before = _threads()
        await in_own_thread(parallel_work)
        deadline = time.monotonic() + 5
        while _threads() > before and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return before, _threads()

    before, after = asyncio.run(main())
    assert after <= before  # asyncio.to_thread here: the pooled worker and its OpenMP team stay
