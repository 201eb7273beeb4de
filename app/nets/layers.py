"""Layer stacks declared in model.toml: a closed list of safe torch layers, built into nn.Sequential.

A stack is a list of tables, each ``{type = "Linear", in_features = 512, out_features = 10}`` with
an optional ``name`` and ``repeat``. Unnamed layers are numbered by their position, exactly as
``nn.Sequential(*layers)`` numbers them; named layers keep their names, as in
``nn.Sequential(OrderedDict(...))``; so the state_dict keys equal those of the user's own module.

Nothing here evaluates a string or resolves a name to a callable: the layer types are a fixed
table, and every argument is type-checked against that table before a layer is constructed.
Errors are ValueError naming the layer (its position and type) and the argument; the loader
turns them into a ConfigError.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from app.nets import register_net

MAX_LAYERS = 512
"""Most layers one stack may expand to (repeats included)."""
MAX_REPEAT = 256
MAX_WIDTH = 1 << 20
"""Largest feature/channel count one layer may declare (the loader's meta-device build checks memory)."""
MAX_DEPTH = 4
"""Deepest nesting of ``Sequential`` blocks."""

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


# --- argument kinds -------------------------------------------------------------------------


def _int(lo: int = 0, hi: int = MAX_WIDTH) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"must be an integer, got {value!r}")
        if not lo <= value <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return value

    check.__doc__ = f"integer {lo}..{hi}"
    return check


def _any_int(value: Any) -> Any:
    """Dimension indices (may be negative)."""
    if isinstance(value, bool) or not isinstance(value, int) or not -8 <= value <= 8:
        raise ValueError(f"must be a dimension index between -8 and 8, got {value!r}")
    return value


def _pair(lo: int = 0, hi: int = 4096) -> Callable[[Any], Any]:
    one = _int(lo, hi)

    def check(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ValueError(f"must be an integer or a pair of integers, got {value!r}")
            return tuple(one(v) for v in value)
        return one(value)

    return check


def _float(lo: float, hi: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number, got {value!r}")
        if not lo <= float(value) <= hi:
            raise ValueError(f"must be between {lo} and {hi}, got {value}")
        return float(value)

    return check


def _bool(value: Any) -> Any:
    if not isinstance(value, bool):
        raise ValueError(f"must be true or false, got {value!r}")
    return value


def _choice(*allowed: str) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in allowed:
            raise ValueError(f"must be one of {', '.join(map(repr, allowed))}, got {value!r}")
        return value

    return check


def _padding(value: Any) -> Any:
    if isinstance(value, str):
        return _choice("same", "valid")(value)
    return _pair(0, 4096)(value)


@dataclass(frozen=True)
class LayerType:
    """One allowed layer: its torch class, its arguments (name -> checker) and which are required."""

    cls: type[nn.Module]
    args: Mapping[str, Callable[[Any], Any]]
    required: tuple[str, ...] = ()


_POOL = {"kernel_size": _pair(1), "stride": _pair(1), "padding": _pair(0), "ceil_mode": _bool}

LAYER_TYPES: dict[str, LayerType] = {
    "Linear": LayerType(
        nn.Linear, {"in_features": _int(1), "out_features": _int(1), "bias": _bool}, ("in_features", "out_features")
    ),
    "Conv2d": LayerType(
        nn.Conv2d,
        {
            "in_channels": _int(1), "out_channels": _int(1), "kernel_size": _pair(1, 64), "stride": _pair(1, 64),
            "padding": _padding, "dilation": _pair(1, 64), "groups": _int(1), "bias": _bool,
            "padding_mode": _choice(*_PADDING_MODES),
        },
        ("in_channels", "out_channels", "kernel_size"),
    ),
    "BatchNorm1d": LayerType(
        nn.BatchNorm1d,
        {"num_features": _int(1), "eps": _float(0, 1), "momentum": _float(0, 1), "affine": _bool,
         "track_running_stats": _bool},
        ("num_features",),
    ),
    "BatchNorm2d": LayerType(
        nn.BatchNorm2d,
        {"num_features": _int(1), "eps": _float(0, 1), "momentum": _float(0, 1), "affine": _bool,
         "track_running_stats": _bool},
        ("num_features",),
    ),
    "ReLU": LayerType(nn.ReLU, {"inplace": _bool}),
    "GELU": LayerType(nn.GELU, {"approximate": _choice("none", "tanh")}),
    "Sigmoid": LayerType(nn.Sigmoid, {}),
    "Tanh": LayerType(nn.Tanh, {}),
    "Dropout": LayerType(nn.Dropout, {"p": _float(0, 1), "inplace": _bool}),
    # dim is required: nn.Softmax() without it guesses the dimension (and warns).
    "Softmax": LayerType(nn.Softmax, {"dim": _any_int}, ("dim",)),
    "LogSoftmax": LayerType(nn.LogSoftmax, {"dim": _any_int}, ("dim",)),
    "Flatten": LayerType(nn.Flatten, {"start_dim": _any_int, "end_dim": _any_int}),
    "MaxPool2d": LayerType(nn.MaxPool2d, {**_POOL, "dilation": _pair(1)}, ("kernel_size",)),
    "AvgPool2d": LayerType(
        nn.AvgPool2d, {**_POOL, "count_include_pad": _bool, "divisor_override": _int(1)}, ("kernel_size",)
    ),
    "AdaptiveAvgPool2d": LayerType(nn.AdaptiveAvgPool2d, {"output_size": _pair(1)}, ("output_size",)),
    "Identity": LayerType(nn.Identity, {}),
}
"""The closed list of layer types a stack may use."""

BLOCK = "Sequential"
"""A nested block: ``{type = "Sequential", layers = [...], repeat = 3}`` (keys ``0.0.weight``, ...)."""

_ENTRY_KEYS = {"type", "name", "repeat"}


def _where(path: str, index: int, type_name: Any) -> str:
    return f"{path}[{index}] ({type_name})" if isinstance(type_name, str) else f"{path}[{index}]"


def _child_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.isidentifier() or len(name) > 100:
        raise ValueError(f"{where}: name must be a plain identifier (letters, digits, _), got {name!r}")
    return name


def _build_layer(entry: Mapping[str, Any], where: str) -> nn.Module:
    layer = LAYER_TYPES[entry["type"]]
    kwargs: dict[str, Any] = {}
    for key, value in entry.items():
        if key in _ENTRY_KEYS:
            continue
        check = layer.args.get(key)
        if check is None:
            accepted = ", ".join(sorted(layer.args)) or "none"
            raise ValueError(f"{where}: unknown argument {key!r} (accepted: {accepted})")
        try:
            kwargs[key] = check(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {key} {exc}") from None
    missing = [k for k in layer.required if k not in kwargs]
    if missing:
        raise ValueError(f"{where}: missing required argument(s) {', '.join(missing)}")
    try:
        return layer.cls(**kwargs)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def _expand(spec: Any, path: str, depth: int, budget: list[int]) -> list[tuple[str | None, nn.Module]]:
    """(name or None, module) per position of one stack level, repeats expanded."""
    if not isinstance(spec, Sequence) or isinstance(spec, (str, bytes)):
        raise ValueError(f"{path} must be a list of layer tables, got {type(spec).__name__}")
    if not spec:
        raise ValueError(f"{path} is empty: a stack needs at least one layer")
    out: list[tuple[str | None, nn.Module]] = []
    for index, entry in enumerate(spec):
        if not isinstance(entry, Mapping):
            raise ValueError(f"{path}[{index}] must be a table like {{type = \"Linear\", ...}}, got {entry!r}")
        type_name = entry.get("type")
        where = _where(path, index, type_name)
        if type_name is None:
            raise ValueError(f"{where}: missing 'type'")
        if type_name != BLOCK and type_name not in LAYER_TYPES:
            raise ValueError(
                f"{where}: unknown layer type {type_name!r} (allowed: {', '.join([*LAYER_TYPES, BLOCK])})"
            )
        repeat = entry.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
            raise ValueError(f"{where}: repeat must be an integer between 1 and {MAX_REPEAT}, got {repeat!r}")
        name = _child_name(entry["name"], where) if "name" in entry else None
        if name is not None and repeat > 1:
            raise ValueError(
                f"{where}: a repeated layer cannot have a name (its copies are numbered); "
                f"put it in a named {{type = \"{BLOCK}\", layers = [...]}} block instead"
            )
        for _ in range(repeat):
            budget[0] -= 1
            if budget[0] < 0:
                raise ValueError(f"{path}: more than {MAX_LAYERS} layers")
            if type_name == BLOCK:
                extra = set(entry) - _ENTRY_KEYS - {"layers"}
                if extra:
                    raise ValueError(f"{where}: unknown argument(s) {', '.join(sorted(extra))} (accepted: layers)")
                if depth >= MAX_DEPTH:
                    raise ValueError(f"{where}: blocks nested deeper than {MAX_DEPTH}")
                module: nn.Module = _sequential(
                    _expand(entry.get("layers"), f"{where}.layers", depth + 1, budget), where
                )
            else:
                module = _build_layer(entry, where)
            out.append((name, module))
    return out


def _sequential(children: list[tuple[str | None, nn.Module]], where: str) -> nn.Sequential:
    named: OrderedDict[str, nn.Module] = OrderedDict()
    for position, (name, module) in enumerate(children):
        key = name if name is not None else str(position)
        if key in named:
            raise ValueError(f"{where}: layer name {key!r} is used twice")
        named[key] = module
    return nn.Sequential(named)


def build_stack(spec: Any, *, path: str = "layers") -> nn.Sequential:
    """An nn.Sequential from a declared stack (see the module docstring); ValueError naming any problem."""
    return _sequential(_expand(spec, path, 0, [MAX_LAYERS]), path)


def output_width(stack: nn.Module) -> int | None:
    """out_features of the stack's last Linear (or out_channels of its last Conv2d); None if neither."""
    last: int | None = None
    for module in stack.modules():
        if isinstance(module, nn.Linear):
            last = module.out_features
        elif isinstance(module, nn.Conv2d):
            last = module.out_channels
    return last


def check_classes(stack: nn.Module, num_classes: int, what: str) -> None:
    """The stack's last Linear/Conv2d must give ``num_classes`` outputs (the runtime's labels and shapes)."""
    width = output_width(stack)
    if width is not None and width != num_classes:
        raise ValueError(
            f"{what} ends with {width} outputs but num_classes = {num_classes}: set num_classes = {width}"
        )


class FlatStack(nn.Sequential):
    """A stack fed the flattened image, ``(B, C*H*W)``: an MLP served as an image classifier.

    A subclass of nn.Sequential with the same children, so its state_dict keys are the stack's.
    """

    def forward(self, x):  # type: ignore[override]  # noqa: ANN001, ANN201 - nn.Sequential's signature
        return super().forward(x.flatten(1))


@register_net("layer_stack", task="classification", heads=("logits",), head_shapes=(("num_classes",),))
def layer_stack(
    *, layers: list[dict[str, Any]] | None = None, num_classes: int = 10, flatten_input: bool = False
) -> nn.Sequential:
    """A whole model declared as a stack; ``flatten_input = true`` feeds it the flattened image
    (an MLP such as Linear(784, 256), ReLU, Linear(256, 10) on 28 x 28 grey images)."""
    if layers is None:
        raise ValueError("layers is required: a list of layer tables")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if not isinstance(flatten_input, bool):
        raise ValueError(f"flatten_input must be true or false, got {flatten_input!r}")
    stack = build_stack(layers, path="layers")
    check_classes(stack, num_classes, "layers")
    return FlatStack(OrderedDict(stack.named_children())) if flatten_input else stack
