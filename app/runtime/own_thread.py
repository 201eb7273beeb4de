"""Blocking torch work off the inference threads (building, smoke-testing and warming up a model)
runs in a thread of its own that exits when it is done.

libgomp, torch's OpenMP on Linux, keeps a team of worker threads for every thread that ever ran a
parallel region, for as long as that thread lives. An idle second team is not free: with more
OpenMP threads than cores, libgomp stops spinning between parallel regions in every team, and each
forward of the inference thread pays for it (resnet18 at 64 x 64 on 2 cores: 10 ms with one team,
14-20 ms with the loader's idle team alive; bench/README.md, "Thread layout"). A thread that exits
takes its team with it; a pooled worker (``asyncio.to_thread``) would keep it forever.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


async def in_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread`` in a fresh thread that ends with the call (context variables copied)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="modserve-build")
    try:
        call = functools.partial(contextvars.copy_context().run, fn, *args)
        return await asyncio.get_running_loop().run_in_executor(executor, call)
    finally:
        executor.shutdown(wait=False)  # the thread exits once the call returns
