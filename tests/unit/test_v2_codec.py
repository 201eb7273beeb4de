"""The v2 wire format without a server: tritonclient's own request bodies decode, our
response bodies parse with tritonclient's own ``InferResult``, and every malformed
tensor is refused with a message."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import serialize_byte_tensor

from app.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType
from app.v2.body import inflate
from app.v2.codec import CodecError, decode_inputs, load_json, split_body
from app.v2.encode import encode_output, join_body, to_binary

NUMERIC = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
}


def _sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    rng = np.random.default_rng(1)
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(bool)
    dtype = np.dtype(NUMERIC[datatype])
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    info = np.iinfo(dtype)
    return rng.integers(max(info.min, -100), min(info.max, 100), size=shape, endpoint=True).astype(dtype)


def _decode_triton(inputs: list[httpclient.InferInput]) -> list[Any]:
    """A request body exactly as tritonclient builds it, through our decoder."""
    body, json_size = httpclient.InferenceServerClient.generate_request_body(inputs)
    head, binary = split_body(body, None if json_size is None else str(json_size))
    return decode_inputs(load_json(head)["inputs"], binary)


def _input(name: str, array: np.ndarray, datatype: str, binary: bool) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


@pytest.mark.parametrize("binary", [True, False])
@pytest.mark.parametrize("datatype", sorted(NUMERIC))
def test_tritonclient_numeric_inputs_round_trip(datatype: str, binary: bool) -> None:
    array = _sample(datatype)
    (tensor,) = _decode_triton([_input("x", array, datatype, binary)])
    assert tensor.shape == (2, 3) and tensor.datatype == datatype
    np.testing.assert_array_equal(tensor.array, array)
    assert tensor.array.flags.writeable  # torch.from_numpy needs it


def test_tritonclient_bytes_and_bf16_inputs() -> None:
    blobs = np.array([b"\x89PNG\x00\xff", b"", b"abc"], dtype=object)
    floats = np.array([[1.5, -2.25], [3.0, 1e-3]], dtype=np.float32)
    bf16 = httpclient.InferInput("b", [2, 2], "BF16")
    bf16.set_data_from_numpy(floats.astype(ml_dtypes.bfloat16), binary_data=True)
    text = _input("t", np.array([b"hello", "wörld".encode()], dtype=object), "BYTES", False)
    blob_t, bf_t, text_t = _decode_triton([_input("blob", blobs, "BYTES", True), bf16, text])
    assert list(blob_t.array) == list(blobs)
    np.testing.assert_allclose(bf_t.array, floats, rtol=1e-2)  # bf16 keeps ~3 significant digits
    assert list(text_t.array) == [b"hello", "wörld".encode()]


def test_bytes_binary_layout_matches_the_protocol_example() -> None:
    raw = to_binary(np.array([b"hi", b"abc"], dtype=object), "BYTES")
    assert raw == bytes.fromhex("02000000 6869 03000000 616263".replace(" ", ""))
    assert raw == serialize_byte_tensor(np.array([b"hi", b"abc"], dtype=object)).item()
    floats = np.array([1.5, -2.0], dtype=np.float32)
    assert to_binary(floats, "BF16") == floats.astype(ml_dtypes.bfloat16).tobytes()  # exact in bf16


def test_json_data_flat_nested_and_base64() -> None:
    values = np.arange(12, dtype=np.float32).reshape(2, 2, 3)
    docs = [
        {"name": "flat", "datatype": "FP32", "shape": [2, 2, 3], "data": values.ravel().tolist()},
        {"name": "nested", "datatype": "FP32", "shape": [2, 2, 3], "data": values.tolist()},
        {"name": "rows", "datatype": "FP32", "shape": [2, 2, 3], "data": values.reshape(4, 3).tolist()},
        {
            "name": "b64",
            "datatype": "BYTES",
            "shape": [1],
            "data": ["aGk="],
            "parameters": {"content_type": "base64"},
        },
        {"name": "one", "datatype": "INT64", "shape": [1], "data": 7},
    ]
    flat, nested, rows, b64, one = decode_inputs(docs, b"")
    for t in (flat, nested, rows):
        np.testing.assert_array_equal(t.array, values)
        assert t.array.dtype == np.float32
    assert list(b64.array) == [b"hi"]
    assert one.array.tolist() == [7]


def test_mixed_json_and_binary_inputs_take_chunks_in_order() -> None:
    a, b = np.ones((2,), np.float32), np.arange(3, dtype=np.int32)
    docs = [
        {"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}},
        {"name": "j", "datatype": "BOOL", "shape": [2], "data": [True, False]},
        {"name": "b", "datatype": "INT32", "shape": [3], "parameters": {"binary_data_size": 12}},
    ]
    ta, tj, tb = decode_inputs(docs, a.tobytes() + b.tobytes())
    np.testing.assert_array_equal(ta.array, a)
    np.testing.assert_array_equal(tb.array, b)
    assert tj.array.tolist() == [True, False]


def _fp32(**overrides: Any) -> dict[str, Any]:
    return {"name": "x", "datatype": "FP32", "shape": [2], "data": [1.0, 2.0], **overrides}


@pytest.mark.parametrize(
    ("inputs", "binary", "message"),
    [
        ([], b"", "non-empty list"),
        ({"name": "x"}, b"", "non-empty list"),
        (["x"], b"", "must be an object"),
        ([_fp32(name="")], b"", "name"),
        ([_fp32(), _fp32()], b"", "more than once"),
        ([_fp32(datatype="FLOAT")], b"", "unknown datatype"),
        ([_fp32(shape=[-1])], b"", "non-negative"),
        ([_fp32(shape="2")], b"", "shape"),
        ([_fp32(shape=[2.0])], b"", "non-negative integers"),
        ([_fp32(shape=[3])], b"", "2 elements but shape \\[3\\] needs 3"),
        ([_fp32(data=[[1.0], [2.0, 3.0]])], b"", "ragged"),
        ([_fp32(data=["1", "2"])], b"", "must be numbers"),
        ([_fp32(data=[1.0, None])], b"", "must be numbers"),
        ([_fp32(datatype="INT32", data=[1.5, 2])], b"", "must be integers"),
        ([_fp32(datatype="UINT8", data=[1, 300])], b"", "out of range"),
        ([_fp32(datatype="BOOL", data=[1, 0])], b"", "true/false"),
        ([_fp32(datatype="BF16")], b"", "BF16 has no JSON"),
        ([_fp32(datatype="BYTES", data=[1, 2])], b"", "must be strings"),
        ([_fp32(datatype="BYTES", data=["%%", "a"], parameters={"content_type": "base64"})], b"", "base64"),
        ([{"name": "x", "datatype": "FP32", "shape": [2]}], b"", "neither"),
        ([_fp32(parameters={"binary_data_size": 8})], b"\0" * 8, "both"),
        ([_fp32(parameters={"shared_memory_region": "r"})], b"", "shared-memory"),
        ([_fp32(parameters=[1])], b"", "parameters must be an object"),
    ],
)
def test_malformed_json_inputs(inputs: Any, binary: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_inputs(inputs, binary)


def _bin(datatype: str, shape: list[int], size: Any) -> list[dict[str, Any]]:
    return [{"name": "x", "datatype": datatype, "shape": shape, "parameters": {"binary_data_size": size}}]


@pytest.mark.parametrize(
    ("inputs", "binary", "message"),
    [
        (_bin("FP32", [2], 8), b"\0" * 4, "past the end"),
        (_bin("FP32", [3], 8), b"\0" * 8, "needs 12"),
        (_bin("FP32", [2], 8), b"\0" * 12, "4 bytes of binary data follow"),
        (_bin("FP32", [2], -1), b"", "non-negative integer"),
        (_bin("FP32", [2], "8"), b"\0" * 8, "non-negative integer"),
        (_bin("BOOL", [2], 2), b"\x01\x07", "0 or 1"),
        (_bin("BYTES", [2], 6), b"\x02\0\0\0hi", "too short"),
        (_bin("BYTES", [10**12], 8), b"\0" * 8, "too short"),  # no giant allocation first
        (_bin("BYTES", [1], 6), b"\x09\0\0\0hi", "claims 9 bytes"),
        (_bin("BYTES", [1], 7), b"\x02\0\0\0hi!", "beyond its 1 elements"),
    ],
)
def test_malformed_binary_inputs(inputs: Any, binary: bytes, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        decode_inputs(inputs, binary)


@pytest.mark.parametrize(
    ("value", "ok"),
    [(None, True), ("5", True), (" 5 ", True), ("0", False), ("11", False), ("-1", False), ("x", False)],
)
def test_split_body_checks_the_header(value: str | None, ok: bool) -> None:
    body = b'{"a": 1}xy'
    if ok:
        head, rest = split_body(body, value)
        assert head + rest == body and (value is None or len(head) == 5)
    else:
        with pytest.raises(CodecError, match="Inference-Header-Content-Length"):
            split_body(body, value)


def test_load_json_reads_nan_tokens_and_rejects_garbage() -> None:
    assert np.isnan(load_json(b'{"x": NaN}')["x"])
    assert load_json(b'{"x": 1}') == {"x": 1}
    for bad in (b"{", b"\xff\xfe", b"[" * 100_000):
        with pytest.raises(CodecError, match="not valid"):
            load_json(bad)


@pytest.mark.parametrize("binary", [True, False])
def test_responses_parse_with_tritonclient(binary: bool) -> None:
    probs = np.random.default_rng(0).random((2, 4), dtype=np.float32)
    mask = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    outs = [
        encode_output("probs", probs, "FP32", binary=binary),
        encode_output("mask", mask, "UINT8", binary=False),
    ]
    body, header_length = join_body(
        {"model_name": "m", "outputs": [o for o, _ in outs]}, [c for _, c in outs if c is not None]
    )
    assert (header_length is not None) == binary
    if not binary:
        data = json.loads(body)["outputs"][0]["data"]  # flat, and float32-exact after parsing
        np.testing.assert_array_equal(np.array(data, dtype=np.float32), probs.ravel())
    result = httpclient.InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("probs"), probs)
    np.testing.assert_array_equal(result.as_numpy("mask"), mask)


def test_non_finite_outputs_go_binary_never_invalid_json() -> None:
    arr = np.array([[1.0, np.nan, np.inf]], dtype=np.float32)
    out, chunk = encode_output("probs", arr, "FP32", binary=False)
    assert "data" not in out and out["parameters"] == {"binary_data_size": 12}
    body, header_length = join_body({"model_name": "m", "outputs": [out]}, [chunk])
    json.loads(body[:header_length])  # strict JSON: the header holds no NaN token
    got = httpclient.InferResult.from_response_body(body, header_length=header_length).as_numpy("probs")
    np.testing.assert_array_equal(got, arr)


def test_empty_binary_output_still_gets_a_header_length() -> None:
    out, chunk = encode_output("probs", np.zeros((0, 4), np.float32), "FP32", binary=True)
    body, header_length = join_body({"model_name": "m", "outputs": [out]}, [chunk])
    assert header_length == len(body)
    assert httpclient.InferResult.from_response_body(body, header_length=header_length).as_numpy(
        "probs"
    ).shape == (0, 4)


def test_inflate_gzip_deflate_and_limits() -> None:
    data = b'{"inputs": []}' * 100
    assert inflate(gzip.compress(data), "gzip", 10_000) == data
    assert inflate(zlib.compress(data), "deflate", 10_000) == data
    assert inflate(gzip.compress(data) + gzip.compress(data), "gzip", 10_000) == data * 2
    assert inflate(data, "identity", 10) == data
    with pytest.raises(PayloadTooLarge):
        inflate(gzip.compress(b"\0" * 50_000_000), "gzip", 1_000_000)  # a bomb stops at the limit
    with pytest.raises(BadRequest, match="truncated"):
        inflate(gzip.compress(data)[:-6], "gzip", 10_000)
    with pytest.raises(BadRequest, match="not valid gzip"):
        inflate(b"not gzip", "gzip", 10_000)
    with pytest.raises(UnsupportedMediaType) as info:
        inflate(data, "br", 10_000)
    assert info.value.headers["Accept-Encoding"] == "gzip, deflate"
