"""Benchmark modserve against its ceiling and two peers in one run.

    bench/run.sh [--config compute overhead unet] [--quick] [options]

Per configuration: write a model store, measure the raw forward ceiling (bench.ceiling),
then for modserve, a naive FastAPI app and LitServe in turn: start it in its own process
group on a checked free port, wait until ready, send one probe request (outputs compared
with modserve's), run the closed-loop concurrency sweep from separate load-generator
processes (bench.loadgen), stop it and wait for its port to close. Prints one table and
writes bench/results/<config>-<device>-<date>.json and a .png latency-throughput plot.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import report, requests_v2, servers
from bench.probes import batch_sizes, compare_probes, machine_info, mean_batch, probe
from bench.workload import CONFIGS, SCALAR, Workload, build_workload, make_jpegs, write_store

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", nargs="+", choices=sorted(CONFIGS), default=["compute", "overhead"],
                   help="compute: resnet50+scalar 224x224; overhead: resnet18+scalar 64x64; unet: 256x256")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="every system and the ceiling")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="model.toml runtime.dtype (autocast, the service's rule, applied to peers too)")
    p.add_argument("--channels-last", action="store_true", help="model.toml runtime.channels_last")
    p.add_argument("--max-batch-size", type=int, help="service and LitServe (default 8 on CPU, 32 on CUDA)")
    p.add_argument("--max-batch-delay-ms", type=float, default=2.0, help="service; LitServe batch_timeout")
    p.add_argument("--duration", type=float, help="measured seconds per step (default 10; quick 2)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each step (default 2; quick 0.5)")
    p.add_argument("--concurrency", help="comma-separated client counts (default 1,4,16,64; quick 1,4)")
    p.add_argument("--client-procs", type=int, default=1, help="load-generator processes per step")
    p.add_argument("--image-size", type=int, help="model input side (default per config: 224/64/256)")
    p.add_argument("--payload-size", type=_payload_size, default=None,
                   help="JPEG sent by clients: WIDTHxHEIGHT or one side (default 640x480)")
    p.add_argument("--base-channels", type=int, default=16, help="unet width")
    p.add_argument("--ceiling-batches", help="comma-separated batch sizes (default 1,4,8; quick 1,max_batch)")
    p.add_argument("--ceiling-runs", type=int, choices=[1, 2], default=2,
                   help="2: before and after the systems (the better counts); 1: before only (faster)")
    p.add_argument("--ceiling-seconds", type=float, help="timed seconds per batch size (default 5; quick 1)")
    p.add_argument("--threads", type=int, help="torch intra-op threads for every server and the ceiling "
                   "(default: torch's default here, i.e. what the service uses unconfigured)")
    p.add_argument("--systems", default="service,naive,litserve", help="comma-separated subset to run")
    p.add_argument("--naive-endpoint", choices=["sync", "async"], default="sync",
                   help="naive peer: def route in FastAPI's thread pool, or async route blocking the loop")
    p.add_argument("--litserve-fast-queue", action="store_true",
                   help="LitServe peer: fast_queue=True (ZeroMQ) instead of its default mp.Manager queues")
    p.add_argument("--service-workers", type=int, default=1,
                   help="the service's HTTP processes (MODSERVE_WORKERS; 2 or more add a device process)")
    p.add_argument("--service-log-level", default="warning",
                   help="MODSERVE_LOG_LEVEL for the service (default warning: no per-request log line, like the "
                        "peers, which run without access logs); info measures it with its JSON request log")
    p.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--tag", default="", help="appended to the result files' names (e.g. the dtype)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the store, payloads and server logs")
    p.add_argument("--quick", action="store_true", help="tiny smoke run")
    a = p.parse_args(argv)
    a.max_batch_size = a.max_batch_size or (32 if a.device == "cuda" else 8)
    a.duration = a.duration or (2.0 if a.quick else 10.0)
    a.warmup = a.warmup if a.warmup is not None else (0.5 if a.quick else 2.0)
    a.concurrency = [int(c) for c in (a.concurrency or ("1,4" if a.quick else "1,4,16,64")).split(",")]
    a.ceiling_batches = a.ceiling_batches or (f"1,{a.max_batch_size}" if a.quick else "1,4,8")
    a.ceiling_seconds = a.ceiling_seconds or (1.0 if a.quick else 5.0)
    a.systems = [s.strip() for s in a.systems.split(",") if s.strip()]
    if set(a.systems) - set(report.SYSTEMS):
        p.error(f"--systems: choose from {','.join(report.SYSTEMS)}")
    if a.threads is None:
        import torch

        a.threads = torch.get_num_threads()
    return a


def _payload_size(text: str) -> tuple[int, int]:
    """'640x480' (width x height) or '224' -> (height, width)."""
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) == 1:
        return parts[0], parts[0]
    if len(parts) != 2 or min(parts) < 1:
        raise argparse.ArgumentTypeError("expected WIDTHxHEIGHT or one side, e.g. 640x480")
    return parts[1], parts[0]


def child_env(threads: int, log_level: str = "warning") -> dict[str, str]:
    """Same thread settings for every server and the ceiling; no inherited MODSERVE_* surprises."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODSERVE_")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1",
               MODSERVE_LOG_LEVEL=log_level, PYTHONPATH=str(ROOT))
    return env


def run_ceiling(args: argparse.Namespace, store: Path, wl: Workload, payload: Path) -> dict[str, Any]:
    cmd = [PY, "-m", "bench.ceiling", "--store", str(store), "--model", wl.model, "--device", args.device,
           "--threads", str(args.threads), "--batch-sizes", args.ceiling_batches,
           "--seconds", str(args.ceiling_seconds), "--payload", str(payload)]
    out = subprocess.run(cmd, cwd=ROOT, env=child_env(args.threads), capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"ceiling failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def system_spec(name: str, args: argparse.Namespace, store: Path, wl: Workload, port: int
                ) -> tuple[list[str], str, str]:
    """(command, readiness path, predict path) for one system under test."""
    if name in ("service", "service_v2"):
        path = f"/v2/models/{wl.model}/infer" if name == "service_v2" else f"/v1/models/{wl.model}/predict"
        return ([PY, "-m", "app", "--store", str(store), "--port", str(port), "--device", args.device,
                 "--workers", str(args.service_workers)],
                "/v2/health/ready", path)
    cmd = [PY, "-m", "bench.peers", name, "--store", str(store), "--model", wl.model, "--port", str(port),
           "--device", args.device, "--threads", str(args.threads),
           "--max-batch-size", str(args.max_batch_size), "--batch-timeout-ms", str(args.max_batch_delay_ms),
           "--naive-endpoint", args.naive_endpoint] + (["--fast-queue"] if args.litserve_fast_queue else [])
    return cmd, "/health", "/predict"


def run_step(args: argparse.Namespace, url: str, conc: int, source: list[str]) -> dict[str, Any]:
    procs = max(1, min(args.client_procs, conc))
    split = [conc // procs + (1 if i < conc % procs else 0) for i in range(procs)]
    start_at = time.time() + 2.0 + 0.3 * procs
    drain = 30.0
    env = child_env(1)
    children = []
    for share in split:
        cmd = [PY, "-m", "bench.loadgen", "--url", url, *source, "--concurrency", str(share),
               "--duration", str(args.duration), "--warmup", str(args.warmup), "--drain", str(drain),
               "--start-at", repr(start_at)]
        children.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True))
    limit = start_at - time.time() + args.warmup + args.duration + drain + 60
    parts = []
    for child in children:
        try:
            out, err = child.communicate(timeout=max(10.0, limit))
        except subprocess.TimeoutExpired:
            child.kill()
            out, err = child.communicate()
        if child.returncode != 0:
            raise RuntimeError(f"load generator failed ({child.returncode}):\n{err[-2000:]}")
        parts.append(json.loads(out.strip().splitlines()[-1]))
    return report.merge_step(parts, args.duration)


def bench_system(name: str, args: argparse.Namespace, store: Path, wl: Workload, tmp: Path,
                 images: Path, payload: Path, used_ports: set[int]) -> tuple[dict[str, Any], dict[str, Any]]:
    port = servers.pick_free_port(used_ports)
    used_ports.add(port)
    cmd, ready_path, predict_path = system_spec(name, args, store, wl, port)
    scalar = SCALAR if wl.takes_extra else None
    env = child_env(args.threads, args.service_log_level if name.startswith("service") else "warning")
    source = ["--images", str(images)] + (["--scalar", scalar] if scalar is not None else [])
    if name == "service_v2":
        bodies = requests_v2.write_bodies(tmp / "v2-bodies", sorted(images.glob("*.jpg")), store, wl.model, scalar)
        source = ["--bodies", str(bodies)]
    server = servers.start_server(name, cmd, port, env, tmp, ROOT)
    try:
        ready_s = servers.wait_ready(server, ready_path)
        url = server.base + predict_path
        probe_out = requests_v2.probe(url, bodies) if name == "service_v2" else probe(url, payload, scalar)
        print(f"bench: {wl.config}/{name} ready on :{port} in {ready_s:.1f} s; probe HTTP {probe_out['status']}",
              flush=True)
        steps = []
        for conc in args.concurrency:
            before = batch_sizes(server, wl.model) if name.startswith("service") else None
            step = run_step(args, url, conc, source)
            if before is not None:
                step["mean_batch"] = mean_batch(before, batch_sizes(server, wl.model))
            steps.append(step)
            print(f"bench: {wl.config}/{name} c={conc}: {step['throughput_rps']:.1f} req/s, p50 "
                  f"{report._f(step['p50_ms'])} ms, p99 {report._f(step['p99_ms'])} ms, "
                  f"{step['errors']} errors", flush=True)
        return {"port": port, "ready_s": ready_s, "command": cmd[1:], "steps": steps}, probe_out
    finally:
        servers.stop_server(server)


def bench_config(config: str, args: argparse.Namespace, stamp: str) -> dict[str, Any]:
    wl = build_workload(config, device=args.device, dtype=args.dtype, channels_last=args.channels_last,
                        max_batch_size=args.max_batch_size, max_batch_delay_ms=args.max_batch_delay_ms,
                        image_size=args.image_size, payload_size=args.payload_size,
                        base_channels=args.base_channels)
    tmp = Path(tempfile.mkdtemp(prefix=f"modserve-bench-{config}-"))
    store, images = tmp / "store", tmp / "payloads"
    write_store(store, wl)
    payloads = make_jpegs(images, wl.payload_size)
    result: dict[str, Any] = {
        "config": config, "device": args.device, "date": stamp, "model": wl.describe(),
        "concurrency": args.concurrency, "machine": machine_info(), "threads": args.threads,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "payload_bytes": [p.stat().st_size for p in payloads], "systems": {}, "probe": {},
    }
    ok = False
    try:
        print(f"bench: {config}: ceiling ({args.ceiling_batches}, {args.threads} threads)", flush=True)
        ceilings = [run_ceiling(args, store, wl, payloads[0])]
        used: set[int] = set()
        for name in args.systems:
            try:
                result["systems"][name], result["probe"][name] = bench_system(
                    name, args, store, wl, tmp, images, payloads[0], used)
            except Exception as exc:  # one failing peer must not lose the other measurements
                print(f"bench: {config}/{name} FAILED: {exc}", file=sys.stderr, flush=True)
                result["systems"][name] = {"error": str(exc)[-3000:], "steps": []}
        if args.ceiling_runs == 2:
            print(f"bench: {config}: ceiling again (the best of both runs is the ceiling)", flush=True)
            ceilings.append(run_ceiling(args, store, wl, payloads[0]))
        result["ceiling_runs"], result["ceiling"] = ceilings, report.merge_ceilings(ceilings)
        ok = all("error" not in result["systems"][n] and result["probe"].get(n, {}).get("status") == 200
                 and not any(s["errors"] for s in result["systems"][n]["steps"]) for n in args.systems)
    finally:
        result["machine"]["loadavg_end"] = os.getloadavg()
        if args.keep_tmp or not ok:
            print(f"bench: store, payloads and server logs kept in {tmp}", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    compare_probes(result)
    return report.add_ratios(result)


def _interrupted(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _interrupted)  # so the finally blocks stop every server
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    if load > 0.25 * cpus:
        print(f"bench: WARNING: load average {load:.1f} on {cpus} CPUs before starting; other work "
              "shares the cores and the figures will be noisy", file=sys.stderr, flush=True)
    results = []
    for config in args.config:
        result = bench_config(config, args, stamp)
        tag = f"-{args.tag}" if args.tag else ""
        base = args.out_dir / f"{config}-{args.device}{tag}-{stamp}{'-quick' if args.quick else ''}"
        result["plot"] = base.with_suffix(".png").name
        report.plot(result, base.with_suffix(".png"))
        report.write_json(result, base.with_suffix(".json"))
        results.append(result)
        print(f"bench: wrote {base}.json and {base}.png", flush=True)
    print()
    print(report.format_table(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
