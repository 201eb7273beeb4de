"""End to end with the official clients, unchanged: tritonclient (sync and aio) and the
kserve SDK's ``InferenceRESTClient`` against one real uvicorn process per module.

Outputs are compared with a local forward of the same seeded net (within 1e-5).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from support.models import build_small, image_bytes, small_configs
from support.server import Server, free_port, run_server
from tritonclient.utils import InferenceServerException

from app.demo.store import demo_configs
from app.store.writer import write_model
from app.runtime.images import decode_image
from app.runtime.preprocess import Preprocessor
from app.store.model_config import PreprocessConfig

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
ATOL = 1e-5


@pytest.fixture(scope="module")
def server(small_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    port = free_port()
    env = {
        "MODSERVE_STORE": str(small_store),
        "MODSERVE_PORT": str(port),
        "MODSERVE_DEVICE": "cpu",
        "MODSERVE_WARMUP": "false",
    }
    with run_server(
        ["-m", "app"],
        env=env,
        port=port,
        log_dir=tmp_path_factory.mktemp("v2-logs"),
        ready_path="/v2/health/ready",
    ) as srv:
        yield srv


def _hostport(srv: Server) -> str:
    return srv.url.removeprefix("http://")  # tritonclient refuses a scheme


def _preprocessed(name: str, data: bytes) -> np.ndarray:
    pre = Preprocessor(PreprocessConfig(**small_configs()[name]["preprocess"]), default_resize=None)
    return pre(decode_image(data, color_mode="RGB", max_pixels=10**8)).numpy()


def _forward(name: str, images: np.ndarray, scalars: np.ndarray | None = None) -> list[np.ndarray]:
    net = build_small(name)
    with torch.inference_mode():
        x = torch.from_numpy(images)
        out = net(x) if scalars is None else net(x, torch.from_numpy(scalars))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


def _inp(name: str, array: np.ndarray, datatype: str, binary: bool = True) -> httpclient.InferInput:
    inp = httpclient.InferInput(name, list(array.shape), datatype)
    inp.set_data_from_numpy(array, binary_data=binary)
    return inp


# ---- tritonclient, sync -------------------------------------------------------------------


def test_tritonclient_health_metadata_config_index(server: Server) -> None:
    client = httpclient.InferenceServerClient(_hostport(server))
    try:
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("unet") and client.is_model_ready("unet", "1")
        assert not client.is_model_ready("nope") and not client.is_model_ready("unet", "2")
        meta = client.get_server_metadata()
        assert meta["name"] == "modserve" and "binary_tensor_data" in meta["extensions"]
        model = client.get_model_metadata("resnet50_extra_dual", "1")
        assert [(i["name"], i["shape"]) for i in model["inputs"]] == [
            ("image", [-1, 3, 32, 32]),
            ("image_bytes", [-1]),
            ("scalar", [-1]),
        ]
        assert [(o["name"], o["shape"]) for o in model["outputs"]] == [
            ("probs", [-1, 4]),
            ("features", [-1, 1000]),
        ]
        config = client.get_model_config("unet")
        assert config["max_batch_size"] == 4 and config["output"][0]["data_type"] == "TYPE_UINT8"
        index = client.get_model_repository_index()
        assert {e["name"]: e["state"] for e in index} == {n: "READY" for n in small_configs()}
        with pytest.raises(InferenceServerException) as info:
            client.get_model_metadata("nope")
        assert info.value.status() == "404" and "not found" in info.value.message()
    finally:
        client.close()


@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False, None])  # None: no outputs listed (all, binary)
def test_tritonclient_infer_matches_local_forward(
    server: Server, binary_in: bool, binary_out: bool | None
) -> None:
    name = "resnet50_extra_dual"
    images = np.stack([_preprocessed(name, image_bytes(50, 40, seed=s)) for s in range(2)])
    scalars = np.array([0.5, -2.0], np.float32)
    inputs = [_inp("image", images, "FP32", binary_in), _inp("scalar", scalars, "FP32", binary_in)]
    outputs = (
        None if binary_out is None else [httpclient.InferRequestedOutput("probs", binary_data=binary_out)]
    )
    client = httpclient.InferenceServerClient(_hostport(server))
    try:
        result = client.infer(name, inputs, model_version="1", outputs=outputs, request_id="r1")
    finally:
        client.close()
    response = result.get_response()
    assert response["model_name"] == name and response["model_version"] == "1" and response["id"] == "r1"
    ref = _forward(name, images, scalars)
    np.testing.assert_allclose(result.as_numpy("probs"), ref[0], atol=ATOL)
    if binary_out is None:
        np.testing.assert_allclose(result.as_numpy("features"), ref[1], atol=ATOL)
    else:
        assert result.as_numpy("features") is None  # not requested, not computed
        assert ("data" in response["outputs"][0]) is not binary_out


@pytest.mark.parametrize("compression", ["gzip", "deflate"])
def test_tritonclient_image_bytes_and_request_compression(server: Server, compression: str) -> None:
    pngs = [image_bytes(50, 40, seed=s) for s in (3, 4)]
    client = httpclient.InferenceServerClient(_hostport(server))
    try:
        files = _inp("image_bytes", np.array(pngs, dtype=object), "BYTES")
        result = client.infer("resnet50_head", [files], request_compression_algorithm=compression)
        seg = client.infer(
            "unet",
            [_inp("image_bytes", np.array(pngs[:1], dtype=object), "BYTES")],
            outputs=[httpclient.InferRequestedOutput("mask"), httpclient.InferRequestedOutput("logits")],
            request_compression_algorithm=compression,
        )
    finally:
        client.close()
    images = np.stack([_preprocessed("resnet50_head", p) for p in pngs])
    np.testing.assert_allclose(result.as_numpy("probs"), _forward("resnet50_head", images)[0], atol=ATOL)
    mask, logits = seg.as_numpy("mask"), seg.as_numpy("logits")
    assert mask.shape == (1, 40, 50) and mask.dtype == np.uint8 and logits.shape == (1, 3, 40, 50)
    np.testing.assert_array_equal(mask, logits.argmax(1))


def test_tritonclient_errors_carry_status_and_message(server: Server) -> None:
    client = httpclient.InferenceServerClient(_hostport(server))
    try:
        bad = _inp("image", np.zeros((1, 3, 16, 16), np.float32), "FP32")
        with pytest.raises(InferenceServerException) as info:
            client.infer("resnet50_head", [bad])
        assert info.value.status() == "400" and "must have shape" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.infer("resnet50_extra", [_inp("image", np.zeros((1, 3, 32, 32), np.float32), "FP32")])
        assert info.value.status() == "400" and "scalar" in info.value.message()
        with pytest.raises(InferenceServerException) as info:
            client.infer("nope", [bad])
        assert info.value.status() == "404"
    finally:
        client.close()


# ---- tritonclient, aio --------------------------------------------------------------------


def test_tritonclient_aio(server: Server) -> None:
    name = "resnet50_extra"
    images = _preprocessed(name, image_bytes(seed=7))[None]
    scalars = np.array([1.5], np.float32)
    ref = _forward(name, images, scalars)[0]

    async def run() -> None:
        async with aiohttpclient.InferenceServerClient(_hostport(server)) as client:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready(name) and not await client.is_model_ready("nope")
            assert (await client.get_server_metadata())["name"] == "modserve"
            assert (await client.get_model_metadata(name))["platform"]
            assert (await client.get_model_config(name))["name"] == name
            assert len(await client.get_model_repository_index()) == len(small_configs())
            for binary in (True, False):
                inputs = [_inp("image", images, "FP32", binary), _inp("scalar", scalars, "FP32", binary)]
                outputs = [httpclient.InferRequestedOutput("probs", binary_data=binary)]
                result = await client.infer(
                    name, inputs, outputs=outputs, request_compression_algorithm="gzip"
                )
                np.testing.assert_allclose(result.as_numpy("probs"), ref, atol=ATOL)
            files = _inp("image_bytes", np.array([image_bytes(seed=7)], dtype=object), "BYTES")
            result = await client.infer(name, [files, _inp("scalar", scalars, "FP32")])
            np.testing.assert_allclose(result.as_numpy("probs"), ref, atol=ATOL)
            with pytest.raises(InferenceServerException) as info:
                await client.infer(name, [files])
            assert info.value.status() == "400"

    asyncio.run(run())


# ---- kserve SDK -----------------------------------------------------------------------------


def test_kserve_inference_rest_client(server: Server) -> None:
    from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

    name = "resnet50_extra_dual"
    images = _preprocessed(name, image_bytes(seed=11))[None]
    scalars = np.array([0.25], np.float32)
    ref = _forward(name, images, scalars)

    async def run() -> None:
        client = InferenceRESTClient(RESTConfig(protocol="v2", retries=0, timeout=60))
        try:
            assert await client.is_server_live(server.url) is True
            assert await client.is_server_ready(server.url) is True
            assert await client.is_model_ready(server.url, name) is True
            assert await client.is_model_ready(server.url, "nope") is False
            for binary in (True, False):
                image, scalar = (
                    InferInput("image", list(images.shape), "FP32"),
                    InferInput("scalar", [1], "FP32"),
                )
                image.set_data_from_numpy(images, binary_data=binary)
                scalar.set_data_from_numpy(scalars, binary_data=binary)
                request = InferRequest(
                    model_name=name, infer_inputs=[image, scalar], request_id=f"k-{binary}"
                )
                response = await client.infer(server.url, request, model_name=name)
                assert response.model_name == name and response.id == f"k-{binary}"
                outputs = {o.name: o.as_numpy() for o in response.outputs}
                np.testing.assert_allclose(outputs["probs"], ref[0], atol=ATOL)
                np.testing.assert_allclose(outputs["features"], ref[1], atol=ATOL)
            files = InferInput("image_bytes", [1], "BYTES")
            files.set_data_from_numpy(np.array([image_bytes(seed=11)], dtype=object), binary_data=True)
            scalar = InferInput("scalar", [1], "FP32")
            scalar.set_data_from_numpy(scalars, binary_data=False)  # JSON and binary inputs mixed
            response = await client.infer(server.url, InferRequest(name, [files, scalar]), model_name=name)
            np.testing.assert_allclose(response.outputs[0].as_numpy(), ref[0], atol=ATOL)
        finally:
            await client.close()

    asyncio.run(run())


# ---- the v2 doc's snippet (docs/v2-protocol.md), as written, against demo-store models ----------


V2_DOC = ROOT / "docs" / "v2-protocol.md"


def _doc_snippet() -> str:
    match = re.search(r"<!-- v2-snippet -->\s*```python\n(.*?)```", V2_DOC.read_text(), re.S)
    if match is None:
        pytest.fail(f"no <!-- v2-snippet --> python block in {V2_DOC.relative_to(ROOT)}")
    return match.group(1)


def test_v2_doc_tritonclient_snippet_runs_against_the_demo_store(tmp_path: Path) -> None:
    """The models the snippet calls, configured exactly as the demo store writes them."""
    configs = demo_configs()
    for name in ("resnet50_extra", "unet"):
        cfg = configs[name]
        torch.manual_seed(0)
        from app import nets

        net = nets.get_net(cfg["architecture"], **cfg["arguments"])
        write_model(tmp_path / "store", name, cfg, net.state_dict())
    port = free_port()
    env = {
        "MODSERVE_STORE": str(tmp_path / "store"),
        "MODSERVE_PORT": str(port),
        "MODSERVE_DEVICE": "cpu",
        "MODSERVE_WARMUP": "false",
    }
    snippet = _doc_snippet().replace("127.0.0.1:8000", f"127.0.0.1:{port}")
    with run_server(["-m", "app"], env=env, port=port, log_dir=tmp_path, ready_path="/v2/health/ready"):
        namespace: dict[str, object] = {"__name__": "v2_doc_snippet"}
        exec(compile(snippet, "docs/v2-protocol.md snippet", "exec"), namespace)  # noqa: S102 - our own doc
