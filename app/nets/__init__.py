"""A closed registry of the network architectures this service can build.

Configs name an architecture and its keyword arguments; everything else (the
loader, the runtime, config validation) asks this registry what a name means, so
the set of buildable nets lives in one place and unknown names or arguments are
rejected before any checkpoint is touched. Pure torch: no web-framework import.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from torch import nn

from app.errors import UnknownArchitecture

Task = Literal["segmentation", "classification", "tensor"]
Builder = Callable[..., nn.Module]
B = TypeVar("B", bound=Builder)

_TASKS: frozenset[str] = frozenset(typing.get_args(Task))


@dataclass(frozen=True)
class NetSpec:
    """What a registered name builds and how its forward is called and answers."""

    name: str
    builder: Builder
    root_class: type[nn.Module]
    """Class of the module the builder returns (the loader checks full-model pickles against it)."""
    task: Task
    takes_extra: bool
    """``forward(image, scalar)`` instead of ``forward(image)``."""
    heads: tuple[str, ...]
    """Names of the forward outputs, in order; one name means a plain tensor, not a tuple."""
    defaults: dict[str, Any]
    """Default builder kwargs, so a config can be completed without calling the builder."""
    head_shapes: tuple[tuple[int | str, ...], ...] = ()
    """Per head, its shape without the batch dimension: ints, -1 for any size, or the name of the
    builder argument that sets it (``"num_classes"``)."""
    classes: str = "num_classes"
    """The builder argument that holds the number of classes."""
    ignored_inputs: tuple[str, ...] = ()
    """Inputs a request may send because the user's class takes them, but that the net does not use
    (the notes' dual-output class has ``forward(x, add_variable)`` and ignores ``add_variable``)."""
    resolve: Callable[[NetSpec, dict[str, Any]], NetSpec] | None = None
    """For nets whose heads or inputs come from model.toml (exported programs): the spec for given arguments."""

    def for_arguments(self, arguments: dict[str, Any]) -> NetSpec:
        """This spec as a net built with ``arguments`` answers (heads, inputs)."""
        return self.resolve(self, arguments) if self.resolve is not None else self

    def head_shape(self, head: str, arguments: dict[str, Any]) -> tuple[int, ...]:
        """The shape of ``head`` (batch dimension first, as -1) for a net built with ``arguments``."""
        dims = self.head_shapes[self.heads.index(head)]
        args = {**self.defaults, **arguments}
        return (-1, *(int(args[d]) if isinstance(d, str) else d for d in dims))

    def num_classes(self, arguments: dict[str, Any]) -> int:
        return int({**self.defaults, **arguments}[self.classes])


_REGISTRY: dict[str, NetSpec] = {}


def _keyword_defaults(name: str, builder: Builder) -> dict[str, Any]:
    """Builders must be keyword-only with defaults: configs pass arguments by name only."""
    defaults: dict[str, Any] = {}
    for param in inspect.signature(builder).parameters.values():
        if param.kind is not inspect.Parameter.KEYWORD_ONLY or param.default is inspect.Parameter.empty:
            raise TypeError(f"builder {name!r}: parameter {param.name!r} must be keyword-only with a default")
        defaults[param.name] = param.default
    return defaults


def _return_class(name: str, builder: Builder) -> type[nn.Module]:
    """The root class comes from the return annotation, one source of truth with the builder."""
    hint = typing.get_type_hints(builder).get("return")
    if not (isinstance(hint, type) and issubclass(hint, nn.Module)):
        raise TypeError(f"builder {name!r} must annotate its return type with an nn.Module subclass")
    return hint


def register_net(
    name: str, *, task: Task, heads: tuple[str, ...], takes_extra: bool = False,
    head_shapes: tuple[tuple[int | str, ...], ...] | None = None, classes: str = "num_classes",
    ignored_inputs: tuple[str, ...] = (), resolve: Callable[[NetSpec, dict[str, Any]], NetSpec] | None = None,
) -> Callable[[B], B]:
    """Register a keyword-only builder under ``name``; a name can be registered once only."""
    if task not in _TASKS:
        raise ValueError(f"task must be one of {sorted(_TASKS)}, got {task!r}")
    if not heads:
        raise ValueError("a net has at least one head")
    shapes = tuple(head_shapes) if head_shapes is not None else tuple((-1,) for _ in heads)
    if len(shapes) != len(heads):
        raise ValueError(f"{name}: {len(heads)} heads but {len(shapes)} head shapes")

    def decorator(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"architecture {name!r} is already registered")
        _REGISTRY[name] = NetSpec(
            name=name,
            builder=builder,
            root_class=_return_class(name, builder),
            task=task,
            takes_extra=takes_extra,
            heads=tuple(heads),
            defaults=_keyword_defaults(name, builder),
            head_shapes=shapes,
            classes=classes,
            ignored_inputs=tuple(ignored_inputs),
            resolve=resolve,
        )
        return builder

    return decorator


def _spec(name: str) -> NetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownArchitecture(f"unknown architecture {name!r}; known: {', '.join(list_nets())}") from None


def list_nets() -> list[str]:
    """Registered names, sorted so messages and listings are stable."""
    return sorted(_REGISTRY)


def net_spec(name: str) -> NetSpec:
    """The spec for ``name``; ``defaults`` is a copy, so callers cannot alter the registry."""
    spec = _spec(name)
    return dataclasses.replace(spec, defaults=dict(spec.defaults))


def builder_params(name: str) -> set[str]:
    """Keyword arguments the builder accepts, for rejecting unknown config arguments early."""
    return set(_spec(name).defaults)


def get_net(name: str, /, **kwargs: Any) -> nn.Module:
    """Build ``name`` with ``kwargs`` (in train mode, as constructed; the loader calls eval())."""
    spec = _spec(name)
    unknown = set(kwargs) - set(spec.defaults)
    if unknown:
        raise TypeError(
            f"unknown arguments for {name}: {', '.join(sorted(unknown))}"
            f" (accepted: {', '.join(sorted(spec.defaults))})"
        )
    return spec.builder(**kwargs)


__all__ = ["NetSpec", "Task", "builder_params", "get_net", "list_nets", "net_spec", "register_net"]

# Importing the builder modules registers them; they import register_net from above.
from app.nets import declared, layers, resnets, tensor_stack, torchvision_nets, unet  # noqa: E402,F401
