"""Parse native predict requests (multipart or JSON) into service ``Instance``s."""

from __future__ import annotations

import base64
import binascii
import json
import math
from typing import Any

import numpy as np
from fastapi import Request
from starlette.datastructures import UploadFile

from app.errors import InvalidInput, UnsupportedMediaType
from app.service import Instance, finite_number

_FORM_FIELDS = {"image", "scalar"}


def _reject_constant(name: str) -> float:
    raise InvalidInput(f"JSON must not contain {name}: send finite numbers only")


def parse_scalar_text(text: str) -> list[float]:
    """``"0.5"`` or ``"0.1,0.2"`` -> floats; non-numeric and non-finite values are refused."""
    values = []
    for part in text.split(","):
        part = part.strip()
        try:
            if "_" in part:  # float() reads "1_0" as 10.0; nobody means that
                raise ValueError(part)
            value = float(part)
        except ValueError:
            raise InvalidInput(f"scalar must be a number (or comma-separated numbers), got {text!r}") from None
        if not math.isfinite(value):
            raise InvalidInput(f"scalar must be finite, got {part!r}")
        values.append(value)
    return values


def _json_scalar(value: Any, index: int) -> list[float] | None:
    if value is None:
        return None
    items = value if isinstance(value, list) else [value]
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise InvalidInput(f"instances[{index}].scalar must be a number or a list of numbers, got {v!r:.40}")
        if not finite_number(v):
            raise InvalidInput(f"instances[{index}].scalar must be a finite number within float range")
    return [float(v) for v in items]


def _json_tensor(value: list[Any], index: int) -> np.ndarray:
    """Nested lists of numbers (not booleans) in row-major order, as float32."""
    def numbers(v: Any, depth: int) -> bool:
        if isinstance(v, list):
            return depth < 4 and all(numbers(x, depth + 1) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and finite_number(v)

    if not numbers(value, 0):
        raise InvalidInput(f"instances[{index}] must be finite numbers, nested at most 4 deep")
    try:
        return np.asarray(value, dtype=np.float32)
    except ValueError:
        raise InvalidInput(f"instances[{index}] is ragged: nested lists must be regular") from None



async def parse_multipart(request: Request) -> list[Instance]:
    form = await request.form(max_files=4, max_fields=16, max_part_size=64 * 1024)
    try:
        unknown = sorted(set(form.keys()) - _FORM_FIELDS)
        if unknown:
            raise InvalidInput(
                f"unexpected form field(s): {', '.join(unknown)}; expected 'image' (file) and optionally 'scalar'"
            )
        images = form.getlist("image")
        if not images:
            raise InvalidInput("missing form field 'image' (the image file)")
        if len(images) > 1:
            raise InvalidInput("send exactly one 'image' file per multipart request (use JSON instances for several)")
        image = images[0]
        if not isinstance(image, UploadFile):
            raise InvalidInput("form field 'image' must be a file upload, not a text value")
        scalars = form.getlist("scalar")
        if len(scalars) > 1:
            raise InvalidInput("send one 'scalar' field (comma-separated for several values)")
        scalar = None
        if scalars:
            if not isinstance(scalars[0], str):
                raise InvalidInput("form field 'scalar' must be text, not a file")
            scalar = parse_scalar_text(scalars[0])
        data = await image.read()
    finally:
        await form.close()
    return [Instance(image_bytes=data, scalar=scalar)]


def parse_json_body(body: bytes) -> list[Instance]:
    try:
        doc = json.loads(body, parse_constant=_reject_constant)
    except RecursionError:
        raise InvalidInput("request body is not valid JSON: nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        if isinstance(exc, InvalidInput):
            raise
        raise InvalidInput(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("instances"), list):
        raise InvalidInput('JSON body must be {"instances": [{"image": {"b64": "..."}, "scalar": ...}, ...]}')
    extra = set(doc) - {"instances"}
    if extra:
        raise InvalidInput(f"unexpected JSON key(s): {', '.join(sorted(extra))}")
    instances = []
    for i, inst in enumerate(doc["instances"]):
        if isinstance(inst, list):  # a tensor-in model's input
            instances.append(Instance(tensor=_json_tensor(inst, i)))
            continue
        if not isinstance(inst, dict):
            raise InvalidInput(f"instances[{i}] must be an object (an image) or a list of numbers (a tensor)")
        unknown = set(inst) - {"image", "scalar"}
        if unknown:
            raise InvalidInput(f"instances[{i}] has unexpected key(s): {', '.join(sorted(unknown))}")
        image = inst.get("image")
        if not isinstance(image, dict) or not isinstance(image.get("b64"), str):
            raise InvalidInput(f'instances[{i}].image must be {{"b64": "<base64 image bytes>"}}')
        try:
            data = base64.b64decode(image["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise InvalidInput(f"instances[{i}].image.b64 is not valid base64") from None
        instances.append(Instance(image_bytes=data, scalar=_json_scalar(inst.get("scalar"), i)))
    return instances


async def parse_predict_request(request: Request) -> list[Instance]:
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "multipart/form-data":
        return await parse_multipart(request)
    if content_type == "application/json":
        return parse_json_body(await request.body())
    raise UnsupportedMediaType(
        f"unsupported content type {content_type or '(none)'!r}; use multipart/form-data or application/json"
    )
