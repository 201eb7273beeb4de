"""Soak test: minutes of mixed load on every model with a reload every few seconds.

Not part of the test suite. Prints requests sent, failed (must be 0), p99 latency,
and the server's resident (and GPU) memory at the start and the end.

    .venv/bin/python -m bench.soak --minutes 5 --reload-every 10
"""

from __future__ import annotations

import argparse
import io
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from PIL import Image

from app import nets
from app.store.writer import write_model

TOKEN = "soak-admin-token-0123456789"
MODELS: dict[str, dict] = {
    "unet": {"architecture": "unet", "arguments": {"n_classes": 2, "base_channels": 8},
             "preprocess": {"scale": 0.5, "warmup_size": [64, 64]}},
    "extra": {"architecture": "resnet50_extra", "arguments": {"num_classes": 5, "backbone": "resnet18"},
              "preprocess": {"resize": [64, 64]}},
    "dual": {"architecture": "resnet50_extra_dual", "arguments": {"num_classes": 3, "backbone": "resnet18"},
             "preprocess": {"resize": [64, 64]}},
}


def write_store(root: Path, device: str) -> None:
    for name, cfg in MODELS.items():
        full = {**cfg, "runtime": {"device": device, "max_batch_size": 8, "max_batch_delay_ms": 2.0}}
        for version in (1, 2):
            torch.manual_seed(version)
            net = nets.get_net(cfg["architecture"], **cfg["arguments"])
            write_model(root, name, full, net.state_dict(), version=str(version))


def jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    match = re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())
    return int(match.group(1)) / 1024 if match else float("nan")


def gpu_mb(client: httpx.Client) -> float | None:
    text = client.get("/metrics").text
    values = [float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith("modserve_gpu_memory_allocated_bytes{")]
    return sum(values) / 2**20 if values else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--reload-every", type=float, default=10.0, help="seconds between reloads")
    ap.add_argument("--clients", type=int, default=6)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    store = Path(tempfile.mkdtemp(prefix="modserve-soak-"))
    write_store(store, args.device)
    port = free_port()
    env = {**os.environ, "MODSERVE_ADMIN_TOKEN": TOKEN, "MODSERVE_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "app", "--store", str(store), "--port", str(port)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    latencies: list[float] = []
    failures: list[str] = []
    sent = 0
    lock = threading.Lock()
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("server did not become ready")
            time.sleep(0.5)
        images = [jpeg(i) for i in range(16)]
        meta = httpx.Client(base_url=url, timeout=30)
        start_rss, start_gpu = rss_mb(proc.pid), gpu_mb(meta)

        def worker(i: int) -> None:
            nonlocal sent
            names = list(MODELS)
            with httpx.Client(base_url=url, timeout=60) as client:
                n = 0
                while not stop.is_set():
                    name = names[(i + n) % len(names)]
                    data = {"scalar": str((n % 10) / 10)} if name != "unet" else None
                    t0 = time.perf_counter()
                    try:
                        r = client.post(f"/v1/models/{name}/predict", data=data,
                                        files={"image": ("a.jpg", images[n % len(images)], "image/jpeg")})
                        ok, why = r.status_code == 200, f"{name}: {r.status_code} {r.text[:200]}"
                    except httpx.HTTPError as exc:
                        ok, why = False, f"{name}: {type(exc).__name__} {exc}"
                    with lock:
                        sent += 1
                        latencies.append(time.perf_counter() - t0)
                        if not ok:
                            failures.append(why)
                    n += 1

        threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(args.clients)]
        for t in threads:
            t.start()
        end, reloads, k = time.monotonic() + args.minutes * 60, 0, 0
        auth = {"Authorization": f"Bearer {TOKEN}"}
        while time.monotonic() < end:
            time.sleep(min(args.reload_every, max(0.0, end - time.monotonic())))
            name = list(MODELS)[k % len(MODELS)]
            version = "1" if (k // len(MODELS)) % 2 else "2"
            r = meta.post(f"/v2/repository/models/{name}/load", headers=auth,
                          json={"parameters": {"version": version}}, timeout=120)
            if r.status_code != 200:
                failures.append(f"reload {name} v{version}: {r.status_code} {r.text[:200]}")
            reloads, k = reloads + 1, k + 1
        stop.set()
        for t in threads:
            t.join(60)
        end_rss, end_gpu = rss_mb(proc.pid), gpu_mb(meta)
    finally:
        stop.set()
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc.wait(60)
    p99 = float(np.percentile(latencies, 99) * 1000) if latencies else float("nan")
    print(f"soak: {args.minutes:g} min, {args.clients} clients, models {', '.join(MODELS)}, device {args.device}")
    print(f"requests sent: {sent}   failed: {len(failures)}   reloads: {reloads}")
    print(f"latency p50 {np.percentile(latencies, 50) * 1000:.1f} ms   p99 {p99:.1f} ms")
    print(f"server resident memory: start {start_rss:.0f} MB, end {end_rss:.0f} MB")
    if start_gpu is not None:
        print(f"GPU memory allocated: start {start_gpu:.0f} MB, end {end_gpu:.0f} MB")
    for why in failures[:10]:
        print("  failure:", why)
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
