"""torch.export archives (.pt2): real exports load and equal the user's module; crafted ones, each a real
code-execution attack on ``torch.export.load`` (proved by running plain torch on it), are refused
without running anything."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from app.errors import CheckpointFormatMismatch, UnsafeCheckpoint
from app.loading import CheckpointSpec, load_checkpoint
from support.notes import ResNetTwoOutputs, craft, export, malicious_pickle

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
S = torch.rand(2, 1, generator=torch.Generator().manual_seed(1))
DUAL = {"outputs": ["probs", "features"], "num_classes": 3, "n_extra": 1}


@pytest.fixture(scope="module")
def dual(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = ResNetTwoOutputs(num_classes=3, backbone="resnet18").eval()
    return model, export(model, (X, S), tmp_path_factory.mktemp("pt2") / "dual.pt2")


def _load(path: Path, arguments: dict[str, Any] = DUAL) -> torch.nn.Module:
    return load_checkpoint("exported_classifier", arguments, CheckpointSpec(path)).model


def _torch_runs_it(path: Path, marker: Path) -> None:
    """What plain torch does with the crafted file: the attack is real (it creates the marker)."""
    try:
        torch.export.load(path).module()(X, S)
    except Exception:  # noqa: BLE001 - the program may break after the payload ran
        pass
    assert marker.exists(), "the crafted archive did not run its payload under plain torch: the test proves nothing"
    marker.unlink()


def test_a_real_export_loads_and_answers_as_the_users_module(dual: tuple[torch.nn.Module, Path]) -> None:
    model, path = dual
    loaded = _load(path)
    with torch.inference_mode():
        for got, want in zip(loaded(X[:1], S[:1]), model(X[:1], S[:1])):
            assert (got - want).abs().max().item() < 1e-5


def _first_expr(program: dict[str, Any]) -> dict[str, Any]:
    for value in program["graph_module"]["graph"]["tensor_values"].values():
        for size in value["sizes"]:
            if "as_expr" in size:
                return size["as_expr"]
    raise AssertionError("no symbolic size in the export")


def _guard(marker: Path) -> Any:
    def change(parts: dict[str, bytes], program: dict[str, Any]) -> None:
        program["guards_code"] = [f"__import__('builtins').open({str(marker)!r}, 'w').close() is None"]
    return change


def _sympy(marker: Path) -> Any:
    def change(parts: dict[str, bytes], program: dict[str, Any]) -> None:
        expr = _first_expr(program)
        expr["expr_str"] = f"__import__('builtins').open({str(marker)!r}, 'w').close() or {expr['expr_str']}"
    return change


def _pickled_weight(marker: Path) -> Any:
    def change(parts: dict[str, bytes], program: dict[str, Any]) -> None:
        config = json.loads(parts["data/weights/model_weights_config.json"])
        first = next(iter(config["config"].values()))
        first["use_pickle"] = True
        parts["data/weights/" + first["path_name"]] = malicious_pickle(marker)
        parts["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    return change


def _sample_inputs(marker: Path) -> Any:
    def change(parts: dict[str, bytes], program: dict[str, Any]) -> None:
        parts["data/sample_inputs/model.pt"] = malicious_pickle(marker)
    return change


@pytest.mark.parametrize("attack", [_guard, _sympy, _pickled_weight],
                         ids=["guards_code-exec", "sympy-eval", "pickled-weight"])
def test_crafted_archives_that_run_code_in_torch_are_refused_without_running(
    tmp_path: Path, dual: tuple[torch.nn.Module, Path], attack: Any
) -> None:
    marker = tmp_path / "ran"
    crafted = craft(dual[1], tmp_path / "crafted.pt2", attack(marker))
    _torch_runs_it(crafted, marker)
    with pytest.raises(UnsafeCheckpoint) as info:
        _load(crafted)
    assert "nothing in it was run" in info.value.message
    assert not marker.exists()


def test_sample_inputs_are_never_read(tmp_path: Path, dual: tuple[torch.nn.Module, Path]) -> None:
    """torch falls back to a full unpickling of sample inputs the weights-only reader refuses; modserve
    never uses them, so it never reads them (the rebuilt archive has none) and the program loads."""
    marker = tmp_path / "ran"
    crafted = craft(dual[1], tmp_path / "crafted.pt2", _sample_inputs(marker))
    _torch_runs_it(crafted, marker)
    loaded = _load(crafted)
    with torch.inference_mode():
        assert loaded(X[:1], S[:1])[0].shape == (1, 3)
    assert not marker.exists()


def _weight(parts: dict[str, bytes], program: dict[str, Any], *, record: bytes | None = None,
            sizes: list[int] | None = None) -> None:
    """Change the first weight: its record's bytes, or the shape its table claims (with a matching record)."""
    config = json.loads(parts["data/weights/model_weights_config.json"])
    meta = next(iter(config["config"].values()))
    if record is not None:
        parts["data/weights/" + meta["path_name"]] = record
    if sizes is not None:
        meta["tensor_meta"]["sizes"] = [{"as_int": n} for n in sizes]
        meta["tensor_meta"]["strides"] = [{"as_int": 1}]
    parts["data/weights/model_weights_config.json"] = json.dumps(config).encode()


def test_compressed_records_are_refused_before_they_expand(tmp_path: Path, dual: tuple[torch.nn.Module, Path]) -> None:
    """A deflated record could expand 1000-fold (a zip bomb); torch.export.save stores records as they are."""
    import zipfile

    bomb = tmp_path / "bomb.pt2"
    with zipfile.ZipFile(dual[1]) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    with pytest.raises(UnsafeCheckpoint, match="is compressed"):
        _load(bomb)


def _node(program: dict[str, Any], op: str) -> dict[str, Any]:
    return next(n for n in program["graph_module"]["graph"]["nodes"] if n["target"] == op)


@pytest.mark.parametrize(("change", "needle"), [
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default").update(target="torch.os.system"), "not an ATen operator"),
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default").update(target="builtins.exec"), "not an ATen operator"),
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default").update(target="torch.ops.aten.from_file.default"),
     "not one modserve serves"),
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default").update(
        target="torch.ops.aten._sparse_coo_tensor_with_dims_and_tensors.default"), "not one modserve serves"),
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default").update(target="torch.ops.aten.empty.memory_format"),
     "not one modserve serves"),
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default")["inputs"].append(
        {"name": "f", "arg": {"as_operator": "torch.os.system"}, "kind": 1}), "as_operator"),
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default").update(
        target="_operator.mul", inputs=[{"name": "a", "arg": {"as_string": "A"}}, {"name": "b", "arg": {"as_int": 9}}]),
     "size arithmetic takes"),
    (lambda parts, p: _node(p, "torch.ops.aten.max_pool2d.default")["inputs"][1]["arg"].update(as_ints=[2**40, 3]),
     "beyond"),
    (lambda parts, p: _first_expr(p).update(expr_str=_first_expr(p)["expr_str"] + " + Float(1, 99999999)"),
     "names 'Float'"),
    (lambda parts, p: _first_expr(p).update(expr_str="Max(" + ", ".join(f"s40+{i}" for i in range(40)) + ")"),
     "too many arguments"),
    (lambda parts, p: _weight(parts, p, record=b""), "but its record holds 0 bytes"),
    (lambda parts, p: _weight(parts, p, sizes=[7]), "the program expects"),
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default").update(target="torch.ops.higher_order.cond"),
     "not an ATen operator"),
    (lambda parts, p: parts.update({"data/aotinductor/model/model.so": b"\x7fELF"}), "data/aotinductor/model/model.so"),
    (lambda parts, p: parts.update({"data/constants/opaque_obj_0": b"x"}), "data/constants/opaque_obj_0"),
    (lambda parts, p: _node(p, "torch.ops.aten.relu.default").update(name="x = 1; import os"), "not a plain name"),
    (lambda parts, p: _first_expr(p).update(expr_str="s40.__class__"), "not a plain shape expression"),
    (lambda parts, p: _first_expr(p).update(expr_str="Symbol('s40') + Function('f')(1)"), "names 'Function'"),
    (lambda parts, p: p.update(guards_code=["L['x'].size()[0] == __import__('os').getpid()"]),
     "not a plain size comparison"),
    (lambda parts, p: p["graph_module"].update(treespec_namedtuple_fields={"T": {"field_names": ["a"]}}),
     "named tuples"),
], ids=["torch.os.system", "builtins.exec", "aten.from_file", "aten-sparse", "aten-empty", "as_operator",
        "symint-string", "huge-int", "sympy-float", "sympy-max-args", "zero-byte-weight", "weight-shape",
        "higher-order-op", "aotinductor-library",
        "opaque-object", "node-name", "sympy-attribute", "sympy-function", "guard-call", "namedtuple"])
def test_anything_but_aten_programs_with_raw_weights_is_refused(
    tmp_path: Path, dual: tuple[torch.nn.Module, Path], change: Any, needle: str
) -> None:
    crafted = craft(dual[1], tmp_path / "crafted.pt2", change)
    with pytest.raises(UnsafeCheckpoint) as info:
        _load(crafted)
    assert needle in info.value.message


def test_a_fixed_batch_is_refused_with_how_to_export(tmp_path: Path) -> None:
    model = ResNetTwoOutputs(num_classes=3, backbone="resnet18").eval()
    path = tmp_path / "fixed.pt2"
    torch.export.save(torch.export.export(model, (X, S)), path)
    with pytest.raises(CheckpointFormatMismatch) as info:
        _load(path)
    assert "fixed batch size (2)" in info.value.message and "torch.export.Dim('batch'" in info.value.message


@pytest.mark.parametrize(("arch", "arguments", "needle"), [
    ("exported_classifier", {"outputs": ["probs"], "num_classes": 3, "n_extra": 1}, "returns 2 outputs"),
    ("exported_classifier", {**DUAL, "n_extra": 0}, "takes 2 inputs"),
    ("resnet50_dual", {"num_classes": 3}, "torch.export.save"),
])
def test_the_declared_interface_must_match_the_program(
    dual: tuple[torch.nn.Module, Path], arch: str, arguments: dict[str, Any], needle: str
) -> None:
    with pytest.raises(CheckpointFormatMismatch) as info:
        load_checkpoint(arch, arguments, CheckpointSpec(dual[1]))
    assert needle in info.value.message


def test_an_exported_architecture_refuses_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save(ResNetTwoOutputs(num_classes=3, backbone="resnet18").state_dict(), path)
    with pytest.raises(CheckpointFormatMismatch, match="is not one"):
        _load(path)


def test_inspect_describes_a_program_and_says_whether_it_loads(tmp_path: Path, dual: tuple[torch.nn.Module, Path]) -> None:
    from app.loading import inspect_checkpoint

    facts = inspect_checkpoint(dual[1])
    assert facts.container == "exported" and "the loader's checks pass" in " ".join(facts.notes)
    assert [(f.arch, f.kwargs) for f in facts.fits] == [
        ("exported_classifier", {"outputs": ["probs", "output1"], "num_classes": 3, "n_extra": 1})]
    assert 'architecture = "exported_classifier"' in facts.to_text()
    marker = tmp_path / "ran"
    crafted = craft(dual[1], tmp_path / "crafted.pt2", _sympy(marker))
    assert "REFUSES" in " ".join(inspect_checkpoint(crafted).notes) and not marker.exists()


def test_an_exported_unet_is_sized_like_the_built_one(tmp_path: Path) -> None:
    """The processed-pixel limit comes from the activation bytes of a forward: a program has no layers
    to hook, so its operators are counted instead (else a 40-megapixel image would pass the limit)."""
    from app import nets
    from app.runtime.budget import activation_bytes_per_pixel

    built = nets.get_net("unet", n_channels=3, n_classes=2, base_channels=4).eval()
    path = export(built, (torch.zeros(2, 3, 48, 40),), tmp_path / "unet.pt2", spatial=True)
    exported = load_checkpoint("exported_segmenter", {"num_classes": 2}, CheckpointSpec(path)).model
    example = (torch.zeros(1, 3, 64, 48),)
    ratio = activation_bytes_per_pixel(exported, example) / activation_bytes_per_pixel(built, example)
    assert 0.9 < ratio < 1.5
