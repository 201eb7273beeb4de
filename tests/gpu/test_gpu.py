"""What only a GPU can show: nvJPEG decode against Pillow's, reduced precision against fp32, a real
CUDA out-of-memory split and retried, two models on one device, memory released on reload."""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator
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
from app.runtime.classifier import ClassifierRuntime
from app.runtime.segmenter import SegmenterRuntime
from app.runtime.uploads import decode_upload
from app.store.model_config import ModelConfig
from app.store.writer import write_model
from support.models import build_small, small_configs

CUDA = torch.device("cuda:0")
TOKEN = "gpu-tier-admin-token-0123456789"


def photo(seed: int, width: int = 640, height: int = 480) -> bytes:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([110 + 70 * np.sin(xx / rng.uniform(20, 80) + c) * np.cos(yy / rng.uniform(20, 80))
                    for c in range(3)], axis=-1) + rng.normal(0, 5, (height, width, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def runtime(name: str, device: torch.device, **runtime_cfg: Any) -> Any:
    raw = {**small_configs()[name]}
    raw["runtime"] = {**raw["runtime"], "device": str(device), **runtime_cfg}
    cls = SegmenterRuntime if name == "unet" else ClassifierRuntime
    return cls(name=name, version="1", config=ModelConfig.model_validate(raw),
               model=build_small(name).to(device), device=device, sha256="0" * 64)


def serve(rt: Any, datas: list[bytes], scalar: float = 0.5) -> list[dict[str, np.ndarray]]:
    """The service's path for a batch of uploads: decode_upload per image, then one run_batch."""
    items = []
    for data in datas:
        up = decode_upload(data, rt.preprocess, rt.device, max_pixels=10**8)
        item = rt.make_item(up.image, size=up.size, scalar=torch.tensor([scalar]) if rt.takes_extra else None,
                            outputs=None)
        item.encoded = up.encoded
        items.append(item)
    results = rt.run_batch(items)
    assert not any(isinstance(r, BaseException) for r in results), results
    return results  # type: ignore[return-value]


@pytest.fixture(autouse=True)
def _clean_cuda() -> Iterator[None]:
    yield
    gc.collect()
    torch.cuda.empty_cache()


@pytest.mark.gpu
def test_gpu_jpeg_decode_equals_pillows_within_tolerance() -> None:
    from torchvision.io import decode_jpeg

    datas = [photo(s) for s in range(4)]
    on_gpu = decode_jpeg([torch.frombuffer(bytearray(d), dtype=torch.uint8) for d in datas], device=CUDA)
    for data, gpu in zip(datas, on_gpu):
        cpu = np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)
        diff = np.abs(gpu.permute(1, 2, 0).cpu().numpy().astype(np.int16) - cpu)
        assert diff.mean() < 1.0 and np.percentile(diff, 99.9) <= 8, (diff.mean(), diff.max())


@pytest.mark.gpu
def test_batched_gpu_decode_answers_as_the_cpu_path() -> None:
    datas = [photo(s) for s in range(5)]
    gpu_rt, cpu_rt = runtime("resnet50_extra", CUDA), runtime("resnet50_extra", torch.device("cpu"))
    cpu_rt.preprocess.fast_jpeg = False  # nvJPEG decodes in full: compare with the exact path
    for got, want in zip(serve(gpu_rt, datas), serve(cpu_rt, datas)):
        np.testing.assert_allclose(got["probs"], want["probs"], atol=0.02)
        assert got["probs"].argmax() == want["probs"].argmax()


@pytest.mark.gpu
def test_a_corrupt_jpeg_fails_only_its_own_item_in_a_gpu_batch() -> None:
    rt = runtime("resnet50_extra", CUDA)
    good, broken = photo(1), bytearray(photo(2))
    table = broken.index(b"\xff\xc4")
    broken[table + 5: table + 25] = b"\xff" * 20  # a bogus Huffman table: the header check passes it
    bad = bytes(broken)
    items = []
    for data in (good, bad, good):
        up = decode_upload(data, rt.preprocess, rt.device, max_pixels=10**8)
        item = rt.make_item(up.image, size=up.size, scalar=torch.tensor([0.5]), outputs=None)
        item.encoded = up.encoded
        items.append(item)
    results = rt.run_batch(items)
    assert isinstance(results[0], dict) and isinstance(results[2], dict)
    np.testing.assert_allclose(results[0]["probs"], results[2]["probs"], atol=1e-5)
    assert isinstance(results[1], BaseException) and "could not be decoded" in str(results[1])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_reduced_precision_stays_close_to_fp32(dtype: str) -> None:
    datas = [photo(s) for s in range(4)]
    full, low = runtime("resnet50_extra", CUDA), runtime("resnet50_extra", CUDA, dtype=dtype)
    for a, b in zip(serve(full, datas), serve(low, datas)):
        np.testing.assert_allclose(a["probs"], b["probs"], atol=0.03)
    ua, ub = runtime("unet", CUDA), runtime("unet", CUDA, dtype=dtype)
    for a, b in zip(serve(ua, datas[:2]), serve(ub, datas[:2])):
        assert (a["mask"] == b["mask"]).mean() > 0.97


@pytest.mark.gpu
def test_a_real_out_of_memory_splits_the_batch_and_retries() -> None:
    rt = runtime("unet", CUDA)
    rt.preprocess.fast_jpeg = False
    datas = [photo(s, 1536, 1536) for s in range(4)]  # scale 0.5: 768 x 768 through the U-Net each
    alone = [serve(rt, [d])[0]["mask"] for d in datas]
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    serve(rt, [datas[0]])
    one = torch.cuda.max_memory_allocated() - base
    total = torch.cuda.get_device_properties(CUDA).total_memory
    torch.cuda.empty_cache()
    ooms = torch.cuda.memory_stats().get("num_ooms", 0)
    torch.cuda.set_per_process_memory_fraction(min(1.0, (torch.cuda.memory_reserved() + 2.6 * one) / total), CUDA)
    try:
        results = serve(rt, datas)  # 4 do not fit, 2 + 2 do
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, CUDA)
    assert torch.cuda.memory_stats().get("num_ooms", 0) > ooms  # a real OOM happened ...
    for got, want in zip(results, alone):  # ... and every item was answered, as alone
        assert (got["mask"] == want).mean() > 0.999


@pytest.mark.gpu
def test_two_models_share_one_gpu_and_keep_their_cudnn_setting() -> None:
    classifier, unet = runtime("resnet50_extra", CUDA), runtime("unet", CUDA)
    datas = [photo(s) for s in range(3)]
    want_cls = [r["probs"] for r in serve(classifier, datas)]
    assert torch.backends.cudnn.benchmark  # fixed-size classifier: tuned per shape
    want_seg = [r["mask"] for r in serve(unet, datas)]
    assert not torch.backends.cudnn.benchmark  # any-size U-Net: no re-tuning per size

    def hammer(rt: Any, n: int) -> list[Any]:
        return [serve(rt, datas) for _ in range(n)]

    with ThreadPoolExecutor(2) as pool:
        a, b = pool.submit(hammer, classifier, 4), pool.submit(hammer, unet, 4)
        for round_ in a.result():
            for got, want in zip(round_, want_cls):
                np.testing.assert_allclose(got["probs"], want, atol=1e-4)
        for round_ in b.result():
            for got, want in zip(round_, want_seg):
                assert (got["mask"] == want).mean() > 0.999


@pytest.mark.gpu
def test_a_reload_gives_the_old_models_memory_back(tmp_path: Path) -> None:
    """Allocated bytes after each reload come back to the level of one loaded model (the old copy's
    weights are freed, not added up); after shutdown and release, to the level before the app."""
    store = tmp_path / "store"
    config = {**small_configs()["resnet50_extra"]}
    config["runtime"] = {**config["runtime"], "device": "cuda"}
    write_model(store, "resnet50_extra", config, build_small("resnet50_extra").state_dict())
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    app = create_app(Settings(store=store, device="cuda", warmup=True, admin_token=TOKEN))
    with TestClient(app) as client:
        files = {"image": ("p.jpg", photo(3), "image/jpeg")}
        assert client.post("/v1/models/resnet50_extra/predict", files=files, data={"scalar": "0.5"}).status_code == 200
        loaded = torch.cuda.memory_allocated()
        assert loaded > before
        for _ in range(3):
            r = client.post("/v2/repository/models/resnet50_extra/load", headers={"Authorization": f"Bearer {TOKEN}"})
            assert r.status_code == 200, r.text
            gc.collect()
            assert torch.cuda.memory_allocated() <= loaded
        assert client.post("/v1/models/resnet50_extra/predict", files=files, data={"scalar": "0.5"}).status_code == 200
    del app, client
    gc.collect()
    torch.cuda.empty_cache()
    assert torch.cuda.memory_allocated() <= before + (loaded - before) // 10  # at most cuDNN/cuBLAS handles
