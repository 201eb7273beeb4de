"""The checkout stands alone: no file reads or links to a path above the repository root.

A user clones this repository and nothing beside it, so a test, script, benchmark or document that
reaches outside the checkout (a sibling folder, the checkout's parent) works only on the machine where
it was written. Scanned: every file git knows of here (tracked, plus untracked files that are not
ignored), text only. Two kinds of reference are caught:

- ``Path(__file__)`` climbing more folders (``.parent``, ``.parents[n]``, ``/ ".."``) than lie between
  the file and the root, and ``ROOT.parent`` / ``ROOT / ".."`` on the root itself;
- relative paths that start with ``../``. In Markdown, YAML and other data files they are resolved from
  the file's own folder (how links, kustomize and compose read them); in code (Python, shell) also from
  the repository root, the working directory of the scripts, the service and pytest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THIS = Path(__file__).resolve()
MAX_BYTES = 2_000_000

# path-traversal strings that tests send to the service on purpose (they must be refused there)
PROBES = {"../../etc/passwd", "../x"}

CODE_SUFFIXES = {".py", ".sh", ".bash", ""}
# Path(__file__)[.resolve()|.absolute()] then a chain of .parent / .parents[n] / (/ "..")
FILE_CHAIN = re.compile(
    r"Path\(\s*__file__\s*\)(?:\.resolve\(\)|\.absolute\(\))?"
    r"(?P<chain>(?:\.parent\b(?!s)|\.parents\[\d+\]|\s*/\s*[\"']\.\.[\"'])+)"
)
CHAIN_STEP = re.compile(r"\.parents\[(\d+)\]|\.parent\b|[\"']\.\.[\"']")
ROOT_UP = re.compile(r"\bROOT\.parent\b|\bROOT\s*/\s*[\"']\.\.[\"']")
# a relative path starting at a token boundary: not part of a URL or of a longer path ("/static/../x")
RELATIVE_UP = re.compile(r"(?<![\w./\\-])((?:\.\./)+)([\w.\-/]*)")


def _files() -> list[Path]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: no file list to scan")
    out = subprocess.run([git, "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True, timeout=60).stdout
    return [ROOT / name for name in sorted(set(out.decode().split("\0"))) if name]


def _text(path: Path) -> str | None:
    try:
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_BYTES:
            return None
        raw = path.read_bytes()
    except OSError:
        return None
    if b"\0" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _chain_levels(chain: str) -> int:
    levels = 0
    for step in CHAIN_STEP.finditer(chain):
        levels += int(step.group(1)) + 1 if step.group(1) is not None else 1
    return levels


def escapes(rel: Path, text: str) -> list[str]:
    """What in ``text`` (the file at ``rel``, relative to the root) points above the root."""
    found: list[str] = []
    depth = len(rel.parent.parts)  # folders between the root and the file
    lines = text.splitlines()

    def where(pos: int) -> str:
        n = text.count("\n", 0, pos)
        return f"{rel}:{n + 1}: {lines[n].strip()[:120] if n < len(lines) else ''}"

    if rel.suffix == ".py":
        for m in FILE_CHAIN.finditer(text):
            if _chain_levels(m.group("chain")) > depth + 1:  # one level from the file to its folder
                found.append(where(m.start()))
        found.extend(where(m.start()) for m in ROOT_UP.finditer(text))
    is_code = rel.suffix in CODE_SUFFIXES
    for m in RELATIVE_UP.finditer(text):
        ups = len(m.group(1)) // 3
        token = m.group(1) + m.group(2)
        if rel.parts[0] == "tests" and token in PROBES:
            continue
        if ups > depth or (is_code and ups > 0):
            found.append(where(m.start()))
    return found


def test_no_file_reaches_above_the_repository_root() -> None:
    hits: list[str] = []
    for path in _files():
        if path.resolve() == THIS:
            continue
        text = _text(path)
        if text is not None:
            hits.extend(escapes(path.relative_to(ROOT), text))
    assert not hits, (
        "these files refer to paths outside the repository, which a fresh clone does not have "
        "(copy what they need into the repository; a deliberate path-traversal probe in a test "
        "goes into PROBES):\n" + "\n".join(hits)
    )


@pytest.mark.parametrize(("rel", "text"), [
    ("tests/api/test_x.py", 'SPECS = Path(__file__).resolve().parents[2].parent / "shared" / "specs"\n'),
    ("tests/api/test_x.py", 'SPECS = Path(__file__).resolve().parents[3] / "shared"\n'),
    ("tests/api/test_x.py", 'SPECS = Path(__file__).parent.parent.parent.parent / "shared"\n'),
    ("tests/api/test_x.py", 'SPECS = Path(__file__).resolve().parents[2] / ".." / "shared"\n'),
    ("tests/x.py", 'SPECS = ROOT.parent / "shared"\n'),
    ("tests/api/test_x.py", '"""the schemas from ``../shared/specs``."""\n'),
    ("scripts/x.sh", 'cp ../shared/specs/*.yaml tests/\n'),
    ("docs/x.md", "see [the notes](../../shared/docs/notes.md)\n"),
    ("README.md", "see [the notes](../shared/docs/notes.md)\n"),
])
def test_the_scan_catches_references_above_the_root(rel: str, text: str) -> None:
    assert escapes(Path(rel), text), text


@pytest.mark.parametrize(("rel", "text"), [
    ("tests/api/test_x.py", 'ROOT = Path(__file__).resolve().parents[2]\n'),
    ("tests/api/test_x.py", 'SPECS = Path(__file__).resolve().parents[1] / "specs"\n'),
    ("bench/run_bench.py", 'ROOT = Path(__file__).resolve().parent.parent\n'),
    ("app/api/routes/ui.py", 'STATIC_DIR = Path(__file__).resolve().parents[2] / "static"\n'),
    ("deploy/README.md", "[the README](../README.md#deployment)\n"),
    ("docs/x.md", "[admin routes](../app/api/routes/admin.py)\n"),
    ("scripts/x.sh", 'cd "$(dirname "$0")/.."\n'),
    ("tests/api/test_x.py", 'client.get("/static/../demo_trained.py")\n'),
    ("tests/unit/test_x.py", 'file = "../../etc/passwd"\n'),
])
def test_the_scan_passes_references_inside_the_root(rel: str, text: str) -> None:
    assert not escapes(Path(rel), text), text
