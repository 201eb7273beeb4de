"""Which of bench/gpu-requirements.txt this Python lacks (by distribution metadata and version), for
bench/gpu.sh to install from its wheels; torch and torchvision are never listed (see gpu.sh).

    python -m bench.gpu_deps missing bench/gpu-requirements.txt [--skip NAME ...]   # prints what is missing
"""

from __future__ import annotations

import re
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

_REQ = re.compile(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?\s*(>=\s*([0-9][0-9.]*))?")


def _tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:4])


def missing(requirements: Path, skip: tuple[str, ...] = ()) -> list[str]:
    out = []
    for line in requirements.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = _REQ.match(line)
        if not m or m.group(1).lower() in ("torch", "torchvision", *skip):
            continue
        try:
            have = version(m.group(1))
        except PackageNotFoundError:
            out.append(line.replace(" ", ""))
            continue
        if m.group(4) and _tuple(have) < _tuple(m.group(4)):
            out.append(line.replace(" ", ""))
    return out


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] != "missing" or (len(argv) > 2 and argv[2] != "--skip"):
        print(__doc__, file=sys.stderr)
        return 2
    print(" ".join(missing(Path(argv[1]), tuple(a.lower() for a in argv[3:]))))  # gpu.sh splits it, no globbing
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
