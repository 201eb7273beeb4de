"""The side-by-side GPU bench of issue 16 in one run (``bench/gpu.sh`` calls it after the GPU tier).

    python -m bench.gpu_suite [--out-dir bench/results] [--cpu-smoke]

On CUDA: ResNet50-extra at 224 x 224 (``compute``) and the reference-width U-Net at 256 x 256
(``unet``, base_channels 64), channels_last, ceiling at batch 1/16/64/256; in bf16 the service with
JPEG uploads, the service with binary v2 tensors, LitServe and the naive app at concurrency 1 and 64;
in fp32 the ceiling and both service paths at concurrency 64; then (issue 17) the ResNet in bf16 with
8 HTTP processes at concurrency 64 and 256 (each server start costs 10-15 s on a GPU; with every system
in both precisions the run would not fit in 8 minutes).
Each configuration writes its JSON and plot (``bench.run_bench``) tagged with its dtype, then
``gpu-summary-<date>.json`` collects the headline figures.

``--cpu-smoke``: the same steps shrunk to run on a CPU in about a minute (64 x 64 inputs, a narrow
U-Net, one short step per system, no LitServe, the naive app for the ResNet only), so the script
itself is tested where no GPU is.
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import run_bench

ROOT = Path(__file__).resolve().parent.parent


def plan(smoke: bool) -> list[tuple[str, list[str]]]:
    """(dtype tag, run_bench arguments) per run."""
    if smoke:
        common = ["--device", "cpu", "--image-size", "64", "--base-channels", "4", "--payload-size", "160x120",
                  "--max-batch-size", "4", "--ceiling-batches", "1,2", "--ceiling-seconds", "0.2",
                  "--ceiling-runs", "1", "--concurrency", "1", "--duration", "0.5", "--warmup", "0.2",
                  "--threads", "1", "--dtype", "float32"]
        return [("float32", [*common, "--config", "compute", "--systems", "service,service_v2,naive"]),
                ("float32", [*common, "--config", "unet", "--systems", "service,service_v2"])]
    common = ["--device", "cuda", "--config", "compute", "unet", "--base-channels", "64", "--channels-last",
              "--max-batch-size", "64", "--max-batch-delay-ms", "2", "--ceiling-batches", "1,16,64,256",
              "--ceiling-seconds", "0.6", "--ceiling-runs", "1", "--concurrency", "1,64", "--duration", "2.5",
              "--warmup", "0.5", "--client-procs", "4", "--litserve-fast-queue"]
    return [
        ("bfloat16", [*common, "--dtype", "bfloat16", "--systems", "service,service_v2,naive,litserve"]),
        ("float32", [*common, "--dtype", "float32", "--systems", "service,service_v2", "--concurrency", "64"]),
        # issue 17: 8 HTTP processes and one device process, JPEG uploads, enough clients for 5,000 req/s
        ("bfloat16-w8", [*common, "--dtype", "bfloat16", "--config", "compute", "--systems", "service",
                         "--service-workers", "8", "--concurrency", "64,256", "--client-procs", "6"]),
    ]


def headline(result: dict[str, Any]) -> dict[str, Any]:
    ceiling = result.get("ceiling") or {}
    best = {name: max((s["throughput_rps"] for s in sys.get("steps", [])), default=None)
            for name, sys in result["systems"].items()}
    return {
        "config": result["config"], "dtype": result["model"]["dtype"],
        "ceiling_images_per_s": {b: v["images_per_s"] for b, v in ceiling.get("batches", {}).items()},
        "pipeline_c1_ms": ceiling.get("pipeline_c1_ms"), "best_rps": best,
        "service_over_ceiling": result.get("service_over_ceiling"),
        "overhead_c1_ms": result.get("overhead_c1_ms"),
        "errors": {name: sum(s["errors"] for s in sys.get("steps", [])) + ("error" in sys)
                   for name, sys in result["systems"].items()},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--cpu-smoke", action="store_true", help="shrunk run on the CPU (tests the script)")
    args = parser.parse_args(argv)
    started = time.monotonic()
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    before = set(args.out_dir.glob("*.json")) if args.out_dir.exists() else set()
    for tag, run_args in plan(args.cpu_smoke):
        print(f"gpu_suite: {tag}: python -m bench.run_bench {' '.join(run_args)}", flush=True)
        run_bench.main([*run_args, "--tag", tag, "--out-dir", str(args.out_dir)])
    written = sorted(set(args.out_dir.glob("*.json")) - before)
    rows = [headline(json.loads(p.read_text())) for p in written if not p.name.startswith("gpu-summary")]
    summary = {"date": stamp, "cpu_smoke": args.cpu_smoke, "seconds": round(time.monotonic() - started, 1),
               "files": [p.name for p in written], "runs": rows}
    out = args.out_dir / f"gpu-summary-{stamp}{'-cpu-smoke' if args.cpu_smoke else ''}.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"gpu_suite: wrote {out} ({summary['seconds']} s)", flush=True)
    failed = [r for r in rows if any(r["errors"].values())]
    return 1 if failed or not rows else 0


if __name__ == "__main__":
    raise SystemExit(main())
