"""Fixtures for tests/unit; the checkpoint builders themselves live in ckpt_helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import ckpt_helpers  # noqa: E402


@pytest.fixture(scope="session")
def user_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Checkpoints a user script run as __main__ saved (whole models, DataParallel, U-Nets)."""
    return ckpt_helpers.make_user_files(tmp_path_factory.mktemp("user"))


@pytest.fixture
def odd_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """A whole model of an importable user class whose unpickling leaves a marker file."""
    return ckpt_helpers.make_odd_model(tmp_path, monkeypatch)
