"""Start a real uvicorn subprocess on a free port, and stop it by its process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30) -> int:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


@contextmanager
def run_server(
    args: Sequence[str], *, env: dict[str, str] | None = None, port: int | None = None,
    log_dir: Path, ready_path: str = "/v2/health/live", timeout: float = 120,
) -> Iterator[Server]:
    port = port or free_port()
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    log = log_dir / f"server-{port}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, *args], cwd=ROOT, env=full_env, stdout=fh, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()}")
            try:
                if httpx.get(server.url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server not up after {timeout}s:\n{server.output()}")
            time.sleep(0.2)
        yield server
    finally:
        stop(proc)


@contextmanager
def serve_store(store: Path, log_dir: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    """A real server on ``store`` (CPU, no warm-up), ready once its models are: the e2e default."""
    port = free_port()
    base = {"MODSERVE_STORE": str(store), "MODSERVE_PORT": str(port), "MODSERVE_DEVICE": "cpu",
            "MODSERVE_WARMUP": "false"}
    with run_server(["-m", "app"], env={**base, **(env or {})}, port=port, log_dir=log_dir,
                    ready_path="/v2/health/ready") as srv:
        yield srv
