"""Which pickle globals a checkpoint needs, and which ones we allow for weights-only loading.

Listing globals never executes the pickle: torch's own static scan for zip files,
``pickletools.genops`` (a disassembler) for legacy streams and whatever torch's scan
cannot parse.
"""

from __future__ import annotations

import argparse
import io
import pickletools
import sys
import zipfile
from collections.abc import Iterable, Mapping
from typing import Any, BinaryIO

import torch
from torch import nn

from app.loading.files import TORCH_LOAD_LOCK, Container

# Plain-data helpers that research scripts put next to weights ({"args": Namespace(...)}).
# Unpickling one is NEWOBJ + __dict__.update: no code of the file runs.
METADATA_GLOBALS: tuple[Any, ...] = (argparse.Namespace,)

# Modules whose globals in a checkpoint mean "this file wants to run something".
SUSPICIOUS_MODULES = frozenset(
    {
        "builtins",
        "__builtin__",
        "os",
        "posix",
        "nt",
        "sys",
        "subprocess",
        "shutil",
        "socket",
        "importlib",
        "runpy",
        "pickle",
        "marshal",
        "types",
        "code",
        "codeop",
        "pty",
        "ctypes",
        "webbrowser",
        "urllib",
        "http",
        "requests",
        "functools",
        "operator",
        "io",
        "pathlib",
    }
)

# Globals that execute code or commands when a pickle calls them. Refused even for a
# ``trusted`` checkpoint: trust covers the author's model classes, never a shell.
_CODE_MODULES = frozenset({
    "os", "posix", "nt", "subprocess", "_posixsubprocess", "runpy", "pty", "ctypes", "importlib",
    "code", "codeop", "marshal", "pickle", "_pickle", "webbrowser", "shutil", "socket", "sys",
    "multiprocessing", "commands", "popen2", "asyncio", "_thread", "threading", "signal",
})
_CODE_BUILTINS = frozenset({
    "exec", "eval", "compile", "__import__", "open", "getattr", "setattr", "delattr", "breakpoint",
    "input", "globals", "locals", "vars", "execfile", "apply", "reload",
})
_CODE_OPERATORS = frozenset({"attrgetter", "methodcaller"})


def runs_code(name: str) -> bool:
    """Whether the pickle global ``module.attr`` is a known code-execution callable."""
    module, _, attr = name.rpartition(".")
    root = module.split(".")[0]
    if root in _CODE_MODULES:
        return True
    if module in ("builtins", "__builtin__"):
        return attr in _CODE_BUILTINS
    if module in ("operator", "_operator"):
        return attr in _CODE_OPERATORS
    return False


# What plain pickle.dump writes for a tensor's storage: it calls torch.load(weights_only=False).
RAW_PICKLE_TENSOR = "torch.storage._load_from_bytes"

_STRING_OPS = {
    "SHORT_BINUNICODE",
    "BINUNICODE",
    "BINUNICODE8",
    "UNICODE",
    "SHORT_BINSTRING",
    "BINSTRING",
    "STRING",
}


def _py3_name(module: str, name: str) -> str:
    """Python 2 names as torch's unpickler maps them (``__builtin__.set`` -> ``builtins.set``)."""
    try:
        from torch._utils import IMPORT_MAPPING, NAME_MAPPING
    except ImportError:  # pragma: no cover
        return f"{module}.{name}"
    if (module, name) in NAME_MAPPING:
        module, name = NAME_MAPPING[(module, name)]
    elif module in IMPORT_MAPPING:
        module = IMPORT_MAPPING[module]
    return f"{module}.{name}"


def _scan_one_pickle(stream: BinaryIO, found: set[str]) -> None:
    """Add GLOBAL / STACK_GLOBAL / INST names of one pickle to ``found`` (stops at STOP)."""
    recent: list[Any] = []
    memo: dict[int, Any] = {}
    for op, arg, _pos in pickletools.genops(stream):
        name = op.name
        if name in ("GLOBAL", "INST"):
            found.add(_py3_name(*str(arg).split(" ", 1)))
        elif name == "STACK_GLOBAL" and len(recent) >= 2:
            found.add(_py3_name(str(recent[-2]), str(recent[-1])))
        if name in _STRING_OPS:
            recent.append(arg.decode("latin-1") if isinstance(arg, bytes) else arg)
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = recent[-1] if recent else None
        elif name == "MEMOIZE":
            memo[len(memo)] = recent[-1] if recent else None
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            recent.append(memo.get(int(arg)))
        elif name not in ("STACK_GLOBAL", "GLOBAL", "FRAME", "PROTO"):
            recent.append(None)
        recent = recent[-4:]


def scan_globals(fh: BinaryIO, container: Container) -> list[str]:
    """All globals the object pickle references (zip: data.pkl; legacy: the first 5 pickles)."""
    found: set[str] = set()
    fh.seek(0)
    if container == "zip":
        with zipfile.ZipFile(fh) as zf:
            name = next(n for n in zf.namelist() if n == "data.pkl" or n.endswith("/data.pkl"))
            _scan_one_pickle(io.BytesIO(zf.read(name)), found)
        return sorted(found)
    # legacy torch.save: magic number, protocol, sys_info, the object, storage keys
    for index in range(5):
        try:
            _scan_one_pickle(fh, found)
        except Exception:  # noqa: BLE001 - trailing raw storage bytes are not a pickle
            if index == 0:
                raise
            break
    return sorted(found)


def _default_safe_names() -> set[str]:
    """torch's built-in weights-only allowlist plus whatever safe_globals is active."""
    try:
        from torch import _weights_only_unpickler as wo

        return set(wo._get_allowed_globals()) | set(wo._get_user_allowed_globals())
    except Exception:  # noqa: BLE001 - private API; worst case we over-report
        return set()


def unsafe_globals(fh: BinaryIO, container: Container) -> list[str]:
    """Globals outside torch's default weights-only allowlist, found without executing anything."""
    with TORCH_LOAD_LOCK:
        if container == "zip":
            try:
                fh.seek(0)
                return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(fh))
            except Exception:  # noqa: BLE001 - its scanner knows few opcodes; fall back to genops
                pass
        safe = _default_safe_names()
    return [g for g in scan_globals(fh, container) if g not in safe]


def qualname(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _sibling_modules(module: str) -> list[str]:
    """``unet.unet_model`` -> also ``unet.unet_parts``: where the reference keeps its part classes."""
    out = [module]
    if module.endswith("_model"):
        out.append(module[: -len("_model")] + "_parts")
    return out


def build_allowlist(net: nn.Module, root_class: type, pickled_class_names: Iterable[str]) -> dict[str, Any]:
    """Name -> object for weights-only loading of a whole-model pickle of this architecture.

    torch/torchvision layer classes come from a fresh build, so a pickle can only
    instantiate layers the configured architecture really has. The root class and our
    own part classes (DoubleConv, ...) are also reachable under the user's names.
    """
    classes = {type(m) for m in net.modules()} | {root_class}
    allowed: dict[str, Any] = {qualname(c): c for c in classes}
    allowed[qualname(nn.DataParallel)] = nn.DataParallel
    for obj in METADATA_GLOBALS:
        allowed[qualname(obj)] = obj
    own_parts = [c for c in classes if c is not root_class and not _is_library_class(c)]
    for pickled in pickled_class_names:
        pickled = pickled.strip()
        if not pickled:
            continue
        allowed[pickled] = root_class
        module = pickled.rpartition(".")[0]
        for mod in _sibling_modules(module):
            for part in own_parts:
                allowed.setdefault(f"{mod}.{part.__name__}", part)
    return allowed


def _is_library_class(cls: type) -> bool:
    return cls.__module__.split(".")[0] in ("torch", "torchvision")


def as_safe_globals(allowed: Mapping[str, Any]) -> list[Any]:
    """safe_globals entries: a bare class under its real name, else an ``(obj, name)`` tuple."""
    return [obj if qualname(obj) == name else (obj, name) for name, obj in allowed.items()]


def known_library_class(name: str) -> type | None:
    """The real torch/torchvision nn.Module class for ``name``, looked up without importing.

    Only already-imported modules are consulted so a crafted name cannot trigger imports.
    """
    module, _, attr = name.rpartition(".")
    if not module.startswith(("torch.nn.", "torchvision.models.")):
        return None
    obj = getattr(sys.modules.get(module), attr, None)
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        return obj
    return None


class StandIn(nn.Module):
    """Inert placeholder for a class (or callable!) named in a pickle we only inspect.

    Constructing or "calling" it stores nothing and runs none of the file's code;
    ``__setstate__`` keeps a module's ``__dict__`` so its state_dict keys can be read.
    """

    pickled_name: str = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> StandIn:
        return super().__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and isinstance(state[0], dict):
            state = state[0]
        if isinstance(state, dict) and isinstance(state.get("_modules"), dict):
            nn.Module.__setstate__(self, state)
        else:
            nn.Module.__init__(self)
            self.__dict__["_standin_state"] = type(state).__name__


def stand_in(name: str) -> type[StandIn]:
    """A distinct StandIn subclass per pickled name, so the root's original name is known."""
    short = name.rpartition(".")[2] or "Global"
    return type(f"StandIn_{short}", (StandIn,), {"pickled_name": name, "__module__": __name__})
