"""The native API through the app with its lifespan running (httpx via TestClient)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.runtime.images import decode_image
from support.models import build_small, image_bytes, small_configs


@pytest.fixture(scope="module")
def client(small_store: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(store=small_store, warmup=False))) as c:
        yield c


def _post_image(client: TestClient, name: str, data: bytes, scalar: str | None = None, **kw):
    form = {"scalar": scalar} if scalar is not None else None
    return client.post(f"/v1/models/{name}/predict", files={"image": ("x.png", data, "image/png")}, data=form, **kw)


def test_list_and_describe_models(client: TestClient) -> None:
    body = client.get("/v1/models").json()
    names = {m["name"] for m in body["models"]}
    assert names == set(small_configs())
    info = client.get("/v1/models/resnet50_extra").json()
    assert info["ready"] is True and info["state"] == "READY"
    assert info["version"] == "1" and info["architecture"] == "resnet50_extra"
    assert info["device"] == "cpu" and info["dtype"] == "float32"
    assert len(info["sha256"]) == 64
    assert {i["name"] for i in info["inputs"]} == {"image", "scalar"}
    assert info["inputs"][0]["shape"] == [-1, 3, 32, 32]
    assert [o["name"] for o in info["outputs"]] == ["probs"]
    dual = client.get("/v1/models/resnet50_extra_dual").json()
    assert [o["name"] for o in dual["outputs"]] == ["probs", "features"]
    assert dual["outputs"][1]["shape"] == [-1, 1000]


def test_predict_extra_multipart(client: TestClient) -> None:
    r = _post_image(client, "resnet50_extra", image_bytes(), scalar="0.5")
    assert r.status_code == 200, r.text
    (pred,) = r.json()["predictions"]
    assert len(pred["probs"]) == 4
    assert sum(pred["probs"]) == pytest.approx(1.0, abs=1e-5)
    assert pred["label"]["index"] == int(np.argmax(pred["probs"]))
    assert pred["label"]["name"] == ["cat", "dog", "bird", "fish"][pred["label"]["index"]]
    assert r.headers["X-Model-Name"] == "resnet50_extra"
    assert r.headers["X-Model-Version"] == "1"
    assert len(r.headers["X-Model-Sha256"]) == 64


def test_scalar_changes_the_answer(client: TestClient) -> None:
    a = _post_image(client, "resnet50_extra", image_bytes(), scalar="0").json()["predictions"][0]["probs"]
    b = _post_image(client, "resnet50_extra", image_bytes(), scalar="50").json()["predictions"][0]["probs"]
    assert not np.allclose(a, b)


@pytest.mark.parametrize("name", ["resnet50_dual", "resnet50_extra_dual"])
def test_two_heads_in_every_format(client: TestClient, name: str) -> None:
    scalar = "0.25" if "extra" in name else None
    multi = _post_image(client, name, image_bytes(), scalar=scalar).json()["predictions"][0]
    inst = {"image": {"b64": base64.b64encode(image_bytes()).decode()}}
    if scalar:
        inst["scalar"] = 0.25
    js = client.post(f"/v1/models/{name}/predict", json={"instances": [inst]}).json()["predictions"][0]
    for pred in (multi, js):
        assert len(pred["probs"]) == 4 and len(pred["features"]) == 1000
    np.testing.assert_allclose(multi["probs"], js["probs"], atol=1e-6)
    np.testing.assert_allclose(multi["features"], js["features"], atol=1e-5)


def test_json_instances_keep_order(client: TestClient) -> None:
    imgs = [image_bytes(seed=s) for s in range(3)]
    scalars = [0.1, 2.0, -1.0]
    body = {"instances": [{"image": {"b64": base64.b64encode(i).decode()}, "scalar": s} for i, s in zip(imgs, scalars)]}
    batch = client.post("/v1/models/resnet50_extra/predict", json=body).json()["predictions"]
    single = [_post_image(client, "resnet50_extra", i, scalar=str(s)).json()["predictions"][0] for i, s in zip(imgs, scalars)]
    assert len(batch) == 3
    for b, s in zip(batch, single):
        np.testing.assert_allclose(b["probs"], s["probs"], atol=1e-5)


@pytest.mark.parametrize("size", [(37, 23), (64, 48), (17, 91)])
def test_unet_png_mask_has_input_size(client: TestClient, size: tuple[int, int]) -> None:
    width, height = size
    r = _post_image(client, "unet", image_bytes(width, height), headers={"Accept": "image/png"})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    mask = Image.open(io.BytesIO(r.content))
    assert mask.size == (width, height)
    assert set(np.unique(np.asarray(mask))) <= {0, 100, 200}


def test_unet_json_mask(client: TestClient) -> None:
    r = _post_image(client, "unet", image_bytes(33, 21))
    pred = r.json()["predictions"][0]
    assert (pred["width"], pred["height"]) == (33, 21)
    mask = Image.open(io.BytesIO(base64.b64decode(pred["mask"])))
    assert mask.size == (33, 21)
    assert set(pred["class_fractions"]) == {"bg", "a", "b"}
    assert sum(pred["class_fractions"].values()) == pytest.approx(1.0)


def _reference(name: str, data: bytes, scalar: float | None = None):
    """The net's own forward on the same preprocessed input: what the service must equal."""
    from app.runtime.preprocess import Preprocessor
    from app.store.model_config import PreprocessConfig

    cfg = small_configs()[name]
    net = build_small(name)
    pre = Preprocessor(PreprocessConfig(**cfg["preprocess"]), default_resize=None)
    raw = decode_image(data, color_mode="RGB", max_pixels=10**8)
    x = pre(raw).unsqueeze(0)
    with torch.inference_mode():
        if scalar is None:
            return net(x), raw.shape[1:]
        return net(x, torch.tensor([scalar])), raw.shape[1:]


@pytest.mark.parametrize("name", ["resnet50_head", "resnet50_extra", "resnet50_dual", "resnet50_extra_dual"])
def test_reference_forward_classifiers(client: TestClient, name: str) -> None:
    data = image_bytes(50, 40, seed=3)
    scalar = 0.75 if "extra" in name else None
    out, _ = _reference(name, data, scalar)
    ref_probs = (out[0] if isinstance(out, tuple) else out)[0].numpy()
    pred = _post_image(client, name, data, scalar=None if scalar is None else str(scalar)).json()["predictions"][0]
    np.testing.assert_allclose(pred["probs"], ref_probs, atol=1e-5)
    if isinstance(out, tuple):
        np.testing.assert_allclose(pred["features"], out[1][0].numpy(), atol=1e-4)


def test_reference_forward_unet(client: TestClient) -> None:
    data = image_bytes(45, 31, seed=4)
    logits, (h, w) = _reference("unet", data)
    logits = torch.nn.functional.interpolate(logits, size=(h, w), mode="bilinear")
    ref = np.asarray([0, 100, 200], dtype=np.uint8)[logits[0].argmax(0).numpy()]
    r = _post_image(client, "unet", data, headers={"Accept": "image/png"})
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(r.content))), ref)


def test_health(client: TestClient) -> None:
    assert client.get("/v2/health/live").json() == {"live": True}
    r = client.get("/v2/health/ready")
    assert r.status_code == 200 and r.json() == {"ready": True}


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    for path in ("/v1/models", "/v1/models/{name}", "/v1/models/{name}/predict", "/v2/health/live", "/v2/health/ready"):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "application/json"} <= set(body)
    assert client.get("/docs").status_code == 200
