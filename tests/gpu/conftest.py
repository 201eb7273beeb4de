"""The GPU tier (``pytest -m gpu``): real CUDA work, skipped on a machine without CUDA."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device: the GPU tier runs on a GPU machine (bench/gpu.sh)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
