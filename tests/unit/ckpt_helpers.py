"""Helpers that make checkpoints the way practitioners do (torch.save in their own scripts).

Imported by test_loader.py / test_inspect.py after putting this folder on sys.path.
The user-side U-Net below re-creates the structure of the widely used
milesial/Pytorch-UNet model (same classes, attribute names, layer order, 64-wide
and forward), written independently: what matters is that its state_dict keys and
outputs are those of the reference, and that its classes pickle under user names.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import types
from pathlib import Path
from typing import Any

import pytest
import torch

USER_UNET_PARTS = textwrap.dedent(
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F


    class DoubleConv(nn.Module):
        def __init__(self, in_channels, out_channels, mid_channels=None):
            super().__init__()
            mid = mid_channels or out_channels
            self.double_conv = nn.Sequential(
                nn.Conv2d(in_channels, mid, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(mid),
                nn.ReLU(inplace=True),
                nn.Conv2d(mid, out_channels, kernel_size=3, padding=1, bias=False),
                nn.BatchNorm2d(out_channels),
                nn.ReLU(inplace=True),
            )

        def forward(self, x):
            return self.double_conv(x)


    class Down(nn.Module):
        def __init__(self, in_channels, out_channels):
            super().__init__()
            self.maxpool_conv = nn.Sequential(nn.MaxPool2d(2), DoubleConv(in_channels, out_channels))

        def forward(self, x):
            return self.maxpool_conv(x)


    class Up(nn.Module):
        def __init__(self, in_channels, out_channels, bilinear=True):
            super().__init__()
            if bilinear:
                self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
                self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
            else:
                self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
                self.conv = DoubleConv(in_channels, out_channels)

        def forward(self, x1, x2):
            x1 = self.up(x1)
            dy = x2.size()[2] - x1.size()[2]
            dx = x2.size()[3] - x1.size()[3]
            x1 = F.pad(x1, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
            return self.conv(torch.cat([x2, x1], dim=1))


    class OutConv(nn.Module):
        def __init__(self, in_channels, out_channels):
            super().__init__()
            self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)

        def forward(self, x):
            return self.conv(x)
    """
)

USER_UNET_MODEL = textwrap.dedent(
    """
    class UNet(nn.Module):
        def __init__(self, n_channels, n_classes, bilinear=False):
            super().__init__()
            self.n_channels = n_channels
            self.n_classes = n_classes
            self.bilinear = bilinear
            factor = 2 if bilinear else 1
            self.inc = DoubleConv(n_channels, 64)
            self.down1 = Down(64, 128)
            self.down2 = Down(128, 256)
            self.down3 = Down(256, 512)
            self.down4 = Down(512, 1024 // factor)
            self.up1 = Up(1024, 512 // factor, bilinear)
            self.up2 = Up(512, 256 // factor, bilinear)
            self.up3 = Up(256, 128 // factor, bilinear)
            self.up4 = Up(128, 64, bilinear)
            self.outc = OutConv(64, n_classes)

        def forward(self, x):
            x1 = self.inc(x)
            x2 = self.down1(x1)
            x3 = self.down2(x2)
            x4 = self.down3(x3)
            x5 = self.down4(x4)
            x = self.up1(x5, x4)
            x = self.up2(x, x3)
            x = self.up3(x, x2)
            x = self.up4(x, x1)
            return self.outc(x)
    """
)

# The extra-input wrapper from the practitioners' notes: a torchvision ResNet whose 1000
# outputs are joined by scalar inputs. Defined in a script, so it pickles as __main__.Model.
USER_MODEL_CLASS = textwrap.dedent(
    """
    import torch
    import torchvision
    from torch import nn


    class Model(nn.Module):
        def __init__(self, backbone="resnet50", num_classes=3, n_extra=1):
            super().__init__()
            self.net = getattr(torchvision.models, backbone)(weights=None)
            self.relu = nn.ReLU()
            self.dropout = nn.Dropout(0.5)
            self.fc_add = nn.Linear(1000 + n_extra, num_classes)
            self.output = nn.Softmax(dim=1)

        def forward(self, image, scalar):
            x = self.dropout(self.relu(self.net(image)))
            x = torch.cat([x, scalar.view(x.size(0), -1).to(x.dtype)], dim=1)
            return self.output(self.fc_add(x))
    """
)


def reference_unet_module() -> types.ModuleType:
    """The user-side U-Net classes as an in-process module named ``user_unet``."""
    module = types.ModuleType("user_unet")
    exec(compile(USER_UNET_PARTS + USER_UNET_MODEL, "user_unet.py", "exec"), module.__dict__)
    return module


def write_unet_package(root: Path) -> None:
    """``root/unet/{unet_parts,unet_model}.py`` as in the reference repository layout."""
    pkg = root / "unet"
    pkg.mkdir(parents=True, exist_ok=True)
    (pkg / "__init__.py").write_text("from .unet_model import UNet\n")
    (pkg / "unet_parts.py").write_text(USER_UNET_PARTS)
    (pkg / "unet_model.py").write_text("from .unet_parts import *\n" + USER_UNET_MODEL)


def run_script(cwd: Path, source: str, timeout: float = 180) -> str:
    """Run ``source`` as ``__main__`` in a fresh interpreter (as a user's train.py would be)."""
    script = cwd / "user_script.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(cwd)
    done = subprocess.run(
        [sys.executable, str(script)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


class _Payload:
    """A pickle whose unpickling would run ``func(arg)``: the classic malicious checkpoint."""

    def __init__(self, func: Any, arg: str) -> None:
        self.func, self.arg = func, arg

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (self.func, (self.arg,))


def write_malicious(path: Path, marker: Path, how: str = "system", inside_state_dict: bool = False) -> str:
    """torch.save a payload that would create ``marker``; returns the global it needs."""
    if how == "system":
        payload = _Payload(os.system, f"touch {marker}")
        name = f"{os.system.__module__}.system"
    else:
        payload = _Payload(exec, f"open({str(marker)!r}, 'w').close()")
        name = "builtins.exec"
    obj: Any = payload
    if inside_state_dict:
        obj = {"state_dict": {"w": torch.zeros(2)}, "extra": payload}
    torch.save(obj, path)
    return name


def save_with_location(obj: Any, path: Path, location: str = "cuda:1") -> None:
    """torch.save as if every storage lived on ``location`` (e.g. a checkpoint from GPU 1).

    torch writes each storage's location tag from its registered taggers; a tagger
    placed first for the duration of the save makes the real save path record
    ``location``, exactly what the file of a multi-GPU box contains.
    """
    registry = torch.serialization._package_registry
    entry = (-1000, lambda storage: location, lambda storage, loc: None)
    registry.insert(0, entry)
    try:
        torch.save(obj, path)
    finally:
        registry.remove(entry)


def randomize_bn(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-default BatchNorm statistics, so eval outputs depend on every buffer."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.running_mean.copy_(torch.randn(mod.running_mean.shape, generator=gen) * 0.1)
                mod.running_var.copy_(torch.rand(mod.running_var.shape, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(mod.weight.shape, generator=gen) + 0.5)


# A user's train.py: defines its classes in __main__, imports the packaged U-Net, and
# saves whole models and state_dicts plus inputs/outputs to compare against.
MAIN_SCRIPT = (
    USER_MODEL_CLASS
    + USER_UNET_PARTS
    + USER_UNET_MODEL
    + """
from unet.unet_model import UNet as PackagedUNet

torch.manual_seed(0)
image, scalar, x = torch.randn(2, 3, 64, 64), torch.randn(2, 2), torch.randn(1, 3, 32, 32)
with torch.no_grad():
    m50 = Model("resnet50", num_classes=3, n_extra=2).eval()
    torch.save(m50, "model_main.pt")
    m18 = Model("resnet18", num_classes=3, n_extra=2).eval()
    torch.save(nn.DataParallel(m18), "model_dp.pkl")
    torch.save(nn.DataParallel(m18).state_dict(), "model_dp_sd.pth")
    u_pkg, u_main = PackagedUNet(3, 2, bilinear=True).eval(), UNet(3, 2, bilinear=True).eval()
    torch.save(u_pkg, "unet_pkg.pt")
    torch.save(u_main, "unet_main.pth")
    torch.save({"image": image, "scalar": scalar, "x": x, "m50": m50(image, scalar),
                "m18": m18(image, scalar), "u_pkg": u_pkg(x), "u_main": u_main(x)}, "expected.pt")
"""
)


def make_user_files(root: Path) -> Path:
    """Run MAIN_SCRIPT in ``root`` (with the ``unet`` package beside it); returns ``root``."""
    write_unet_package(root)
    run_script(root, MAIN_SCRIPT)
    return root


# An importable user module whose class leaves a marker when its __setstate__ runs:
# proves which code paths execute the file's classes and which do not.
ODD_MODULE = """
import torchvision
from torch import nn

MARKER = None

class OddWrapper(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torchvision.models.resnet18(weights=None)
        self.relu, self.dropout = nn.ReLU(), nn.Dropout(0.5)
        self.fc_add, self.output = nn.Linear(1002, 4), nn.Softmax(dim=1)

    def __setstate__(self, state):
        if MARKER:
            open(MARKER, "w").close()
        super().__setstate__(state)
"""


def make_odd_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    """Save a whole ``oddmodels.OddWrapper``; returns (checkpoint, marker path)."""
    (tmp_path / "oddmodels.py").write_text(ODD_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "oddmodels", raising=False)
    import oddmodels  # type: ignore[import-not-found]

    marker = tmp_path / "setstate_ran"
    monkeypatch.setattr(oddmodels, "MARKER", str(marker))
    torch.save(oddmodels.OddWrapper().eval(), tmp_path / "odd.pt")
    return tmp_path / "odd.pt", marker
