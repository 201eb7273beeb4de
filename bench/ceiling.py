"""The ceiling: raw in-process forward throughput of the served model, no HTTP, no decode.

Run as its own process (``python -m bench.ceiling --store DIR --model NAME ...``) with the
same thread settings the servers get, so it measures what the service's inference thread
could do at best on this machine. Prints one JSON object on stdout.

With ``--payload FILE`` it also times the service's own request work done in-process, on one
thread, on that upload: decode + pre-process (``app.runtime.uploads.decode_upload``, the model's
``fast_jpeg`` setting), batched normalisation, forward at batch 1, outputs to numpy
(``pipeline_c1_ms``): what a request at concurrency 1 costs without HTTP, batching or threads.
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
        x = torch.randn(b, channels, h, w, generator=gen).to(net.device)  # on the device already, as the anchors
        inputs[b] = (x, torch.rand(b, n_extra, generator=gen).to(net.device) if net.takes_extra else None)
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


def pipeline(store: Path, name: str, device: str, payload: bytes, seconds: float) -> dict[str, Any]:
    """Median of decode + pre-process + normalise + forward (batch 1) + to numpy, in-process."""
    import torch

    from app.runtime.batch_input import batch_input, decode_on_device
    from app.runtime.items import InferenceItem
    from app.runtime.preprocess import Preprocessor
    from app.runtime.uploads import decode_upload
    from bench.workload import forward, load_net

    net = load_net(store, name, device)
    pre = Preprocessor(net.config.preprocess, default_resize=None)
    n_extra = int(net.config.arguments.get("n_extra", 1))
    scalar = torch.full((1, n_extra), 0.5) if net.takes_extra else None
    sync = torch.cuda.synchronize if net.device.type == "cuda" else (lambda: None)

    def once() -> None:
        upload = decode_upload(payload, pre, net.device, max_pixels=10**9)
        item = InferenceItem(image=upload.image, encoded=upload.encoded)
        decode_on_device([item], pre, net.device, net.config.preprocess.color_mode)  # GPU: nvJPEG
        out = forward(net, batch_input([item], pre, net.device), scalar)
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.float().cpu().numpy()
        sync()

    times: list[float] = []
    with torch.inference_mode():
        for _ in range(3):
            once()
        start = time.perf_counter()
        while len(times) < 5 or time.perf_counter() - start < seconds:
            t0 = time.perf_counter()
            once()
            times.append(time.perf_counter() - t0)
    return {"pipeline_c1_ms": 1000 * statistics.median(times), "pipeline_iterations": len(times),
            "fast_jpeg": pre.fast_jpeg}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--batch-sizes", default="1,4,8")
    p.add_argument("--seconds", type=float, default=5.0, help="timed seconds per batch size")
    p.add_argument("--payload", type=Path, help="also time decode + pre-process + forward of this upload")
    args = p.parse_args(argv)
    from bench.workload import set_threads

    set_threads(args.threads)
    sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    result = measure(args.store, args.model, args.device, sizes, args.seconds)
    if args.payload is not None:
        result.update(pipeline(args.store, args.model, args.device, args.payload.read_bytes(), args.seconds / 2))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
