"""Whole-model pickles of classes only the user's code defines: the operator's ``model.py``.

``model.py`` is Python and runs with the server's rights when imported, so it is imported only when
the operator sets ``MODSERVE_ALLOW_MODEL_CODE`` (checked by the runtime factory before this module is
reached) and only from the model's own folder on disk; the admin API never writes one. The pickle
itself is still read weights-only: its globals may name the classes ``model.py`` defines (under
``__main__``, ``model`` or a name listed in ``pickled_class_names``), torch/torchvision layers, and
nothing else; code-execution globals are refused as for every checkpoint.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import logging
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO

from torch import nn

from app.errors import CheckpointFormatMismatch, ConfigError, UnsafeCheckpoint
from app.loading.allowlist import METADATA_GLOBALS, as_safe_globals, known_library_class, qualname, runs_code
from app.loading.files import torch_load, where

log = logging.getLogger(__name__)


def import_model_code(path: Path) -> ModuleType:
    """Import ``path`` as a module of its own (a fresh one per load, so a reload sees edits)."""
    if not path.is_file():
        raise ConfigError(f"{path}: not found; python_* architectures need a model.py beside model.toml")
    source = path.read_bytes()
    name = f"modserve_model_code_{hashlib.sha256(str(path).encode() + source).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    log.warning("importing operator model code %s (MODSERVE_ALLOW_MODEL_CODE is set)", path)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the operator's code may raise anything; say what and where
        raise ConfigError(f"{path}: importing it failed: {type(exc).__name__}: {exc}") from None
    sys.modules.pop(name, None)  # never importable by name: only this load's allowlist reaches it
    return module


def _code_classes(module: ModuleType) -> dict[str, type]:
    return {
        cls.__name__: cls for _, cls in inspect.getmembers(module, inspect.isclass)
        if cls.__module__ == module.__name__
    }


def code_allowlist(module: ModuleType, needed: Iterable[str], pickled_class_names: Iterable[str]) -> dict[str, Any]:
    """Name -> object for each global of the pickle that model.py, torch or torchvision explains."""
    classes = _code_classes(module)
    prefixes = {"__main__", "model", *(n.strip().rpartition(".")[0] for n in pickled_class_names if n.strip())}
    allowed: dict[str, Any] = {qualname(obj): obj for obj in METADATA_GLOBALS}
    allowed[qualname(nn.DataParallel)] = nn.DataParallel
    for name in needed:
        prefix, _, short = name.rpartition(".")
        if prefix in prefixes and short in classes:
            allowed[name] = classes[short]
        elif (library := known_library_class(name)) is not None:
            allowed[name] = library
    return allowed


def load_with_model_code(
    fh: BinaryIO, needed: list[str], code: Path, pickled_class_names: Iterable[str]
) -> nn.Module:
    """Unpickle a whole model weights-only with the classes of ``code``; return the model."""
    path = where(fh)
    dangerous = [g for g in needed if runs_code(g)]
    if dangerous:
        raise UnsafeCheckpoint(
            f"{path}: refusing to unpickle: it calls {', '.join(dangerous)}, which runs commands or code",
            globals_needed=list(needed),
        )
    module = import_model_code(code)
    allowed = code_allowlist(module, needed, pickled_class_names)
    refused = [g for g in needed if g not in allowed]
    if refused:
        raise UnsafeCheckpoint(
            f"{path}: refusing to unpickle: {', '.join(refused[:10])} is neither a class of {code.name} (pickled as"
            " __main__.X, model.X or a name in pickled_class_names) nor a torch/torchvision layer",
            globals_needed=list(needed),
        )
    obj = torch_load(fh, safe=as_safe_globals({g: allowed[g] for g in needed}), needed=lambda: list(needed))
    if isinstance(obj, nn.DataParallel):
        obj = obj.module
    if not isinstance(obj, nn.Module):
        raise CheckpointFormatMismatch(
            f"{path} holds a {type(obj).__name__}, not a whole model; python_* architectures serve"
            " torch.save(model) files"
        )
    return obj
