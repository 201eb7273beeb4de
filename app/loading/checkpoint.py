"""Load a user's checkpoint into a freshly built architecture, without running the file's code.

Order matters: existence, digest and container are checked on raw bytes; the pickle's
globals are listed statically; only then is it unpickled, weights-only, with an
allowlist computed from the configured architecture. Full unpickling happens only
for ``trusted`` specs, and never as a fallback after a refusal.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

import torch
from torch import nn

from app.errors import (
    CheckpointCorrupt,
    CheckpointFormatMismatch,
    ChecksumMismatch,
    ConfigError,
    StateDictMismatch,
    UnsafeCheckpoint,
)
from app.loading.allowlist import (
    METADATA_GLOBALS,
    RAW_PICKLE_TENSOR,
    SUSPICIOUS_MODULES,
    as_safe_globals,
    build_allowlist,
    qualname,
    runs_code,
    unsafe_globals,
)
from app.loading.files import (
    Container,
    file_sha256,
    read_safetensors,
    require_file,
    sniff_container,
    torch_load,
    where,
)
from app.loading.statedict import Kind, compare_shapes, describe_mismatch, small_json, split_checkpoint
from app.loading.declared import load_declared
from app.nets import get_net, net_spec
from app.runtime.budget import device_memory_bytes

log = logging.getLogger(__name__)

Format = Literal["state_dict", "whole_model", "auto"]
_FORMATS = ("state_dict", "whole_model", "auto")


@dataclass(frozen=True)
class CheckpointSpec:
    """Where a checkpoint is and how far it may be trusted."""

    path: Path
    format: Format = "auto"
    sha256: str | None = None
    """Expected hex digest; checked before any unpickling."""
    trusted: bool = False
    """Only then is full unpickling (weights_only=False) allowed, and only for whole_model/auto."""
    pickled_class_names: tuple[str, ...] = ()
    """Names a whole-model pickle may use for the root class, e.g. ``("__main__.Model",)``."""
    code: Path | None = None
    """The operator's model.py, for python_* architectures (the factory checks the server allows it)."""


@dataclass
class LoadedCheckpoint:
    """A fresh architecture with the checkpoint's weights, plus what the file told us."""

    model: nn.Module
    metadata: dict[str, Any]
    sha256: str
    kind: Kind | Literal["exported"]
    dataparallel: bool


MAX_WEIGHTS_SHARE = 0.5
"""Largest share of this host's memory one architecture's weights may take (checked on the meta device)."""


def _build(arch: str, arch_kwargs: Mapping[str, Any]) -> nn.Module:
    """Build ``arch``; first on the meta device, so arguments that would allocate more than this
    host can hold (``num_classes = 10**9``) are refused without allocating anything."""
    kwargs = dict(arch_kwargs)
    try:
        with torch.device("meta"):
            probe = get_net(arch, **kwargs)
        weights = sum(t.numel() * t.element_size() for t in (*probe.parameters(), *probe.buffers()))
        del probe
        limit = int(device_memory_bytes(torch.device("cpu")) * MAX_WEIGHTS_SHARE)
        if weights > limit:
            raise ConfigError(
                f"architecture '{arch}' with {kwargs} would need {weights / 2**30:.1f} GiB for its weights, more"
                f" than {MAX_WEIGHTS_SHARE:.0%} of this host's memory: check the arguments"
            )
        return get_net(arch, **kwargs)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ConfigError(f"cannot build architecture '{arch}' with {kwargs}: {exc}") from None
    except RuntimeError as exc:  # an allocation the host refused
        raise ConfigError(f"cannot build architecture '{arch}' with {kwargs}: {str(exc)[:200]}") from None


def _check_class_names(names: tuple[str, ...]) -> None:
    """pickled_class_names must look like classes; code-running modules are refused outright."""
    for name in names:
        module, dot, attr = name.strip().rpartition(".")
        if not dot or not module or not attr.isidentifier():
            raise ConfigError(f"pickled_class_names: {name!r} is not a 'module.ClassName'")
        if module.split(".")[0] in SUSPICIOUS_MODULES:
            raise ConfigError(f"pickled_class_names: {name!r} names a code-running module, not a model class")


def _check_digest(fh: BinaryIO, path: Path, expected: str | None) -> str:
    actual = file_sha256(fh)
    if expected is not None:
        want = expected.strip().lower().removeprefix("sha256:")
        if want != actual:
            raise ChecksumMismatch(
                f"{path}: sha256 mismatch: expected {want}, actual {actual}; the file is not the one "
                "the digest was recorded for (nothing was unpickled)"
            )
    return actual


def _unsafe_message(
    path: str,
    arch: str,
    refused: list[str],
    spec: CheckpointSpec,
    container: Container,
    part_names: set[str],
) -> str:
    """Explain a refusal and say which setting would (legitimately) change it."""
    shown = ", ".join(refused[:20]) + (f", ... and {len(refused) - 20} more" if len(refused) > 20 else "")
    text = [f"{path}: refusing to unpickle: it needs globals outside the allowlist for '{arch}': {shown}."]
    suspicious = [g for g in refused if g.split(".")[0] in SUSPICIOUS_MODULES]
    raw_pickle = RAW_PICKLE_TENSOR in refused
    library = [g for g in refused if g.split(".")[0] in ("torch", "torchvision") and g != RAW_PICKLE_TENSOR]
    user = [g for g in refused if g not in suspicious and g not in library]
    if suspicious:
        text.append(
            f"{', '.join(suspicious)} can run arbitrary code and has no place in a model "
            "checkpoint: this file may be malicious."
        )
    elif raw_pickle:
        text.append(
            "The file was written with pickle.dump, not torch.save: its tensors would be restored by a "
            "full (code-running) torch.load; re-save it with torch.save."
        )
    elif spec.format == "state_dict":
        text.append(
            "A state_dict pickles no classes: this looks like a whole model saved with "
            'torch.save(model); set format = "whole_model" or "auto".'
        )
    else:
        roots = ([g for g in user if g.rpartition(".")[2] not in part_names] or user)[:3]
        if roots:
            text.append(
                f"If {' or '.join(roots)} is your model class (with the same attribute names as "
                f"'{arch}'), add it to pickled_class_names (its part classes in the same module "
                "are then allowed too)."
            )
        if library:
            text.append(
                f"{', '.join(library)} is not part of '{arch}' as configured: check the "
                "architecture arguments (e.g. backbone, bilinear), or save model.state_dict() instead."
            )
        text.append("Set trusted = true only if you trust the file's author: it runs the file's code.")
    if container == "legacy" and spec.format != "state_dict" and not suspicious and not raw_pickle:
        text.append(
            "Legacy (non-zip) whole-model pickles cannot be read weights-only at all: "
            "re-save with a current torch, or as a state_dict."
        )
    return " ".join(text)


def _unpickle(
    fh: BinaryIO,
    container: Container,
    needed: list[str],
    fresh: nn.Module,
    root_class: type,
    arch: str,
    spec: CheckpointSpec,
) -> Any:
    """Weights-only load with the allowlist for ``spec.format``; full unpickling only if trusted."""
    path = where(fh)
    if spec.format == "whole_model" and not needed:
        raise CheckpointFormatMismatch(
            f"{path} holds a plain state_dict (it pickles no module classes), but format is "
            '"whole_model"; set format = "state_dict" or "auto"'
        )
    if spec.format == "state_dict":
        allowed = {qualname(g): g for g in METADATA_GLOBALS}
    else:
        allowed = build_allowlist(fresh, root_class, spec.pickled_class_names)
    refused = [g for g in needed if g not in allowed]
    legacy_model = container == "legacy" and bool(needed) and spec.format != "state_dict"
    if not refused and not legacy_model:
        safe = as_safe_globals({name: allowed[name] for name in needed})
        return torch_load(fh, safe=safe, needed=lambda: list(needed))
    if spec.trusted and spec.format != "state_dict":
        dangerous = [g for g in needed if runs_code(g)]
        if dangerous:
            raise UnsafeCheckpoint(
                f"{path}: refusing to unpickle even though trusted = true: it calls {', '.join(dangerous)},"
                " which runs commands or code; no model class needs that, so the file is not what it claims",
                globals_needed=list(needed),
            )
        log.warning("trusted checkpoint %s: full unpickling (weights_only=False) for %s", path, refused)
        return torch_load(fh, weights_only=False)
    if not refused:
        raise UnsafeCheckpoint(
            f"{path} is a legacy (non-zip) whole-model pickle: it embeds class source, which "
            "torch's weights-only loader cannot read; re-save it with a current torch (the "
            "model or its state_dict), or set trusted = true only if you trust its author",
            globals_needed=list(needed),
        )
    parts = {
        type(m).__name__
        for m in fresh.modules()
        if type(m) is not root_class and type(m).__module__.split(".")[0] not in ("torch", "torchvision")
    }
    raise UnsafeCheckpoint(
        _unsafe_message(path, arch, refused, spec, container, parts), globals_needed=list(needed)
    )


def load_checkpoint(
    arch: str,
    arch_kwargs: Mapping[str, Any],
    spec: CheckpointSpec,
    device: torch.device | str = "cpu",
) -> LoadedCheckpoint:
    """Build ``arch(**arch_kwargs)``, copy the checkpoint's weights in (strict), eval, move.

    The returned module is always a fresh build: an unpickled object is only read.
    """
    if spec.format not in _FORMATS:
        raise ConfigError(f"checkpoint format must be one of {', '.join(_FORMATS)}, got {spec.format!r}")
    root_class = net_spec(arch).root_class  # UnknownArchitecture before touching the file
    _check_class_names(spec.pickled_class_names)
    path = Path(spec.path)
    require_file(path)
    # One open file for digest, scan and load: what was digested is what gets unpickled.
    header: dict[str, Any] = {}
    with open(path, "rb") as fh:
        digest = _check_digest(fh, path, spec.sha256)
        container = sniff_container(fh)
        declared = load_declared(fh, container, arch, arch_kwargs, spec, torch.device(device))
        if declared is not None:  # the file is the model: a .pt2 program, or a pickle of model.py's classes
            return LoadedCheckpoint(declared, {}, digest, "exported" if container == "exported" else "whole_model", False)
        if container == "safetensors":
            if spec.format == "whole_model":
                raise CheckpointFormatMismatch(
                    f"{path} is a safetensors file, which holds tensors (a state_dict), never a whole model; "
                    'set format = "state_dict" or "auto"'
                )
            fresh = _build(arch, arch_kwargs)
            obj, header = read_safetensors(fh)  # no pickle at all
        else:
            try:
                needed = unsafe_globals(fh, container)
            except Exception as exc:  # noqa: BLE001 - a pickle the disassembler cannot read
                raise CheckpointCorrupt(
                    f"{path}: truncated or not a torch checkpoint (unreadable pickle: {exc})"
                ) from None
            fresh = _build(arch, arch_kwargs)
            if root_class is nn.Module:  # a builder of many classes (torchvision): the one built is the root
                root_class = type(fresh)
            obj = _unpickle(fh, container, needed, fresh, root_class, arch, spec)

    split = split_checkpoint(obj, str(path))
    del obj
    split.metadata = {**_small(header), **split.metadata}
    if spec.format == "state_dict" and split.kind == "whole_model":
        raise CheckpointFormatMismatch(
            f"{path} is a whole model (torch.save(model)), not a state_dict; "
            'set format = "whole_model" or "auto"'
        )
    if spec.format == "whole_model" and split.kind != "whole_model":
        raise CheckpointFormatMismatch(
            f"{path} holds a {split.kind.replace('_', ' ')}, not a whole model; "
            'set format = "state_dict" or "auto"'
        )
    _copy_weights(fresh, split.tensors, arch, arch_kwargs, path)
    model = fresh.to(torch.device(device)).eval()
    return LoadedCheckpoint(model, split.metadata, digest, split.kind, split.dataparallel)


def _small(header: dict[str, Any]) -> dict[str, Any]:
    """A safetensors header's metadata, as small JSON (it travels to API responses), or nothing."""
    try:
        out = small_json(header)
    except (ValueError, TypeError, RecursionError):
        log.warning("safetensors metadata dropped: too large or not plain data")
        return {}
    return out if isinstance(out, dict) else {}


def _copy_weights(
    fresh: nn.Module,
    tensors: Mapping[str, torch.Tensor],
    arch: str,
    arch_kwargs: Mapping[str, Any],
    path: Path,
) -> None:
    """Check keys and shapes ourselves (for a readable error), then load_state_dict(strict=True)."""
    expected = fresh.state_dict()
    mismatch = compare_shapes(expected, tensors)
    if not mismatch:
        if getattr(tensors, "_metadata", None) is None and all(k in tensors for k in expected):
            # Whole models and safetensors carry no module versions; with every key present the layout
            # is the current one, so say so (torchvision's MNASNet refuses a state_dict without it).
            tensors = OrderedDict(tensors)
            tensors._metadata = getattr(expected, "_metadata", None)  # type: ignore[attr-defined]
        try:
            fresh.load_state_dict(tensors, strict=True)
            return
        except (RuntimeError, ValueError) as exc:  # e.g. a num_batches_tracked torch would not fill in
            raise StateDictMismatch(
                f"{path} does not load into '{arch}' with {dict(arch_kwargs)}: "
                f"{' '.join(str(exc).split())[:600]}"
            ) from None
    raise StateDictMismatch(
        describe_mismatch(mismatch, arch, arch_kwargs, str(path)),
        missing_keys=mismatch.missing[:10],
        unexpected_keys=mismatch.unexpected[:10],
        shape_mismatches=[
            f"{k}: checkpoint {list(c)} vs model {list(e)}" for k, c, e in mismatch.shapes[:10]
        ],
    )
