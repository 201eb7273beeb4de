"""Fast JSON responses and the model headers every inference response carries.

orjson serialises numpy arrays without per-element Python loops; non-finite floats become
``null`` (valid JSON), never an encoding error. (FastAPI's own ORJSONResponse is deprecated
in current FastAPI (0.165 here) in favour of pydantic serialisation, which does not take numpy
arrays, so this stays a ten-line class of ours.)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import orjson
from starlette.responses import Response

if TYPE_CHECKING:
    from app.runtime.base import ModelRuntime


def model_headers(runtime: ModelRuntime) -> dict[str, str]:
    """Which model answered: on every inference response of both protocols."""
    return {"X-Model-Name": runtime.name, "X-Model-Version": runtime.version, "X-Model-Sha256": runtime.sha256}


class FastJSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)
