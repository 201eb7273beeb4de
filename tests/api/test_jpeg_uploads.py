"""Photo-sized JPEG uploads through the whole app: the fast path (draft decode) by default, batched
requests equal to lone ones, masks at the upload's full size."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from app.config import Settings
from app.main import create_app
from support.models import build_small, small_configs, write_small_store


def _photo(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:480, 0:640].astype(np.float32)
    img = np.stack([100 + 80 * np.sin(xx / rng.uniform(30, 90) + c) * np.cos(yy / rng.uniform(30, 90))
                    for c in range(3)], axis=-1) + rng.normal(0, 6, (480, 640, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _reference(name: str, data: bytes, *, draft: bool) -> np.ndarray:
    """Pillow decode (drafted or not), Pillow bilinear resize to 32 x 32, mean/std, the net."""
    pre = small_configs()[name]["preprocess"]
    img = Image.open(io.BytesIO(data))
    if draft:
        img.draft(None, (32, 32))
    x = torch.from_numpy(np.asarray(img.convert("RGB").resize((32, 32), Image.Resampling.BILINEAR)) / 255.0)
    x = ((x.permute(2, 0, 1).float() - torch.tensor(pre["mean"]).view(3, 1, 1))
         / torch.tensor(pre["std"]).view(3, 1, 1))
    with torch.inference_mode():
        return build_small(name)(x.unsqueeze(0), torch.tensor([[0.5]]))[0].numpy()


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Any:
    store = write_small_store(tmp_path_factory.mktemp("store"), ["resnet50_extra", "unet"])
    with TestClient(create_app(Settings(store=Path(store), warmup=False))) as c:
        yield c


def _post(client: TestClient, name: str, data: bytes) -> Any:
    r = client.post(f"/v1/models/{name}/predict", files={"image": ("p.jpg", data, "image/jpeg")},
                    data={"scalar": "0.5"} if name != "unet" else None)
    assert r.status_code == 200, r.text
    return r.json()["predictions"][0]


def test_a_photo_takes_the_fast_path_by_default(client: TestClient) -> None:
    data = _photo(1)
    probs = np.asarray(_post(client, "resnet50_extra", data)["probs"])
    np.testing.assert_allclose(probs, _reference("resnet50_extra", data, draft=True), atol=1e-5)
    np.testing.assert_allclose(probs, _reference("resnet50_extra", data, draft=False), atol=0.02)


def test_concurrent_photos_batch_and_answer_as_alone(client: TestClient) -> None:
    datas = [_photo(s) for s in range(6)]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda d: _post(client, "resnet50_extra", d)["probs"], datas))
    for data, probs in zip(datas, together):
        np.testing.assert_allclose(probs, _reference("resnet50_extra", data, draft=True), atol=1e-5)


def test_a_drafted_photo_gets_its_mask_at_the_full_upload_size(client: TestClient) -> None:
    # scale 0.5 with an explicit resample: decoded at 1/2 (320 x 240), answered at 640 x 480
    pred = _post(client, "unet", _photo(2))
    assert (pred["width"], pred["height"]) == (640, 480)
