"""The checks on a ``.pt2`` archive's program (``models/model.json``) before torch sees it.

Where torch would run something a crafted program says (see exported.py): sympy ``eval``s every
symbolic shape expression, ``ExportedProgram.module()`` ``exec``s the guards, and each node's target
is resolved from ``torch`` by name and called. So every expression, guard, name and target must match
a strict grammar or a closed list: operators come from an allowlist of ATen operators that the
torchvision families, U-Nets and MLPs use (no sparse, nested, ``empty``/``set_``/``as_strided``, file
or console operators: a sparse tensor's unchecked indices let a forward write anywhere in memory),
node arguments are tensors, numbers, names and plain strings only, and node metadata is dropped.
"""

from __future__ import annotations

import json
import re
from typing import Any

from app.errors import CheckpointCorrupt, CheckpointFormatMismatch, UnsafeCheckpoint

ATEN_OPERATORS = frozenset("""
conv1d conv2d conv3d convolution conv_transpose1d conv_transpose2d conv_transpose3d linear matmul mm bmm addmm
baddbmm einsum scaled_dot_product_attention embedding
batch_norm native_batch_norm _native_batch_norm_legit_no_training layer_norm native_layer_norm group_norm
native_group_norm instance_norm rms_norm
relu relu_ relu6 gelu gelu_ silu silu_ sigmoid sigmoid_ tanh tanh_ hardswish hardswish_ hardsigmoid hardsigmoid_
hardtanh hardtanh_ leaky_relu leaky_relu_ elu elu_ selu celu mish softplus prelu glu log_sigmoid threshold
softmax _softmax log_softmax _log_softmax
max_pool1d max_pool2d max_pool3d max_pool2d_with_indices avg_pool1d avg_pool2d avg_pool3d adaptive_avg_pool1d
adaptive_avg_pool2d _adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool2d upsample_bilinear2d
upsample_nearest2d upsample_bicubic2d _upsample_bilinear2d_aa pixel_shuffle pixel_unshuffle pad constant_pad_nd
reflection_pad2d replication_pad2d
dropout dropout_ feature_dropout alpha_dropout native_dropout
add add_ sub sub_ rsub mul mul_ div div_ neg abs exp log log1p sqrt rsqrt pow clamp clamp_ clamp_min clamp_max
minimum maximum where masked_fill masked_fill_ eq ne lt le gt ge logical_and logical_or logical_not bitwise_not
erf floor ceil round sign reciprocal square fill_ zeros_like ones_like full_like new_zeros lerp
mean sum amax amin max min argmax argmin std var norm linalg_vector_norm prod cumsum logsumexp topk sort
view reshape flatten unflatten permute transpose swapaxes t contiguous clone squeeze unsqueeze expand expand_as
repeat tile cat concat stack split split_with_sizes chunk unbind select slice narrow index index_select gather
roll flip movedim alias detach lift_fresh_copy to _to_copy type_as
sym_size sym_numel sym_stride _assert_tensor_metadata _assert_scalar _functional_assert_scalar
sym_constrain_range_for_size
""".split())
"""Operators a program may call, by ATen name (any overload)."""
_SYMINT_OPS = {f"_operator.{op}" for op in ("getitem", "add", "sub", "mul", "floordiv", "mod", "neg", "eq", "ge", "le", "gt", "lt")}
_SYMINT_ARGS = frozenset({"as_sym_int", "as_int", "as_sym_bool", "as_bool", "as_tensor", "as_none"})
_NO_ARGS = frozenset({"as_operator", "as_string_to_argument", "as_graph", "as_custom_obj"})
"""Arguments that name a Python object (resolved from ``torch`` by getattr), a sub-graph or a custom class."""
MAX_INT = 1 << 31
_OPERATOR = re.compile(r"^torch\.ops\.aten\.([a-z_][a-z0-9_]{0,99})\.([a-zA-Z_][A-Za-z0-9_]{0,99})$")
NAME = re.compile(r"^([A-Za-z_][A-Za-z0-9_]{0,199}(\.[A-Za-z0-9_]{1,200}){0,32})?$")
_EXPR_TOKEN = re.compile(r"\s*(?:([A-Za-z][A-Za-z0-9]*)|'([su]\d{1,6})'|(\d{1,19})|(//|==|<=|>=|[-+*/%(),<>=]))")
_EXPR_WORDS = frozenset({
    "Symbol", "Integer", "positive", "integer", "True", "False", "Add", "Mul", "Mod", "FloorDiv", "CeilDiv",
    "PythonMod", "Max", "Min", "Abs", "IntTrueDiv", "CleanDiv", "TruncToInt", "oo",
    "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
})
MAX_EXPR_CHARS = 1024
MAX_EXPR_COMMAS = 32
MAX_EXPRESSIONS = 50_000
"""Bounds on what sympy evaluates (a U-Net's longest expression is about 250 characters with 10
commas): no powers, floats or rationals, few arguments (a Max compares them pairwise), few symbols."""
MAX_EXPR_SYMBOLS = 8
_GUARD_TERM = r"(?:L\['[A-Za-z_][A-Za-z0-9_]{0,99}'\](?:\.size\(\)\[\d{1,2}\]|\[\d{1,3}\])*|-?\d{1,19})"
_GUARD = re.compile(rf"^{_GUARD_TERM}\s*(?:==|!=|<=|>=|<|>)\s*{_GUARD_TERM}$")


def refuse(path: str, why: str) -> UnsafeCheckpoint:
    return UnsafeCheckpoint(f"{path}: refusing this torch.export archive: {why} (nothing in it was run)", globals_needed=[])


def _check_expr(path: str, text: str) -> None:
    if len(text) > MAX_EXPR_CHARS or text.count(",") > MAX_EXPR_COMMAS or "**" in text:
        raise refuse(path, f"symbolic expression {text[:80]!r} is too long, has too many arguments or a power")
    pos, symbols = 0, set()
    while pos < len(text):
        m = _EXPR_TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise refuse(path, f"symbolic expression {text[:80]!r} is not a plain shape expression")
        word = m.group(1)
        if word and word not in _EXPR_WORDS and not re.fullmatch(r"[su]\d{1,6}", word):
            raise refuse(path, f"symbolic expression {text[:80]!r} names {word!r}")
        symbols.add(m.group(2) or (word if word and word not in _EXPR_WORDS else None))
        if len(symbols - {None}) > MAX_EXPR_SYMBOLS:
            raise refuse(path, f"symbolic expression {text[:80]!r} has more than {MAX_EXPR_SYMBOLS} symbols")
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1


def _check_node(path: str, node: dict[str, Any]) -> None:
    """Its operator is allowlisted; arithmetic on sizes takes sizes and small numbers only."""
    target = str(node["target"])
    if target in _SYMINT_OPS:
        for arg in node.get("inputs") or []:
            kinds = set(arg.get("arg", {})) if isinstance(arg, dict) else {"?"}
            if not kinds <= _SYMINT_ARGS:
                raise refuse(path, f"{target} takes {', '.join(sorted(kinds))}: size arithmetic takes sizes and numbers")
        return
    m = _OPERATOR.match(target)
    if not m:
        raise refuse(path, f"operator {target[:100]!r} is not an ATen operator")
    if m.group(1) not in ATEN_OPERATORS:
        raise refuse(path, f"operator {target!r} is not one modserve serves (sparse, memory-layout, factory, file"
                     " and console operators are refused); export with standard layers")


def _walk(path: str, node: Any, key: str, counts: list[int]) -> Any:
    if isinstance(node, dict):
        if "target" in node and "inputs" in node and "outputs" in node:  # a graph node
            _check_node(path, node)
            node = {**node, "metadata": {}}  # stack traces, module paths: resolved by getattr, not needed
        refused = _NO_ARGS & set(node)
        if refused:
            raise refuse(path, f"an argument is {', '.join(sorted(refused))}: only tensors, numbers and names pass")
        return {k: _walk(path, v, k, counts) for k, v in node.items()}
    if isinstance(node, list):
        return [_walk(path, v, key, counts) for v in node]
    if isinstance(node, str):
        if key == "expr_str":
            counts[0] += 1
            if counts[0] > MAX_EXPRESSIONS:
                raise refuse(path, f"it holds more than {MAX_EXPRESSIONS} symbolic expressions")
            _check_expr(path, node)
        elif key in ("name", "fqn", "target", "forward_arg_names") or key.endswith("_name"):
            if not NAME.match(node):
                raise refuse(path, f"{key} {node[:80]!r} is not a plain name")
    elif isinstance(node, int) and not isinstance(node, bool) and key in ("as_int", "as_ints") and abs(node) > MAX_INT:
        raise refuse(path, f"an integer argument is {node}, beyond {MAX_INT}")
    return node


def checked_program(path: str, raw: bytes) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """The program JSON, checked and cleaned; with its user inputs' specs and its number of outputs."""
    try:
        program = json.loads(raw)
    except (ValueError, RecursionError):
        raise CheckpointCorrupt(f"{path}: the archive's program is not readable JSON") from None
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise CheckpointCorrupt(f"{path}: the archive's program has no graph")
    for expr in program.get("range_constraints") or {}:
        _check_expr(path, str(expr))
    for guard in program.get("guards_code") or []:
        if not isinstance(guard, str) or not _GUARD.match(guard):
            raise refuse(path, f"guard {str(guard)[:100]!r} is not a plain size comparison")
    if program["graph_module"].get("treespec_namedtuple_fields"):
        raise refuse(path, "its inputs or outputs use named tuples; return a plain tensor or tuple")
    program = _walk(path, program, "", [0])
    signature = program["graph_module"].get("signature") or {}
    inputs = [s for s in signature.get("input_specs", []) if "user_input" in s]
    outputs = [s for s in signature.get("output_specs", []) if "user_output" in s]
    _require_dynamic_batch(path, program, inputs)
    return program, inputs, len(outputs)


def tensor_sizes(program: dict[str, Any], name: str | None) -> list[dict[str, Any]]:
    return program["graph_module"]["graph"].get("tensor_values", {}).get(name, {}).get("sizes") or []


def _require_dynamic_batch(path: str, program: dict[str, Any], inputs: list[dict[str, Any]]) -> None:
    for spec in inputs:
        name = spec["user_input"].get("arg", {}).get("as_tensor", {}).get("name")
        sizes = tensor_sizes(program, name)
        if not sizes or "as_expr" not in sizes[0]:
            fixed = sizes[0].get("as_int") if sizes else None
            raise CheckpointFormatMismatch(
                f"{path}: input {name!r} was exported with a fixed batch size ({fixed}); modserve batches requests,"
                " so export with a dynamic batch dimension: batch = torch.export.Dim('batch', min=1, max=1024);"
                " torch.export.export(model, (x,), dynamic_shapes=({0: batch},)) (one entry per input)"
            )


def parameter_sizes(program: dict[str, Any]) -> dict[str, list[int]]:
    """Weight and constant name -> the shape the program's graph expects for it."""
    out: dict[str, list[int]] = {}
    for spec in (program["graph_module"].get("signature") or {}).get("input_specs", []):
        for kind, name_key in (("parameter", "parameter_name"), ("buffer", "buffer_name"),
                               ("tensor_constant", "tensor_constant_name")):
            if kind in spec:
                sizes = tensor_sizes(program, spec[kind].get("arg", {}).get("name"))
                out[spec[kind].get(name_key, "")] = [d.get("as_int", -1) for d in sizes]
    return out
