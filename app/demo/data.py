"""Synthetic shapes for the demo models: red, green and blue discs, squares and triangles on
textured, noisy, muted backgrounds, with their masks.

Every image is a pure function of ``(seed, index)`` (numpy and Pillow), so a data set is
reproducible item by item, and the page's samples, the training and the tests share one generator.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

from app.demo.trained import COLOURS, HUE_SPREAD, HUES, SHAPES, THRESHOLD


# ---- synthetic data (numpy + Pillow) ------------------------------------------------------------


def cls_label(colour: str, scalar: float) -> int:
    """Class index of the extra-input classifier: the shape's colour x (scalar above THRESHOLD)."""
    return 2 * COLOURS.index(colour) + int(scalar > THRESHOLD)


@dataclass
class ShapeInfo:
    kind: str
    colour: str
    center: tuple[float, float]
    """(x, y) in pixels: a point inside the shape."""
    bbox: tuple[int, int, int, int]
    """(x0, y0, x1, y1) in pixels, inclusive-exclusive."""

    def to_dict(self) -> dict[str, object]:
        return {"kind": self.kind, "colour": self.colour, "center": [round(c, 1) for c in self.center],
                "bbox": list(self.bbox)}


@dataclass
class Sample:
    image: np.ndarray
    """uint8 (H, W, 3)."""
    mask: np.ndarray
    """uint8 (H, W): 0 background, ``SHAPES.index(kind) + 1`` where a shape is visible."""
    shapes: list[ShapeInfo] = field(default_factory=list)


def _smooth_noise(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a random grid upsampled bicubically."""
    grid = rng.uniform(0, 255, size=(cells, cells, channels)).astype(np.uint8)
    img = Image.fromarray(grid.squeeze(-1) if channels == 1 else grid)
    up = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)
    if channels == 1:
        up = up[..., None]
    return up / 127.5 - 1.0


def _pattern(rng: np.random.Generator, size: int) -> np.ndarray:
    """A grey (H, W, 1) texture in [-1, 1]: stripes, a checkerboard, blotches or nothing."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    kind = rng.integers(0, 4)
    if kind == 0:  # stripes at a random angle
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, 16)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
        pat = np.sin(phase)
    elif kind == 1:  # checkerboard
        period = rng.integers(6, 20)
        pat = (((xx // period) + (yy // period)) % 2) * 2.0 - 1.0
    elif kind == 2:  # blotches
        pat = _smooth_noise(rng, size, int(rng.integers(8, 16)), 1)[..., 0]
    else:
        pat = np.zeros((size, size), np.float32)
    return pat[..., None]


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Muted colours (a third of full saturation at most) with smooth noise and a texture."""
    base = rng.uniform(30, 225, size=3).astype(np.float32)
    low = _smooth_noise(rng, size, int(rng.integers(2, 6)), 3) * rng.uniform(10, 45)
    pat = _pattern(rng, size) * rng.uniform(8, 30) * rng.uniform(0.5, 1.0, size=3).astype(np.float32)
    image = base + low + pat
    grey = image.mean(axis=-1, keepdims=True)
    return grey + (image - grey) * np.float32(rng.uniform(0.0, 0.35))


def _shape_colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    """A saturated RGB colour of the named hue family."""
    hue = (HUES[colour] + rng.uniform(-HUE_SPREAD, HUE_SPREAD)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.55, 1.0))
    return np.asarray(rgb, dtype=np.float32) * 255.0


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners = 4 if kind == "square" else 3
    angles = [angle + 2 * math.pi * k / corners for k in range(corners)]
    return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in angles]


def _draw(kind: str, cx: float, cy: float, r: float, angle: float, size: int) -> np.ndarray:
    """Boolean (H, W) coverage of one shape; ``r`` is the circumradius."""
    img = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(img)
    if kind == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_polygon(kind, cx, cy, r, angle), fill=1)
    return np.asarray(img, dtype=bool)


def make_sample(
    seed: int,
    index: int,
    *,
    size: int = 128,
    n_shapes: int | tuple[int, int] = (1, 3),
    kinds: tuple[str, ...] | None = None,
    colours: tuple[str, ...] | None = None,
    radius: tuple[float, float] | None = None,
) -> Sample:
    """Image ``index`` of the set ``seed``: ``n_shapes`` shapes (a count, or an inclusive range).

    ``kinds`` and ``colours`` fix the kind and colour family of each shape in order (their length
    is then the count); ``radius`` is the range of circumradii as fractions of the side.
    Later shapes are drawn over earlier ones and the mask shows what stays visible.
    """
    rng = np.random.default_rng([seed, index])
    if kinds is not None or colours is not None:
        count = len(kinds if kinds is not None else colours)  # type: ignore[arg-type]
    elif isinstance(n_shapes, int):
        count = n_shapes
    else:
        count = int(rng.integers(n_shapes[0], n_shapes[1] + 1))
    image = _background(rng, size)
    mask = np.zeros((size, size), np.uint8)
    shapes: list[ShapeInfo] = []
    for k in range(count):
        kind = kinds[k] if kinds is not None else SHAPES[int(rng.integers(0, len(SHAPES)))]
        colour = colours[k] if colours is not None else COLOURS[int(rng.integers(0, len(COLOURS)))]
        # Size relative to the image, so a resized photo-sized upload looks like training data.
        r = size * rng.uniform(*(radius or (0.11, 0.24 if count > 1 else 0.32)))
        if kind == "disc":
            r *= 0.85  # same area range as the polygons, roughly
        angle = rng.uniform(0, 2 * math.pi)
        for _ in range(20):  # mostly apart, so each shape stays recognisable
            cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)
            cover = _draw(kind, cx, cy, r, angle, size)
            if (mask[cover] > 0).mean() < 0.1:
                break
        if not cover.any():
            continue
        shading = _smooth_noise(rng, size, 3, 1) * rng.uniform(5, 20)
        np.copyto(image, _shape_colour(rng, colour) + shading, where=cover[..., None])
        mask[cover] = SHAPES.index(kind) + 1
        ys, xs = np.nonzero(cover)
        bbox = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        shapes.append(ShapeInfo(kind, colour, (float(cx), float(cy)), bbox))
    image += rng.standard_normal(size=image.shape, dtype=np.float32) * np.float32(rng.uniform(3, 14))
    return Sample(np.clip(image, 0, 255).round().astype(np.uint8), mask, shapes)
