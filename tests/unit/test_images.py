"""Image decoding limits that do not need a server: Pillow's own bomb warning is an error too."""

from __future__ import annotations

import struct
import zlib

import pytest

from app.errors import PayloadTooLarge
from app.runtime.images import decode_image


def _png_header(width: int, height: int) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00")) + chunk(b"IEND", b"")


def test_pillow_bomb_warning_is_an_error_even_above_our_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    from PIL import Image

    # Between Pillow's limit and twice it Pillow only warns; we must refuse, not decode.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000_000)
    with pytest.raises(PayloadTooLarge, match="too many pixels"):
        decode_image(_png_header(1200, 1000), color_mode="RGB", max_pixels=10**9)


def test_our_limit_is_checked_from_the_header() -> None:
    with pytest.raises(PayloadTooLarge, match="limit is 40000000"):
        decode_image(_png_header(8000, 6000), color_mode="RGB", max_pixels=40_000_000)
