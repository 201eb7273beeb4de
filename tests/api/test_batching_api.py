"""Concurrent requests through the real app are batched, and batching changes no number."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from app.api.disconnect import unless_disconnected
from app.errors import ClientClosedRequest
from app.batching import BatchPolicy, DynamicBatcher
from app.config import Settings
from app.store.writer import write_model
from app.main import create_app
from support.models import build_small, image_bytes, small_configs


def _store(root: Path) -> Path:
    cfg = small_configs()["resnet50_extra"]
    cfg = {**cfg, "runtime": {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 400.0}}
    write_model(root, "batched", cfg, build_small("resnet50_extra").state_dict())
    return root


async def _predict(client: httpx.AsyncClient, seed: int) -> dict[str, Any]:
    r = await client.post(
        "/v1/models/batched/predict",
        files={"image": ("a.png", image_bytes(seed=seed))},
        data={"scalar": str(seed / 3)},
    )
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_concurrent_requests_are_batched_with_identical_results(tmp_path: Path) -> None:
    app = create_app(Settings(store=_store(tmp_path), warmup=False))

    async def main() -> tuple[list[dict], list[dict], dict]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
                alone = [await _predict(client, s) for s in range(8)]
                together = await asyncio.gather(*(_predict(client, s) for s in range(8)))
                info = (await client.get("/v1/models/batched")).json()
        return alone, list(together), info

    alone, together, info = asyncio.run(main())
    sizes = {int(k): v for k, v in info["batching"]["batch_sizes"].items()}
    assert sizes.get(1, 0) >= 8  # the sequential requests ran alone
    assert any(size > 1 for size in sizes), sizes  # the concurrent ones shared batches
    assert info["batching"]["items_run"] == 16
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a["probs"], b["probs"], atol=1e-5)


def test_disconnected_client_never_reaches_the_model() -> None:
    ran: list[list[int]] = []
    release = threading.Event()

    def runner(items: list[int]) -> list[int]:
        ran.append(list(items))
        release.wait(5)
        return items

    class FakeRequest:
        def __init__(self) -> None:
            self.gone = asyncio.Event()

        async def receive(self) -> dict[str, str]:
            await self.gone.wait()
            return {"type": "http.disconnect"}

    async def main() -> None:
        batcher = DynamicBatcher("t", runner, BatchPolicy(max_batch_size=1, max_batch_delay_ms=0))
        await batcher.start()
        first = asyncio.ensure_future(batcher.submit(1))  # occupies the model
        await asyncio.sleep(0.05)
        request = FakeRequest()
        second = asyncio.ensure_future(unless_disconnected(request, batcher.submit(2)))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        request.gone.set()
        with pytest.raises(ClientClosedRequest):
            await second
        release.set()
        assert await first == 1
        await batcher.stop()

    asyncio.run(main())
    assert ran == [[1]]
