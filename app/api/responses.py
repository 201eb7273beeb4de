"""Fast JSON responses: orjson serialises numpy arrays without per-element Python loops.

Non-finite floats become ``null`` (valid JSON), never an encoding error.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class FastJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
