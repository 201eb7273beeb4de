"""Shared fixtures: a small real model store written with torch.save, and real image bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.models import image_bytes, write_small_store

TESTS = Path(__file__).resolve().parent
TIERS = ("unit", "api", "e2e", "deploy", "gpu")
"""Tiers mirror the folders: unit (no server), api (the app with its lifespan, in process),
e2e (a real uvicorn process and real clients), deploy (deployment files and images), gpu (CUDA work,
skipped without a CUDA device: ``pytest -m gpu``)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test with its tier from its folder, so ``-m unit`` or ``-m "not e2e"`` select by tier."""
    for item in items:
        parts = Path(str(item.path)).resolve().relative_to(TESTS).parts
        if parts and parts[0] in TIERS:
            item.add_marker(getattr(pytest.mark, parts[0]))


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def png_bytes() -> bytes:
    return image_bytes()
