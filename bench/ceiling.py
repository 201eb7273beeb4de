"""The ceiling: raw in-process forward throughput of the served model, no HTTP, no decode.

Run as its own process (``python -m bench.ceiling --store DIR --model NAME ...``) with the
same thread settings the servers get, so it measures what the service's inference thread
could do at best on this machine. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def measure(store: Path, name: str, device: str, batch_sizes: list[int], seconds: float,
            min_iters: int = 3, warmup_iters: int = 2, rounds: int = 3) -> dict[str, Any]:
    import torch

    from bench.workload import forward, load_net

    net = load_net(store, name, device)
    h, w = net.config.preprocess.resize or (224, 224)
    channels = 3 if net.config.preprocess.color_mode == "RGB" else 1
    n_extra = int(net.config.arguments.get("n_extra", 1))
    sync = torch.cuda.synchronize if net.device.type == "cuda" else (lambda: None)
    out: dict[str, Any] = {"threads": torch.get_num_threads(), "device": str(net.device), "batches": {}}
    gen = torch.Generator().manual_seed(0)
    inputs = {}
    for b in batch_sizes:
        x = torch.randn(b, channels, h, w, generator=gen)
        inputs[b] = (x, torch.rand(b, n_extra, generator=gen) if net.takes_extra else None)
    times: dict[int, list[float]] = {b: [] for b in batch_sizes}
    with torch.inference_mode():
        for b in batch_sizes:
            for _ in range(warmup_iters):
                forward(net, *inputs[b])
        sync()
        # round-robin over the batch sizes so a burst of outside load hits all of them alike
        for _ in range(rounds):
            for b in batch_sizes:
                start = time.perf_counter()
                done = 0
                while done < max(1, min_iters // rounds) or time.perf_counter() - start < seconds / rounds:
                    t0 = time.perf_counter()
                    forward(net, *inputs[b])
                    sync()
                    times[b].append(time.perf_counter() - t0)
                    done += 1
                    if len(times[b]) >= 100_000:
                        break
    for b, ts in times.items():
        total, p50 = sum(ts), statistics.median(ts)
        out["batches"][str(b)] = {
            "images_per_s": b * len(ts) / total,
            "images_per_s_at_p50": b / p50,
            "latency_ms_p50": 1000 * p50,
            "latency_ms_mean": 1000 * total / len(ts),
            "iterations": len(ts),
        }
    best = max(out["batches"], key=lambda k: out["batches"][k]["images_per_s"])
    out["best_batch"] = int(best)
    out["best_images_per_s"] = out["batches"][best]["images_per_s"]
    if "1" in out["batches"]:
        out["batch1_latency_ms"] = out["batches"]["1"]["latency_ms_p50"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per batch size")
    args = p.parse_args(argv)
    from bench.workload import set_threads

    set_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    result = measure(args.store, args.model, args.device, sizes, args.seconds)
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
