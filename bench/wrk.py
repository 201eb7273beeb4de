"""A closed-loop step with ``wrk`` (C, epoll): a load generator that costs far less CPU per request
than the Python one, so on a small machine it measures the server, not itself.

``wrk`` comes from Debian's packages (``apt-get install wrk``). One body is sent over and over,
with its content type and extra headers; ``--latency`` gives the percentiles.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

_SCRIPT = """
wrk.method = "POST"
local f = assert(io.open("{body}", "rb"))
wrk.body = f:read("*all")
f:close()
{headers}
"""


def available() -> bool:
    return shutil.which("wrk") is not None


def step(url: str, body: Path, headers: dict[str, str], conc: int, duration: float, work: Path) -> dict[str, Any]:
    """requests/s, p50 and p99 (ms) and non-2xx answers of one ``duration``-second step."""
    lines = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items())
    script = work / f"wrk-{abs(hash((str(body), conc)))}.lua"
    script.write_text(_SCRIPT.format(body=body, headers=lines))
    threads = 1 if conc < 4 else 2
    out = subprocess.run(["wrk", "-t", str(threads), "-c", str(conc), "-d", f"{duration:g}s", "--latency",
                          "--timeout", "30s", "-s", str(script), url],
                         capture_output=True, text=True, timeout=duration + 60, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors: (.*)", out)
    return {"rps": round(rps, 1), "p50_ms": _ms(out, "50%"), "p99_ms": _ms(out, "99%"),
            "errors": int(errors.group(1)) if errors else 0,
            **({"socket_errors": socket_errors.group(1)} if socket_errors else {})}


def _ms(out: str, label: str) -> float | None:
    m = re.search(rf"{label}\s+([\d.]+)(us|ms|s)\b", out)
    if not m:
        return None
    value, unit = float(m.group(1)), m.group(2)
    return round(value / 1000 if unit == "us" else value * 1000 if unit == "s" else value, 2)
