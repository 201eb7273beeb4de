"""The package's shape, checked from its source: no import cycles, thin routes, a registry that
knows nothing of metrics, no branching on the kind of model outside the runtimes."""

from __future__ import annotations

import ast
import re
from pathlib import Path

APP = Path(__file__).resolve().parents[2] / "app"


def _module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when ``path`` is imported (not inside functions or TYPE_CHECKING blocks)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in APP.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = {m for m in _top_level_imports(path) if m in modules and m != name}
        # a registry's submodules import their own package to register themselves (app.nets)
        graph[name] = {m for m in edges if not name.startswith(m + ".")}
    return graph


def test_no_import_cycles_in_app() -> None:
    graph, state, stack = _graph(), {}, []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == [], "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_registry_imports_nothing_from_observability() -> None:
    imports = _top_level_imports(APP / "registry.py")
    assert not any(m.startswith("app.observability") for m in imports), imports


def test_no_branching_on_the_kind_of_model_outside_the_runtimes() -> None:
    offenders = [
        f"{p.relative_to(APP.parent)}:{i}"
        for p in APP.rglob("*.py") if "runtime" not in p.relative_to(APP).parts[:1]
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if re.search(r"\btask\s*==|==\s*[\"'](segmentation|classification)[\"']", line)
    ]
    assert offenders == []


def test_routes_and_batcher_stay_framework_and_torch_free() -> None:
    for path in (APP / "api" / "routes").glob("*.py"):
        assert not any(m == "torch" or m.startswith("torch.") for m in _top_level_imports(path)), path
    batching = _top_level_imports(APP / "batching.py")
    assert not any(m.split(".")[0] in {"torch", "fastapi", "starlette"} for m in batching), batching


def test_every_error_type_lives_in_app_errors() -> None:
    found = []
    for path in APP.rglob("*.py"):
        if path.name == "errors.py" and path.parent == APP:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and any(
                (isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id == "ServiceError"))
                for b in node.bases
            ):
                found.append(f"{path.relative_to(APP.parent)}:{node.name}")
    assert found == []


def test_the_server_never_imports_the_trainer() -> None:
    graph, seen, todo = _graph(), set(), ["app.main", "app.cli", "app.demo.store"]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(graph.get(node, ()))
    assert "app.demo.store" in seen and not {"app.demo.train", "app.demo.data"} & seen
