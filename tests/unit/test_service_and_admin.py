"""The inference service and the admin service without HTTP: a real store, a registry, real small nets."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.admin import AdminService
from app.config import Settings
from app.errors import Conflict, InvalidInput, Overloaded, PayloadTooLarge
from app.lifecycle import ServerState
from app.registry import ModelRegistry
from app.service import Instance, InferenceService
from app.store import ModelStore
from app.store.writer import to_toml
from support.models import build_small, image_bytes, small_configs, write_small_store


def _setup(root: Path, **settings: Any) -> tuple[ModelRegistry, InferenceService, AdminService, ServerState]:
    cfg = Settings(store=root, warmup=False, **settings)
    store = ModelStore(root)
    registry = ModelRegistry(store, cfg)
    state = ServerState()
    return registry, InferenceService(registry, cfg, state), AdminService(registry, store), state


def test_predict_validates_and_answers(tmp_path: Path) -> None:
    root = write_small_store(tmp_path, ["resnet50_extra", "unet"])
    registry, service, _, state = _setup(root, max_instances=2)

    async def main() -> None:
        await registry.load_all()
        png = image_bytes()
        pred = await service.predict("resnet50_extra", [Instance(image_bytes=png, scalar=[0.5])])
        assert pred.results[0]["probs"].shape == (4,) and pred.image_sizes == [(30, 40)]
        with pytest.raises(InvalidInput, match="missing scalar"):
            await service.predict("resnet50_extra", [Instance(image_bytes=png)])
        with pytest.raises(InvalidInput, match="finite"):
            await service.predict("resnet50_extra", [Instance(image_bytes=png, scalar=[10**400])])
        with pytest.raises(PayloadTooLarge, match="limit is 2"):
            await service.predict("resnet50_extra", [Instance(image_bytes=png, scalar=[1.0])] * 3)
        with pytest.raises(InvalidInput, match="unknown output"):
            await service.predict("unet", [Instance(image_bytes=png)], outputs=frozenset({"nope"}))
        seg = await service.predict("unet", [Instance(image=np.zeros((3, 6, 8), np.float32))],
                                    outputs=frozenset({"mask"}))
        assert set(seg.results[0]) == {"mask"} and seg.results[0]["mask"].shape == (6, 8)
        assert state.inflight == 0
        await registry.close()

    asyncio.run(main())
    service.close()


def test_the_concurrency_limit_counts_requests_in_the_service(tmp_path: Path) -> None:
    root = write_small_store(tmp_path, ["resnet50_head"])
    registry, service, _, state = _setup(root, max_concurrency=1)

    async def main() -> None:
        await registry.load_all()
        state.inflight = 1  # one request holds the only slot
        with pytest.raises(Overloaded, match="concurrency limit"):
            await service.predict("resnet50_head", [Instance(image_bytes=image_bytes())])
        state.inflight = 0
        await service.predict("resnet50_head", [Instance(image_bytes=image_bytes())])
        assert state.inflight == 0
        await registry.close()

    asyncio.run(main())
    service.close()


async def _chunks(data: bytes, size: int = 4096) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i:i + size]


def _ckpt(seed: int) -> bytes:
    buf = io.BytesIO()
    torch.save(build_small("unet", seed=seed).state_dict(), buf)
    return buf.getvalue()


def test_admin_upload_then_load(tmp_path: Path) -> None:
    root = write_small_store(tmp_path, ["unet"])
    registry, service, admin, _ = _setup(root)

    async def main() -> None:
        await registry.load_all()
        result = await admin.upload("unet", "2", _chunks(_ckpt(2)), None, "test")
        assert result.version == "2" and (root / "unet" / "2" / "model.pth").is_file()
        with pytest.raises(Conflict):
            await admin.upload("unet", "2", _chunks(_ckpt(3)), None, "test")
        trusted = to_toml({**small_configs()["unet"], "checkpoint": {"file": "model.pth", "trusted": True}})
        with pytest.raises(InvalidInput, match="trusted"):
            await admin.upload("unet", "3", _chunks(_ckpt(3)), trusted.encode(), "test")
        status = await admin.load("unet", None, "test")
        assert status.version == "2"
        assert list((root / ".staging").iterdir()) == []
        await registry.close()

    asyncio.run(main())
    service.close()
