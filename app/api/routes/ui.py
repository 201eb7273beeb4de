"""The demo page: ``GET /`` and its static files (plain HTML, CSS and JavaScript; no build step).

The page talks to the native API (``/v1/models``, ``/v1/models/{name}/predict``) from the browser;
these routes only hand out files from ``app/static``. No torch import here.
"""

from __future__ import annotations

import mimetypes
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, JSONResponse, Response

STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
}
# Everything the page loads comes from this origin; images may be blob:/data: URLs of the
# user's upload and of the returned mask.
_CSP = (
    "default-src 'self'; img-src 'self' blob: data:; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
)

router = APIRouter(include_in_schema=False)


def _not_found(path: str) -> JSONResponse:
    return JSONResponse({"error": f"no static file {path!r}"}, status_code=404)


@router.api_route("/", methods=["GET", "HEAD"])
async def index() -> Response:
    return FileResponse(STATIC_DIR / "index.html", media_type=_TYPES[".html"],
                        headers={**_HEADERS, "Content-Security-Policy": _CSP})


@router.api_route("/static/{path:path}", methods=["GET", "HEAD"])
async def static_file(path: str) -> Response:
    root = STATIC_DIR.resolve()
    try:
        target = (root / path).resolve(strict=True)
    except (OSError, RuntimeError, ValueError):  # ValueError: a NUL byte in the path
        return _not_found(path)
    if not target.is_relative_to(root) or not target.is_file():
        return _not_found(path)
    media_type = _TYPES.get(target.suffix.lower()) or mimetypes.guess_type(target.name)[0]
    return FileResponse(target, media_type=media_type or "application/octet-stream", headers=_HEADERS)
