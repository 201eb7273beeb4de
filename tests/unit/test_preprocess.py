"""Pre-processing: target sizes, normalisation, tiny images."""

from __future__ import annotations

import pytest
import torch

from app.runtime.preprocess import Preprocessor
from app.store.model_config import PreprocessConfig


def test_target_sizes() -> None:
    assert Preprocessor(PreprocessConfig(), default_resize=(224, 224)).target_size(480, 640) == (224, 224)
    assert Preprocessor(PreprocessConfig(scale=0.5), default_resize=None).target_size(481, 641) == (240, 320)
    assert Preprocessor(PreprocessConfig(scale=0.5), default_resize=None).target_size(1, 1) == (1, 1)
    assert Preprocessor(PreprocessConfig(), default_resize=None).target_size(7, 9) == (7, 9)


def test_normalisation_matches_the_formula() -> None:
    cfg = PreprocessConfig(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    image = torch.randint(0, 256, (3, 5, 6), dtype=torch.uint8)
    out = Preprocessor(cfg, default_resize=None)(image)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(out, (image.float() / 255 - mean) / std)


@pytest.mark.parametrize("size", [(2, 2), (3, 3), (2, 1), (4, 4)])
@pytest.mark.parametrize("resample", ["bilinear", "bicubic"])
def test_tiny_images_resize_to_one_pixel(size: tuple[int, int], resample: str) -> None:
    image = torch.full((3, *size), 100, dtype=torch.uint8)
    out = Preprocessor(PreprocessConfig(resize=(1, 1), resample=resample), default_resize=None)(image)
    assert out.shape == (3, 1, 1)
    torch.testing.assert_close(out, torch.full((3, 1, 1), 100 / 255))
