"""Turn raw measurements into the table, the JSON file and the latency-throughput plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

SYSTEMS = ("service", "service_v2", "naive", "litserve")
"""service: native JPEG uploads; service_v2: the same server, v2 binary FP32 tensors (bench.requests_v2)."""

# Targets from issue 16 (CPU, 640 x 480 JPEG uploads): measured and reported, never asserted.
# (label, key, at, bound): at is "best" (best over the sweep), a concurrency, "all" (the worst over
# every concurrency) or "c>=16" (the worst over those); ">=" for ratios, "<=" for overhead_c1_ms.
_COMMON: list[tuple[str, str, Any, float]] = [
    ("service/naive >= 1.0 at every concurrency", "service_over_naive", "all", 1.0),
    ("request-path overhead at c=1 <= 2 ms", "overhead_c1_ms", 1, 2.0),
]
TARGETS: dict[str, list[tuple[str, str, Any, float]]] = {
    "compute": [("service/ceiling >= 0.95 (best)", "service_over_ceiling", "best", 0.95), *_COMMON],
    "overhead": [("service/LitServe >= 1.3 at c>=16", "service_over_litserve", "c>=16", 1.3), *_COMMON],
}


def merge_step(parts: list[dict[str, Any]], duration: float) -> dict[str, Any]:
    """Merge the JSON of every load-generator process of one step."""
    lat = np.array([x for p in parts for x in p["latencies_ms"]], dtype=np.float64)
    kinds: dict[str, int] = {}
    for p in parts:
        for k, v in p["error_kinds"].items():
            kinds[k] = kinds.get(k, 0) + v
    first = next((p["first_error"] for p in parts if p.get("first_error")), None)
    return {
        "concurrency": sum(p["concurrency"] for p in parts),
        "client_procs": len(parts),
        "throughput_rps": len(lat) / duration,
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else None,
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else None,
        "mean_ms": float(lat.mean()) if len(lat) else None,
        "ok": int(len(lat)),
        "errors": sum(p["errors"] for p in parts),
        "error_kinds": kinds,
        "first_error": first,
        "late_or_cancelled": sum(p["late"] + p["cancelled_at_drain"] for p in parts),
        "hit_max_requests": any(p["hit_max_requests"] for p in parts),
    }


def merge_ceilings(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Ceiling measured before and after the systems: the best of each batch size is the ceiling
    (outside load can only make a forward slower, never faster)."""
    best: dict[str, Any] = {"threads": runs[0]["threads"], "device": runs[0]["device"], "batches": {}}
    for b in runs[0]["batches"]:
        best["batches"][b] = dict(max((r["batches"][b] for r in runs), key=lambda v: v["images_per_s"]))
        best["batches"][b]["latency_ms_p50"] = min(r["batches"][b]["latency_ms_p50"] for r in runs)
    top = max(best["batches"], key=lambda k: best["batches"][k]["images_per_s"])
    best["best_batch"], best["best_images_per_s"] = int(top), best["batches"][top]["images_per_s"]
    if "1" in best["batches"]:
        best["batch1_latency_ms"] = best["batches"]["1"]["latency_ms_p50"]
    piped = [r["pipeline_c1_ms"] for r in runs if r.get("pipeline_c1_ms") is not None]
    if piped:
        best["pipeline_c1_ms"] = min(piped)
    return best


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b <= 0:
        return None
    return a / b


def _step(result: dict[str, Any], system: str, conc: int) -> dict[str, Any] | None:
    for s in result["systems"].get(system, {}).get("steps", []):
        if s["concurrency"] == conc:
            return s
    return None


def _best(result: dict[str, Any], system: str) -> float | None:
    steps = result["systems"].get(system, {}).get("steps", [])
    return max((s["throughput_rps"] for s in steps), default=None)


def add_ratios(result: dict[str, Any]) -> dict[str, Any]:
    """Per concurrency and per configuration (best throughput over the sweep) ratios."""
    ceiling = (result.get("ceiling") or {}).get("best_images_per_s")
    rows = []
    for conc in result["concurrency"]:
        thr = {k: (s["throughput_rps"] if s else None) for k in SYSTEMS for s in [_step(result, k, conc)]}
        rows.append({
            "concurrency": conc,
            "service_over_ceiling": _ratio(thr["service"], ceiling),
            "service_over_naive": _ratio(thr["service"], thr["naive"]),
            "service_over_litserve": _ratio(thr["service"], thr["litserve"]),
            "service_v2_over_ceiling": _ratio(thr["service_v2"], ceiling),
        })
    result["per_concurrency"] = rows
    result["service_over_ceiling"] = _ratio(_best(result, "service"), ceiling)
    result["service_over_naive"] = _ratio(_best(result, "service"), _best(result, "naive"))
    result["service_over_litserve"] = _ratio(_best(result, "service"), _best(result, "litserve"))
    c1 = _step(result, "service", 1)
    p50 = c1["p50_ms"] if c1 else None
    b1 = (result.get("ceiling") or {}).get("batch1_latency_ms")
    piped = (result.get("ceiling") or {}).get("pipeline_c1_ms")
    # issue 16: service p50 minus the same decode + pre-process + forward done in-process
    result["overhead_c1_ms"] = (p50 - piped) if p50 is not None and piped else None
    result["overhead_c1_vs_forward_ms"] = (p50 - b1) if p50 is not None and b1 else None
    result["targets"] = _targets(result)
    return result


def _targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for label, key, at, bound in TARGETS.get(result["config"], []):
        rows = result["per_concurrency"]
        if at == "best" or key == "overhead_c1_ms":
            value = result.get(key)
        elif at in ("all", "c>=16"):
            values = [r[key] for r in rows if r[key] is not None and (at == "all" or r["concurrency"] >= 16)]
            value = min(values) if values else None
        else:
            value = next((r[key] for r in rows if r["concurrency"] == at), None)
        met = None if value is None else (value <= bound if key == "overhead_c1_ms" else value >= bound)
        out.append({"target": label, "key": key, "at": at, "bound": bound, "value": value, "met": met})
    return out


def _f(x: float | None, fmt: str = "{:.1f}") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else fmt.format(x)


def format_table(results: list[dict[str, Any]]) -> str:
    present = [n for n in SYSTEMS if any(r["systems"].get(n, {}).get("steps") for r in results)]
    head = ["config", "conc"]
    for name in present:
        head += [f"{name} req/s", "p50 ms", "p99 ms", "err"]
    head += ["svc/ceil", "svc/naive", "svc/lit"]
    rows = [head]
    for r in results:
        for ratio in r["per_concurrency"]:
            conc = ratio["concurrency"]
            row = [r["config"], str(conc)]
            for name in present:
                s = _step(r, name, conc)
                row += ([_f(s["throughput_rps"]), _f(s["p50_ms"]), _f(s["p99_ms"]), str(s["errors"])]
                        if s else ["-"] * 4)
            row += [_f(ratio[k], "{:.2f}") for k in ("service_over_ceiling", "service_over_naive",
                                                      "service_over_litserve")]
            rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    out = ["\n".join(lines), ""]
    for r in results:
        c = r.get("ceiling") or {}
        per = ", ".join(f"b{b}: {_f(v['images_per_s'])} img/s" for b, v in c.get("batches", {}).items())
        out.append(f"[{r['config']}] ceiling ({c.get('threads')} threads): {per}; batch-1 latency "
                   f"{_f(c.get('batch1_latency_ms'), '{:.2f}')} ms; in-process decode + pre-process + forward "
                   f"{_f(c.get('pipeline_c1_ms'), '{:.2f}')} ms")
        out.append(f"[{r['config']}] best-over-sweep: service/ceiling {_f(r['service_over_ceiling'], '{:.2f}')}, "
                   f"service/naive {_f(r['service_over_naive'], '{:.2f}')}, service/LitServe "
                   f"{_f(r['service_over_litserve'], '{:.2f}')}; overhead at c=1: "
                   f"{_f(r['overhead_c1_ms'], '{:.2f}')} ms over the in-process pipeline, "
                   f"{_f(r.get('overhead_c1_vs_forward_ms'), '{:.2f}')} ms over the bare forward")
        batches = [f"c{s['concurrency']}: {_f(s.get('mean_batch'), '{:.2f}')}"
                   for s in r["systems"].get("service", {}).get("steps", [])]
        if batches:
            out.append(f"[{r['config']}] service mean batch size: " + ", ".join(batches))
        if any((x["service_over_ceiling"] or 0) > 1.05 for x in r["per_concurrency"]):
            out.append(f"[{r['config']}] WARNING: the service beat the ceiling: the ceiling runs were slowed "
                       "by outside load; rerun on a quiet machine")
        for t in r["targets"]:
            verdict = {True: "met", False: "NOT met", None: "n/a"}[t["met"]]
            out.append(f"[{r['config']}] target {t['target']}: {_f(t['value'], '{:.2f}')} ({verdict})")
        for name in SYSTEMS:
            for s in r["systems"].get(name, {}).get("steps", []):
                if s["errors"]:
                    out.append(f"[{r['config']}] {name} c={s['concurrency']}: {s['errors']} errors "
                               f"{s['error_kinds']}; first: {s['first_error']}")
    return "\n".join(out)


def write_json(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def plot(result: dict[str, Any], path: Path) -> None:
    """Latency (p50 solid, p99 dotted) against throughput, one line per system, labelled by concurrency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
    colors = {"service": "tab:blue", "service_v2": "tab:purple", "naive": "tab:orange", "litserve": "tab:green"}
    labels = {"service": "modserve", "service_v2": "modserve v2 tensors", "naive": "naive FastAPI",
              "litserve": "LitServe"}
    for name in SYSTEMS:
        steps = [s for s in result["systems"].get(name, {}).get("steps", []) if s["p50_ms"] is not None]
        if not steps:
            continue
        x = [s["throughput_rps"] for s in steps]
        ax.plot(x, [s["p50_ms"] for s in steps], "o-", color=colors[name], label=f"{labels[name]} p50")
        ax.plot(x, [s["p99_ms"] for s in steps], "^:", color=colors[name], alpha=0.7, label=f"{labels[name]} p99")
        for s in steps:
            ax.annotate(f"c{s['concurrency']}", (s["throughput_rps"], s["p50_ms"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7, color=colors[name])
    ceiling = result.get("ceiling") or {}
    if ceiling.get("best_images_per_s"):
        ax.axvline(ceiling["best_images_per_s"], color="grey", ls="--",
                   label=f"ceiling b{ceiling['best_batch']} ({ceiling['best_images_per_s']:.1f} img/s)")
    ax.set_xlabel("throughput (requests/s = images/s)")
    ax.set_ylabel("latency (ms)")
    ax.set_yscale("log")
    m = result["model"]
    ax.set_title(f"{result['config']}: {m['architecture']} ({m['arguments'].get('backbone', 'unet')}) "
                 f"{m['input_size'][0]}x{m['input_size'][1]}, {result['device']} {m['dtype']}, "
                 f"max_batch {m['max_batch_size']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
