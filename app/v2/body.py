"""Request-body decompression for ``Content-Encoding: gzip|deflate`` (tritonclient's
``request_compression_algorithm``), bounded so a small zip bomb cannot expand
past the body limit in memory.
"""

from __future__ import annotations

import zlib

from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

SUPPORTED_ENCODINGS = "gzip, deflate"


def _decompress(data: bytes, wbits: int, limit: int, coding: str) -> bytes:
    out = bytearray()
    while data:
        d = zlib.decompressobj(wbits)
        out += d.decompress(data, limit + 1 - len(out))
        if len(out) > limit or d.unconsumed_tail:
            raise PayloadTooLarge(f"decompressed request body exceeds the {limit}-byte limit")
        if not d.eof:
            raise BadRequest(f"{coding} request body is truncated")
        data = d.unused_data  # gzip allows several members back to back
        if wbits <= zlib.MAX_WBITS:
            break
    return bytes(out)


def _inflate_one(data: bytes, coding: str, limit: int) -> bytes:
    # "deflate" is zlib-wrapped on the wire (zlib.compress); raw deflate is accepted as a fallback.
    tries = [16 + zlib.MAX_WBITS] if coding != "deflate" else [zlib.MAX_WBITS, -zlib.MAX_WBITS]
    for i, wbits in enumerate(tries):
        try:
            return _decompress(data, wbits, limit, coding)
        except zlib.error as exc:
            if i == len(tries) - 1:
                raise BadRequest(f"request body is not valid {coding} data: {exc}") from None
    raise AssertionError("unreachable")


def inflate(data: bytes, content_encoding: str | None, limit: int) -> bytes:
    """Undo ``Content-Encoding`` (codings applied in order, so undone last to first)."""
    codings = [c.strip().lower() for c in (content_encoding or "").split(",") if c.strip()]
    for coding in reversed(codings):
        if coding == "identity":
            continue
        if coding not in ("gzip", "x-gzip", "deflate"):
            exc = UnsupportedMediaType(f"unsupported Content-Encoding {coding!r}; use gzip or deflate")
            exc.headers["Accept-Encoding"] = SUPPORTED_ENCODINGS
            raise exc
        data = _inflate_one(data, coding, limit)
    return data
