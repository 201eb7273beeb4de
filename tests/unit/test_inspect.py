"""inspect_checkpoint: facts about each kind of checkpoint, fitting architectures, no code run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import ckpt_helpers as h  # noqa: E402

from app.errors import CheckpointCorrupt, CheckpointNotFound  # noqa: E402
from app.loading import ArchFit, CheckpointSpec, inspect_checkpoint, load_checkpoint  # noqa: E402
from app.loading.inspect import fit_architectures  # noqa: E402
from app.nets import get_net, net_spec  # noqa: E402

UNET = {"n_channels": 3, "n_classes": 3, "base_channels": 8, "bilinear": True}
EXTRA = {"num_classes": 4, "n_extra": 2, "backbone": "resnet18"}


def _fits(facts: Any) -> dict[str, dict[str, Any]]:
    return {f.arch: f.kwargs for f in facts.fits}


def test_state_dict_with_mask_values(tmp_path: Path) -> None:
    net = get_net("unet", **UNET)
    sd = net.state_dict()
    sd["mask_values"] = [0, 255]
    torch.save(sd, tmp_path / "u.pth")
    facts = inspect_checkpoint(tmp_path / "u.pth")
    assert (facts.kind, facts.container, facts.dataparallel, facts.wrapper_key) == (
        "state_dict",
        "zip",
        False,
        None,
    )
    assert facts.metadata == {"mask_values": [0, 255]}
    assert facts.tensor_count == len(net.state_dict())
    assert facts.parameter_count == sum(t.numel() for t in net.state_dict().values())
    assert facts.globals_needed == [] and facts.root_class is None
    assert _fits(facts) == {"unet": UNET}
    text = facts.to_text()
    assert (
        "mask_values=[0, 255]" in text
        and "unet(n_channels=3, n_classes=3, bilinear=True, base_channels=8)" in text
    )
    json.dumps(facts.to_dict())


def test_dataparallel_wrapped_state_dict(tmp_path: Path) -> None:
    net = get_net("resnet50_extra", **EXTRA)
    opt = torch.optim.Adam(net.parameters())
    torch.save(
        {"state_dict": nn.DataParallel(net).state_dict(), "epoch": 5, "optimizer": opt.state_dict()},
        tmp_path / "r.pt",
    )
    facts = inspect_checkpoint(tmp_path / "r.pt")
    assert (facts.kind, facts.wrapper_key, facts.dataparallel) == ("wrapped_state_dict", "state_dict", True)
    assert facts.metadata == {"epoch": 5} and facts.other_entries == ["optimizer"]
    # extra and extra_dual share their keys: both fit, with the inferred arguments
    assert _fits(facts) == {"resnet50_extra": EXTRA, "resnet50_extra_dual": EXTRA}
    assert "DataParallel 'module.' prefix: yes" in facts.to_text()


def test_whole_models_report_globals_and_fit(tmp_path: Path, user_files: Path) -> None:
    torch.save(nn.DataParallel(get_net("unet", **UNET)), tmp_path / "dp.pt")
    facts = inspect_checkpoint(tmp_path / "dp.pt")
    assert (facts.kind, facts.dataparallel, facts.root_class) == ("whole_model", True, "app.nets.unet.UNet")
    assert "torch.nn.parallel.data_parallel.DataParallel" in facts.globals_needed
    assert _fits(facts) == {"unet": UNET}
    facts = inspect_checkpoint(user_files / "model_main.pt")
    assert (facts.kind, facts.root_class, facts.suspicious_globals) == ("whole_model", "__main__.Model", [])
    assert {"__main__.Model", "torchvision.models.resnet.Bottleneck"} <= set(facts.globals_needed)
    expected = {"num_classes": 3, "n_extra": 2, "backbone": "resnet50"}
    assert _fits(facts) == {"resnet50_extra": expected, "resnet50_extra_dual": expected}
    facts = inspect_checkpoint(user_files / "unet_pkg.pt")
    assert facts.root_class == "unet.unet_model.UNet" and "unet.unet_parts.DoubleConv" in facts.globals_needed
    assert _fits(facts) == {"unet": {"n_channels": 3, "n_classes": 2, "bilinear": True, "base_channels": 64}}


def test_whole_model_of_user_class_is_read_without_its_code(odd_model: tuple[Path, Path]) -> None:
    path, marker = odd_model
    facts = inspect_checkpoint(path)
    assert not marker.exists()  # the class's __setstate__ would create it
    assert facts.root_class == "oddmodels.OddWrapper" and "oddmodels.OddWrapper" in facts.globals_needed
    assert _fits(facts)["resnet50_extra"] == EXTRA
    # and what inspect suggests really loads
    load_checkpoint("resnet50_extra", EXTRA, CheckpointSpec(path, pickled_class_names=(facts.root_class,)))
    assert not marker.exists()


@pytest.mark.parametrize("how", ["system", "exec"])
@pytest.mark.parametrize("inside", [False, True])
def test_malicious_pickle_is_reported_not_run(tmp_path: Path, how: str, inside: bool) -> None:
    marker = tmp_path / "pwned"
    name = h.write_malicious(tmp_path / "evil.pt", marker, how, inside_state_dict=inside)
    facts = inspect_checkpoint(tmp_path / "evil.pt")
    assert not marker.exists()
    assert facts.globals_needed == [name] and facts.suspicious_globals == [name]
    assert "SUSPICIOUS:  " + name in facts.to_text() and "malicious" in facts.to_text()


@pytest.mark.parametrize(
    ("arch", "kwargs"),
    [
        ("resnet50_head", {"num_classes": 7, "backbone": "resnet101"}),
        ("resnet50_head", {"num_classes": 2, "backbone": "resnet34"}),
        ("resnet50_dual", {"num_classes": 5, "backbone": "resnet50"}),
        ("resnet50_extra_dual", {"num_classes": 3, "n_extra": 4, "backbone": "resnet18"}),
        ("unet", {"n_channels": 1, "n_classes": 4, "bilinear": False, "base_channels": 16}),
    ],
)
def test_fit_infers_arguments(arch: str, kwargs: dict[str, Any]) -> None:
    with torch.device("meta"):
        sd = get_net(arch, **kwargs).state_dict()
    fits = fit_architectures(sd)  # state_dict shapes only: built on meta, no file needed
    assert ArchFit(arch, {**net_spec(arch).defaults, **kwargs}) in fits
    twins = {"resnet50_extra", "resnet50_extra_dual"}  # same keys, different forward outputs
    assert {f.arch for f in fits} == (twins if arch in twins else {arch})


def test_legacy_files(tmp_path: Path) -> None:
    net = get_net("unet", **UNET)
    torch.save(net.state_dict(), tmp_path / "sd.pt", _use_new_zipfile_serialization=False)
    facts = inspect_checkpoint(tmp_path / "sd.pt")
    assert (facts.container, facts.kind, _fits(facts)) == ("legacy", "state_dict", {"unet": UNET})
    torch.save(net, tmp_path / "whole.pt", _use_new_zipfile_serialization=False)
    facts = inspect_checkpoint(tmp_path / "whole.pt")
    assert facts.kind is None and "app.nets.unet.UNet" in facts.globals_needed
    assert any("legacy" in note for note in facts.notes)


def test_unusable_files_raise(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound):
        inspect_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "garbage.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(CheckpointCorrupt, match="not a torch checkpoint"):
        inspect_checkpoint(tmp_path / "garbage.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointCorrupt, match="empty file"):
        inspect_checkpoint(tmp_path / "empty.pt")
    torch.save(get_net("unet", **UNET).state_dict(), tmp_path / "ok.pt")
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 3])
    with pytest.raises(CheckpointCorrupt, match="central directory") as err:
        inspect_checkpoint(tmp_path / "cut.pt")
    assert "\n" not in err.value.message
