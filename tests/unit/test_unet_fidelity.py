"""The U-Net served as the reference predict script runs it: same input, same mask, same PNG.

A ``unet`` model with ``scale`` and no explicit ``resample`` must give, pixel for pixel, the mask
that milesial/Pytorch-UNet's ``predict.py`` gives (tests/support/unet_reference.py restates it).
A random net's masks are nearly constant and would prove nothing, so each net here gets a fitted
output layer: its 1x1 ``outc`` is solved by least squares on the net's own last features to
classify pixels by colour (red shapes, blue shapes, background), so the masks follow the picture,
are balanced, and have many boundaries where a different resize would flip pixels.
"""

from __future__ import annotations

import io
from functools import cache
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.runtime.images import decode_image
from app.runtime.preprocess import Preprocessor
from app.runtime.segmenter import SegmenterRuntime
from app.nets.unet import UNet
from app.store.model_config import ModelConfig, PreprocessConfig
from support.unet_reference import reference_input, reference_mask_image, reference_predict

SIZES = [(37, 53), (61, 45)]  # (width, height): odd, so int(scale * side) rounds down
SCALES = [0.5, 1.0]
MODELS: dict[str, dict[str, Any]] = {
    "two_class": {"n_classes": 2, "bilinear": False, "mask_values": [0, 1]},
    "one_class": {"n_classes": 1, "bilinear": False, "mask_values": [0, 1]},
    "three_class_bilinear": {"n_classes": 3, "bilinear": True,
                             "mask_values": [[0, 0, 0], [255, 0, 0], [0, 0, 255]]},
}
RED, BLUE = (205, 45, 40), (45, 60, 215)


def scene(width: int, height: int, seed: int) -> np.ndarray:
    """A uint8 (H, W, 3) picture: a noisy gradient with red and blue discs and rectangles."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float64)
    base = 60 + 70 * (xx / width) + 40 * (yy / height)
    img = np.stack([base, base + 25, base - 10], axis=-1) + rng.normal(0, 10, (height, width, 3))
    area, shapes = 0.0, 0
    while area < 0.45 * width * height or shapes < 2:
        colour = np.array(RED if shapes % 2 == 0 else BLUE) + rng.normal(0, 12, 3)
        shapes += 1
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        r = rng.uniform(0.12, 0.3) * min(width, height)
        if rng.random() < 0.5:
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        else:
            inside = (abs(xx - cx) < r) & (abs(yy - cy) < 0.7 * r)
        img[inside] = colour + rng.normal(0, 10, (int(inside.sum()), 3))
        area += inside.sum()
    return np.clip(img, 0, 255).round().astype(np.uint8)


def colour_classes(x: torch.Tensor) -> torch.Tensor:
    """Per-pixel class of an input batch in [0, 1]: 0 background, 1 red, 2 blue."""
    r, g, b = (x[:, i] * 255 for i in range(3))
    labels = torch.zeros_like(r, dtype=torch.long)
    labels[(r > g + 60) & (r > b + 60)] = 1
    labels[(b > r + 60) & (b > g + 40)] = 2
    return labels


@cache
def fitted_net(kind: str) -> UNet:
    """A narrow U-Net whose output layer is fitted to classify pixels by colour."""
    spec = MODELS[kind]
    torch.manual_seed(7)
    net = UNet(3, spec["n_classes"], bilinear=spec["bilinear"], base_channels=16).eval()
    features: list[torch.Tensor] = []
    hook = net.outc.register_forward_hook(lambda _m, inputs, _out: features.append(inputs[0]))
    inputs = [reference_input(Image.fromarray(scene(w, h, seed)), scale)
              for seed, (w, h) in enumerate([(48, 40), (40, 56), (35, 33), (64, 48)], start=100)
              for scale in SCALES]
    with torch.no_grad():
        for x in inputs:
            net(x)
    hook.remove()
    feats = torch.cat([f.permute(0, 2, 3, 1).reshape(-1, f.shape[1]) for f in features]).double()
    labels = torch.cat([colour_classes(x).reshape(-1) for x in inputs])
    if spec["n_classes"] == 1:
        targets = (labels > 0).double().unsqueeze(1) * 2 - 1  # logit sign = foreground
    elif spec["n_classes"] == 2:
        targets = torch.nn.functional.one_hot((labels > 0).long(), 2).double()
    else:
        targets = torch.nn.functional.one_hot(labels, 3).double()
    design = torch.cat([feats, torch.ones(len(feats), 1, dtype=torch.float64)], dim=1)
    solution = torch.linalg.lstsq(design, targets).solution  # (features + 1, classes)
    with torch.no_grad():
        net.outc.conv.weight.copy_(solution[:-1].T.reshape(net.outc.conv.weight.shape).float())
        net.outc.conv.bias.copy_(solution[-1].float())
    return net


def runtime(kind: str, scale: float, **preprocess: Any) -> SegmenterRuntime:
    spec = MODELS[kind]
    config = ModelConfig.model_validate({
        "architecture": "unet",
        "arguments": {"n_channels": 3, "n_classes": spec["n_classes"], "bilinear": spec["bilinear"],
                      "base_channels": 16},
        "runtime": {"device": "cpu"},
        "preprocess": {"scale": scale, **preprocess},
        "postprocess": {"mask_values": spec["mask_values"]},
    })
    return SegmenterRuntime(name=kind, version="1", config=config, model=fitted_net(kind),
                            device=torch.device("cpu"), sha256="0" * 64)


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def serve(rt: SegmenterRuntime, data: bytes) -> tuple[torch.Tensor, dict[str, np.ndarray]]:
    """What app/service.py does for one image: decode, preprocess, make_item, run_batch."""
    raw = decode_image(data, color_mode="RGB", max_pixels=40_000_000, device=torch.device("cpu"))
    image = rt.preprocess(raw)
    item = rt.make_item(image, size=(int(raw.shape[1]), int(raw.shape[2])), scalar=None, outputs=None)
    (result,) = rt.run_batch([item])
    assert not isinstance(result, BaseException)
    return image, result


def decoded_png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("kind", list(MODELS))
def test_service_mask_equals_the_reference(kind: str, scale: float, size: tuple[int, int]) -> None:
    rt = runtime(kind, scale)
    assert rt.preprocess.reference
    net = fitted_net(kind)
    for seed in (1, 2):
        data = png(scene(*size, seed=seed))
        full_img = Image.open(io.BytesIO(data))
        image, result = serve(rt, data)

        # the network sees the very same tensor: values and layout
        expected_input = reference_input(full_img, scale)[0]
        assert torch.equal(image, expected_input)
        assert image.stride() == expected_input.stride()

        ref = reference_predict(net, full_img, scale=scale)
        mask = result["mask"]
        assert mask.shape == (size[1], size[0])
        np.testing.assert_array_equal(mask, ref)
        # balanced, content-driven masks: every class holds a fair share of the pixels, and the
        # mask mostly agrees with the colours it was fitted to
        counts = np.bincount(ref.ravel(), minlength=max(MODELS[kind]["n_classes"], 2))
        assert counts.min() >= 0.05 * ref.size, counts
        truth = colour_classes(reference_input(full_img, 1.0))[0].numpy()
        truth = truth if MODELS[kind]["n_classes"] == 3 else (truth > 0)
        assert (ref == truth).mean() > 0.6

        # the PNG the native API answers is the image the reference writes
        file = rt.native_file([result], "image/png")
        assert file is not None
        served, expected = decoded_png(file[0]), reference_mask_image(ref, MODELS[kind]["mask_values"])
        assert served.mode == expected.mode == ("1" if MODELS[kind]["mask_values"] == [0, 1] else "RGB")
        assert served.size == expected.size
        np.testing.assert_array_equal(np.asarray(served), np.asarray(expected))


def test_the_comparison_has_teeth() -> None:
    """An explicit ``resample = "bilinear"`` is not the reference's Pillow bicubic resize: at scale 0.5
    its masks differ from the reference's, so the test above can fail."""
    differing = 0
    for size in SIZES:
        for seed in (1, 2):
            data = png(scene(*size, seed=seed))
            ref = reference_predict(fitted_net("two_class"), Image.open(io.BytesIO(data)), scale=0.5)
            _, result = serve(runtime("two_class", 0.5, resample="bilinear"), data)
            differing += int((result["mask"] != ref).sum())
    assert differing > 0


@pytest.mark.parametrize("mask_values,mode", [([0, 255], "L"), ([0, 1], "1"), ([[0, 0, 0], [9, 200, 30]], "RGB")])
@pytest.mark.parametrize("kind", ["one_class", "two_class"])
def test_mask_png_is_written_as_the_reference_writes_it(kind: str, mask_values: list[Any], mode: str) -> None:
    rt = runtime(kind, 0.5)
    rt.mask_values = mask_values
    data = png(scene(61, 45, seed=3))
    _, result = serve(rt, data)
    ref = reference_predict(fitted_net(kind), Image.open(io.BytesIO(data)), scale=0.5)
    expected = reference_mask_image(ref, mask_values)
    for payload in (rt.native_file([result], "image/png")[0],  # type: ignore[index]
                    __import__("base64").b64decode(rt.format_native(result)["mask"])):
        served = decoded_png(payload)
        assert served.mode == expected.mode == mode
        np.testing.assert_array_equal(np.asarray(served), np.asarray(expected))


@pytest.mark.parametrize("values", [(0,), (0, 1), (1,)], ids=["all-black", "zeros-and-ones", "all-ones"])
@pytest.mark.parametrize("scale", SCALES)
def test_images_of_only_zeros_and_ones_are_fed_as_the_reference_feeds_them(
    values: tuple[int, ...], scale: float
) -> None:
    """The reference divides by 255 only when some pixel is above 1; an image of 0s and 1s (or all
    black) goes in as 0.0 and 1.0. The service mirrors that in the reference mode."""
    rng = np.random.default_rng(0)
    array = rng.choice(np.array(values, dtype=np.uint8), size=(45, 61, 3))
    data = png(array)
    full_img = Image.open(io.BytesIO(data))
    rt = runtime("two_class", scale)
    image, result = serve(rt, data)
    expected = reference_input(full_img, scale)[0]
    assert torch.equal(image, expected)
    assert float(image.max()) == float(max(values))  # not divided
    np.testing.assert_array_equal(result["mask"], reference_predict(fitted_net("two_class"), full_img, scale=scale))


def test_pixels_above_one_are_divided_exactly_as_the_reference_divides_them() -> None:
    """float32 division by 255 rounds every uint8 value as the reference's float64 division cast to
    float32 (multiplying by 1/255 would not)."""
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    image = torch.from_numpy(np.stack([levels] * 3))
    out = Preprocessor(PreprocessConfig(scale=1.0), default_resize=None)(image)
    reference = torch.from_numpy(np.stack([levels] * 3) / 255.0).float()
    assert torch.equal(out, reference)


def test_grey_models_resize_with_pillow_too() -> None:
    array = scene(37, 53, seed=4)[:, :, 0]
    pre = Preprocessor(PreprocessConfig(scale=0.5, color_mode="L"), default_resize=None)
    out = pre(torch.from_numpy(array).unsqueeze(0))
    assert torch.equal(out, reference_input(Image.fromarray(array), 0.5)[0])


def test_an_explicit_resample_is_pillows_resize_within_a_grey_level_of_torchvision() -> None:
    """An explicit ``resample`` resizes with Pillow's antialiased filter of that name on the host (no
    torch in the decode threads) and always divides by 255; torchvision's uint8 kernels were ported
    from Pillow's, so the result stays within one grey level of torchvision's resize."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    array = scene(37, 53, seed=5)
    image = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    cases = [("bicubic", InterpolationMode.BICUBIC, Image.Resampling.BICUBIC),
             ("bilinear", InterpolationMode.BILINEAR, Image.Resampling.BILINEAR)]
    for resample, mode, pil_mode in cases:
        pre = Preprocessor(PreprocessConfig(scale=0.5, resample=resample), default_resize=None)
        assert not pre.reference
        pillow = np.asarray(Image.fromarray(array).resize((18, 26), pil_mode))
        torch.testing.assert_close(pre(image), torch.from_numpy(pillow).permute(2, 0, 1).float() / 255)
        torchvision = F.resize(image, [26, 18], interpolation=mode, antialias=True).float() / 255
        torch.testing.assert_close(pre(image), torchvision, atol=1 / 255 + 1e-6, rtol=0)
    # no scale: resample unset means bilinear, as before
    pre = Preprocessor(PreprocessConfig(resize=(20, 10)), default_resize=None)
    assert not pre.reference
    expected = F.resize(image, [20, 10], interpolation=InterpolationMode.BILINEAR, antialias=True).float() / 255
    torch.testing.assert_close(pre(image), expected, atol=1 / 255 + 1e-6, rtol=0)


@pytest.mark.parametrize("size", [(7, 5), (64, 48), (3, 300)])
def test_nearest_keeps_torchvisions_index_rule(size: tuple[int, int]) -> None:
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    image = torch.from_numpy(scene(37, 53, seed=7)).permute(2, 0, 1).contiguous()
    pre = Preprocessor(PreprocessConfig(resize=size, resample="nearest"), default_resize=None)
    expected = F.resize(image, list(size), interpolation=InterpolationMode.NEAREST).float() / 255
    torch.testing.assert_close(pre(image), expected)


def test_mean_and_std_apply_after_the_reference_scaling() -> None:
    image = torch.from_numpy(scene(37, 53, seed=6)).permute(2, 0, 1).contiguous()
    cfg = PreprocessConfig(scale=0.5, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 2.0))
    out = Preprocessor(cfg, default_resize=None)(image)
    plain = Preprocessor(PreprocessConfig(scale=0.5), default_resize=None)(image)
    mean, std = torch.tensor(cfg.mean).view(3, 1, 1), torch.tensor(cfg.std).view(3, 1, 1)
    torch.testing.assert_close(out, (plain - mean) / std)
