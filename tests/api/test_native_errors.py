"""Every bad input of the native API: its status code and ``{"error": ...}`` body, never a 500."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from support.models import image_bytes, write_small_store


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    root = write_small_store(tmp_path_factory.mktemp("errstore"), ["unet", "resnet50_extra", "resnet50_head"])
    broken = root / "broken"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.pth").write_bytes(b"this is not a checkpoint")
    (broken / "model.toml").write_text('architecture = "unet"\n[arguments]\nbase_channels = 4\n')
    with TestClient(create_app(Settings(store=root, warmup=False, max_instances=3))) as c:
        yield c


def _err(r, status: int, *needles: str) -> None:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) >= {"error"} and "detail" not in body
    for needle in needles:
        assert needle.lower() in body["error"].lower(), body["error"]


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def predict(client: TestClient, name: str = "resnet50_extra", **kw):
    return client.post(f"/v1/models/{name}/predict", **kw)


def test_unknown_model_404(client: TestClient) -> None:
    _err(client.get("/v1/models/nope"), 404, "nope")
    _err(predict(client, "nope", files={"image": ("a.png", image_bytes())}), 404, "nope")


def test_unknown_route_404(client: TestClient) -> None:
    _err(client.get("/v1/nothing/here"), 404, "no route")


def test_not_ready_503_with_reason(client: TestClient) -> None:
    _err(predict(client, "broken", files={"image": ("a.png", image_bytes())}), 503, "not ready", "checkpoint")
    info = client.get("/v1/models/broken").json()
    assert info["ready"] is False and "checkpoint" in info["reason"].lower()
    # Default readiness: the other models serve, so one broken model does not take the replica out.
    assert client.get("/v2/health/ready").json() == {"ready": True}
    settings = client.app.state.settings
    client.app.state.settings = settings.model_copy(update={"strict_readiness": True})
    try:  # strict readiness: every model must serve
        _err(client.get("/v2/health/ready"), 503, "broken")
    finally:
        client.app.state.settings = settings
    assert client.get("/v2/health/live").status_code == 200


def test_missing_image_422(client: TestClient) -> None:
    _err(predict(client, data={"scalar": "0.5"}, files={"other": ("a.png", image_bytes())}), 422, "other")
    _err(predict(client, data={"scalar": "0.5"}, files={"dummy": ("", b"")}), 422)


def test_missing_image_field_only_scalar(client: TestClient) -> None:
    r = client.post("/v1/models/resnet50_extra/predict", data={"scalar": "0.5"},
                    headers={"content-type": "multipart/form-data; boundary=xyz"}, content=b"--xyz--\r\n")
    _err(r, 422, "image")


def test_missing_scalar_422(client: TestClient) -> None:
    _err(predict(client, files={"image": ("a.png", image_bytes())}), 422, "missing scalar")


@pytest.mark.parametrize("value", ["nan", "inf", "-Infinity", "1e309"])
def test_non_finite_scalar_422(client: TestClient, value: str) -> None:
    _err(predict(client, files={"image": ("a.png", image_bytes())}, data={"scalar": value}), 422, "finite")


@pytest.mark.parametrize("value", ["abc", "", "1,2", "true"])
def test_bad_scalar_422(client: TestClient, value: str) -> None:
    _err(predict(client, files={"image": ("a.png", image_bytes())}, data={"scalar": value}), 422, "scalar")


def test_scalar_for_model_without_one_422(client: TestClient) -> None:
    _err(predict(client, "resnet50_head", files={"image": ("a.png", image_bytes())}, data={"scalar": "1"}), 422, "no scalar")


def test_undecodable_image_422(client: TestClient) -> None:
    _err(predict(client, files={"image": ("a.png", b"\x00garbage" * 50)}, data={"scalar": "1"}), 422, "decoded")
    _err(predict(client, files={"image": ("a.png", b"")}, data={"scalar": "1"}), 422, "empty")


def test_truncated_image_422(client: TestClient) -> None:
    data = image_bytes(64, 64, fmt="PNG")
    _err(predict(client, files={"image": ("a.png", data[: len(data) // 2])}, data={"scalar": "1"}), 422, "truncated")
    jpeg = image_bytes(64, 64, fmt="JPEG")
    _err(predict(client, files={"image": ("a.jpg", jpeg[: len(jpeg) // 2])}, data={"scalar": "1"}), 422, "truncated")


def test_unsupported_image_format_415(client: TestClient) -> None:
    _err(predict(client, files={"image": ("a.gif", image_bytes(fmt="GIF"))}, data={"scalar": "1"}), 415, "GIF")
    _err(predict(client, files={"image": ("a.bmp", image_bytes(fmt="BMP"))}, data={"scalar": "1"}), 415, "BMP")


def test_unsupported_content_type_415(client: TestClient) -> None:
    _err(predict(client, content=b"hello", headers={"content-type": "text/plain"}), 415, "text/plain")
    _err(predict(client, content=b"hello"), 415, "content type")


def test_wrong_field_names_422(client: TestClient) -> None:
    _err(predict(client, files={"img": ("a.png", image_bytes())}, data={"scalar": "1"}), 422, "img")
    _err(predict(client, files={"image": ("a.png", image_bytes())}, data={"scalar": "1", "extra": "x"}), 422, "extra")
    two = [("image", ("a.png", image_bytes())), ("image", ("b.png", image_bytes()))]
    _err(predict(client, files=two, data={"scalar": "1"}), 422, "exactly one")


def test_json_errors_422(client: TestClient) -> None:
    good = {"image": {"b64": _b64(image_bytes())}, "scalar": 0.5}
    _err(predict(client, content=b"{not json", headers={"content-type": "application/json"}), 422, "json")
    _err(predict(client, json={"inputs": []}), 422, "instances")
    _err(predict(client, json={"instances": [{"img": good["image"], "scalar": 1}]}), 422, "img")
    _err(predict(client, json={"instances": [{"image": {"b64": "!!!"}, "scalar": 1}]}), 422, "base64")
    _err(predict(client, json={"instances": [{"image": good["image"]}]}), 422, "missing scalar")
    _err(predict(client, json={"instances": [{"image": good["image"], "scalar": "x"}]}), 422, "scalar")
    _err(predict(client, json={"instances": [{"image": good["image"], "scalar": True}]}), 422, "scalar")
    _err(predict(client, json={"instances": []}), 422, "no instances")
    nan = b'{"instances": [{"image": {"b64": "%s"}, "scalar": NaN}]}' % _b64(image_bytes()).encode()
    _err(predict(client, content=nan, headers={"content-type": "application/json"}), 422, "NaN")
    inf = b'{"instances": [{"image": {"b64": "%s"}, "scalar": Infinity}]}' % _b64(image_bytes()).encode()
    _err(predict(client, content=inf, headers={"content-type": "application/json"}), 422, "Infinity")


def test_too_many_instances_413(client: TestClient) -> None:
    inst = {"image": {"b64": _b64(image_bytes())}, "scalar": 0.5}
    _err(predict(client, json={"instances": [inst] * 4}), 413, "limit is 3")


def test_json_ok_after_errors(client: TestClient) -> None:
    inst = {"image": {"b64": _b64(image_bytes())}, "scalar": 0.5}
    assert predict(client, json={"instances": [inst] * 3}).status_code == 200
