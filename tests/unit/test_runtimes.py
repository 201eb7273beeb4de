"""Runtime families on their own: specs, heads, native formats, configuration checked at load."""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from app.errors import ConfigError, InvalidModelOutput, PayloadTooLarge
from app.runtime.classifier import ClassifierRuntime
from app.runtime.factory import RUNTIMES
from app.runtime.segmenter import SegmenterRuntime
from app.store.model_config import ModelConfig
from support.models import build_small, small_configs


def _runtime(name: str, **changes: Any) -> Any:
    raw = {**small_configs()[name]}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value}
    config = ModelConfig.model_validate(raw)
    cls = RUNTIMES[{"unet": "segmentation"}.get(name, "classification")]
    return cls(name=name, version="1", config=config, model=build_small(name), device=torch.device("cpu"),
               sha256="0" * 64)


def test_families_are_looked_up_by_the_net_registry_task() -> None:
    from app.runtime.tensor import TensorRuntime

    assert RUNTIMES == {"classification": ClassifierRuntime, "segmentation": SegmenterRuntime, "tensor": TensorRuntime}


def test_classifier_specs_come_from_the_net_spec() -> None:
    rt = _runtime("resnet50_extra_dual")
    assert [s.to_dict() for s in rt.input_specs()] == [
        {"name": "image", "datatype": "FP32", "shape": [-1, 3, 32, 32]},
        {"name": "scalar", "datatype": "FP32", "shape": [-1]},
    ]
    assert [s.to_dict() for s in rt.output_specs()] == [
        {"name": "probs", "datatype": "FP32", "shape": [-1, 4]},
        {"name": "features", "datatype": "FP32", "shape": [-1, 1000]},
    ]


def test_classifier_forward_heads_and_native_format() -> None:
    rt = _runtime("resnet50_extra_dual", postprocess={"output_names": ["p", "f"]})
    item = rt.dummy_item()
    (result,) = rt.run_batch([item])
    assert set(result) == {"p", "f"} and result["p"].shape == (4,) and result["f"].shape == (1000,)
    native = rt.format_native(result)
    assert native["label"] == {"index": int(np.argmax(result["p"])), "name": rt.labels[int(np.argmax(result["p"]))]}
    assert rt.native_file([result], "image/png") is None  # a classifier always answers JSON
    only = rt.make_item(item.image, size=(5, 7), scalar=item.scalar, outputs=frozenset({"f"}))
    assert only.orig_size is None and set(rt.run_batch([only])[0]) == {"f"}


def test_segmenter_answers_at_the_image_size_and_as_png() -> None:
    rt = _runtime("unet")
    image = torch.zeros(3, 8, 10)
    item = rt.make_item(image, size=(16, 20), scalar=None, outputs=None)
    (result,) = rt.run_batch([item])
    assert result["mask"].shape == (16, 20) and result["logits"].shape == (3, 16, 20)
    native = rt.format_native(result)
    assert (native["width"], native["height"]) == (20, 16)
    assert sum(native["class_fractions"].values()) == pytest.approx(1.0)
    png = Image.open(io.BytesIO(base64.b64decode(native["mask"])))
    assert png.size == (20, 16) and set(np.unique(np.asarray(png))) <= {0, 100, 200}
    file = rt.native_file([result], "image/png, */*")
    assert file is not None and file[1] == "image/png" and file[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert rt.native_file([result, result], "image/png") is None  # several instances: JSON
    assert rt.describe() == {"labels": ["bg", "a", "b"], "mask_values": [0, 100, 200]}


@pytest.mark.parametrize(
    ("name", "changes", "needle"),
    [
        ("unet", {"postprocess": {"mask_values": [0, 255]}}, "mask_values has 2 entries"),
        ("unet", {"postprocess": {"labels": ["a", "b"]}}, "labels has 2 names"),
        ("resnet50_head", {"postprocess": {"labels": ["a"]}}, "labels has 1 names"),
        ("resnet50_dual", {"postprocess": {"output_names": ["only"]}}, "output_names has 1"),
    ],
)
def test_configuration_mistakes_are_found_at_load(name: str, changes: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        _runtime(name, **changes)


def test_non_finite_weights_fail_the_smoke_test() -> None:
    rt = _runtime("resnet50_head")
    with torch.no_grad():
        next(rt.model.parameters()).fill_(float("nan"))
    with pytest.raises(InvalidModelOutput, match="not finite"):
        rt.smoke_test()


def test_processed_pixel_limit_is_derived_and_enforced() -> None:
    rt = _runtime("unet")
    rt.set_pixel_limit(ceiling=10**12)
    assert rt.max_processed_pixels is not None and rt.max_processed_pixels >= 64 * 64
    rt.max_processed_pixels = 100
    rt.check_image_size(20, 20)  # scale 0.5: 10x10 = 100 pixels
    with pytest.raises(PayloadTooLarge, match="at most 100 pixels"):
        rt.check_image_size(22, 22)
    assert rt.needs_own_batch(torch.zeros(3, 10, 10)) and not rt.needs_own_batch(torch.zeros(3, 2, 2))
    classifier = _runtime("resnet50_head")
    classifier.set_pixel_limit(ceiling=10**12)
    assert classifier.max_processed_pixels is None  # a fixed input size costs the same for any image


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a host without CUDA")
def test_a_cuda_device_on_a_host_without_one_is_a_configuration_error() -> None:
    from app.devices import resolve_device

    for device in ("cuda", "cuda:1"):
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device(device)
    assert resolve_device("auto").type == "cpu"
