"""What is in a checkpoint file, and which registered architecture it fits, without running it.

Whole-model pickles are read weights-only with every non-library global mapped to an
inert StandIn class, so even a malicious ``__reduce__`` only constructs a StandIn.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch import nn

from app.errors import CheckpointCorrupt, CheckpointError
from app.loading.allowlist import (
    RAW_PICKLE_TENSOR,
    SUSPICIOUS_MODULES,
    as_safe_globals,
    known_library_class,
    qualname,
    stand_in,
    unsafe_globals,
)
from app.loading.exported import describe_exported
from app.loading.files import (
    Container,
    file_sha256,
    require_file,
    safetensors_shapes,
    sniff_container,
    torch_load,
)
from app.loading.statedict import Kind, compare_shapes, small_json, split_checkpoint
from app.nets import get_net, list_nets, net_spec
from app.nets.torchvision_nets import GUESSERS

try:
    from torch._weights_only_unpickler import _blocklisted_modules as _TORCH_BLOCKED
except ImportError:  # pragma: no cover - private name; keep torch's documented list
    _TORCH_BLOCKED = ["sys", "os", "posix", "nt"]

IMAGENET_CLASSES = 1000
_RESNETS = {
    ("basic", 2): "resnet18",
    ("basic", 6): "resnet34",
    ("bottleneck", 6): "resnet50",
    ("bottleneck", 23): "resnet101",
}


@dataclass
class ArchFit:
    """A registered architecture whose fresh build matches every key and shape."""

    arch: str
    kwargs: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.arch}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"

    def to_toml(self) -> str:
        """The start of a model.toml for this fit: architecture and arguments (unset ones left out)."""
        import tomli_w

        doc: dict[str, Any] = {"architecture": self.arch}
        arguments = {k: v for k, v in self.kwargs.items() if v is not None}
        if arguments:
            doc["arguments"] = arguments
        text = tomli_w.dumps(doc)
        if self.arch in GUESSERS:
            text += (
                "# torchvision's own training recipe normalises with ImageNet statistics; use your training's:\n"
                "# [preprocess]\n# mean = [0.485, 0.456, 0.406]\n# std = [0.229, 0.224, 0.225]\n"
            )
        return text


@dataclass
class CheckpointFacts:
    """Facts about one checkpoint file, for the inspect CLI and the admin API."""

    path: str
    size_bytes: int
    sha256: str
    container: Container
    kind: Kind | None = None
    wrapper_key: str | None = None
    dataparallel: bool = False
    root_class: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    other_entries: list[str] = field(default_factory=list)
    tensor_count: int = 0
    parameter_count: int = 0
    globals_needed: list[str] = field(default_factory=list)
    suspicious_globals: list[str] = field(default_factory=list)
    fits: list[ArchFit] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_text(self) -> str:
        kind = {
            "state_dict": "state_dict",
            "wrapped_state_dict": "wrapped state_dict",
            "whole_model": "whole model (torch.save(model))",
            "exported": "program (torch.export.save)",
            None: "unknown (not read)",
        }[self.kind]
        if self.wrapper_key:
            kind += f" under key {self.wrapper_key!r}"
        lines = [
            f"file:        {self.path} ({self.size_bytes:,} bytes, {self.container} format)",
            f"sha256:      {self.sha256}",
            f"format:      {kind}",
            f"DataParallel 'module.' prefix: {'yes' if self.dataparallel else 'no'}",
            f"tensors:     {self.tensor_count} ({self.parameter_count:,} values)",
        ]
        if self.root_class:
            lines.append(f"root class:  {self.root_class}")
        if self.metadata:
            lines.append("metadata:    " + "; ".join(f"{k}={v!r}" for k, v in self.metadata.items()))
        if self.other_entries:
            lines.append("dropped:     " + ", ".join(self.other_entries))
        if self.globals_needed:
            lines.append("globals:     " + ", ".join(self.globals_needed))
        if self.suspicious_globals:
            lines.append("SUSPICIOUS:  " + ", ".join(self.suspicious_globals))
        lines.append("fits:        " + ("; ".join(map(str, self.fits)) or "no registered architecture"))
        lines.extend(f"note:        {n}" for n in [*self.notes, *_twin_notes(self.fits)])
        if self.fits:
            more = f" (first of {len(self.fits)} fits)" if len(self.fits) > 1 else ""
            lines.append(f"model.toml{more}:")
            lines.extend(f"    {line}" if line else "" for line in self.fits[0].to_toml().splitlines())
        return "\n".join(lines)


def inspect_checkpoint(path: Path) -> CheckpointFacts:
    """Read a checkpoint's structure; CheckpointCorrupt/CheckpointNotFound for unusable files."""
    path = Path(path)
    size = require_file(path)
    with open(path, "rb") as fh:
        container = sniff_container(fh)
        if container == "safetensors":
            return _inspect_safetensors(fh, path, size)
        if container == "exported":
            return _inspect_exported(fh, path, size)
        try:
            needed = unsafe_globals(fh, container)
        except Exception as exc:  # noqa: BLE001 - disassembler failure means not a pickle we know
            raise CheckpointCorrupt(
                f"{path}: truncated or not a torch checkpoint (unreadable pickle: {exc})"
            ) from None
        facts = CheckpointFacts(str(path), size, file_sha256(fh), container, globals_needed=needed)
        facts.suspicious_globals = [
            g for g in needed if g.split(".")[0] in SUSPICIOUS_MODULES or g == RAW_PICKLE_TENSOR
        ]
        if any(g.split(".")[0] in SUSPICIOUS_MODULES for g in needed):
            facts.notes.append(
                "references code-executing globals: the file may be malicious; the loader refuses it"
            )
        obj = _read_inertly(fh, container, needed, facts)
    if obj is None:
        return facts
    try:
        split = split_checkpoint(obj, str(path))
    except CheckpointCorrupt as exc:
        facts.notes.append(exc.message)
        return facts
    facts.kind, facts.wrapper_key, facts.dataparallel = split.kind, split.wrapper_key, split.dataparallel
    facts.metadata, facts.other_entries = split.metadata, split.dropped
    if split.root is not None:
        facts.root_class = getattr(type(split.root), "pickled_name", None) or qualname(type(split.root))
    facts.tensor_count = len(split.tensors)
    facts.parameter_count = sum(t.numel() for t in split.tensors.values())
    if split.tensors:
        facts.fits = fit_architectures(split.tensors)
    return facts


_TWINS = {
    frozenset({"resnet50_extra", "resnet50_extra_dual"}): (
        "resnet50_extra and resnet50_extra_dual have the same layers and keys; the notes' ResNetExtra, whose"
        " forward(x, add_variable) returns the class probabilities only, is resnet50_extra (the first fit)."
        " Choose resnet50_extra_dual to also answer the backbone's 1000 features."
    ),
}


def _twin_notes(fits: list[Any]) -> list[str]:
    """Say which of two architectures with identical keys matches the notes' class, and why."""
    names = {getattr(f, "arch", None) for f in fits}
    return [text for pair, text in _TWINS.items() if pair <= names]


def _inspect_exported(fh: BinaryIO, path: Path, size: int) -> CheckpointFacts:
    """A torch.export program: its inputs and outputs, whether it would load, the model.toml to start from."""
    program, refusal = describe_exported(fh)
    facts = CheckpointFacts(str(path), size, file_sha256(fh), "exported", kind="exported")  # type: ignore[arg-type]
    inputs, outputs = program["inputs"], program["outputs"]
    facts.notes.append(
        f"torch.export program, {program['operators']} graph nodes; inputs {inputs}, outputs {outputs}"
        " (batch first; 'dynamic' = any size)"
    )
    facts.notes.append(f"the loader REFUSES it: {refusal}" if refusal else "the loader's checks pass: it loads")
    first_in, first_out = (inputs or [[]])[0], (outputs or [[]])[0]
    if len(first_in) == 4 and len(first_out) == 4:
        facts.fits.append(ArchFit("exported_segmenter", {"num_classes": first_out[1]}))
    elif len(first_in) == 4:
        extra = inputs[1][-1] if len(inputs) > 1 and len(inputs[1]) == 2 else 1 if len(inputs) > 1 else 0
        names = ["probs", *(f"output{i}" for i in range(1, len(outputs)))]
        facts.fits.append(ArchFit("exported_classifier", {"outputs": names, "num_classes": first_out[-1], "n_extra": extra}))
    elif first_in:
        facts.fits.append(ArchFit("exported_tensor", {"input_shape": first_in[1:], "num_outputs": first_out[-1]}))
    return facts


def _inspect_safetensors(fh: BinaryIO, path: Path, size: int) -> CheckpointFacts:
    """A safetensors file from its header alone: names, shapes, dtypes, metadata; no tensor is read."""
    tensors, header = safetensors_shapes(fh)
    facts = CheckpointFacts(str(path), size, file_sha256(fh), "safetensors")
    if not tensors:
        facts.notes.append("no tensors in the file")
        return facts
    split = split_checkpoint(tensors, str(path))
    facts.kind, facts.dataparallel = split.kind, split.dataparallel
    try:
        facts.metadata = small_json(header)
    except (ValueError, TypeError, RecursionError):
        facts.other_entries = ["__metadata__"]
    facts.tensor_count = len(split.tensors)
    facts.parameter_count = sum(t.numel() for t in split.tensors.values())
    facts.fits = fit_architectures(split.tensors)
    return facts


def _read_inertly(fh: BinaryIO, container: Container, needed: list[str], facts: CheckpointFacts) -> Any:
    """torch.load weights-only with StandIns for every global not a known library nn.Module."""
    blocked = [g for g in needed if g.split(".")[0] in _TORCH_BLOCKED]
    if blocked:
        facts.notes.append(f"contents not read: torch never unpickles globals of {', '.join(blocked)}")
        return None
    if RAW_PICKLE_TENSOR in needed:
        facts.notes.append(
            "contents not read: written with pickle.dump, not torch.save; its tensors would be "
            "restored by a full (code-running) torch.load"
        )
        return None
    if needed and container == "legacy":
        facts.notes.append(
            "contents not read: a legacy (non-zip) whole-model pickle embeds class "
            "source and cannot be read weights-only"
        )
        return None
    mapping: dict[str, Any] = {}
    for name in needed:
        real = nn.DataParallel if name == qualname(nn.DataParallel) else known_library_class(name)
        mapping[name] = real or stand_in(name)
    try:
        return torch_load(fh, safe=as_safe_globals(mapping), needed=lambda: list(needed))
    except CheckpointCorrupt:
        raise
    except CheckpointError as exc:
        facts.notes.append(f"contents not read: {exc.message}")
        return None


def _layer_blocks(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"layer3\.(\d+)\.")
    return len({m.group(1) for k in shapes if (m := pattern.match(k))})


def _infer(param: str, shapes: Mapping[str, tuple[int, ...]]) -> Any:
    """One builder argument from key names and shapes; None when the keys do not tell."""
    inc, outc = shapes.get("inc.double_conv.0.weight"), shapes.get("outc.conv.weight")
    if param == "n_channels" and inc:
        return inc[1]
    if param == "base_channels" and inc:
        return inc[0]
    if param == "n_classes" and outc:
        return outc[0]
    if param == "bilinear" and inc:
        return "up1.up.weight" not in shapes
    if param == "backbone":
        for prefix in ("", "net."):
            if f"{prefix}conv1.weight" in shapes:
                block = "bottleneck" if f"{prefix}layer1.0.conv3.weight" in shapes else "basic"
                return _RESNETS.get((block, _layer_blocks(shapes, prefix)))
    if param == "num_classes":
        for key in ("fc_add.weight", "fc1.weight", "fc.fc2.weight", "fc.weight"):
            if key in shapes:
                return shapes[key][0]
    if param == "n_extra" and "fc_add.weight" in shapes:
        return shapes["fc_add.weight"][1] - IMAGENET_CLASSES
    return None


def fit_architectures(tensors: Mapping[str, torch.Tensor]) -> list[ArchFit]:
    """Registered architectures (with inferred arguments) matching every key and shape exactly.

    Candidates are verified by building them on the meta device: no memory, no init cost.
    """
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    fits: list[ArchFit] = []
    for arch in list_nets():
        if arch in GUESSERS:  # builders of many models: candidates from key patterns, a few at most
            for candidate in GUESSERS[arch](shapes):
                if _fits(arch, candidate, tensors):
                    fits.append(ArchFit(arch, candidate))
            continue
        kwargs = dict(net_spec(arch).defaults)
        inferred = {p: v for p in kwargs if (v := _infer(p, shapes)) is not None}
        if not inferred:
            continue
        kwargs.update(inferred)
        if _fits(arch, kwargs, tensors):
            fits.append(ArchFit(arch, kwargs))
    return fits


def _fits(arch: str, kwargs: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``arch(**kwargs)``, built on the meta device, has exactly these keys and shapes."""
    try:
        with torch.device("meta"):
            expected = get_net(arch, **kwargs).state_dict()
    except (TypeError, ValueError, RuntimeError):
        return False
    return not compare_shapes(expected, tensors)
