"""Bearer-token auth for the admin API: secure by default, constant-time compare, never logged."""

from __future__ import annotations

import hmac

from fastapi import Request

from app.admin import audit
from app.errors import Forbidden, Unauthorized


async def require_admin(request: Request) -> None:
    token = request.app.state.settings.admin_token
    if token is None or not token.get_secret_value():
        raise Forbidden("admin API disabled: set MODSERVE_ADMIN_TOKEN to enable it")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    expected = token.get_secret_value().encode()
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), expected):
        client = request.client.host if request.client else "unknown"
        audit(client, f"{request.method} {request.url.path}", request.path_params.get("name", ""),
              result="denied (401)")
        raise Unauthorized("missing or invalid admin token (send Authorization: Bearer <token>)")
