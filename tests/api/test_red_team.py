"""Regression tests for what an outside red-team pass found: each was a 500, a lost model or an
unbounded cost before; each is now a 4xx (or a 200 where the input is legitimate)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from app.store.writer import to_toml
from support.models import build_small, image_bytes, small_configs, write_small_store

TOKEN = "redteam-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OCTET = {**AUTH, "content-type": "application/octet-stream"}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_small_store(tmp_path_factory.mktemp("red"), ["unet", "resnet50_extra", "resnet50_head"])


@pytest.fixture(scope="module")
def client(store: Path) -> Iterator[TestClient]:
    settings = Settings(store=store, warmup=False, admin_token=TOKEN, max_request_pixels=3_000_000)
    with TestClient(create_app(settings)) as c:
        yield c
        lines = [ln for ln in c.get("/metrics").text.splitlines()
                 if ln.startswith("modserve_requests_total{") and 'code="5' in ln]
        assert lines == []


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), "gray").save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("size", [(1, 1), (2, 2), (3, 3), (2, 1), (1, 100), (3, 2)])
def test_tiny_images_are_served(client: TestClient, size: tuple[int, int]) -> None:
    r = client.post("/v1/models/unet/predict", files={"image": ("a.png", _png(*size))})
    assert r.status_code == 200, r.text
    assert (r.json()["predictions"][0]["width"], r.json()["predictions"][0]["height"]) == size


@pytest.mark.parametrize(
    "inputs",
    [
        [{"name": "image", "datatype": ["FP32"], "shape": [1], "data": [1]}],
        [{"name": "image", "datatype": {}, "shape": [1], "data": [1]}],
        [{"name": "image", "datatype": "FP32", "shape": [0, 1099511627776, 1099511627776], "data": []}],
    ],
)
def test_malformed_v2_tensors_are_400(client: TestClient, inputs: list[dict[str, Any]]) -> None:
    r = client.post("/v2/models/unet/infer", json={"inputs": inputs})
    assert r.status_code == 400 and "error" in r.json()


def test_v2_timeout_out_of_range_is_400(client: TestClient) -> None:
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 3, 4, 4], "data": [0.0] * 48}],
            "parameters": {"timeout": int("1" + "0" * 400)}}
    assert client.post("/v2/models/unet/infer", json=body).status_code == 400


@pytest.mark.parametrize("version", ["%C2%B2", "%E2%91%A0", "%D9%A1", "01", "1.0"])
def test_non_ascii_or_non_canonical_versions_are_404(client: TestClient, version: str) -> None:
    for path in (f"/v2/models/unet/versions/{version}/ready", f"/v2/models/unet/versions/{version}"):
        r = client.get(path)
        assert r.status_code == 404 and "error" in r.json(), (path, r.status_code)
    assert client.get("/v2/models/unet/versions/1/ready").status_code == 200


def test_nul_in_a_static_path_is_404(client: TestClient) -> None:
    assert client.get("/static/app.js%00").status_code == 404


def test_huge_integer_scalar_is_422(client: TestClient) -> None:
    b64 = base64.b64encode(image_bytes()).decode()
    doc = '{"instances": [{"image": {"b64": "%s"}, "scalar": 1%s}]}' % (b64, "0" * 400)
    r = client.post("/v1/models/resnet50_extra/predict", content=doc, headers={"content-type": "application/json"})
    assert r.status_code == 422 and "finite" in r.json()["error"]
    r = client.post("/v1/models/resnet50_extra/predict", files={"image": ("a.png", image_bytes())}, data={"scalar": "1_0"})
    assert r.status_code == 422


def test_request_pixel_total_is_bounded(client: TestClient) -> None:
    big = base64.b64encode(_png(1000, 1000)).decode()  # 1 MP each, 3 MP allowed per request here
    four = {"instances": [{"image": {"b64": big}}] * 4}
    r = client.post("/v1/models/resnet50_head/predict", json=four)
    assert r.status_code == 413 and "in total" in r.json()["error"]
    two = {"instances": [{"image": {"b64": big}}] * 2}
    assert client.post("/v1/models/resnet50_head/predict", json=two).status_code == 200


@pytest.mark.parametrize(
    ("arguments", "status", "needle"),
    [({"num_classes": 10**9}, 422, "GiB"), ({"num_classes": 10**12}, 422, "GiB"), ({"base_channels": 100000}, 422, "GiB")],
)
def test_architectures_too_large_for_the_host_are_refused_without_allocating(
    client: TestClient, store: Path, arguments: dict[str, Any], status: int, needle: str
) -> None:
    name = "resnet50_head" if "num_classes" in arguments else "unet"
    cfg = small_configs()[name]
    cfg = {**cfg, "arguments": {**cfg["arguments"], **arguments}}
    buf = io.BytesIO()
    torch.save(build_small(name).state_dict(), buf)
    r = client.put(f"/admin/models/huge_{name}/versions/1", headers=AUTH,
                   files={"checkpoint": ("m.pt", buf.getvalue()), "model_toml": (None, to_toml(cfg))})
    assert r.status_code == status and needle in r.json()["error"], r.text
    assert ".staging" not in r.json()["error"]
    assert not (store / f"huge_{name}").exists()


def _ckpt(name: str = "unet", seed: int = 3) -> bytes:
    buf = io.BytesIO()
    torch.save(build_small(name, seed=seed).state_dict(), buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"version": "42"}, "pins version 42"),
        ({"checkpoint": {"file": "other.pth"}}, "does not fit version 1"),
        ({"checkpoint": {"file": "model.pth", "sha256": "0" * 64}}, "table"),
        ({"checkpoint": {"file": "model.pth", "sha256": {"1": "0" * 64}}}, "for version 1"),
    ],
)
def test_an_uploaded_model_toml_must_fit_the_versions_on_disk(
    client: TestClient, store: Path, change: dict[str, Any], needle: str
) -> None:
    cfg = {**small_configs()["unet"], **change}
    before = (store / "unet" / "model.toml").read_bytes()
    r = client.put("/admin/models/unet/versions/7", headers=AUTH,
                   files={"checkpoint": ("model.pth", _ckpt()), "model_toml": (None, to_toml(cfg))})
    assert r.status_code == 422 and needle in r.json()["error"], r.text
    assert (store / "unet" / "model.toml").read_bytes() == before and not (store / "unet" / "7").exists()


@pytest.mark.parametrize(
    ("toml_tail", "needle"),
    [('\n[checkpoint]\nfile = "a\\u0000b.pt"\n', "checkpoint.file"),
     ('\n[checkpoint]\nfile = "' + "a" * 300 + '.pt"\n', "checkpoint.file"),
     ("\ny = " + "[" * 5000 + "]" * 5000 + "\n", "nested too deeply")],
)
def test_odd_uploaded_toml_is_422(client: TestClient, toml_tail: str, needle: str) -> None:
    text = to_toml(small_configs()["unet"]).replace('[checkpoint]\nfile = "model.pth"\n', "") + toml_tail
    r = client.put("/admin/models/oddtoml/versions/1", headers=AUTH,
                   files={"checkpoint": ("model.pth", _ckpt()), "model_toml": (None, text)})
    assert r.status_code == 422 and needle in r.json()["error"], r.text


def test_deep_json_on_the_admin_load_is_400(client: TestClient) -> None:
    r = client.post("/v2/repository/models/unet/load", headers=AUTH, content="[" * 100_000)
    assert r.status_code == 400


def test_a_symlinked_staging_folder_is_never_written_through(client: TestClient, store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    staging = store / ".staging"
    if staging.exists():
        staging.rmdir()
    staging.symlink_to(outside)
    r = client.put("/admin/models/unet/versions/8", headers=OCTET, content=_ckpt(seed=8))
    assert r.status_code == 200, r.text
    assert list(outside.iterdir()) == [] and staging.is_dir() and not staging.is_symlink()


def test_large_same_size_images_do_not_share_a_forward(store: Path) -> None:
    """Images near the per-image limit run one per forward, so memory does not grow with the batch."""
    cfg = {**small_configs()["unet"]}
    cfg["preprocess"] = {**cfg["preprocess"], "max_processed_pixels": 40_000}
    cfg["runtime"] = {**cfg["runtime"], "max_batch_size": 4, "max_batch_delay_ms": 200.0, "adaptive_batch_delay": False}
    root = store.parent / "solo-store"
    from app.store.writer import write_model

    write_model(root, "seg", cfg, build_small("unet").state_dict())
    big = {"image": {"b64": base64.b64encode(image_bytes(360, 360)).decode()}}   # 180x180 = 32,400 px
    small = {"image": {"b64": base64.b64encode(image_bytes(60, 60)).decode()}}   # 30x30 = 900 px
    with TestClient(create_app(Settings(store=root, warmup=False))) as c:
        assert c.post("/v1/models/seg/predict", json={"instances": [big] * 3}).status_code == 200
        assert c.post("/v1/models/seg/predict", json={"instances": [small] * 3}).status_code == 200
        sizes = c.get("/v1/models/seg").json()["batching"]["batch_sizes"]
    assert sizes == {"1": 3, "3": 1}, sizes


# ---- second pass ------------------------------------------------------------------------------


def _head_ckpt(classes: int, seed: int = 0) -> bytes:
    from app import nets

    torch.manual_seed(seed)
    net = nets.get_net("resnet50_head", num_classes=classes, backbone="resnet18")
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    return buf.getvalue()


def _head_toml(classes: int, **post: Any) -> str:
    cfg = {**small_configs()["resnet50_head"]}
    cfg["arguments"] = {**cfg["arguments"], "num_classes": classes}
    cfg["postprocess"] = {"labels": [f"c{i}" for i in range(classes)], **post}
    return to_toml(cfg)


def test_an_uploaded_model_toml_may_not_strand_the_existing_versions(client: TestClient, store: Path) -> None:
    before = (store / "resnet50_head" / "model.toml").read_bytes()
    r = client.put("/admin/models/resnet50_head/versions/5", headers=AUTH,  # 5 classes: version 1 has 4
                   files={"checkpoint": ("model.pt", _head_ckpt(5)), "model_toml": (None, _head_toml(5))})
    assert r.status_code == 422 and "would stop loading" in r.json()["error"], r.text
    assert (store / "resnet50_head" / "model.toml").read_bytes() == before
    assert not (store / "resnet50_head" / "5").exists()


@pytest.mark.parametrize(
    ("post", "needle"),
    [({"labels": ["only-one"]}, "labels has 1 names"), ({"mask_values": [0, 100, 300]}, "0..255")],
)
def test_configuration_mistakes_in_an_uploaded_model_toml_are_422_at_upload(
    client: TestClient, store: Path, post: dict[str, Any], needle: str
) -> None:
    cfg = {**small_configs()["unet" if "mask_values" in post else "resnet50_head"]}
    cfg["postprocess"] = {**cfg.get("postprocess", {}), **post}
    name = "unet" if "mask_values" in post else "resnet50_head"
    r = client.put(f"/admin/models/fresh_{name}/versions/1", headers=AUTH,
                   files={"checkpoint": ("m", _ckpt(name)), "model_toml": (None, to_toml(cfg))})
    assert r.status_code == 422 and needle in r.json()["error"], r.text
    assert not (store / f"fresh_{name}").exists()


def test_concurrent_uploads_creating_one_model_are_serialised(store: Path) -> None:
    import asyncio

    import httpx

    app = create_app(Settings(store=store, warmup=False, admin_token=TOKEN))

    async def main() -> list[int]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as c:
                rs = await asyncio.gather(*(
                    c.put(f"/admin/models/racer/versions/{v}", headers=AUTH,
                          files={"checkpoint": ("m.pt", _head_ckpt(k)), "model_toml": (None, _head_toml(k))})
                    for v, k in (("1", 4), ("2", 5))
                ))
                load = await c.post("/v2/repository/models/racer/load", headers=AUTH)
        assert load.status_code == 200, load.text
        return [r.status_code for r in rs]

    assert sorted(asyncio.run(main())) == [200, 422]  # the second sees the first's model.toml and versions


def test_load_errors_show_no_absolute_store_paths(client: TestClient, store: Path) -> None:
    (store / "broken").mkdir()
    (store / "broken" / "model.toml").write_text(to_toml(small_configs()["unet"]))
    (store / "broken" / "1").mkdir()
    (store / "broken" / "1" / "model.pth").write_bytes(b"not a checkpoint")
    r = client.post("/v2/repository/models/broken/load", headers=AUTH)
    assert r.status_code == 422 and "broken/1/model.pth" in r.json()["error"]
    for body in (r.text, client.get("/v1/models/broken").text, client.post("/v2/repository/index").text):
        assert str(store) not in body and str(store.resolve()) not in body


def test_health_probes_answer_head(client: TestClient) -> None:
    for path in ("/v2/health/live", "/v2/health/ready"):
        r = client.head(path)
        assert r.status_code == 200 and r.content == b""
