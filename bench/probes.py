"""Small reads around a bench run: probe answers, the service's batch counters, machine facts."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import httpx

from bench import servers


def probe(url: str, image: Path, scalar: str | None) -> dict[str, Any]:
    files = {"image": (image.name, image.read_bytes(), "image/jpeg")}
    data = {"scalar": scalar} if scalar is not None else None
    with httpx.Client(timeout=120, trust_env=False) as http:
        resp = http.post(url, files=files, data=data)
    out: dict[str, Any] = {"status": resp.status_code}
    if resp.status_code == 200:
        pred = resp.json()["predictions"][0]
        out["probs"] = pred.get("probs")
    else:
        out["body"] = resp.text[:500]
    return out


def batch_sizes(server: servers.Server, model: str) -> dict[str, int]:
    with httpx.Client(timeout=30, trust_env=False) as http:
        return http.get(f"{server.base}/v1/models/{model}").json()["batching"]["batch_sizes"]


def mean_batch(before: dict[str, int], after: dict[str, int]) -> float | None:
    diff = {int(k): v - before.get(k, 0) for k, v in after.items()}
    batches = sum(diff.values())
    return sum(k * v for k, v in diff.items()) / batches if batches else None


def compare_probes(result: dict[str, Any]) -> None:
    ref = (result["probe"].get("service") or {}).get("probs")
    for name, out in result["probe"].items():
        probs = out.pop("probs", None)
        if ref is not None and probs is not None and name != "service":
            out["max_abs_diff_vs_service"] = max(abs(a - b) for a, b in zip(ref, probs))


def machine_info() -> dict[str, Any]:
    import torch

    try:
        from importlib.metadata import version

        lit = version("litserve")
    except Exception:
        lit = None
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "litserve": lit, "loadavg_start": os.getloadavg(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
