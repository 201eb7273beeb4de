"""The trained demo models' data generator, int8 weights and committed checkpoints (no training)."""

from __future__ import annotations

import colorsys
import hashlib
import shutil
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch

from app import nets
from app.demo.data import cls_label, make_sample
from app.demo.train import (
    EXTRA_RADIUS,
    SAMPLE_SEED,
    SAMPLE_SIZE,
    SAMPLES,
    TrainSettings,
    build_parser,
    confusion,
    iou_from_confusion,
    seg_target,
)
from app.demo.trained import (
    CHECKPOINT_FILES,
    CLS_LABELS,
    COLOURS,
    DEMO_DIR,
    EXTRA_NAME,
    HUE_SPREAD,
    HUES,
    MANIFEST,
    SHAPES,
    UNET_NAME,
    DemoModelsError,
    dequantize_state_dict,
    quantize_state_dict,
    trained_configs,
    write_trained_models,
)
from app.loading.checkpoint import CheckpointSpec, load_checkpoint
from app.runtime.preprocess import Preprocessor
from app.store.model_config import PreprocessConfig, parse_model_config


# ---- the generator -------------------------------------------------------------------------------


def test_samples_are_a_pure_function_of_seed_and_index() -> None:
    a = make_sample(3, 17, size=96)
    make_sample(3, 16, size=96)  # other draws in between change nothing
    b = make_sample(3, 17, size=96)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert [s.to_dict() for s in a.shapes] == [s.to_dict() for s in b.shapes]
    assert not np.array_equal(a.image, make_sample(3, 18, size=96).image)
    assert not np.array_equal(a.image, make_sample(4, 17, size=96).image)


def test_images_masks_and_shape_facts_agree() -> None:
    for index in range(12):
        sample = make_sample(11, index, size=80, n_shapes=(1, 3))
        assert sample.image.shape == (80, 80, 3) and sample.image.dtype == np.uint8
        assert sample.mask.shape == (80, 80) and set(np.unique(sample.mask)) <= {0, 1, 2, 3}
        assert 1 <= len(sample.shapes) <= 3
        visible = {SHAPES[v - 1] for v in np.unique(sample.mask) if v}
        assert visible <= {s.kind for s in sample.shapes}
        assert sample.image.std() > 5  # textured and noisy, not flat
    sample = make_sample(5, 0, size=128, kinds=("square", "triangle"), colours=("blue", "red"))
    assert [(s.kind, s.colour) for s in sample.shapes] == [("square", "blue"), ("triangle", "red")]


@pytest.mark.parametrize("colour", COLOURS)
def test_a_shape_has_the_hue_of_its_colour_family(colour: str) -> None:
    sample = make_sample(9, COLOURS.index(colour), size=128, kinds=("disc",), colours=(colour,),
                         radius=EXTRA_RADIUS)
    (shape,) = sample.shapes
    cx, cy = (int(v) for v in shape.center)
    patch = sample.image[cy - 3 : cy + 4, cx - 3 : cx + 4].reshape(-1, 3).mean(axis=0) / 255
    hue, saturation, _ = colorsys.rgb_to_hsv(*patch)
    distance = min(abs(hue - HUES[colour]), 1 - abs(hue - HUES[colour]))
    assert distance < HUE_SPREAD + 0.04 and saturation > 0.4
    assert sample.mask[cy, cx] == SHAPES.index("disc") + 1
    x0, y0, x1, y1 = shape.bbox
    assert sample.mask[y0:y1, x0:x1].any() and not sample.mask[:y0].any() and not sample.mask[y1:].any()


def test_classifier_labels_are_colour_times_scalar_side() -> None:
    assert len(CLS_LABELS) == 2 * len(COLOURS)
    for colour in COLOURS:
        assert CLS_LABELS[cls_label(colour, 0.2)] == f"{colour} / low"
        assert CLS_LABELS[cls_label(colour, 0.5)] == f"{colour} / low"
        assert CLS_LABELS[cls_label(colour, 0.51)] == f"{colour} / high"


def test_iou_from_confusion() -> None:
    truth = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    pred = np.array([[1, 1], [0, 1]], dtype=np.uint8)
    iou = iou_from_confusion(confusion(pred, truth, 2))
    assert iou[1] == pytest.approx(2 / 4) and iou[0] == pytest.approx(0.0)
    assert set(np.unique(seg_target(np.array([0, 1, 2, 3])))) == {0, 1}


def test_cli_defaults() -> None:
    args = build_parser().parse_args([])
    assert args.out == DEMO_DIR and args.threads == TrainSettings().threads == 1
    assert build_parser().parse_args(["--only", "unet", "--only", "samples"]).only == ["unet", "samples"]


# ---- int8 weights --------------------------------------------------------------------------------


def test_int8_round_trip_is_close_and_keeps_small_tensors_exact() -> None:
    torch.manual_seed(0)
    model = nets.get_net("resnet50_extra", num_classes=6, n_extra=1, backbone="resnet18")
    state = model.state_dict()
    packed = quantize_state_dict(state)
    restored = dequantize_state_dict(packed)
    assert restored.keys() == state.keys()
    big = "net.layer3.0.conv1.weight"
    assert packed["tensors"][big]["q"].dtype == torch.int8
    scale = packed["tensors"][big]["scale"].view(-1, 1, 1, 1)
    assert ((restored[big] - state[big]).abs() <= scale / 2 + 1e-7).all()
    for exact in ("fc_add.weight", "net.bn1.running_var", "net.bn1.num_batches_tracked"):
        assert torch.equal(restored[exact], state[exact]), exact
    assert dequantize_state_dict(quantize_state_dict(restored))[big].equal(restored[big])
    with pytest.raises(DemoModelsError):
        dequantize_state_dict({"format": "something else"})


# ---- the committed checkpoints -------------------------------------------------------------------


def test_manifest_records_the_committed_files() -> None:
    manifest = tomllib.loads((DEMO_DIR / MANIFEST).read_text())
    total = 0
    for name, file in CHECKPOINT_FILES.items():
        data = (DEMO_DIR / file).read_bytes()
        total += len(data)
        assert manifest[name]["file"] == file
        assert hashlib.sha256(data).hexdigest() == manifest[name]["sha256"]
    assert total < 20_000_000
    assert manifest[UNET_NAME]["metrics"]["mean_iou"] >= 0.9
    assert manifest[EXTRA_NAME]["metrics"]["accuracy"] >= 0.9


def test_trained_configs_are_valid_model_tomls() -> None:
    for name, config in trained_configs().items():
        parsed = parse_model_config(config, source=name)
        assert parsed.checkpoint.format == "state_dict"


@pytest.fixture(scope="module")
def trained_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    assert write_trained_models(root) == [UNET_NAME, EXTRA_NAME]
    return root


def _load(root: Path, name: str) -> tuple[torch.nn.Module, Preprocessor]:
    config = tomllib.loads((root / name / "model.toml").read_text())
    path = root / name / "1" / "model.pth"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == config["checkpoint"]["sha256"]
    spec = CheckpointSpec(path, format="state_dict", sha256=config["checkpoint"]["sha256"])
    model = load_checkpoint(config["architecture"], config["arguments"], spec).model
    return model, Preprocessor(PreprocessConfig(**config["preprocess"]), default_resize=None)


def test_written_store_serves_what_the_models_learned(trained_store: Path) -> None:
    assert write_trained_models(trained_store) == []  # present: left alone
    unet, pre = _load(trained_store, UNET_NAME)
    stem, _, kinds, colours, index = SAMPLES[3]
    sample = make_sample(SAMPLE_SEED, index, size=SAMPLE_SIZE, kinds=kinds, colours=colours)
    x = pre(torch.from_numpy(sample.image).permute(2, 0, 1).contiguous())[None]
    with torch.inference_mode():
        logits = torch.nn.functional.interpolate(unet(x), size=sample.mask.shape, mode="bilinear")
    pred = logits[0].argmax(0).numpy().astype(np.uint8)
    iou = iou_from_confusion(confusion(pred, seg_target(sample.mask), 2))
    assert iou[1] > 0.85, f"{stem}: shape IoU {iou[1]:.3f}"

    extra, pre = _load(trained_store, EXTRA_NAME)
    for stem, _, kinds, colours, index in SAMPLES[:3]:
        sample = make_sample(SAMPLE_SEED, index, size=SAMPLE_SIZE, kinds=kinds, colours=colours,
                             radius=EXTRA_RADIUS)
        x = pre(torch.from_numpy(sample.image).permute(2, 0, 1).contiguous())[None]
        with torch.inference_mode():
            low, high = (int(extra(x, torch.tensor([s])).argmax()) for s in (0.1, 0.9))
        assert (CLS_LABELS[low], CLS_LABELS[high]) == (f"{colours[0]} / low", f"{colours[0]} / high"), stem


def test_an_altered_committed_file_is_refused(tmp_path: Path) -> None:
    demo = tmp_path / "demo"
    shutil.copytree(DEMO_DIR, demo)
    data = bytearray((demo / CHECKPOINT_FILES[UNET_NAME]).read_bytes())
    data[-100] ^= 0xFF
    (demo / CHECKPOINT_FILES[UNET_NAME]).write_bytes(bytes(data))
    with pytest.raises(DemoModelsError, match="sha256"):
        write_trained_models(tmp_path / "store", demo_dir=demo)
    assert not (tmp_path / "store" / UNET_NAME / "model.toml").exists()
    (demo / MANIFEST).unlink()
    with pytest.raises(DemoModelsError, match="missing"):
        write_trained_models(tmp_path / "store", demo_dir=demo)
