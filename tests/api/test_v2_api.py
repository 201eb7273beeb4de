"""The Open Inference Protocol v2 routes through the app with its lifespan running.

Request bodies are built by tritonclient's own ``generate_request_body`` where the
binary extension is involved and responses are read with its ``InferResult``, so
the wire format is the clients' one; JSON bodies are checked against the
protocol's OpenAPI schemas in ``tests/specs`` (copies; origin and licence in its README).
"""

from __future__ import annotations

import base64
import gzip
import io
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import yaml
from fastapi.testclient import TestClient
from PIL import Image
from support.models import build_small, image_bytes, small_configs

from app.config import Settings
from app.main import create_app
from app.runtime.images import decode_image
from app.runtime.preprocess import Preprocessor
from app.store.model_config import PreprocessConfig

SPECS = Path(__file__).resolve().parents[1] / "specs"
HEADER = "Inference-Header-Content-Length"
CLASSIFIERS = ["resnet50_head", "resnet50_extra", "resnet50_dual", "resnet50_extra_dual"]


# ---- fixtures and helpers -----------------------------------------------------------------


@pytest.fixture(scope="module")
def client(small_store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(store=small_store, warmup=False))) as c:
        yield c


def _validator(spec_file: str, ref: str) -> jsonschema.Draft7Validator:
    spec = yaml.safe_load((SPECS / spec_file).read_text())
    return jsonschema.Draft7Validator({"$ref": ref, "components": spec["components"]})


@pytest.fixture(scope="module")
def schemas() -> dict[str, list[jsonschema.Draft7Validator]]:
    """Each response kind against the OIP spec and MLServer's copy (both must accept it)."""
    oip, mls, repo = "oip_rest.yaml", "mlserver_dataplane_patched.yaml", "mlserver_model_repository.yaml"
    s = "#/components/schemas/"
    return {
        "server": [
            _validator(oip, s + "metadata_server_response"),
            _validator(mls, s + "MetadataServerResponse"),
        ],
        "model": [
            _validator(oip, s + "metadata_model_response"),
            _validator(mls, s + "MetadataModelResponse"),
        ],
        "infer": [_validator(oip, s + "inference_response"), _validator(mls, s + "InferenceResponse")],
        "index": [_validator(repo, s + "RepositoryIndexResponse")],
        "error": [
            _validator(oip, s + "inference_error_response"),
            _validator(oip, s + "metadata_model_error_response"),
            _validator(mls, s + "InferenceErrorResponse"),
        ],
    }


def _valid(schemas: dict[str, list[jsonschema.Draft7Validator]], kind: str, body: Any) -> None:
    for validator in schemas[kind]:
        validator.validate(body)


def _preprocessed(name: str, data: bytes) -> np.ndarray:
    """The native endpoint's pre-processing, done client-side: what the ``image`` tensor carries."""
    pre = Preprocessor(PreprocessConfig(**small_configs()[name]["preprocess"]), default_resize=None)
    return pre(decode_image(data, color_mode="RGB", max_pixels=10**8)).numpy()


def _forward(name: str, images: np.ndarray, scalars: np.ndarray | None = None) -> tuple[torch.Tensor, ...]:
    net = build_small(name)
    with torch.inference_mode():
        x = torch.from_numpy(images)
        out = net(x) if scalars is None else net(x, torch.from_numpy(scalars))
    return out if isinstance(out, tuple) else (out,)


def _infer(client: TestClient, name: str, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()  # float("nan") -> NaN token
    return client.post(f"/v2/models/{name}/infer", content=content, headers=headers)


def _triton_body(
    inputs: list[tuple[str, np.ndarray, str]],
    *,
    binary: bool,
    outputs: list[tuple[str, bool]] | None = None,
    request_id: str = "",
) -> tuple[bytes, dict[str, str]]:
    """A request body exactly as tritonclient sends it (no Content-Type, header only when binary)."""
    ins = []
    for name, array, datatype in inputs:
        inp = httpclient.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array, binary_data=binary)
        ins.append(inp)
    outs = [httpclient.InferRequestedOutput(n, binary_data=b) for n, b in outputs] if outputs else None
    body, json_size = httpclient.InferenceServerClient.generate_request_body(ins, outs, request_id=request_id)
    return body, ({HEADER: str(json_size)} if json_size is not None else {})


def _result(r: httpx.Response) -> httpclient.InferResult:
    assert r.status_code == 200, r.text
    length = r.headers.get(HEADER)
    return httpclient.InferResult.from_response_body(
        r.content, header_length=None if length is None else int(length)
    )


def _error(r: httpx.Response, status: int, fragment: str, schemas: dict[str, Any] | None = None) -> None:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) >= {"error"} and isinstance(body["error"], str), body
    assert fragment.lower() in body["error"].lower(), body["error"]
    if schemas is not None:
        _valid(schemas, "error", body)


# ---- metadata, readiness, config, index ---------------------------------------------------


def test_server_metadata(client: TestClient, schemas: dict[str, Any]) -> None:
    r = client.get("/v2")
    assert r.status_code == 200
    body = r.json()
    _valid(schemas, "server", body)
    assert body["name"] == "modserve" and body["version"]
    # what is implemented end to end, and nothing the service does not do (no shared memory, ...)
    assert {"binary_tensor_data", "model_configuration"} <= set(body["extensions"])
    assert set(body["extensions"]) <= {"binary_tensor_data", "model_configuration", "model_repository"}
    assert client.get("/v2/", follow_redirects=False).json() == body  # the spec's spelling


def test_health_bodies(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}


EXPECTED_TENSORS = {
    "resnet50_head": (
        [("image", "FP32", [-1, 3, 32, 32]), ("image_bytes", "BYTES", [-1])],
        [("probs", "FP32", [-1, 4])],
    ),
    "resnet50_extra": (
        [("image", "FP32", [-1, 3, 32, 32]), ("image_bytes", "BYTES", [-1]), ("scalar", "FP32", [-1])],
        [("probs", "FP32", [-1, 4])],
    ),
    "resnet50_extra_dual": (
        [("image", "FP32", [-1, 3, 32, 32]), ("image_bytes", "BYTES", [-1]), ("scalar", "FP32", [-1])],
        [("probs", "FP32", [-1, 4]), ("features", "FP32", [-1, 1000])],
    ),
    "unet": (
        [("image", "FP32", [-1, 3, -1, -1]), ("image_bytes", "BYTES", [-1])],
        [("mask", "UINT8", [-1, -1, -1]), ("logits", "FP32", [-1, 3, -1, -1])],
    ),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TENSORS))
def test_model_metadata(client: TestClient, schemas: dict[str, Any], name: str) -> None:
    body = client.get(f"/v2/models/{name}").json()
    _valid(schemas, "model", body)
    assert body["name"] == name and body["versions"] == ["1"] and body["platform"]
    inputs, outputs = EXPECTED_TENSORS[name]
    assert [(t["name"], t["datatype"], t["shape"]) for t in body["inputs"]] == inputs
    assert [(t["name"], t["datatype"], t["shape"]) for t in body["outputs"]] == outputs
    assert all(isinstance(v, str) for v in body["properties"].values())
    assert client.get(f"/v2/models/{name}/versions/1").json() == body


def test_model_ready(client: TestClient) -> None:
    for path in ("/v2/models/unet/ready", "/v2/models/unet/versions/1/ready"):
        r = client.get(path)
        assert r.status_code == 200 and r.json() == {"name": "unet", "ready": True}
    _error(client.get("/v2/models/nope/ready"), 404, "not found")
    _error(client.get("/v2/models/unet/versions/2/ready"), 404, "version 2")
    _error(client.get("/v2/models/unet/versions/latest/ready"), 404, "decimal")


def test_model_config(client: TestClient) -> None:
    cfg = client.get("/v2/models/resnet50_extra/config").json()
    assert cfg["name"] == "resnet50_extra" and cfg["max_batch_size"] == 4
    assert cfg["platform"] and cfg["backend"] == "pytorch"
    assert cfg["input"] == [
        {"name": "image", "data_type": "TYPE_FP32", "dims": [3, 32, 32]},
        {"name": "image_bytes", "data_type": "TYPE_STRING", "dims": [1], "reshape": {"shape": []}},
        {"name": "scalar", "data_type": "TYPE_FP32", "dims": [1], "reshape": {"shape": []}},
    ]
    assert cfg["output"] == [{"name": "probs", "data_type": "TYPE_FP32", "dims": [4]}]
    unet = client.get("/v2/models/unet/versions/1/config").json()
    assert [(o["name"], o["data_type"], o["dims"]) for o in unet["output"]] == [
        ("mask", "TYPE_UINT8", [-1, -1]),
        ("logits", "TYPE_FP32", [3, -1, -1]),
    ]
    _error(client.get("/v2/models/nope/config"), 404, "not found")


def test_repository_index(client: TestClient, schemas: dict[str, Any]) -> None:
    for body in (b"", b"{}", b'{"ready": false}', b'{"ready": true}'):
        r = client.post("/v2/repository/index", content=body)
        assert r.status_code == 200, r.text
        _valid(schemas, "index", r.json())
        assert r.json() == [
            {"name": n, "version": "1", "state": "READY", "reason": ""} for n in sorted(small_configs())
        ]
    _error(client.post("/v2/repository/index", content=b'{"ready": "yes"}'), 400, "boolean")
    _error(client.post("/v2/repository/index", content=b"[1]"), 400, "object")
    _error(client.post("/v2/repository/index", content=b"{"), 400, "not valid")


def test_model_not_ready_is_503_and_listed_unavailable(client: TestClient, schemas: dict[str, Any]) -> None:
    registry = client.app.state.registry  # type: ignore[attr-defined]
    client.portal.call(registry.unload, "resnet50_head")  # type: ignore[union-attr]
    try:
        for path in (
            "/v2/models/resnet50_head/ready",
            "/v2/models/resnet50_head",
            "/v2/models/resnet50_head/config",
        ):
            _error(client.get(path), 503, "not ready")
        x = np.zeros((1, 3, 32, 32), np.float32)
        body, headers = _triton_body([("image", x, "FP32")], binary=True)
        _error(_infer(client, "resnet50_head", body, **headers), 503, "not ready", schemas)
        index = {e["name"]: e for e in client.post("/v2/repository/index").json()}
        assert index["resnet50_head"]["state"] == "UNAVAILABLE" and index["resnet50_head"]["reason"]
        _valid(schemas, "index", list(index.values()))
        ready_only = client.post("/v2/repository/index", json={"ready": True}).json()
        assert "resnet50_head" not in {e["name"] for e in ready_only}
    finally:
        client.portal.call(registry.load, "resnet50_head")  # type: ignore[union-attr]
    assert client.get("/v2/models/resnet50_head/ready").status_code == 200


# ---- inference ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", CLASSIFIERS)
@pytest.mark.parametrize("binary", [False, True])
def test_infer_image_tensor_equals_local_forward(
    client: TestClient, schemas: dict[str, Any], name: str, binary: bool
) -> None:
    images = np.stack([_preprocessed(name, image_bytes(50, 40, seed=s)) for s in range(3)])
    scalars = np.array([0.5, -1.0, 3.0], np.float32) if "extra" in name else None
    inputs = [("image", images, "FP32")] + ([("scalar", scalars, "FP32")] if scalars is not None else [])
    body, headers = _triton_body(inputs, binary=binary, request_id="req-7")
    if not binary:
        body = json.dumps({**json.loads(body), "parameters": {}}).encode()  # JSON answer wanted
    r = _infer(client, name, body, **headers)
    result = _result(r)
    response = result.get_response()
    assert response["model_name"] == name and response["model_version"] == "1" and response["id"] == "req-7"
    if not binary:
        _valid(schemas, "infer", r.json())
    ref = _forward(name, images, scalars)
    np.testing.assert_allclose(result.as_numpy("probs"), ref[0].numpy(), atol=1e-5)
    if "dual" in name:
        np.testing.assert_allclose(result.as_numpy("features"), ref[1].numpy(), atol=1e-5)


def test_nested_and_flat_json_data_agree(client: TestClient) -> None:
    x = _preprocessed("resnet50_extra", image_bytes(seed=5))[None]
    base = [{"name": "scalar", "datatype": "FP32", "shape": [1], "data": [[0.25]]}]
    answers = []
    for data in (x.ravel().tolist(), x.tolist(), x.reshape(3, -1).tolist()):
        body = {
            "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": data}, *base]
        }
        r = _infer(client, "resnet50_extra", body)
        assert r.status_code == 200, r.text
        answers.append(r.json()["outputs"][0]["data"])
    assert answers[0] == answers[1] == answers[2]
    assert "id" not in r.json()


def test_requested_outputs_select_and_choose_binary(client: TestClient, schemas: dict[str, Any]) -> None:
    x = _preprocessed("resnet50_dual", image_bytes(seed=1))[None]
    for binary in (True, False):
        body, headers = _triton_body([("image", x, "FP32")], binary=True, outputs=[("features", binary)])
        r = _infer(client, "resnet50_dual", body, **headers)
        result = _result(r)
        outs = result.get_response()["outputs"]
        assert [o["name"] for o in outs] == ["features"]
        assert ("data" in outs[0]) is not binary and (HEADER in r.headers) is binary
        if not binary:
            _valid(schemas, "infer", r.json())
        np.testing.assert_allclose(
            result.as_numpy("features"), _forward("resnet50_dual", x)[1].numpy(), atol=1e-5
        )
    # the request-level default and per-output overrides, in order of the request
    body = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}],
        "parameters": {"binary_data_output": True},
        "outputs": [{"name": "probs", "parameters": {"binary_data": False}}, {"name": "features"}],
    }
    r = _infer(client, "resnet50_dual", body)
    outs = _result(r).get_response()["outputs"]
    assert [o["name"] for o in outs] == ["probs", "features"]
    assert "data" in outs[0] and outs[1]["parameters"]["binary_data_size"] == 4000


def test_image_bytes_native_and_tensor_paths_agree(client: TestClient) -> None:
    """Acceptance 3: the same image through native, OIP JSON and OIP binary gives the same numbers."""
    png = image_bytes(50, 40, seed=9)
    native = client.post(
        "/v1/models/resnet50_extra_dual/predict",
        files={"image": ("a.png", png, "image/png")},
        data={"scalar": "0.75"},
    ).json()["predictions"][0]
    scalar = np.array([0.75], np.float32)
    tensor = _preprocessed("resnet50_extra_dual", png)[None]
    runs = {
        "bytes-binary": _triton_body(
            [("image_bytes", np.array([png], object), "BYTES"), ("scalar", scalar, "FP32")], binary=True
        ),
        "tensor-binary": _triton_body([("image", tensor, "FP32"), ("scalar", scalar, "FP32")], binary=True),
        "tensor-json": _triton_body([("image", tensor, "FP32"), ("scalar", scalar, "FP32")], binary=False),
    }
    b64 = {
        "inputs": [
            {
                "name": "image_bytes",
                "datatype": "BYTES",
                "shape": [1],
                "parameters": {"content_type": "base64"},
                "data": [base64.b64encode(png).decode()],
            },
            {"name": "scalar", "datatype": "FP32", "shape": [1], "data": [0.75]},
        ]
    }
    runs["bytes-json-base64"] = (json.dumps(b64).encode(), {})
    for label, (body, headers) in runs.items():
        result = _result(_infer(client, "resnet50_extra_dual", body, **headers))
        np.testing.assert_allclose(result.as_numpy("probs")[0], native["probs"], atol=1e-5, err_msg=label)
        np.testing.assert_allclose(
            result.as_numpy("features")[0], native["features"], atol=1e-5, err_msg=label
        )


def test_unet_image_bytes_mask_matches_native_png(client: TestClient) -> None:
    png = image_bytes(45, 31, seed=4)
    native = client.post(
        "/v1/models/unet/predict",
        files={"image": ("a.png", png, "image/png")},
        headers={"Accept": "image/png"},
    )
    painted = np.asarray(Image.open(io.BytesIO(native.content)))
    body, headers = _triton_body([("image_bytes", np.array([png, png], object), "BYTES")], binary=True)
    result = _result(_infer(client, "unet", body, **headers))
    mask, logits = result.as_numpy("mask"), result.as_numpy("logits")
    assert mask.shape == (2, 31, 45) and mask.dtype == np.uint8 and logits.shape == (2, 3, 31, 45)
    np.testing.assert_array_equal(np.array([0, 100, 200], np.uint8)[mask[0]], painted)
    np.testing.assert_array_equal(mask[0], logits[0].argmax(0))


def test_unet_image_tensor_outputs_at_input_size(client: TestClient) -> None:
    x = _preprocessed("unet", image_bytes(64, 48, seed=2))[None]  # scale 0.5 -> 24 x 32
    body, headers = _triton_body([("image", x, "FP32")], binary=True, outputs=[("mask", False)])
    r = _infer(client, "unet", body, **headers)
    result = _result(r)
    assert [o["name"] for o in result.get_response()["outputs"]] == ["mask"]
    (ref,) = _forward("unet", x)
    np.testing.assert_array_equal(result.as_numpy("mask"), ref.argmax(1).numpy().astype(np.uint8))


def test_unet_differently_sized_images_in_one_request_is_400(client: TestClient) -> None:
    files = np.array([image_bytes(40, 30), image_bytes(30, 40)], object)
    body, headers = _triton_body([("image_bytes", files, "BYTES")], binary=True)
    _error(_infer(client, "unet", body, **headers), 400, "separate requests")


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_request_bodies(client: TestClient, encoding: str) -> None:
    x = _preprocessed("resnet50_head", image_bytes(seed=3))[None]
    body, headers = _triton_body([("image", x, "FP32")], binary=True)
    packed = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
    result = _result(_infer(client, "resnet50_head", packed, **headers, **{"Content-Encoding": encoding}))
    np.testing.assert_allclose(result.as_numpy("probs"), _forward("resnet50_head", x)[0].numpy(), atol=1e-5)


@pytest.mark.parametrize("content_type", [None, "application/octet-stream", "application/json", "text/plain"])
def test_content_type_never_decides_the_format(client: TestClient, content_type: str | None) -> None:
    x = np.zeros((1, 3, 32, 32), np.float32)
    for binary in (True, False):
        body, headers = _triton_body([("image", x, "FP32")], binary=binary)
        if content_type:
            headers["Content-Type"] = content_type
        assert _infer(client, "resnet50_head", body, **headers).status_code == 200


def test_non_finite_outputs_are_sent_binary_not_as_invalid_json(client: TestClient) -> None:
    x = np.full((1, 3, 32, 32), 3e38, np.float32)  # finite input that overflows inside the net
    body = {
        "inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 32, 32], "data": x.ravel().tolist()}]
    }
    r = _infer(client, "resnet50_head", body)
    assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
    length = int(r.headers[HEADER])
    json.loads(r.content[:length], parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert not np.isfinite(_result(r).as_numpy("probs")).all()


# ---- errors: every case answers its status with {"error": ...} -----------------------------


def _img(shape: list[int] | None = None, datatype: str = "FP32", **extra: Any) -> dict[str, Any]:
    shape = shape or [1, 3, 32, 32]
    data = extra.pop("data", [0.0] * int(np.prod(shape)))
    return {"name": "image", "datatype": datatype, "shape": shape, "data": data, **extra}


def _scalar(values: list[Any], shape: list[int] | None = None, datatype: str = "FP32") -> dict[str, Any]:
    return {"name": "scalar", "datatype": datatype, "shape": shape or [len(values)], "data": values}


ERROR_CASES: list[tuple[str, str, Any, dict[str, str], str]] = [
    ("shape-hw", "resnet50_head", {"inputs": [_img([1, 3, 31, 32])]}, {}, "[-1, 3, 32, 32]"),
    ("shape-rank", "resnet50_head", {"inputs": [_img([3, 32, 32])]}, {}, "must have shape"),
    ("shape-channels", "unet", {"inputs": [_img([1, 1, 16, 16])]}, {}, "must have shape"),
    ("dtype-image", "resnet50_head", {"inputs": [_img(datatype="FP64")]}, {}, "must be FP32"),
    (
        "dtype-scalar",
        "resnet50_extra",
        {"inputs": [_img(), _scalar([1], datatype="INT32")]},
        {},
        "must be FP32",
    ),
    (
        "dtype-bytes",
        "unet",
        {"inputs": [{"name": "image_bytes", "datatype": "FP32", "shape": [1], "data": [1.0]}]},
        {},
        "must be BYTES",
    ),
    ("count", "resnet50_head", {"inputs": [_img(data=[0.0] * 10)]}, {}, "needs 3072"),
    ("scalar-shape", "resnet50_extra", {"inputs": [_img(), _scalar([1, 2], shape=[1, 2])]}, {}, "shape [-1]"),
    ("scalar-batch", "resnet50_extra", {"inputs": [_img(), _scalar([1.0, 2.0])]}, {}, "batch size 2"),
    ("unknown-input", "resnet50_head", {"inputs": [_img(), _scalar([1.0])]}, {}, "unknown input(s) scalar"),
    (
        "unknown-input2",
        "resnet50_extra",
        {"inputs": [_img(), _scalar([1.0]), {**_scalar([1.0]), "name": "x"}]},
        {},
        "unknown input(s) x",
    ),
    ("missing-scalar", "resnet50_extra", {"inputs": [_img()]}, {}, "missing input 'scalar'"),
    ("missing-image", "resnet50_extra", {"inputs": [_scalar([1.0])]}, {}, "missing input"),
    (
        "both-images",
        "resnet50_head",
        {"inputs": [_img(), {"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["x"]}]},
        {},
        "either",
    ),
    ("no-inputs", "resnet50_head", {"inputs": []}, {}, "non-empty"),
    ("empty-batch", "resnet50_head", {"inputs": [_img([0, 3, 32, 32])]}, {}, "empty"),
    ("nan-scalar", "resnet50_extra", {"inputs": [_img(), _scalar([float("nan")])]}, {}, "NaN or infinite"),
    ("inf-scalar", "resnet50_extra", {"inputs": [_img(), _scalar([float("-inf")])]}, {}, "NaN or infinite"),
    ("overflow-scalar", "resnet50_extra", {"inputs": [_img(), _scalar([1e39])]}, {}, "NaN or infinite"),
    (
        "nan-image",
        "resnet50_head",
        {"inputs": [_img(data=[float("nan")] + [0.0] * 3071)]},
        {},
        "NaN or infinite",
    ),
    (
        "unknown-output",
        "resnet50_head",
        {"inputs": [_img()], "outputs": [{"name": "features"}]},
        {},
        "unknown output(s) features",
    ),
    (
        "classification",
        "resnet50_head",
        {"inputs": [_img()], "outputs": [{"name": "probs", "parameters": {"classification": 2}}]},
        {},
        "classification",
    ),
    (
        "binary-flag",
        "resnet50_head",
        {"inputs": [_img()], "parameters": {"binary_data_output": "yes"}},
        {},
        "boolean",
    ),
    ("id", "resnet50_head", {"id": 5, "inputs": [_img()]}, {}, "'id'"),
    ("bad-json", "resnet50_head", b'{"inputs": [', {}, "not valid"),
    ("not-object", "resnet50_head", b"[]", {}, "JSON object"),
    ("header-range", "resnet50_head", {"inputs": [_img()]}, {HEADER: "999999"}, "out of range"),
    ("header-int", "resnet50_head", {"inputs": [_img()]}, {HEADER: "ten"}, "integer"),
    (
        "not-an-image",
        "resnet50_head",
        {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["junk"]}]},
        {},
        "decoded",
    ),
    (
        "gif",
        "resnet50_head",
        {"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "data": ["GIF89a...."]}]},
        {},
        "not supported",
    ),
    ("bad-gzip", "resnet50_head", b"not gzip", {"Content-Encoding": "gzip"}, "gzip"),
]


@pytest.mark.parametrize(
    ("label", "name", "body", "headers", "fragment"), ERROR_CASES, ids=[c[0] for c in ERROR_CASES]
)
def test_infer_errors_are_400(
    client: TestClient,
    schemas: dict[str, Any],
    label: str,
    name: str,
    body: Any,
    headers: dict[str, str],
    fragment: str,
) -> None:
    _error(_infer(client, name, body, **headers), 400, fragment, schemas)


def test_binary_error_cases(client: TestClient, schemas: dict[str, Any]) -> None:
    x = np.zeros((1, 3, 32, 32), np.float32)
    body, headers = _triton_body([("image", x, "FP32")], binary=True)
    _error(_infer(client, "resnet50_head", body[:-4], **headers), 400, "past the end", schemas)
    _error(_infer(client, "resnet50_head", body + b"\0" * 4, **headers), 400, "unclaimed", schemas)
    inf = np.array([np.inf], np.float32)
    body, headers = _triton_body([("image", x, "FP32"), ("scalar", inf, "FP32")], binary=True)
    _error(_infer(client, "resnet50_extra", body, **headers), 400, "NaN or infinite", schemas)


def test_unknown_model_and_version_are_404(client: TestClient, schemas: dict[str, Any]) -> None:
    body = json.dumps({"inputs": [_img()]})
    _error(client.post("/v2/models/nope/infer", content=body), 404, "not found", schemas)
    _error(client.post("/v2/models/resnet50_head/versions/3/infer", content=body), 404, "version 3", schemas)
    _error(client.get("/v2/models/nope"), 404, "not found", schemas)
    assert client.post("/v2/models/resnet50_head/versions/1/infer", content=body).status_code == 200


def test_unsupported_content_encoding_is_415(client: TestClient) -> None:
    r = client.post("/v2/models/resnet50_head/infer", content=b"{}", headers={"Content-Encoding": "br"})
    _error(r, 415, "content-encoding")
    assert r.headers["accept-encoding"] == "gzip, deflate"


def test_body_limits_apply_before_and_after_decompression(tmp_path: Path) -> None:
    settings = Settings(store=tmp_path, warmup=False, max_body_bytes=10_000)
    with TestClient(create_app(settings)) as small:
        _error(small.post("/v2/models/m/infer", content=b"x" * 10_001), 413, "limit")
        bomb = gzip.compress(b" " * 5_000_000)  # 5 kB on the wire
        assert len(bomb) < 10_000
        _error(
            small.post("/v2/models/m/infer", content=bomb, headers={"Content-Encoding": "gzip"}), 413, "limit"
        )
        _error(small.post("/v2/models/m/infer", content=gzip.compress(b"{}")), 404, "not found")


def test_openapi_documents_v2(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/v2",
        "/v2/models/{name}",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/models/{name}/infer",
        "/v2/models/{name}/config",
        "/v2/models/{name}/ready",
        "/v2/repository/index",
    ):
        assert path in paths, path
