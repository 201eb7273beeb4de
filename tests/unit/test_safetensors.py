""".safetensors state_dicts: loaded with safetensors (no pickle), for every architecture; inspect reads them."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from torch import nn

from app.errors import ChecksumMismatch, CheckpointCorrupt, CheckpointFormatMismatch, StateDictMismatch
from app.loading import CheckpointSpec, inspect_checkpoint, load_checkpoint
from app.loading.files import sniff_container
from app.nets import get_net, list_nets, net_spec
from app.store import ModelStore
from app.store.store import CHECKPOINT_SUFFIXES

SMALL: dict[str, dict[str, Any]] = {
    "unet": {"n_channels": 3, "n_classes": 2, "base_channels": 4},
    "resnet50_head": {"num_classes": 3, "backbone": "resnet18"},
    "resnet50_extra": {"num_classes": 3, "n_extra": 2, "backbone": "resnet18"},
    "resnet50_dual": {"num_classes": 3, "backbone": "resnet18"},
    "resnet50_extra_dual": {"num_classes": 3, "backbone": "resnet18"},
    "torchvision": {"name": "resnet18", "num_classes": 7},
    "torchvision_segmentation": {"name": "lraspp_mobilenet_v3_large", "num_classes": 2},
    "layer_stack": {"layers": [{"type": "Flatten"}, {"type": "Linear", "in_features": 3 * 16 * 16, "out_features": 4}],
                    "num_classes": 4},
    "tensor_stack": {"layers": [{"type": "Flatten"}, {"type": "Linear", "in_features": 3 * 16 * 16, "out_features": 4}],
                     "input_shape": [3, 16, 16], "num_outputs": 4},
}


def _outputs(model: nn.Module, arch: str, arguments: dict[str, Any]) -> tuple[torch.Tensor, ...]:
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        if "extra" in arch:
            out = model(x, torch.rand(2, arguments.get("n_extra", 1), generator=torch.Generator().manual_seed(6)))
        else:
            out = model(x)
    if isinstance(out, dict):
        out = out["out"]
    return out if isinstance(out, tuple) else (out,)


def test_every_registered_architecture_is_covered() -> None:
    from app.nets.declared import ExportedNet, PythonNet

    # exported_* load .pt2 programs and python_* whole models: neither takes a state_dict
    takes_state_dicts = {a for a in list_nets() if net_spec(a).root_class not in (ExportedNet, PythonNet)}
    assert set(SMALL) == takes_state_dicts
    assert ".safetensors" in CHECKPOINT_SUFFIXES


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_save_file_state_dict_loads_for_every_architecture(tmp_path: Path, arch: str) -> None:
    torch.manual_seed(3)
    users = get_net(arch, **SMALL[arch]).eval()
    for m in users.modules():  # non-trivial running stats
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    safetensors.torch.save_file(users.state_dict(), tmp_path / "model.safetensors")
    loaded = load_checkpoint(arch, SMALL[arch], CheckpointSpec(tmp_path / "model.safetensors"))
    assert loaded.kind == "state_dict" and not loaded.model.training
    for ours, theirs in zip(_outputs(loaded.model, arch, SMALL[arch]), _outputs(users, arch, SMALL[arch]), strict=True):
        assert (ours - theirs).abs().max().item() < 1e-5


def test_no_pickle_is_involved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    users = get_net("torchvision", **SMALL["torchvision"]).eval()
    safetensors.torch.save_file(users.state_dict(), tmp_path / "m.safetensors")

    def refuse(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("pickle/torch.load used for a safetensors file")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    loaded = load_checkpoint("torchvision", SMALL["torchvision"], CheckpointSpec(tmp_path / "m.safetensors"))
    assert torch.equal(loaded.model.fc.weight, users.fc.weight)
    assert inspect_checkpoint(tmp_path / "m.safetensors").container == "safetensors"


def test_dataparallel_prefix_metadata_and_digest(tmp_path: Path) -> None:
    users = get_net("unet", **SMALL["unet"]).eval()
    path = tmp_path / "dp.safetensors"
    safetensors.torch.save_file(nn.DataParallel(users).state_dict(), path,
                                metadata={"mask_values": "[0, 255]", "note": "trained on shapes"})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    loaded = load_checkpoint("unet", SMALL["unet"], CheckpointSpec(path, sha256=digest))
    assert loaded.dataparallel and loaded.sha256 == digest
    assert loaded.metadata == {"mask_values": [0, 255], "note": "trained on shapes"}
    with pytest.raises(ChecksumMismatch):
        load_checkpoint("unet", SMALL["unet"], CheckpointSpec(path, sha256="0" * 64))


def test_whole_model_format_and_mismatches_are_explained(tmp_path: Path) -> None:
    users = get_net("torchvision", **SMALL["torchvision"])
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file(users.state_dict(), path)
    with pytest.raises(CheckpointFormatMismatch) as info:
        load_checkpoint("torchvision", SMALL["torchvision"], CheckpointSpec(path, format="whole_model"))
    assert "safetensors" in info.value.message
    with pytest.raises(StateDictMismatch) as mismatch:
        load_checkpoint("torchvision", {"name": "resnet18", "num_classes": 3}, CheckpointSpec(path))
    assert "fc.weight" in mismatch.value.message


def test_truncated_and_fake_files_are_corrupt(tmp_path: Path) -> None:
    users = get_net("unet", **SMALL["unet"])
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(users.state_dict(), good)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[:-100])
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(b"definitely not a safetensors file")
    for path in (cut, fake):
        with pytest.raises(CheckpointCorrupt) as info:
            load_checkpoint("unet", SMALL["unet"], CheckpointSpec(path))
        assert "safetensors" in info.value.message
        with pytest.raises(CheckpointCorrupt):
            inspect_checkpoint(path)


def test_sniffed_by_content_whatever_the_suffix(tmp_path: Path) -> None:
    """A header length whose low byte is 0x80 (a pickle's PROTO opcode) is still safetensors."""
    for length in range(0, 400):
        data = safetensors.torch.save({"w": torch.zeros(2)}, metadata={"pad": "x" * length})
        if data[0] == 0x80:
            break
    else:  # pragma: no cover
        pytest.fail("no header length with a 0x80 low byte")
    path = tmp_path / "weights.bin"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        assert sniff_container(fh) == "safetensors"
    assert inspect_checkpoint(path).container == "safetensors"


def test_inspect_reads_the_header_and_fits(tmp_path: Path) -> None:
    users = get_net("resnet50_extra", **SMALL["resnet50_extra"])
    path = tmp_path / "x.safetensors"
    safetensors.torch.save_file(users.state_dict(), path, metadata={"epoch": "12"})
    facts = inspect_checkpoint(path)
    assert (facts.container, facts.kind, facts.globals_needed, facts.metadata) == (
        "safetensors", "state_dict", [], {"epoch": 12})
    assert facts.tensor_count == len(users.state_dict())
    assert facts.parameter_count == sum(t.numel() for t in users.state_dict().values())
    assert [(f.arch, f.kwargs) for f in facts.fits] == [  # same keys: the toml printed is the first's
        ("resnet50_extra", SMALL["resnet50_extra"]), ("resnet50_extra_dual", SMALL["resnet50_extra"])]
    assert "safetensors format" in facts.to_text()


def test_store_finds_a_safetensors_checkpoint(tmp_path: Path) -> None:
    from app.store.writer import to_toml

    folder = tmp_path / "store" / "tv"
    (folder / "1").mkdir(parents=True)
    safetensors.torch.save_file(get_net("torchvision", **SMALL["torchvision"]).state_dict(),
                                folder / "1" / "weights.safetensors")
    (folder / "model.toml").write_text(to_toml({"architecture": "torchvision", "arguments": SMALL["torchvision"]}))
    store = ModelStore(tmp_path / "store")
    entry = store.entry("tv")
    assert store.checkpoint_path(entry, "1").name == "weights.safetensors"
