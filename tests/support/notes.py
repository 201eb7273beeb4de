"""The models of the notes our users learn from, written as a user writes them (their own classes,
not modserve's), and the ways they save them: torch.save, torch.export.save.

Also crafted ``.pt2`` archives: a real export with one record changed the way an attacker would.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn


class ResNetWithScalar(nn.Module):
    """The notes' extra-input model: a ResNet's 1000 outputs joined by one scalar before the head."""

    def __init__(self, num_classes: int = 10, backbone: str = "resnet50") -> None:
        super().__init__()
        self.net = getattr(torchvision.models, backbone)(weights=None)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc_add = nn.Linear(1000 + 1, num_classes)
        self.output = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor, add_variable: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.relu(self.net(x)))
        x = torch.cat((x, add_variable.reshape(-1, 1)), dim=1)
        return self.output(self.fc_add(x))


class ResNetTwoOutputs(nn.Module):
    """The notes' dual-output model: class probabilities and the backbone's features; its forward
    takes a second argument that it ignores."""

    def __init__(self, num_classes: int = 10, backbone: str = "resnet50") -> None:
        super().__init__()
        self.net = getattr(torchvision.models, backbone)(weights=None)
        self.relu = nn.ReLU()
        self.dropout = nn.Dropout(0.5)
        self.fc1 = nn.Linear(1000, num_classes)
        self.output = nn.Softmax(dim=1)

    def forward(self, x: torch.Tensor, add_variable: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.net(x)
        return self.output(self.fc1(self.dropout(self.relu(features)))), features


def notes_head(in_features: int = 2048, num_classes: int = 10) -> nn.Sequential:
    """The notes' replacement for a ResNet's fc."""
    return nn.Sequential(OrderedDict([
        ("fc1", nn.Linear(in_features, 128)), ("relu1", nn.ReLU()), ("dropout1", nn.Dropout(0.2)),
        ("fc2", nn.Linear(128, num_classes)), ("output", nn.Softmax(dim=1)),
    ]))


NOTES_HEAD_TOML = [
    {"name": "fc1", "type": "Linear", "in_features": 2048, "out_features": 128},
    {"name": "relu1", "type": "ReLU"},
    {"name": "dropout1", "type": "Dropout", "p": 0.2},
    {"name": "fc2", "type": "Linear", "in_features": 128, "out_features": 10},
    {"name": "output", "type": "Softmax", "dim": 1},
]


def export(model: nn.Module, example: tuple[torch.Tensor, ...], path: Path, *, spatial: bool = False) -> Path:
    """torch.export with a dynamic batch (and, for a U-Net, dynamic height and width), then save."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    shapes: list[dict[int, Any]] = [{0: batch} for _ in example]
    if spatial:
        shapes[0].update({2: torch.export.Dim("h", min=32, max=4096), 3: torch.export.Dim("w", min=32, max=4096)})
    program = torch.export.export(model.eval(), example, dynamic_shapes=tuple(shapes))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, path)
    return path


def records(path: Path) -> dict[str, bytes]:
    from torch.export.pt2_archive._package import PT2ArchiveReader

    with PT2ArchiveReader(str(path)) as reader:
        return {name: reader.read_bytes(name) for name in reader.get_file_names()
                if name not in ("archive_format", "archive_version") and not name.startswith(".data/")}


def write_records(path: Path, parts: dict[str, bytes]) -> Path:
    from torch.export.pt2_archive._package import PT2ArchiveWriter

    with PT2ArchiveWriter(str(path)) as writer:
        for name, data in parts.items():
            writer.write_bytes(name, data)
    return path


def craft(source: Path, target: Path, change: Callable[[dict[str, bytes], dict[str, Any]], None]) -> Path:
    """A copy of ``source`` with its records (and its parsed program, passed alongside) changed."""
    parts = records(source)
    program = json.loads(parts["models/model.json"])
    change(parts, program)
    parts["models/model.json"] = json.dumps(program).encode()
    return write_records(target, parts)


class Payload:
    """Pickles to a call of ``exec`` that creates ``marker``: what a malicious pickle does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


def malicious_pickle(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save({"x": Payload(marker)}, buf)
    return buf.getvalue()
