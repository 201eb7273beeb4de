"""Hostile and broken inputs found by trying the service as an attacker: each is a 4xx with a JSON
error, never a 500, and the server stays ready."""

from __future__ import annotations

import base64
import io
import json
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.store.writer import to_toml
from support.models import build_small, image_bytes, small_configs, write_small_store

TOKEN = "inputs-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_small_store(tmp_path_factory.mktemp("bad"), ["unet", "resnet50_extra"])
    limited = {**small_configs()["unet"]}
    limited["preprocess"] = {**limited["preprocess"], "max_processed_pixels": 2500}
    (root / "tiny_unet").mkdir()
    (root / "tiny_unet" / "model.toml").write_text(to_toml(limited))
    (root / "tiny_unet" / "1").mkdir()
    torch.save(build_small("unet").state_dict(), root / "tiny_unet" / "1" / "model.pth")
    return root


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(store=store, warmup=False, admin_token=TOKEN))) as c:
        yield c
        metrics = c.get("/metrics").text
        codes = [line for line in metrics.splitlines()
                 if line.startswith("modserve_requests_total{") and 'code="5' in line]
        assert codes == [], codes  # the whole module's attacks produced no 5xx


def _err(r: Any, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body.get("error"), str)
    for needle in needles:
        assert needle.lower() in body["error"].lower(), body["error"]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png_with(chunk: bytes) -> bytes:
    png = image_bytes(32, 24)
    at = png.index(b"IDAT") - 4
    return png[:at] + chunk + png[at:]


def _encoded(fmt: str, size: tuple[int, int] = (48, 40), **kw: Any) -> bytes:
    array = (np.random.default_rng(0).random((size[1], size[0], 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kw)
    return buf.getvalue()


def _webp_canvas(width: int, height: int) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in ("red", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format="WEBP", save_all=True, append_images=frames[1:])
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:27], data[27:30] = (width - 1).to_bytes(3, "little"), (height - 1).to_bytes(3, "little")
    return bytes(data)


BAD_IMAGES = {
    "png_ztxt_bomb": (_png_with(_png_chunk(b"zTXt", b"k\x00\x00" + zlib.compress(b"a" * 30_000_000))), 413),
    "png_itxt_bomb": (_png_with(_png_chunk(b"iTXt", b"k\x00\x01\x00\x00\x00" + zlib.compress(b"a" * 30_000_000))), 413),
    "png_icc_bomb": (_png_with(_png_chunk(b"iCCP", b"p\x00\x00" + zlib.compress(b"a" * 30_000_000))), 413),
    "jpeg_truncated_in_header": (_encoded("JPEG")[:200], 422),
    "jpeg_truncated_in_data": (_encoded("JPEG")[: len(_encoded("JPEG")) // 2], 422),
    "webp_truncated": (_encoded("WEBP")[:40], 422),
    "webp_lossless_truncated": (_encoded("WEBP", lossless=True)[:30], 422),
    "webp_canvas_over_the_limit": (_webp_canvas(16000, 16000), 413),
}


@pytest.mark.parametrize("case", sorted(BAD_IMAGES))
def test_bad_images(client: TestClient, case: str) -> None:
    data, status = BAD_IMAGES[case]
    _err(client.post("/v1/models/resnet50_extra/predict", files={"image": ("x", data)}, data={"scalar": "0.5"}), status)
    b64 = base64.b64encode(data).decode()
    _err(client.post("/v1/models/unet/predict", json={"instances": [{"image": {"b64": b64}}]}), status)
    v2 = {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": [b64],
                      "parameters": {"content_type": "base64"}}]}
    _err(client.post("/v2/models/unet/infer", json=v2), 400 if status == 422 else status)
    assert client.get("/v2/health/ready").status_code == 200


def test_processed_pixel_limit(client: TestClient) -> None:
    # tiny_unet: at most 2500 processed pixels; scale 0.5 makes 120x100 -> 60x50 = 3000
    _err(client.post("/v1/models/tiny_unet/predict", files={"image": ("a.png", image_bytes(120, 100))}),
         413, "2500", "60x50")
    assert client.post("/v1/models/tiny_unet/predict", files={"image": ("a.png", image_bytes(100, 100))}).status_code == 200
    info = client.get("/v1/models/tiny_unet").json()
    assert info["max_processed_pixels"] == 2500
    derived = client.get("/v1/models/unet").json()["max_processed_pixels"]
    assert isinstance(derived, int) and derived >= 64 * 64  # measured from the model and this machine
    assert client.get("/v1/models/resnet50_extra").json()["max_processed_pixels"] is None  # fixed 32x32 input
    tensor = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 60, 50], "data": [0.0] * 9000}]}
    _err(client.post("/v2/models/tiny_unet/infer", json=tensor), 413, "2500")


def test_deeply_nested_json(client: TestClient) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    _err(client.post("/v1/models/unet/predict", content='{"instances": ' + deep + "}",
                     headers={"content-type": "application/json"}), 422, "json")
    _err(client.post("/v2/models/unet/infer", content='{"inputs": ' + deep + "}"), 400, "json")
    nested_data = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1], "data": json.loads("[" * 500 + "]" * 500)}]}
    r = client.post("/v2/models/unet/infer", json=nested_data)
    assert r.status_code == 400 and "error" in r.json()


@pytest.mark.parametrize("data", [[True, False, True], [1.0, True, 0.5], [[0.5], [False], [0.5]]])
def test_booleans_are_not_numbers(client: TestClient, data: list[Any]) -> None:
    body = {"inputs": [
        {"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": [0.0] * 3072},
        {"name": "scalar", "datatype": "FP32", "shape": [3] if not isinstance(data[0], list) else [3, 1], "data": data},
    ]}
    _err(client.post("/v2/models/resnet50_extra/infer", json=body), 400, "true/false")


@pytest.mark.parametrize(
    ("parameters", "needle"),
    [({"sequence_id": 7, "sequence_start": True}, "sequence"), ({"priority": 2}, "priority"),
     ({"timeout": "soon"}, "timeout")],
)
def test_v2_parameters_that_change_semantics_are_refused(client: TestClient, parameters: dict[str, Any], needle: str) -> None:
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}],
            "parameters": parameters}
    _err(client.post("/v2/models/unet/infer", json=body), 400, needle)


def test_v2_timeout_parameter_is_a_deadline(client: TestClient) -> None:
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 8, 8], "data": [0.0] * 192}],
            "parameters": {"timeout": 60_000_000}}
    assert client.post("/v2/models/unet/infer", json=body).status_code == 200


def test_admin_load_refuses_config_and_files(client: TestClient) -> None:
    # what tritonclient's load_model(config=..., files=...) sends
    for params in ({"config": json.dumps({"max_batch_size": 8})}, {"file:1/model.pt": "AAAA"}):
        _err(client.post("/v2/repository/models/unet/load", headers=AUTH, json={"parameters": params}),
             400, "model.toml")
    r = client.post("/v2/repository/models/unet/unload", headers=AUTH, json={"parameters": {"unload_dependents": False}})
    assert r.status_code == 200
    assert client.post("/v2/repository/models/unet/load", headers=AUTH).status_code == 200


def test_unknown_model_load_leaves_no_trace(client: TestClient) -> None:
    for name in ("ghost", "nope-2"):
        _err(client.post(f"/v2/repository/models/{name}/load", headers=AUTH), 404, name)
    assert client.get("/v2/health/ready").status_code == 200
    names = [m["name"] for m in client.get("/v1/models").json()["models"]]
    index = [m["name"] for m in client.post("/v2/repository/index").json()]
    assert "ghost" not in names and "ghost" not in index
    _err(client.get("/v1/models/ghost"), 404)


def test_nan_weights_on_reload_are_422(client: TestClient, store: Path) -> None:
    sd = build_small("unet").state_dict()
    sd = {k: (torch.full_like(t, float("nan")) if t.is_floating_point() else t) for k, t in sd.items()}
    (store / "unet" / "2").mkdir()
    torch.save(sd, store / "unet" / "2" / "model.pth")
    try:
        _err(client.post("/v2/repository/models/unet/load", headers=AUTH, json={"parameters": {"version": "2"}}),
             422, "not finite")
        _err(client.post("/v2/repository/models/unet/load", headers=AUTH), 422, "version 1 keeps serving")
        info = client.get("/v1/models/unet").json()
        assert info["ready"] is True and info["version"] == "1" and "not finite" in info["last_error"]
    finally:
        (store / "unet" / "2" / "model.pth").unlink()
        (store / "unet" / "2").rmdir()
