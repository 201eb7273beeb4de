"""Hardening through the real app: body and pixel limits, overload, deadlines, device faults."""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.store.writer import write_model
from app.main import create_app
from support.models import build_small, image_bytes, small_configs


def _store(root: Path, **runtime: float | bool) -> Path:
    cfg = dict(small_configs()["resnet50_head"])
    cfg["runtime"] = {"device": "cpu", "max_batch_size": 4, "max_batch_delay_ms": 1.0, **runtime}
    write_model(root, "m", cfg, build_small("resnet50_head").state_dict())
    return root


def _err(r: httpx.Response, status: int, needle: str) -> None:
    assert r.status_code == status, r.text
    assert needle.lower() in r.json()["error"].lower(), r.json()


def _png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image: a decompression bomb's calling card."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    settings = Settings(store=_store(tmp_path_factory.mktemp("limits")), warmup=False,
                        max_body_bytes=200_000, max_image_pixels=1_000_000)
    with TestClient(create_app(settings)) as c:
        yield c


def test_body_over_limit_with_content_length_413(client: TestClient) -> None:
    r = client.post("/v1/models/m/predict", files={"image": ("a.png", b"\x00" * 300_000)})
    _err(r, 413, "exceeds the limit of 200000 bytes")


def test_chunked_body_over_limit_413(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(40):
            yield b"x" * 10_000
    r = client.post("/v1/models/m/predict", content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in r.request.headers
    _err(r, 413, "exceeds the limit")


def test_decompression_bomb_413_from_header(client: TestClient) -> None:
    r = client.post("/v1/models/m/predict", files={"image": ("bomb.png", _png_header_only(30_000, 30_000))})
    _err(r, 413, "too many pixels")
    r = client.post("/v1/models/m/predict", files={"image": ("big.png", _png_header_only(1001, 1000))})
    _err(r, 413, "limit is 1000000")


def test_multipart_field_flood_is_a_fast_4xx(client: TestClient) -> None:
    fields = {f"f{i}": "x" for i in range(2000)}
    r = client.post("/v1/models/m/predict", data=fields, files={"image": ("a.png", image_bytes())})
    assert 400 <= r.status_code < 500 and "error" in r.json()


def test_unusual_images_answer_or_422(client: TestClient) -> None:
    for data in (image_bytes(1, 1), image_bytes(1, 300), image_bytes(20, 20, mode="L"),
                 image_bytes(20, 20, mode="RGBA"), image_bytes(20, 20, fmt="WEBP")):
        r = client.post("/v1/models/m/predict", files={"image": ("x", data)})
        assert r.status_code == 200, r.text


def _run(settings: Settings, body) -> object:
    app = create_app(settings)

    async def main() -> object:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=30) as client:
                return await body(client)

    return asyncio.run(main())


async def _predict(client: httpx.AsyncClient, seed: int = 0) -> httpx.Response:
    return await client.post("/v1/models/m/predict", files={"image": ("a.png", image_bytes(seed=seed))})


def test_queue_full_503_retry_after_and_health_stays_fast(tmp_path: Path) -> None:
    settings = Settings(store=_store(tmp_path, max_queue_size=2, max_batch_size=1), warmup=False,
                        fault_injection="sleep_ms=400")

    async def body(client: httpx.AsyncClient) -> None:
        tasks = [asyncio.ensure_future(_predict(client, s)) for s in range(6)]
        await asyncio.sleep(0.2)
        # the probes do not queue behind inference: a 1 s client timeout would fail this
        live = await client.get("/v2/health/live", timeout=1)
        ready = await client.get("/v2/health/ready", timeout=1)
        assert live.status_code == 200 and ready.status_code == 200
        results = await asyncio.gather(*tasks)
        full = [r for r in results if r.status_code == 503]
        assert full and all(r.headers["retry-after"] == "1" for r in full)
        assert "queue is full" in full[0].json()["error"]
        assert any(r.status_code == 200 for r in results)

    _run(settings, body)


def test_server_concurrency_limit_503(tmp_path: Path) -> None:
    settings = Settings(store=_store(tmp_path), warmup=False, max_concurrency=1, fault_injection="sleep_ms=300")

    async def body(client: httpx.AsyncClient) -> None:
        results = await asyncio.gather(_predict(client), _predict(client, 1))
        statuses = sorted(r.status_code for r in results)
        assert statuses == [200, 503]
        limited = next(r for r in results if r.status_code == 503)
        _err(limited, 503, "concurrency limit")
        assert limited.headers["retry-after"] == "1"

    _run(settings, body)


def test_deadline_504(tmp_path: Path) -> None:
    settings = Settings(store=_store(tmp_path), warmup=False, timeout_ms=100, fault_injection="sleep_ms=400")

    async def body(client: httpx.AsyncClient) -> None:
        _err(await _predict(client), 504, "deadline exceeded")

    _run(settings, body)


def test_oom_splits_the_batch_and_succeeds(tmp_path: Path) -> None:
    settings = Settings(store=_store(tmp_path, max_batch_delay_ms=300, adaptive_batch_delay=False), warmup=False,
                        fault_injection="oom_above=2")

    async def body(client: httpx.AsyncClient) -> dict:
        results = await asyncio.gather(*(_predict(client, s) for s in range(4)))
        assert [r.status_code for r in results] == [200] * 4
        return (await client.get("/v1/models/m")).json()

    info = _run(settings, body)
    assert info["batching"]["batch_sizes"].get("4") == 1  # one batch of 4 tried (and split into 2 + 2)


def test_oom_that_persists_is_503_and_the_next_request_succeeds(tmp_path: Path) -> None:
    settings = Settings(store=_store(tmp_path, max_batch_delay_ms=300, adaptive_batch_delay=False), warmup=False,
                        fault_injection="oom_above=1")

    async def body(client: httpx.AsyncClient) -> None:
        results = await asyncio.gather(*(_predict(client, s) for s in range(4)))
        for r in results:
            _err(r, 503, "out of device memory")
            assert r.headers["retry-after"] == "1"
        assert (await _predict(client)).status_code == 200  # a batch of one fits: no restart needed
        assert (await client.get("/v2/health/live")).status_code == 200

    _run(settings, body)


def test_unrecoverable_device_error_fails_liveness(tmp_path: Path) -> None:
    settings = Settings(store=_store(tmp_path), warmup=False, fault_injection="fatal")

    async def body(client: httpx.AsyncClient) -> None:
        _err(await _predict(client), 503, "unrecoverable device error")
        live = await client.get("/v2/health/live")
        _err(live, 503, "illegal memory access")
        assert live.json()["live"] is False
        assert (await client.get("/v2/health/ready")).status_code == 503
        info = (await client.get("/v1/models/m")).json()
        assert info["ready"] is False and "device error" in info["reason"]
        _err(await _predict(client), 503, "not ready")

    _run(settings, body)
