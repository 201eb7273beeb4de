"""The ``modserve`` console script: inspect and demo-store, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from app.config import Settings
from app.runtime.factory import build_runtime
from app.store import ModelStore
from support.models import build_small

MODSERVE = str(Path(sys.executable).with_name("modserve"))


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MODSERVE, *args], capture_output=True, text=True, timeout=300)


def test_inspect_state_dict_and_garbage(tmp_path: Path) -> None:
    sd = {f"module.{k}": v for k, v in build_small("resnet50_extra").state_dict().items()}
    path = tmp_path / "dp.pth"
    torch.save(sd, path)
    ok = _run("inspect", str(path))
    assert ok.returncode == 0, ok.stderr
    assert "module." in ok.stdout and "resnet50_extra" in ok.stdout and "resnet18" in ok.stdout
    garbage = tmp_path / "junk.pt"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    bad = _run("inspect", str(garbage))
    assert bad.returncode != 0
    assert bad.stderr.strip().count("\n") == 0 and "modserve inspect:" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_demo_store_is_loaded_completely(tmp_path: Path) -> None:
    root = tmp_path / "demo"
    result = _run("demo-store", str(root))
    assert result.returncode == 0, result.stderr
    store = ModelStore(root)
    names = store.names()
    assert names == ["resnet50_dual", "resnet50_extra", "resnet50_extra_dual", "resnet50_head",
                     "shapes_extra", "shapes_unet", "unet"]
    settings = Settings(store=root, warmup=False, device="cpu")
    for name in names:
        entry = store.entry(name)
        assert entry.error is None, entry.error
        runtime = build_runtime(store, entry, entry.resolve_version(), settings)  # loads and smoke-tests
        assert runtime.version == "1" and len(runtime.sha256) == 64
    again = _run("demo-store", str(root))  # existing models are kept, not rewritten
    assert again.returncode == 0 and again.stdout == ""
