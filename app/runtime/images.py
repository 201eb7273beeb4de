"""Image bytes in and out: decode safely to uint8 tensors, encode masks as PNG.

The pixel limit is checked from the header before any pixel is decoded, so a
decompression bomb is refused quickly with flat memory.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from app.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}

# Magic bytes of image formats we recognise but do not decode (415, not 422).
_OTHER_FORMATS = {
    b"GIF87a": "GIF", b"GIF89a": "GIF", b"BM": "BMP", b"II*\x00": "TIFF", b"MM\x00*": "TIFF",
    b"\x00\x00\x01\x00": "ICO", b"8BPS": "PSD", b"\x00\x00\x00\x0cjP  ": "JPEG 2000",
    b"SIMPLE  =": "FITS", b"%PDF": "PDF",
}

# Our own limit (checked first) is the real one; Pillow's bomb check stays on as a backstop.
Image.MAX_IMAGE_PIXELS = 200_000_000


def decode_image(
    data: bytes, *, color_mode: str, max_pixels: int, device: torch.device | None = None
) -> torch.Tensor:
    """Decode PNG/JPEG/WebP bytes to a uint8 ``(C, H, W)`` tensor in ``color_mode``.

    EXIF orientation is applied so the mask lines up with what the user sees.
    On a GPU device JPEGs are decoded by nvJPEG there; everything else is
    decoded by Pillow and copied over.
    """
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    for magic, fmt in _OTHER_FORMATS.items():
        if data.startswith(magic):
            raise UnsupportedMediaType(f"{fmt} images are not supported; send PNG, JPEG or WebP")
    if len(data) > 12 and data[4:8] == b"ftyp":
        raise UnsupportedMediaType("HEIF/AVIF images are not supported; send PNG, JPEG or WebP")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise InvalidInput("image could not be decoded: not a PNG, JPEG or WebP file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"image has too many pixels (limit {max_pixels})") from None
    width, height = img.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if width < 1 or height < 1:
        raise InvalidInput("image has no pixels")
    if device is not None and device.type == "cuda" and img.format == "JPEG":
        return _decode_jpeg_on_gpu(data, color_mode, device)
    try:
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode != color_mode:
            if img.mode in ("I;16", "I;16B", "I;16L", "I") and color_mode in ("L", "RGB"):
                img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
            img = img.convert(color_mode)
        array = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidInput(f"image could not be decoded (truncated or corrupt): {exc}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
    if device is not None and device.type != "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def _decode_jpeg_on_gpu(data: bytes, color_mode: str, device: torch.device) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_jpeg

    mode = ImageReadMode.RGB if color_mode == "RGB" else ImageReadMode.GRAY
    try:
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_jpeg(raw, mode=mode, device=device, apply_exif_orientation=True)
    except RuntimeError as exc:
        if "out of memory" in str(exc).lower():
            raise
        raise InvalidInput(f"image could not be decoded (truncated or corrupt): {exc}") from None


def encode_png(array: np.ndarray) -> bytes:
    """Encode a ``(H, W)`` or ``(H, W, 3)`` uint8 array as PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
