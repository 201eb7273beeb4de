"""The two JPEG paths against a reference forward: exact (full decode, then the resize) and fast
(Pillow's draft, DCT-domain scaling, then the exact resize); both through the service's own code
(decode_upload in a decode thread's place, then make_item and run_batch on the inference side)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.runtime.classifier import ClassifierRuntime
from app.runtime.images import load_pixels, open_image
from app.runtime.preprocess import Preprocessor
from app.runtime.uploads import decode_upload
from app.store.model_config import ModelConfig, PreprocessConfig
from support.models import build_small, small_configs

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def photo(width: int = 640, height: int = 480, seed: int = 0, orientation: int | None = None) -> bytes:
    """A photo-like JPEG (gradients, blobs, sensor noise), quality 90, optionally EXIF-rotated."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([128 + 60 * (rng.uniform(-1, 1) * xx / width + rng.uniform(-1, 1) * yy / height)
                    for _ in range(3)], axis=-1)
    for _ in range(5):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, width), rng.uniform(0.05, 0.3) * max(height, width)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-80, 80, 3)
    img += rng.normal(0, 6, img.shape)
    pil = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    pil.save(buf, format="JPEG", quality=90, exif=exif.tobytes())
    return buf.getvalue()


def runtime(fast: bool, name: str = "resnet50_extra") -> ClassifierRuntime:
    rt = ClassifierRuntime(name=name, version="1", config=ModelConfig.model_validate(small_configs()[name]),
                           model=build_small(name), device=torch.device("cpu"), sha256="0" * 64)
    rt.preprocess.fast_jpeg = fast
    return rt


def served(rt: ClassifierRuntime, datas: list[bytes], scalar: float = 0.25) -> list[np.ndarray]:
    """What the service computes: decode + resize per upload, one batch, normalised at once."""
    items = []
    for data in datas:
        upload = decode_upload(data, rt.preprocess, rt.device, max_pixels=10**8)
        items.append(rt.make_item(upload.image, size=upload.size, scalar=torch.tensor([scalar]), outputs=None))
    results = rt.run_batch(items)
    return [r["probs"] for r in results]  # type: ignore[index]


def reference(data: bytes, size: tuple[int, int], *, draft: bool, scalar: float = 0.25) -> np.ndarray:
    """Independent of the service's code: Pillow decode (optionally drafted), Pillow bilinear
    resize, divide by 255, mean/std, the net's own forward."""
    img = Image.open(io.BytesIO(data))
    if draft:
        img.draft(None, (size[1], size[0]))
    pixels = np.asarray(img.convert("RGB").resize((size[1], size[0]), Image.Resampling.BILINEAR))
    x = torch.from_numpy(pixels.astype(np.float32) / 255).permute(2, 0, 1)
    x = (x - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    with torch.inference_mode():
        return build_small("resnet50_extra")(x.unsqueeze(0), torch.tensor([[scalar]]))[0].numpy()


def test_the_exact_path_equals_the_reference_forward() -> None:
    datas = [photo(seed=s) for s in range(3)]
    for data, probs in zip(datas, served(runtime(fast=False), datas)):
        np.testing.assert_allclose(probs, reference(data, (32, 32), draft=False), atol=1e-5)


def test_the_fast_path_equals_the_drafted_reference_and_differs_from_the_full_decode() -> None:
    datas = [photo(seed=s) for s in range(3)]
    for data, probs in zip(datas, served(runtime(fast=True), datas)):
        np.testing.assert_allclose(probs, reference(data, (32, 32), draft=True), atol=1e-5)
        full = reference(data, (32, 32), draft=False)
        assert not np.allclose(probs, full, atol=1e-7)  # the draft decode really ran
        np.testing.assert_allclose(probs, full, atol=0.02)  # ... and stays close to the full decode


def test_fast_is_the_default_except_for_the_unet_reference_preprocessing() -> None:
    assert Preprocessor(PreprocessConfig(resize=(64, 64)), default_resize=None).fast_jpeg
    reference_unet = Preprocessor(PreprocessConfig(scale=0.5), default_resize=None)
    assert reference_unet.reference and not reference_unet.fast_jpeg
    assert reference_unet.draft_size(480, 640) is None


@pytest.mark.parametrize("target,decoded", [((64, 64), (160, 120)), ((60, 60), (80, 60)), ((224, 224), (320, 240)),
                                            ((300, 300), (640, 480))])
def test_the_draft_never_decodes_below_the_model_input(target: tuple[int, int], decoded: tuple[int, int]) -> None:
    pre = Preprocessor(PreprocessConfig(resize=target), default_resize=None)
    pixels, full = load_pixels(open_image(photo(), max_pixels=10**8), color_mode="RGB", draft=pre.draft_size)
    assert full == (480, 640) and pixels.size == decoded  # 1/4, 1/8, 1/2, 1/1 of 640 x 480
    assert decode_upload(photo(), pre, torch.device("cpu"), max_pixels=10**8).image.shape == (3, *target)


def test_an_exif_rotated_jpeg_drafts_as_the_user_sees_it() -> None:
    data = photo(orientation=6)  # stored 640 x 480, seen 480 wide x 640 high
    pre = Preprocessor(PreprocessConfig(resize=(300, 100)), default_resize=None)
    pixels, full = load_pixels(open_image(data, max_pixels=10**8), color_mode="RGB", draft=pre.draft_size)
    assert full == (640, 480)
    assert pixels.size == (240, 320)  # 1/2, the most that keeps 320 >= 300 high (not drafted at all if the
    # request were not turned with the image: 100 wide x 300 high of a stored 640 x 480 allows only 1/1)
    upload = decode_upload(data, pre, torch.device("cpu"), max_pixels=10**8)
    assert upload.size == (640, 480) and upload.image.shape == (3, 300, 100)


def test_a_small_jpeg_is_decoded_in_full() -> None:
    pre = Preprocessor(PreprocessConfig(resize=(32, 32)), default_resize=None)
    pixels, _ = load_pixels(open_image(photo(50, 40), max_pixels=10**8), color_mode="RGB", draft=pre.draft_size)
    assert pixels.size == (50, 40)


def test_batched_normalisation_equals_one_image_at_a_time() -> None:
    rt = runtime(fast=True)
    datas = [photo(seed=s) for s in range(4)]
    together = served(rt, datas)
    for data, probs in zip(datas, together):
        (alone,) = served(rt, [data])
        np.testing.assert_allclose(probs, alone, atol=1e-6)


def test_uploads_and_preprocessed_tensors_never_share_a_batch() -> None:
    rt = runtime(fast=True)
    upload = decode_upload(photo(), rt.preprocess, rt.device, max_pixels=10**8)
    raw = rt.make_item(upload.image, size=upload.size, scalar=torch.tensor([0.5]), outputs=None)
    ready = rt.make_item(torch.zeros(3, 32, 32), size=None, scalar=torch.tensor([0.5]), outputs=None)
    assert raw.image.shape == ready.image.shape and raw.group_key() != ready.group_key()


def test_decoding_an_upload_runs_no_torch_kernel() -> None:
    """The decode threads stay off torch: no OpenMP team beside the forward's (views only)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    for fast in (False, True):
        pre = Preprocessor(PreprocessConfig(resize=(64, 64), mean=MEAN, std=STD), default_resize=None)
        pre.fast_jpeg = fast
        with Record() as seen:
            decode_upload(photo(), pre, torch.device("cpu"), max_pixels=10**8)
        assert set(seen.ops) <= {"aten.lift_fresh", "aten.permute"}, seen.ops  # from_numpy, a view


def test_trained_classifier_answers_the_same_on_both_paths(tmp_path: Path) -> None:
    """The trained demo classifier (40 x 40 input, so 640 x 480 JPEGs decode at 1/8) on its kind of
    photo: the same label on both paths, probabilities within 0.02."""
    from app.demo.data import make_sample
    from app.demo.trained import write_trained_models
    from bench.workload import load_net

    write_trained_models(tmp_path)
    net = load_net(tmp_path, "shapes_extra", "cpu")
    rt = ClassifierRuntime(name="shapes_extra", version="1", config=net.config, model=net.model,
                           device=torch.device("cpu"), sha256="0" * 64)
    for index in range(4):
        sample = Image.fromarray(make_sample(11, index, size=480, n_shapes=1).image).resize((640, 480))
        buf = io.BytesIO()
        sample.save(buf, format="JPEG", quality=90)
        outs = []
        for fast in (False, True):
            rt.preprocess.fast_jpeg = fast
            outs.append(served(rt, [buf.getvalue()], scalar=0.8)[0])
        assert outs[0].argmax() == outs[1].argmax()
        np.testing.assert_allclose(outs[0], outs[1], atol=0.02)


def test_the_device_batch_decode_logic_on_the_cpu() -> None:
    """What the GPU path runs (decode_on_device: one decode_jpeg call on a list, resize there, a
    corrupt JPEG failing only its own item), exercised with torchvision's CPU decoder; the GPU tier
    runs it on CUDA."""
    from app.runtime.images import open_image, oriented_size

    rt = runtime(fast=False)
    good = [photo(seed=s) for s in range(2)]
    broken = bytearray(photo(seed=9))
    table = broken.index(b"\xff\xc4")
    broken[table + 5: table + 25] = b"\xff" * 20  # a bogus Huffman table: Pillow's header check passes it
    broken = bytes(broken)
    items = []
    for data in (good[0], broken, good[1]):
        size = oriented_size(open_image(data, max_pixels=10**8))
        placeholder = torch.empty((3, 32, 32), dtype=torch.uint8, device="meta")
        item = rt.make_item(placeholder, size=size, scalar=torch.tensor([0.25]), outputs=None)
        item.encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        items.append(item)
    results = rt.run_batch(items)
    assert isinstance(results[1], Exception) and "could not be decoded" in str(results[1])
    for data, result in zip(good, (results[0], results[2])):
        assert isinstance(result, dict)
        np.testing.assert_allclose(result["probs"], reference(data, (32, 32), draft=False), atol=2e-3)


def test_model_toml_switches_the_draft_decode_per_model() -> None:
    from app.store.model_config import parse_model_config

    base = {"architecture": "resnet50_head", "preprocess": {"resize": [64, 64]}}
    on = parse_model_config(base, source="t")
    off = parse_model_config({**base, "preprocess": {"resize": [64, 64], "fast_jpeg": False}}, source="t")
    assert Preprocessor(on.preprocess, default_resize=None).fast_jpeg
    assert not Preprocessor(off.preprocess, default_resize=None).fast_jpeg
