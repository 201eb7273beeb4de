"""Shared fixtures: a small real model store written with torch.save, and real image bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from support.models import image_bytes, write_small_store


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_store(tmp_path_factory.mktemp("store"))


@pytest.fixture
def png_bytes() -> bytes:
    return image_bytes()
