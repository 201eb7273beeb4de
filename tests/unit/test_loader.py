"""load_checkpoint on checkpoints saved every way practitioners save them, and refusals."""

from __future__ import annotations

import pickle
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
import ckpt_helpers as h  # noqa: E402

from app.errors import (  # noqa: E402
    CheckpointCorrupt,
    CheckpointNotFound,
    ChecksumMismatch,
    ConfigError,
    StateDictMismatch,
    UnknownArchitecture,
    UnsafeCheckpoint,
)
from app.loading import CheckpointFormatMismatch, CheckpointSpec, file_sha256, load_checkpoint  # noqa: E402
from app.nets import get_net  # noqa: E402

UNET = {"n_channels": 3, "n_classes": 3, "base_channels": 8, "bilinear": True}
EXTRA = {"backbone": "resnet18", "num_classes": 4, "n_extra": 2}


def _unet(seed: int = 0, **kw: Any) -> nn.Module:
    torch.manual_seed(seed)
    net = get_net("unet", **{**UNET, **kw})
    h.randomize_bn(net, seed)
    return net.eval()


def _same_output(a: nn.Module, b: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_reference_unet_state_dict_loads_with_identical_logits(tmp_path: Path) -> None:
    ref_mod = h.reference_unet_module()
    torch.manual_seed(0)
    ref = ref_mod.UNet(n_channels=3, n_classes=2)
    h.randomize_bn(ref)
    ref.eval()
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "unet.pth")
    loaded = load_checkpoint("unet", {"n_channels": 3, "n_classes": 2}, CheckpointSpec(tmp_path / "unet.pth"))
    assert (loaded.kind, loaded.metadata, loaded.dataparallel) == ("state_dict", {}, False)
    assert not loaded.model.training
    _same_output(loaded.model, ref, X)
    # The reference training script stores the mask values inside the state_dict.
    sd["mask_values"] = [0, 1]
    torch.save(sd, tmp_path / "unet_masks.pth")
    loaded = load_checkpoint(
        "unet", {"n_channels": 3, "n_classes": 2}, CheckpointSpec(tmp_path / "unet_masks.pth")
    )
    assert loaded.metadata == {"mask_values": [0, 1]}
    _same_output(loaded.model, ref, X)


def _variants(net: nn.Module) -> dict[str, tuple[Any, str, bool, dict[str, Any]]]:
    """file name -> (object to torch.save, expected kind, dataparallel, metadata)."""
    sd, dp = net.state_dict(), nn.DataParallel(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net(X).sum().backward()
    opt.step()  # gives the optimizer real (tensor) state, which must not reach metadata
    wrapped = {"state_dict": sd, "epoch": 7, "optimizer": opt.state_dict(), "best": torch.tensor(0.5)}
    # fmt: off
    return {
        "plain.pt": (sd, "state_dict", False, {}),
        "plain.pkl": (sd, "state_dict", False, {}),
        "dp.pth": (dp.state_dict(), "state_dict", True, {}),
        "wrapped.pth": (wrapped, "wrapped_state_dict", False, {"epoch": 7, "best": 0.5}),
        "model_key.pt": ({"model": dp.state_dict(), "args": {"lr": 0.1}}, "wrapped_state_dict", True,
                         {"args": {"lr": 0.1}}),
        "tutorial.pkl": ({"model_state_dict": sd, "optimizer_state_dict": opt.state_dict()},
                         "wrapped_state_dict", False, {}),
        "whole.pt": (net, "whole_model", False, {}),
        "whole_dp.pkl": (dp, "whole_model", True, {}),
        "whole_in_dict.pth": ({"model": net, "epoch": 2}, "whole_model", False, {"epoch": 2}),
    }
    # fmt: on


def test_state_dict_and_whole_model_variants(tmp_path: Path) -> None:
    net = _unet(seed=3)
    for name, (obj, kind, dp, meta) in _variants(net).items():
        torch.save(obj, tmp_path / name)
        loaded = load_checkpoint("unet", UNET, CheckpointSpec(tmp_path / name))
        assert (loaded.kind, loaded.dataparallel, loaded.metadata) == (kind, dp, meta), name
        assert loaded.sha256 == file_sha256(tmp_path / name)
        assert loaded.model is not obj and type(loaded.model).__module__ == "app.nets.unet"
        _same_output(loaded.model.train(False), net.eval(), X)


def test_legacy_non_zip_state_dict_loads(tmp_path: Path) -> None:
    net = _unet()
    torch.save({"state_dict": net.state_dict()}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint("unet", UNET, CheckpointSpec(tmp_path / "legacy.pt"))
    assert loaded.kind == "wrapped_state_dict"
    _same_output(loaded.model, net, X)


def test_weights_really_replaced(tmp_path: Path) -> None:
    source = _unet(seed=11)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    torch.manual_seed(12)
    fresh = get_net("unet", **UNET).state_dict()
    loaded = load_checkpoint("unet", UNET, CheckpointSpec(tmp_path / "w.pt")).model.state_dict()
    for key, value in source.state_dict().items():
        assert torch.equal(loaded[key], value), key
    changed = [k for k in fresh if not torch.equal(fresh[k], loaded[k])]
    assert {k for k in fresh if k.endswith("conv.0.weight") or k.endswith(".weight")} & set(changed)
    assert len(changed) > len(fresh) // 2


def test_checkpoint_saved_on_cuda1_loads_on_cpu(tmp_path: Path) -> None:
    net = _unet()
    path = tmp_path / "gpu1.pt"
    h.save_with_location(net.state_dict(), path, "cuda:1")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(path, weights_only=True)  # what a loader without map_location hits
    loaded = load_checkpoint("unet", UNET, CheckpointSpec(path), device="cpu")
    assert all(t.device.type == "cpu" for t in loaded.model.state_dict().values())
    _same_output(loaded.model, net, X)


# --- checkpoints written by user scripts run as __main__ ------------------------------------


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_main_model_whole_pickle_loads_without_trust(user_files: Path) -> None:
    exp = torch.load(user_files / "expected.pt", weights_only=True)
    spec = CheckpointSpec(user_files / "model_main.pt", pickled_class_names=("__main__.Model",))
    loaded = load_checkpoint("resnet50_extra", {"num_classes": 3, "n_extra": 2}, spec)
    assert (loaded.kind, loaded.dataparallel) == ("whole_model", False)
    with torch.no_grad():
        _close(loaded.model(exp["image"], exp["scalar"]), exp["m50"])
    with pytest.raises(UnsafeCheckpoint, match=r"__main__\.Model") as err:
        load_checkpoint("resnet50_extra", {"num_classes": 3, "n_extra": 2}, CheckpointSpec(spec.path))
    assert "__main__.Model" in err.value.globals_needed and "pickled_class_names" in err.value.message


def test_dataparallel_whole_model_and_state_dict_from_script(user_files: Path) -> None:
    exp = torch.load(user_files / "expected.pt", weights_only=True)
    kwargs = {"backbone": "resnet18", "num_classes": 3, "n_extra": 2}
    specs = [
        CheckpointSpec(user_files / "model_dp.pkl", "whole_model", pickled_class_names=("__main__.Model",)),
        CheckpointSpec(user_files / "model_dp_sd.pth", "state_dict"),
    ]
    for spec in specs:
        loaded = load_checkpoint("resnet50_extra", kwargs, spec)
        assert loaded.dataparallel
        with torch.no_grad():
            _close(loaded.model(exp["image"], exp["scalar"]), exp["m18"])


USER_UNETS = [("unet_pkg.pt", "unet.unet_model.UNet", "u_pkg"), ("unet_main.pth", "__main__.UNet", "u_main")]


@pytest.mark.parametrize(("name", "pickled", "key"), USER_UNETS)
def test_user_unet_class_loads_under_its_pickled_name(
    user_files: Path, name: str, pickled: str, key: str
) -> None:
    exp = torch.load(user_files / "expected.pt", weights_only=True)
    spec = CheckpointSpec(user_files / name, pickled_class_names=(pickled,))
    loaded = load_checkpoint("unet", {"n_classes": 2, "bilinear": True}, spec)
    assert loaded.kind == "whole_model"
    with torch.no_grad():
        _close(loaded.model(exp["x"]), exp[key])
    with pytest.raises(UnsafeCheckpoint) as err:  # bilinear=False has no Upsample layer to allow
        load_checkpoint("unet", {"n_classes": 2, "bilinear": False}, spec)
    assert "torch.nn.modules.upsampling.Upsample" in err.value.message and "bilinear" in err.value.message


# --- trust -----------------------------------------------------------------------------------


def test_trusted_allows_full_unpickling_only_when_asked(
    odd_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, marker = odd_model
    calls: list[bool] = []
    real_load = torch.load

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    for spec in (CheckpointSpec(path), CheckpointSpec(path, format="state_dict", trusted=True)):
        with pytest.raises(UnsafeCheckpoint, match=r"oddmodels\.OddWrapper"):
            load_checkpoint("resnet50_extra", EXTRA, spec)
    assert calls == [] and not marker.exists()
    loaded = load_checkpoint("resnet50_extra", EXTRA, CheckpointSpec(path, trusted=True))
    assert calls == [False] and marker.exists()  # the user's own code ran: that is what trust means
    assert type(loaded.model).__name__ == "ResNetExtra"
    # Mapping the name instead reads the same file weights-only: the user's __setstate__ never runs.
    marker.unlink()
    loaded = load_checkpoint(
        "resnet50_extra", EXTRA, CheckpointSpec(path, pickled_class_names=("oddmodels.OddWrapper",))
    )
    assert calls[-1] is True and not marker.exists()


# --- malicious pickles -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["system", "exec"])
@pytest.mark.parametrize("fmt", ["auto", "whole_model", "state_dict"])
def test_malicious_pickle_refused_and_never_runs(tmp_path: Path, how: str, fmt: str) -> None:
    marker = tmp_path / "pwned"
    for inside in (False, True):
        path = tmp_path / f"evil_{inside}.pt"
        name = h.write_malicious(path, marker, how, inside_state_dict=inside)
        with pytest.raises(UnsafeCheckpoint) as err:
            load_checkpoint("unet", UNET, CheckpointSpec(path, format=fmt))  # type: ignore[arg-type]
        assert name in err.value.globals_needed and name in err.value.message
        assert "malicious" in err.value.message
        assert not marker.exists()


def test_checksum_checked_before_unpickling(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    h.write_malicious(path, marker, "exec")
    with pytest.raises(ChecksumMismatch) as err:  # even trusted: the digest gate comes first
        load_checkpoint("unet", UNET, CheckpointSpec(path, sha256="0" * 64, trusted=True))
    assert "0" * 64 in err.value.message and file_sha256(path) in err.value.message
    assert not marker.exists()
    good = tmp_path / "good.pt"
    torch.save(_unet().state_dict(), good)
    assert load_checkpoint(
        "unet", UNET, CheckpointSpec(good, sha256=file_sha256(good).upper())
    ).sha256 == file_sha256(good)


# --- typed errors with actionable messages ------------------------------------------------------


def _raises(exc: type[Exception], path: Path, *patterns: str, arch: str = "unet",
            kwargs: dict[str, Any] | None = None, **spec: Any) -> Exception:  # fmt: skip
    with pytest.raises(exc) as err:
        load_checkpoint(arch, UNET if kwargs is None else kwargs, CheckpointSpec(path, **spec))
    for pattern in patterns:
        assert pattern in str(err.value), (pattern, str(err.value))
    return err.value


def test_file_level_errors(tmp_path: Path) -> None:
    torch.save(_unet().state_dict(), tmp_path / "full.pt")
    torch.save(_unet().state_dict(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("full.pt", "legacy.pt"):  # cut real checkpoints in half
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"half_{name}").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "random.pth").write_bytes(bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).tolist()))
    (tmp_path / "text.pkl").write_text("hello, not a pickle")
    full, digest = tmp_path / "full.pt", file_sha256(tmp_path / "full.pt")
    # fmt: off
    _raises(CheckpointNotFound, tmp_path / "nope.pt", str(tmp_path / "nope.pt"))
    _raises(CheckpointCorrupt, tmp_path / "empty.pt", "empty file")
    _raises(CheckpointCorrupt, tmp_path / "random.pth", "not a torch checkpoint")
    _raises(CheckpointCorrupt, tmp_path / "text.pkl", "not a torch checkpoint")
    _raises(CheckpointCorrupt, tmp_path / "half_full.pt", "truncated or not a torch checkpoint",
            "central directory")
    _raises(CheckpointCorrupt, tmp_path / "half_legacy.pt", "truncated")
    _raises(ChecksumMismatch, full, "expected " + "ab" * 32, "actual " + digest, sha256="ab" * 32)
    _raises(UnknownArchitecture, full, "'resnet9000'", "unet", arch="resnet9000")
    _raises(ConfigError, full, "n_layers", kwargs={"n_layers": 3})
    _raises(ConfigError, full, "code-running", pickled_class_names=("os.system",))
    # fmt: on


def test_state_dict_mismatches_list_keys_and_hint(tmp_path: Path) -> None:
    sd = _unet().state_dict()
    torch.save(sd, tmp_path / "sd.pt")
    torch.save({k: v for k, v in sd.items() if not k.startswith("outc.")}, tmp_path / "missing.pt")
    torch.save({**sd, "aux.weight": torch.zeros(2)}, tmp_path / "unexpected.pt")
    torch.save({("module." + k if k.startswith("up") else k): v for k, v in sd.items()}, tmp_path / "dp.pt")
    torch.save({"net." + k: v for k, v in sd.items()}, tmp_path / "prefixed.pt")
    torch.save(get_net("resnet50_extra", **EXTRA).state_dict(), tmp_path / "extra.pt")
    err = _raises(
        StateDictMismatch, tmp_path / "missing.pt", "missing key(s): outc.conv.weight, outc.conv.bias"
    )
    assert err.extra["missing_keys"] == ["outc.conv.weight", "outc.conv.bias"]
    sd_path, extra = tmp_path / "sd.pt", tmp_path / "extra.pt"
    # fmt: off
    _raises(StateDictMismatch, tmp_path / "unexpected.pt", "1 unexpected key(s): aux.weight")
    _raises(StateDictMismatch, tmp_path / "missing.pt", "... and", kwargs={**UNET, "base_channels": 4})
    _raises(StateDictMismatch, sd_path, "outc.conv.weight checkpoint [3, 8, 1, 1] vs model [5, 8, 1, 1]",
            "check n_classes", kwargs={**UNET, "n_classes": 5})
    _raises(StateDictMismatch, sd_path, "check bilinear", kwargs={**UNET, "bilinear": False})
    _raises(StateDictMismatch, sd_path, "check n_channels / base_channels", kwargs={**UNET, "n_channels": 1})
    _raises(StateDictMismatch, tmp_path / "dp.pt", "start with 'module.'")
    _raises(StateDictMismatch, tmp_path / "prefixed.pt", "extra 'net.' prefix")
    _raises(StateDictMismatch, extra, "fc_add.weight checkpoint [4, 1002] vs model [4, 1003]",
            "check n_extra / num_classes", arch="resnet50_extra", kwargs={**EXTRA, "n_extra": 3})
    _raises(StateDictMismatch, extra, "check backbone", arch="resnet50_extra",
            kwargs={**EXTRA, "backbone": "resnet34"})
    # fmt: on


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_format_mismatches(tmp_path: Path) -> None:
    net = _unet()
    torch.save(net, tmp_path / "whole.pt")
    torch.save(net.state_dict(), tmp_path / "sd.pt")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"epoch": 3}, tmp_path / "notensors.pt")
    torch.save(net.state_dict(), tmp_path / "proto4.pt", pickle_protocol=4)
    with open(tmp_path / "raw.pkl", "wb") as fh:
        pickle.dump(net.state_dict(), fh)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, X).save(str(tmp_path / "scripted.pt"))
    # fmt: off
    err = _raises(UnsafeCheckpoint, tmp_path / "whole.pt", "whole model", '"whole_model" or "auto"',
                  format="state_dict")
    assert "app.nets.unet.UNet" in err.globals_needed  # type: ignore[attr-defined]
    _raises(CheckpointFormatMismatch, tmp_path / "sd.pt", "plain state_dict", '"state_dict" or "auto"',
            format="whole_model")
    _raises(CheckpointCorrupt, tmp_path / "list.pt", "not a model checkpoint")
    _raises(CheckpointCorrupt, tmp_path / "notensors.pt", "no tensors found")
    _raises(CheckpointCorrupt, tmp_path / "proto4.pt", "pickle protocol 4", "default protocol")
    _raises(UnsafeCheckpoint, tmp_path / "raw.pkl", "torch.storage._load_from_bytes", "pickle.dump")
    _raises(CheckpointFormatMismatch, tmp_path / "scripted.pt", "TorchScript archive")
    # fmt: on
    whole = load_checkpoint("unet", UNET, CheckpointSpec(tmp_path / "whole.pt", format="whole_model"))
    assert whole.kind == "whole_model"
