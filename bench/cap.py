"""The single-process cap (issue 17, step 1): how many requests/s one service process handles when
the model costs nothing, and where its time goes.

``python -m bench.cap [--duration S] [--concurrency 1 16 64] [--workers 1 2] [--profile]``

The model is a ``layer_stack`` of one Linear layer on a 16 x 16 image (its forward takes a few
microseconds); the payload is a small photo-like JPEG (64 x 48), sent as a native multipart upload,
and, pre-processed, as a v2 request with a binary FP32 tensor. The same closed-loop load generator
as bench/run_bench.py drives one server process, or with ``--workers 1 2`` a server of each size
in turn (``MODSERVE_WORKERS``: N HTTP processes and one device process from 2 on). ``--profile`` samples the server with py-spy
(installed on demand) during one extra native step and prints the top functions by own time.
Prints one JSON object; nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bench import requests_v2, servers, wrk
from bench.loadgen import multipart_body
from bench.workload import make_jpegs

ROOT = Path(__file__).resolve().parents[1]
MODEL = "trivial"
CONFIG = {
    "architecture": "layer_stack",
    "arguments": {"flatten_input": True, "num_classes": 4,
                  "layers": [{"type": "Linear", "in_features": 3 * 16 * 16, "out_features": 4}]},
    "runtime": {"device": "cpu", "max_batch_size": 64, "max_batch_delay_ms": 1.0},
    "preprocess": {"resize": [16, 16]},
    "postprocess": {"output_names": ["probs"]},
}


def write_store(root: Path) -> Path:
    from app.store.writer import write_model

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3 * 16 * 16, 4))
    write_model(root, MODEL, CONFIG, model.state_dict())
    return root


def loadgen(url: str, conc: int, duration: float, source: list[str]) -> dict[str, Any]:
    """requests/s, p50 and errors of one closed-loop step."""
    import statistics

    cmd = [sys.executable, "-m", "bench.loadgen", "--url", url, "--concurrency", str(conc),
           "--duration", str(duration), "--warmup", "1", "--drain", "10", *source]
    out = json.loads(subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=duration + 120,
                                    check=True).stdout)
    lat = out["latencies_ms"]
    return {"rps": round(out["ok"] / out["measure_s"], 1), "p50_ms": round(statistics.median(lat), 2) if lat else None,
            "errors": out["errors"]}


def profile(pid: int, seconds: float, out: Path) -> list[tuple[str, float]]:
    """Top functions by own time (py-spy --nonblocking samples of the server's threads)."""
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "py-spy"], check=True)
    raw = out / "profile.txt"
    subprocess.run([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration",
                    str(int(seconds)), "--nonblocking", "--format", "raw", "--output", str(raw)],
                   check=True, capture_output=True)
    own: dict[str, float] = {}
    total = 0.0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        leaf = stack.split(";")[-1]
        own[leaf] = own.get(leaf, 0.0) + float(count)
        total += float(count)
    top = sorted(own.items(), key=lambda kv: -kv[1])[:15]
    return [(name, round(100 * n / total, 1)) for name, n in top]


def _roles(pid: int, run: Path, workers: int) -> dict[str, list[int]]:
    """The server's processes by role: the HTTP processes, and the device process (N >= 2)."""
    if workers == 1:
        return {"http": [pid]}
    pids = json.loads((run / "pids.json").read_text())
    return {"http": pids["workers"], "device": [pids["device"]]}


def _cpu_seconds(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        total += int(fields[11]) + int(fields[12])  # utime + stime, in clock ticks
    return total / os.sysconf("SC_CLK_TCK")


def _measured(step: Any, roles: dict[str, list[int]], duration: float) -> dict[str, Any]:
    """Run ``step``; add each role's CPU milliseconds per answered request."""
    before = {role: _cpu_seconds(pids) for role, pids in roles.items()}
    out = step()
    answered = max(1.0, out["rps"] * duration)
    out["cpu_ms_per_request"] = {role: round(1000 * (_cpu_seconds(pids) - before[role]) / answered, 3)
                                 for role, pids in roles.items()}
    return out


def _wrk_steps(base: str, conc: int, duration: float, tmp: Path, bodies: Path, roles: dict[str, list[int]]
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The native multipart upload and the v2 binary request of one JPEG, each for ``duration`` s."""
    jpeg = sorted((tmp / "jpegs").glob("*.jpg"))[0]
    native_body = tmp / "native.body"
    native_body.write_bytes(multipart_body(jpeg.read_bytes(), jpeg.name, None))
    from bench.loadgen import BOUNDARY

    native = _measured(lambda: wrk.step(f"{base}/v1/models/{MODEL}/predict", native_body, {
        "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}, conc, duration, tmp), roles, duration)
    v2_body = sorted(bodies.glob("*.body"))[0]
    headers = json.loads((bodies / "headers.json").read_text())
    v2 = _measured(lambda: wrk.step(f"{base}/v2/models/{MODEL}/infer", v2_body, headers, conc, duration, tmp),
                   roles, duration)
    return native, v2


def _profile_step(base: str, pid: int, duration: float, tmp: Path) -> list[tuple[str, float]]:
    import time

    proc = subprocess.Popen([sys.executable, "-m", "bench.loadgen", "--url", f"{base}/v1/models/{MODEL}/predict",
                             "--concurrency", "16", "--duration", str(duration + 4), "--warmup", "1",
                             "--images", str(tmp / "jpegs")], cwd=ROOT, stdout=subprocess.DEVNULL)
    time.sleep(2)
    top = profile(pid, duration, tmp)
    proc.wait(timeout=duration + 60)
    return top


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--workers", type=int, nargs="+", default=[1])
    p.add_argument("--profile", action="store_true", help="py-spy on the single process (workers = 1 only)")
    p.add_argument("--client", choices=["wrk", "python"], default="wrk" if wrk.available() else "python",
                   help="load generator: wrk (C; apt-get install wrk) or bench.loadgen (Python, httpx)")
    args = p.parse_args(argv)
    shm = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # where the server puts its run folder
    with tempfile.TemporaryDirectory() as tmp_name, tempfile.TemporaryDirectory(dir=shm) as runs_name:
        tmp, runs = Path(tmp_name), Path(runs_name)
        store = write_store(tmp / "store")
        jpegs = make_jpegs(tmp / "jpegs", (64, 48))
        bodies = requests_v2.write_bodies(tmp / "v2", jpegs, store, MODEL, None)
        result: dict[str, Any] = {"model": CONFIG, "payload": "64x48 JPEG", "client": args.client,
                                  "load_average": os.getloadavg(), "runs": []}
        for workers in args.workers:
            run = {"workers": workers, "steps": []}
            result["runs"].append(run)
            port = servers.pick_free_port()
            env = {"MODSERVE_STORE": str(store), "MODSERVE_PORT": str(port), "MODSERVE_DEVICE": "cpu",
                   "MODSERVE_LOG_LEVEL": "warning", "MODSERVE_MAX_CONCURRENCY": "4096",
                   "MODSERVE_WORKERS": str(workers), "MODSERVE_RUN_DIR": str(runs / f"run-{workers}")}
            server = servers.start_server(f"service-w{workers}", [sys.executable, "-m", "app"], port, env, tmp, ROOT)
            try:
                servers.wait_ready(server, "/v2/health/ready")
                base = f"http://127.0.0.1:{port}"
                for conc in args.concurrency:
                    if args.client == "wrk":
                        roles = _roles(server.proc.pid, runs / f"run-{workers}", workers)
                        native, v2 = _wrk_steps(base, conc, args.duration, tmp, bodies, roles)
                    else:
                        native = loadgen(f"{base}/v1/models/{MODEL}/predict", conc, args.duration,
                                         ["--images", str(tmp / "jpegs")])
                        v2 = loadgen(f"{base}/v2/models/{MODEL}/infer", conc, args.duration, ["--bodies", str(bodies)])
                    run["steps"].append({"concurrency": conc, "native": native, "v2_binary": v2})
                    print(json.dumps({"workers": workers, **run["steps"][-1]}), file=sys.stderr)
                if args.profile and workers == 1:
                    run["profile_native_c16_own_time_pct"] = _profile_step(base, server.proc.pid, args.duration, tmp)
            finally:
                servers.stop_server(server)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
