"""Closed-loop load generator: N clients each POST, wait for the answer, POST again.

``python -m bench.loadgen --url http://127.0.0.1:PORT/path --concurrency N --images DIR ...``

asyncio + one ``httpx.AsyncClient`` whose pool holds ``concurrency`` keep-alive connections.
The multipart bodies (JPEG file ``image`` + text field ``scalar``) are encoded once up front,
so every system receives byte-identical requests and the client spends its CPU on HTTP only.
``--bodies DIR`` sends pre-encoded ``*.body`` files instead (the v2 binary-tensor requests), with the
content type and extra headers ``DIR/headers.json`` names.

Schedule: wait until ``--start-at`` (wall clock, so several load-generator processes start
together), warm up for ``--warmup`` s, then measure for ``--duration`` s. A request counts
when it completes inside the measured window; at the end no new request is sent, requests
in flight get ``--drain`` s to finish (not counted) so the next step starts on an idle server.

Bounded: only 127.0.0.1 is accepted as target, at most ``--max-requests`` requests are sent,
each has a ``--timeout``, and the whole run has a hard deadline. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

BOUNDARY = "modservebench0d5c8e2f4a7b"
MAX_CONCURRENCY = 1024
MAX_DURATION_S = 3600.0


def multipart_body(jpeg: bytes, filename: str, scalar: str | None) -> bytes:
    parts = [
        f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{filename}\"\r\n"
        "Content-Type: image/jpeg\r\n\r\n".encode() + jpeg + b"\r\n"
    ]
    if scalar is not None:
        parts.append(f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"scalar\"\r\n\r\n{scalar}\r\n".encode())
    return b"".join(parts) + f"--{BOUNDARY}--\r\n".encode()


def load_bodies(folder: Path, scalar: str | None) -> list[bytes]:
    files = sorted(folder.glob("*.jpg"))
    if not files:
        raise SystemExit(f"loadgen: no .jpg files in {folder}")
    return [multipart_body(f.read_bytes(), f.name, scalar) for f in files]


class Run:
    def __init__(self, measure_start: float, end: float, max_requests: int) -> None:
        self.measure_start, self.end, self.max_requests = measure_start, end, max_requests
        self.issued = 0
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()
        self.first_error: str | None = None
        self.warmup_ok = 0
        self.late = 0  # completed after the window (drained, not counted)


def load_raw_bodies(folder: Path) -> tuple[list[bytes], dict[str, str]]:
    files = sorted(folder.glob("*.body"))
    if not files:
        raise SystemExit(f"loadgen: no .body files in {folder}")
    return [f.read_bytes() for f in files], json.loads((folder / "headers.json").read_text())


async def client(idx: int, http: httpx.AsyncClient, url: str, bodies: list[bytes], run: Run,
                 headers: dict[str, str]) -> None:
    k = idx
    while time.perf_counter() < run.end and run.issued < run.max_requests:
        body = bodies[k % len(bodies)]
        k += 1
        run.issued += 1
        t0 = time.perf_counter()
        error: str | None = None
        try:
            resp = await http.post(url, content=body, headers=headers)
            if resp.status_code != 200:
                error = f"HTTP {resp.status_code}"
                if run.first_error is None:
                    run.first_error = f"{error}: {resp.text[:300]}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
            if run.first_error is None:
                run.first_error = f"{error}: {exc}"[:300]
        t1 = time.perf_counter()
        if t1 > run.end:
            run.late += 1
        elif t1 >= run.measure_start:
            if error is None:
                run.latencies.append(1000.0 * (t1 - t0))
            else:
                run.errors[error] += 1
        elif error is None:
            run.warmup_ok += 1


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    headers = {"content-type": f"multipart/form-data; boundary={BOUNDARY}", "accept": "application/json"}
    if args.bodies is not None:
        bodies, headers = load_raw_bodies(args.bodies)
    else:
        bodies = load_bodies(args.images, args.scalar)
    # --start-at is wall clock (shared by processes); convert it to this process's perf_counter
    offset = time.perf_counter() - time.time()
    start = max(args.start_at + offset, time.perf_counter()) if args.start_at else time.perf_counter()
    await asyncio.sleep(max(0.0, start - time.perf_counter()))
    run = Run(start + args.warmup, start + args.warmup + args.duration, args.max_requests)
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    timeout = httpx.Timeout(args.timeout)
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as http:
        tasks = [asyncio.create_task(client(i, http, args.url, bodies, run, headers)) for i in range(args.concurrency)]
        hard_stop = args.warmup + args.duration + args.drain
        done, pending = await asyncio.wait(tasks, timeout=max(0.0, run.end - time.perf_counter()) + args.drain)
        for t in pending:
            t.cancel()
        cancelled = len(pending)
        for t in done:
            if t.exception() is not None and run.first_error is None:
                run.first_error = repr(t.exception())[:300]
        if pending:
            await asyncio.wait(pending, timeout=5)
    return {
        "concurrency": args.concurrency,
        "measure_s": args.duration,
        "ok": len(run.latencies),
        "errors": sum(run.errors.values()),
        "error_kinds": dict(run.errors),
        "first_error": run.first_error,
        "latencies_ms": [round(x, 3) for x in run.latencies],
        "issued": run.issued,
        "warmup_ok": run.warmup_ok,
        "late": run.late,
        "cancelled_at_drain": cancelled,
        "hit_max_requests": run.issued >= args.max_requests,
        "hard_stop_s": hard_stop,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", required=True, help="http://127.0.0.1:PORT/path (loopback only)")
    p.add_argument("--images", type=Path, help="folder of .jpg payloads (multipart uploads)")
    p.add_argument("--bodies", type=Path, help="folder of pre-encoded .body files and headers.json")
    p.add_argument("--scalar", default=None, help="send this text as form field 'scalar'")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument("--drain", type=float, default=30.0, help="seconds in-flight requests get at the end")
    p.add_argument("--timeout", type=float, default=60.0, help="per-request timeout, seconds")
    p.add_argument("--max-requests", type=int, default=1_000_000)
    p.add_argument("--start-at", type=float, default=0.0, help="wall-clock time.time() to start at")
    args = p.parse_args(argv)
    if (args.images is None) == (args.bodies is None):
        p.error("give either --images or --bodies")
    if urlsplit(args.url).hostname != "127.0.0.1" or urlsplit(args.url).scheme != "http":
        p.error("only http://127.0.0.1 targets are allowed")
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        p.error(f"concurrency must be 1..{MAX_CONCURRENCY}")
    if not (0 < args.duration <= MAX_DURATION_S and 0 <= args.warmup <= MAX_DURATION_S):
        p.error(f"duration must be in (0, {MAX_DURATION_S}] and warmup in [0, {MAX_DURATION_S}]")
    if args.start_at and args.start_at > time.time() + 60:
        p.error("--start-at is more than 60 s away")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
