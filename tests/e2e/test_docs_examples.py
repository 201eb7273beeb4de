"""docs/serving-your-model.md runs as written: each example's save block (and model.py) in a fresh folder,
its model.toml beside it, one real server over the store they make, then each request block, whose own
asserts compare the served answer with the user's module."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from support.server import Server, serve_store

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving-your-model.md"
BLOCK = re.compile(r"^```(\w+)(?: ([\w.]+))?\n(.*?)^```$", re.M | re.S)
DOC_URL = "http://127.0.0.1:8000"


@dataclass
class Example:
    name: str
    blocks: dict[str, str] = field(default_factory=dict)
    namespace: dict[str, Any] = field(default_factory=lambda: {"__name__": "docs_example"})


def examples() -> list[Example]:
    found = []
    for section in DOC.read_text().split("<!-- example: ")[1:]:
        name, _, body = section.partition(" -->")
        example = Example(name)
        for lang, role, code in BLOCK.findall(body):
            example.blocks[role or lang] = code
        found.append(example)
    return found


EXAMPLES = examples()


def test_every_kind_has_a_complete_example() -> None:
    assert len(EXAMPLES) == 7
    for example in EXAMPLES:
        assert {"save", "toml", "request"} <= set(example.blocks), example.name
        assert example.blocks["toml"].startswith(f"# store/{example.name}/model.toml"), example.name
        assert DOC_URL in example.blocks["request"], example.name


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    work = tmp_path_factory.mktemp("docs-examples")
    cwd = os.getcwd()
    os.chdir(work)
    sys.path.insert(0, str(work))
    try:
        for example in EXAMPLES:
            if "model.py" in example.blocks:
                (work / "model.py").write_text(example.blocks["model.py"])
            exec(compile(example.blocks["save"], f"{DOC.name}:{example.name}:save", "exec"), example.namespace)
            (work / "store" / example.name / "model.toml").write_text(example.blocks["toml"])
    finally:
        os.chdir(cwd)
        sys.path.remove(str(work))
        sys.modules.pop("model", None)
    with serve_store(work / "store", tmp_path_factory.mktemp("logs"),
                     env={"MODSERVE_ALLOW_MODEL_CODE": "true", "MODSERVE_STRICT_READINESS": "true"}) as server:
        yield server


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_the_request_gets_the_users_answer(served: Server, example: Example) -> None:
    code = example.blocks["request"].replace(DOC_URL, served.url)
    exec(compile(code, f"{DOC.name}:{example.name}:request", "exec"), example.namespace)
    assert example.namespace["r"].status_code == 200, example.namespace["r"].text
