"""Models the checkpoint is, not weights for a build: ``exported_*`` (a ``.pt2`` program) and
``python_*`` (a whole-model pickle with the classes of the operator's model.py).

``load_declared`` answers None for every other architecture, and refuses a ``.pt2`` file for them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import torch
from torch import nn

from app.errors import CheckpointCorrupt, CheckpointFormatMismatch, ConfigError
from app.loading.allowlist import unsafe_globals
from app.loading.exported import read_exported
from app.loading.files import Container
from app.loading.model_code import load_with_model_code
from app.nets import net_spec
from app.nets.declared import ExportedNet, PythonNet

if TYPE_CHECKING:
    from app.loading.checkpoint import CheckpointSpec


def load_declared(
    fh: BinaryIO, container: Container, arch: str, arch_kwargs: Mapping[str, Any], spec: CheckpointSpec,
    device: torch.device,
) -> nn.Module | None:
    """The model for an exported_*/python_* architecture, in eval mode on ``device``; else None."""
    root_class = net_spec(arch).root_class
    path = Path(spec.path)
    if (container == "exported") != (root_class is ExportedNet):
        raise _exported_mismatch(path, arch, container)
    if container == "exported":
        if spec.format == "state_dict":
            raise CheckpointFormatMismatch(f'{path} is a torch.export program, not a state_dict; set format = "auto"')
        model = read_exported(fh, device)
        assert model is not None
        _check_exported_signature(model, arch, arch_kwargs, path)
        return model
    if root_class is PythonNet:
        return _load_python(fh, container, spec, device)
    return None


def _load_python(fh: BinaryIO, container: Container, spec: CheckpointSpec, device: torch.device) -> nn.Module:
    if container == "safetensors" or spec.code is None:
        raise CheckpointFormatMismatch(
            f"{spec.path}: python_* architectures serve a whole model (torch.save(model)) with its classes in a"
            " model.py beside model.toml"
        )
    try:
        needed = unsafe_globals(fh, container)
    except Exception as exc:  # noqa: BLE001 - a pickle the disassembler cannot read
        raise CheckpointCorrupt(f"{spec.path}: truncated or not a torch checkpoint (unreadable pickle: {exc})") from None
    model = load_with_model_code(fh, needed, spec.code, spec.pickled_class_names)
    return PythonNet(model).to(device).eval()


def _exported_mismatch(path: Path, arch: str, container: str) -> CheckpointFormatMismatch:
    if container == "exported":
        return CheckpointFormatMismatch(
            f"{path} is a program written by torch.export.save, which '{arch}' does not load; set architecture to"
            " exported_classifier, exported_segmenter or exported_tensor and declare its inputs and outputs"
        )
    return CheckpointFormatMismatch(
        f"'{arch}' serves a program written by torch.export.save (a .pt2 archive), but {path} is not one"
    )


def _check_exported_signature(model: ExportedNet, arch: str, arch_kwargs: Mapping[str, Any], path: Path) -> None:
    """The program's inputs and outputs must be the ones model.toml declares."""
    try:
        spec = net_spec(arch).for_arguments(dict(arch_kwargs))
    except ValueError as exc:
        raise ConfigError(f"architecture '{arch}': {exc}") from None
    inputs = 2 if spec.takes_extra else 1
    if model.n_inputs != inputs:
        raise CheckpointFormatMismatch(
            f"{path}: the program takes {model.n_inputs} inputs but model.toml declares {inputs}"
            " (for a classifier, n_extra > 0 declares a second input of that many scalars)"
        )
    if model.n_outputs != len(spec.heads):
        raise CheckpointFormatMismatch(
            f"{path}: the program returns {model.n_outputs} outputs but model.toml declares {len(spec.heads)}"
            f" ({', '.join(spec.heads)}; for a classifier, outputs lists their names)"
        )
