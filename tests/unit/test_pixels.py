"""Decoded-pixel bounds: a request's total, and what all decode threads hold at once."""

from __future__ import annotations

import threading
import time

import pytest

from app.errors import PayloadTooLarge
from app.runtime.pixels import PixelBudget, RequestPixels


def test_request_total_is_bounded() -> None:
    pixels = RequestPixels(100)
    pixels.add(60)
    pixels.add(40)
    with pytest.raises(PayloadTooLarge, match="100 pixels in total"):
        pixels.add(1)


def test_budget_makes_a_large_decode_wait_for_others() -> None:
    budget = PixelBudget(100)
    order: list[str] = []
    first_in = threading.Event()
    release_first = threading.Event()

    def first() -> None:
        with budget.hold(70):
            order.append("first in")
            first_in.set()
            assert release_first.wait(5)
            order.append("first out")

    def second() -> None:
        assert first_in.wait(5)
        with budget.hold(50):  # 70 + 50 > 100: waits until the first is out
            order.append("second in")

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    assert first_in.wait(5)
    deadline = time.monotonic() + 5
    while budget.used != 70 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert order == ["first in"]  # the second is still waiting
    release_first.set()
    for t in threads:
        t.join(5)
    assert order == ["first in", "first out", "second in"] and budget.used == 0


def test_an_image_larger_than_the_budget_runs_alone() -> None:
    budget = PixelBudget(100)
    with budget.hold(10_000):
        assert budget.used == 100
    assert budget.used == 0
