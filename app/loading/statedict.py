"""Turning whatever torch.load returned into (state_dict, metadata), and explaining mismatches."""

from __future__ import annotations

import argparse
import json
import re
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn
from torch.nn.modules.utils import consume_prefix_in_state_dict_if_present

from app.errors import CheckpointCorrupt

Kind = Literal["state_dict", "wrapped_state_dict", "whole_model"]

# Checked in this order; the first whose value is a state_dict or a module wins.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "module")
_METADATA_MAX_JSON = 16 * 1024
_TRAINING_STATE = re.compile(r"optim|schedul|scaler|(^|_)ema($|_)", re.I)


@dataclass
class SplitCheckpoint:
    """The tensors to load plus everything learned about how the file was saved."""

    kind: Kind
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    wrapper_key: str | None = None
    dataparallel: bool = False
    root: nn.Module | None = None  # the unpickled module (whole model), already unwrapped


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict-like walk over _parameters/_buffers/_modules without calling any hook.

    An unpickled module's __dict__ came from the file: walking the dicts ourselves
    avoids running state_dict hooks the file could have planted.
    """
    out: dict[str, torch.Tensor] = OrderedDict()
    seen: set[int] = set()

    def walk(mod: Any, prefix: str) -> None:
        if id(mod) in seen or not isinstance(mod, nn.Module):
            return
        seen.add(id(mod))
        d = mod.__dict__
        for name, p in (d.get("_parameters") or {}).items():
            if isinstance(p, torch.Tensor):
                out[prefix + name] = p.detach()
        skip = d.get("_non_persistent_buffers_set") or set()
        for name, b in (d.get("_buffers") or {}).items():
            if isinstance(b, torch.Tensor) and name not in skip:
                out[prefix + name] = b.detach()
        for name, child in (d.get("_modules") or {}).items():
            walk(child, f"{prefix}{name}.")

    walk(module, "")
    return out


def small_json(value: Any) -> Any:
    """``value`` as plain JSON data if it is small; raises ValueError otherwise.

    Metadata travels to API responses: keep lists like mask_values, drop optimizer state.
    """

    def conv(v: Any) -> Any:
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, torch.Tensor):
            if v.numel() == 1:
                return v.item()
            raise ValueError("tensor")
        if isinstance(v, argparse.Namespace):
            v = vars(v)
        if isinstance(v, Mapping):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if hasattr(v, "item") and callable(v.item):  # numpy scalars
            return conv(v.item())
        raise ValueError(type(v).__name__)

    out = conv(value)
    if len(json.dumps(out)) > _METADATA_MAX_JSON:
        raise ValueError("too large")
    return out


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def _take_metadata(entries: Mapping[Any, Any], meta: dict[str, Any], dropped: list[str]) -> None:
    for key, value in entries.items():
        if _TRAINING_STATE.search(str(key)):
            dropped.append(str(key))  # optimizer/scheduler state: resumable training, not serving info
            continue
        try:
            meta[str(key)] = small_json(value)
        except (ValueError, TypeError, RecursionError):
            dropped.append(str(key))


def split_checkpoint(obj: Any, where: str) -> SplitCheckpoint:
    """Classify a loaded object: whole model, {"state_dict"/"model": ...} wrapper, or state_dict."""
    meta: dict[str, Any] = {}
    dropped: list[str] = []
    wrapper_key: str | None = None
    inner = obj
    if isinstance(obj, Mapping) and not isinstance(obj, nn.Module):
        for key in WRAPPER_KEYS:
            if key in obj and (_is_state_dict(obj[key]) or isinstance(obj[key], nn.Module)):
                wrapper_key, inner = key, obj[key]
                _take_metadata({k: v for k, v in obj.items() if k != key}, meta, dropped)
                break
    if isinstance(inner, nn.Module):
        dp = isinstance(inner, nn.DataParallel)
        root = inner.module if dp else inner
        return SplitCheckpoint(
            "whole_model", dict(module_tensors(root)), meta, dropped, wrapper_key, dp, root
        )
    if not isinstance(inner, Mapping):
        raise CheckpointCorrupt(
            f"{where}: not a model checkpoint: it holds a {type(obj).__name__}, "
            "not a state_dict or an nn.Module"
        )
    tensors: dict[str, torch.Tensor] = OrderedDict()
    extras: dict[str, Any] = {}
    for key, value in inner.items():
        if isinstance(value, torch.Tensor):
            tensors[str(key)] = value
        else:
            extras[str(key)] = value
    if not tensors:
        raise CheckpointCorrupt(
            f"{where}: no tensors found (top-level keys: {', '.join(map(str, list(obj)[:10])) or 'none'}); "
            f"expected a state_dict or one of the wrappers {', '.join(WRAPPER_KEYS)}"
        )
    _take_metadata(extras, meta, dropped)
    if getattr(inner, "_metadata", None) is not None:
        tensors = OrderedDict(tensors)
        tensors._metadata = inner._metadata  # type: ignore[attr-defined] - module versions for load_state_dict
    dp = bool(tensors) and all(k.startswith("module.") for k in tensors)
    if dp:
        tensors = OrderedDict(tensors) if not isinstance(tensors, OrderedDict) else tensors
        consume_prefix_in_state_dict_if_present(tensors, "module.")
    kind: Kind = "wrapped_state_dict" if wrapper_key else "state_dict"
    return SplitCheckpoint(kind, tensors, meta, dropped, wrapper_key, dp)


@dataclass
class Mismatch:
    missing: list[str]
    unexpected: list[str]
    shapes: list[tuple[str, tuple[int, ...], tuple[int, ...]]]  # key, checkpoint, model

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.shapes)


def compare_shapes(expected: Mapping[str, torch.Tensor], got: Mapping[str, torch.Tensor]) -> Mismatch:
    """Exact key/shape comparison; a missing BatchNorm num_batches_tracked is tolerated
    because load_state_dict itself fills it in for old checkpoints."""
    missing = [k for k in expected if k not in got and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in got if k not in expected]
    shapes = [
        (k, tuple(got[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in got and tuple(got[k].shape) != tuple(v.shape)
    ]
    return Mismatch(missing, unexpected, shapes)


_SHAPE_HINTS: tuple[tuple[str, str], ...] = (
    (r"(^|\.)fc_add\.", "fc_add shape differs: check n_extra / num_classes"),
    (r"^outc\.", "outc shape differs: check n_classes"),
    (r"^up\d+\.", "up-path shapes differ: check bilinear / base_channels"),
    (r"^(inc|down\d+)\.", "encoder shapes differ: check n_channels / base_channels"),
    (r"^(net\.|backbone\.)?conv1\.weight$", "first convolution differs: check the input channels / backbone"),
    (r"(^|\.)layer\d\.", "residual blocks differ: check backbone"),
    (r"(^|\.)(fc|output|fc\d|head)(\.|$)", "classifier shape differs: check num_classes"),
)


def mismatch_hints(m: Mismatch, arch_kwargs: Mapping[str, Any]) -> list[str]:
    """Human hints derived from which keys/shapes disagree."""
    hints: list[str] = []

    def add(text: str) -> None:
        if text not in hints:
            hints.append(text)

    for key, _, _ in m.shapes:
        for pattern, text in _SHAPE_HINTS:
            if re.search(pattern, key):
                add(text)
                break
    if any(k.startswith("module.") for k in m.unexpected):
        add(
            "checkpoint keys start with 'module.' (saved from nn.DataParallel/DDP) but not all of them; "
            "re-save model.module.state_dict()"
        )
    odd = m.missing + m.unexpected
    if any(re.match(r"up\d+\.up\.", k) for k in odd):
        add(
            "up-sampling weights present on one side only: check bilinear "
            f"(configured {arch_kwargs.get('bilinear', False)})"
        )
    prefix = _shared_prefix_shift(m.missing, m.unexpected)
    if prefix:
        add(prefix)
    elif not any(k.startswith("module.") for k in odd) and any(
        re.search(r"(^|\.)layer\d\.\d+\.", k) for k in odd
    ):
        add(
            "residual block keys differ: check backbone (resnet18/34 use BasicBlock, resnet50/101 Bottleneck)"
        )
    return hints


def _shared_prefix_shift(missing: list[str], unexpected: list[str]) -> str | None:
    """Spot a whole-checkpoint prefix difference like 'model.' or 'net.'."""
    if not missing or not unexpected:
        return None
    miss = set(missing)
    for key in unexpected[:50]:
        head, dot, rest = key.partition(".")
        if dot and rest in miss:
            return f"checkpoint keys carry an extra '{head}.' prefix the architecture does not have"
    for key in missing[:50]:
        head, dot, rest = key.partition(".")
        if dot and rest in set(unexpected):
            return f"the architecture expects keys under '{head}.' but the checkpoint has them at top level"
    return None


def _listed(items: list[str], limit: int = 10) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def describe_mismatch(m: Mismatch, arch: str, arch_kwargs: Mapping[str, Any], where: str) -> str:
    parts = [f"{where} does not match architecture '{arch}' with {dict(arch_kwargs)}"]
    if m.missing:
        parts.append(f"{len(m.missing)} missing key(s): {_listed(m.missing)}")
    if m.unexpected:
        parts.append(f"{len(m.unexpected)} unexpected key(s): {_listed(m.unexpected)}")
    if m.shapes:
        shown = [f"{k} checkpoint {list(c)} vs model {list(e)}" for k, c, e in m.shapes]
        parts.append(f"{len(m.shapes)} shape mismatch(es): {_listed(shown)}")
    hints = mismatch_hints(m, arch_kwargs)
    if hints:
        parts.append("hints: " + "; ".join(hints))
    return "; ".join(parts)
