"""Image bytes in and out: decode safely to uint8 tensors, encode masks as PNG.

The pixel limit is checked from the header before any pixel is decoded, so a
decompression bomb is refused quickly with flat memory.
"""

from __future__ import annotations

import io
import struct
import warnings
import zlib
from collections.abc import Callable

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

# What Pillow's PNG/JPEG/WebP plugins raise for a file they cannot parse (its documented
# OSError and SyntaxError, and what its struct/zlib/EOF reads leak on truncated data).
DECODER_ERRORS: tuple[type[Exception], ...] = (OSError, SyntaxError, EOFError, struct.error, zlib.error)

# Our own limit (checked first) is the real one; Pillow's bomb check stays on as a backstop.
Image.MAX_IMAGE_PIXELS = 200_000_000

_ORIENTATION = 0x0112  # the EXIF tag exif_transpose reads


def decode_image(
    data: bytes, *, color_mode: str, max_pixels: int, device: torch.device | None = None,
    check_size: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Decode PNG/JPEG/WebP bytes to a uint8 ``(C, H, W)`` tensor in ``color_mode``.

    EXIF orientation is applied so the mask lines up with what the user sees.
    On a GPU device JPEGs are decoded by nvJPEG there; everything else is
    decoded by Pillow and copied over.
    """
    img = open_image(data, max_pixels=max_pixels, check_size=check_size)
    if device is not None and device.type == "cuda" and img.format == "JPEG":
        return _decode_jpeg_on_gpu(data, color_mode, device)
    array = np.array(load_pixels(img, color_mode=color_mode)[0], dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    if device is not None and device.type != "cpu":
        tensor = tensor.pin_memory().to(device, non_blocking=True)
    return tensor


def open_image(data: bytes, *, max_pixels: int, check_size: Callable[[int, int], None] | None = None) -> Image.Image:
    """Read and check an upload's header (format, pixel limits, ``check_size(height, width)``);
    no pixel is decoded yet. Pillow only: safe in the decode threads."""
    if not data:
        raise InvalidInput("image is empty (0 bytes)")
    for magic, fmt in _OTHER_FORMATS.items():
        if data.startswith(magic):
            raise UnsupportedMediaType(f"{fmt} images are not supported; send PNG, JPEG or WebP")
    if len(data) > 12 and data[4:8] == b"ftyp":
        raise UnsupportedMediaType("HEIF/AVIF images are not supported; send PNG, JPEG or WebP")
    webp = webp_canvas(data)
    if webp is not None and webp[0] * webp[1] > max_pixels:
        # Pillow's WebP decoder allocates the whole canvas inside Image.open: check before it runs.
        raise PayloadTooLarge(
            f"image is {webp[0]}x{webp[1]} = {webp[0] * webp[1]} pixels; the limit is {max_pixels}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=list(ALLOWED_FORMATS))
    except UnidentifiedImageError:
        raise InvalidInput("image could not be decoded: not a PNG, JPEG or WebP file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(f"image has too many pixels (limit {max_pixels})") from None
    except ValueError as exc:
        if "too large" in str(exc):  # PngImagePlugin.MAX_TEXT_CHUNK: a text or ICC chunk bomb
            raise PayloadTooLarge(f"image metadata is too large: {exc}") from None
        raise InvalidInput(f"image could not be decoded (corrupt header): {exc}") from None
    except DECODER_ERRORS as exc:  # header parsing: truncated markers, a WebP the decoder refuses
        raise InvalidInput(f"image could not be decoded (truncated or corrupt header): {exc}") from None
    width, height = img.size
    if width * height > max_pixels:
        raise PayloadTooLarge(
            f"image is {width}x{height} = {width * height} pixels; the limit is {max_pixels}"
        )
    if width < 1 or height < 1:
        raise InvalidInput("image has no pixels")
    if check_size is not None:
        check_size(height, width)  # the model's own limit on what it processes, before any pixel
    return img


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(height, width) of an opened JPEG as the user sees it, after its EXIF orientation (read from
    the header: a JPEG's EXIF comes before its pixels)."""
    width, height = img.size
    return (width, height) if _turned(img) else (height, width)


def _turned(img: Image.Image) -> bool:
    try:
        return img.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8)
    except (ValueError, *DECODER_ERRORS):
        return False  # unreadable EXIF: exif_transpose will not turn it either


def load_pixels(
    img: Image.Image, *, color_mode: str, draft: Callable[[int, int], tuple[int, int] | None] | None = None,
) -> tuple[Image.Image, tuple[int, int]]:
    """Decode an opened image, apply its EXIF orientation, convert to ``color_mode``; also return
    its full (height, width) as the user sees it.

    ``draft(height, width)`` -> (height, width) or None: a JPEG may be decoded at 1/2, 1/4 or 1/8
    scale (DCT domain), never below the size it names. Pillow only: safe in the decode threads.
    """
    full: tuple[int, int] | None = None
    try:
        if draft is not None and img.format == "JPEG":
            turned = _turned(img)
            full = (img.size[0], img.size[1]) if turned else (img.size[1], img.size[0])
            least = draft(*full)
            if least is not None:
                height, width = least[::-1] if turned else least
                img.draft(None, (width, height))  # the scale only: colour conversion stays Pillow's
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode != color_mode:
            if img.mode in ("I;16", "I;16B", "I;16L", "I") and color_mode in ("L", "RGB"):
                img = Image.fromarray((np.asarray(img, dtype=np.uint32) >> 8).astype(np.uint8))
            img = img.convert(color_mode)
        img.load()
    except (ValueError, *DECODER_ERRORS) as exc:
        raise InvalidInput(f"image could not be decoded (truncated or corrupt): {exc}") from None
    return img, full or (img.size[1], img.size[0])


def webp_canvas(data: bytes) -> tuple[int, int] | None:
    """(width, height) a WebP file declares (VP8X canvas, VP8L or VP8 frame), read from its header."""
    if len(data) < 30 or data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return None
    kind = data[12:16]
    if kind == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None


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
    """Encode a ``(H, W)`` or ``(H, W, 3)`` uint8 array as PNG; a ``(H, W)`` bool array as a
    1-bit (mode "1") PNG."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
