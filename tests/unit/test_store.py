"""The store: discovery, model.toml validation, versions, and staying inside the root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from app.errors import ConfigError, InvalidInput, ModelNotFound, ServiceError
from app.store import ModelStore, load_model_config
from app.store.writer import atomic_write_bytes, to_toml


def _model(root: Path, name: str, toml: str, versions: tuple[str, ...] = ("1",)) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "model.toml").write_text(toml)
    for v in versions:
        (folder / v).mkdir()
        (folder / v / "model.pth").write_bytes(b"x")
    return folder


UNET = 'architecture = "unet"\n[arguments]\nbase_channels = 4\n'


def test_discovers_models_and_newest_version(tmp_path: Path) -> None:
    _model(tmp_path, "a", UNET, ("1", "2", "10"))
    _model(tmp_path, "b", UNET)
    (tmp_path / "not-a-model").mkdir()
    store = ModelStore(tmp_path)
    assert store.names() == ["a", "b"]
    entry = store.entry("a")
    assert entry.versions == ["1", "2", "10"]
    assert entry.resolve_version() == "10"
    assert entry.resolve_version("2") == "2"
    assert store.checkpoint_path(entry, "2") == (tmp_path / "a" / "2" / "model.pth").resolve()


def test_pinned_version(tmp_path: Path) -> None:
    _model(tmp_path, "a", 'architecture = "unet"\nversion = 1\n', ("1", "2"))
    assert ModelStore(tmp_path).entry("a").resolve_version() == "1"


def test_missing_version_is_an_error(tmp_path: Path) -> None:
    _model(tmp_path, "a", UNET, ("1",))
    with pytest.raises(ServiceError, match="no version 7"):
        ModelStore(tmp_path).entry("a").resolve_version("7")


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('architecture = "vgg"\n', "unknown architecture 'vgg'"),
        ('architecture = "unet"\n[arguments]\nn_clases = 2\n', "unknown arguments for unet: n_clases"),
        ('architecture = "unet"\n[runtime]\ndevice = "tpu"\n', "runtime.device"),
        ('architecture = "unet"\n[runtime]\nmax_batch_size = 0\n', "runtime.max_batch_size"),
        ('architecture = "unet"\n[checkpoint]\nformat = "onnx"\n', "checkpoint.format"),
        ('architecture = "unet"\n[checkpoint]\nfile = "../../etc/passwd"\n', "checkpoint.file"),
        ('architecture = "unet"\n[preprocess]\nscale = 0.5\nresize = [2, 2]\n', "either resize or scale"),
        ('architecture = "unet"\ncolour = 1\n', "colour"),
        ("architecture = \n", "not valid TOML"),
        ("[arguments]\n", "architecture"),
    ],
)
def test_config_errors_name_file_and_key(tmp_path: Path, toml: str, needle: str) -> None:
    path = tmp_path / "model.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_model_config(path)
    assert str(path) in info.value.message
    assert needle in info.value.message


def test_invalid_config_is_listed_with_its_error(tmp_path: Path) -> None:
    _model(tmp_path, "bad", 'architecture = "vgg"\n')
    entry = ModelStore(tmp_path).entry("bad")
    assert entry.config is None and "unknown architecture" in (entry.error or "")


def test_names_and_versions_validated(tmp_path: Path) -> None:
    store = ModelStore(tmp_path)
    for name in ("..", "../x", "/etc", "a/b", "%2e%2e"):
        with pytest.raises(InvalidInput):
            store.entry(name)
    with pytest.raises(ModelNotFound):
        store.entry("absent")
    with pytest.raises(InvalidInput):
        store.version_dir("absent", "1a")


def test_symlink_leaving_the_store_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "store", tmp_path / "outside"
    _model(root, "a", UNET, ())
    (outside / "1").mkdir(parents=True)
    (outside / "1" / "model.pth").write_bytes(b"secret")
    os.symlink(outside / "1", root / "a" / "1")
    store = ModelStore(root)
    entry = store.entry("a")
    assert entry.versions == [] and "outside the model store" in entry.warnings[0]  # never served
    with pytest.raises(InvalidInput, match="outside the model store"):
        store.checkpoint_path(entry, "1")
    with pytest.raises(InvalidInput, match="outside the model store"):
        entry.resolve_version("1")


def test_single_checkpoint_found_without_file_key(tmp_path: Path) -> None:
    folder = _model(tmp_path, "a", 'architecture = "unet"\n', ("1",))
    store = ModelStore(tmp_path)
    assert store.checkpoint_path(store.entry("a"), "1").name == "model.pth"
    (folder / "1" / "other.pt").write_bytes(b"y")
    with pytest.raises(ConfigError, match="exactly one checkpoint"):
        store.checkpoint_path(store.entry("a"), "1")


def test_atomic_write_and_toml_round_trip(tmp_path: Path) -> None:
    doc = {"architecture": "unet", "arguments": {"base_channels": 4, "bilinear": True},
           "preprocess": {"mean": [0.5], "resample": "bicubic"}}
    target = tmp_path / "m" / "model.toml"
    atomic_write_bytes(target, to_toml(doc).encode())
    config = load_model_config(target)
    assert config.arguments == {"base_channels": 4, "bilinear": True}
    assert config.preprocess.mean == (0.5,)
    assert [p.name for p in target.parent.iterdir()] == ["model.toml"]  # no temp file left behind
