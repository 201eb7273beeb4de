"""Start and stop the systems under test: free-port checks, process groups, readiness.

Every server runs in its own session (so its own process group) and is stopped with
``os.killpg``: LitServe's inference and API-server children go with it. Ports are
checked with a plain bind (no SO_REUSEADDR/SO_REUSEPORT) before a server starts: a
stale uvicorn bound with SO_REUSEPORT would otherwise share the port and answer part
of the requests. After a server stops we wait until nothing accepts on its port.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

HOST = "127.0.0.1"


def port_is_free(port: int) -> bool:
    """True when a plain bind succeeds and nothing accepts a connection on the port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return not port_accepts(port)


def port_accepts(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((HOST, port)) == 0


def pick_free_port(avoid: set[int] | None = None) -> int:
    avoid = avoid or set()
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in avoid and port_is_free(port):
            return port
    raise RuntimeError("could not find a free port on 127.0.0.1")


def wait_port_closed(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not port_accepts(port):
            return
        time.sleep(0.2)
    raise RuntimeError(f"port {port} still accepts connections {timeout:.0f} s after its server was stopped")


@dataclass
class Server:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    log_file: IO[bytes]

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start_server(name: str, cmd: list[str], port: int, env: dict[str, str], log_dir: Path, cwd: Path) -> Server:
    if not port_is_free(port):
        raise RuntimeError(f"port {port} is in use (a stale server?); refusing to start {name} on it")
    log_path = log_dir / f"{name}-{port}.log"
    log_file = open(log_path, "wb")
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    return Server(name, proc, port, log_path, log_file)


def wait_ready(server: Server, path: str, timeout: float = 600.0) -> float:
    """Poll ``path`` until it answers 200; returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                raise RuntimeError(f"{server.name} exited with {server.proc.returncode} before it was ready:\n"
                                   f"{server.log_tail()}")
            try:
                if http.get(server.base + path).status_code == 200:
                    return time.monotonic() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f} s:\n{server.log_tail()}")


def _group_alive(pgid: int) -> bool:
    """Any live (non-zombie) member left in the group? Zombies of orphans may never be reaped here."""
    proc = Path("/proc")
    if proc.is_dir():
        for entry in proc.iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat[stat.rindex(")") + 2:].split()  # state ppid pgrp ...
            if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_server(server: Server, grace: float = 15.0) -> None:
    """SIGTERM the whole process group, SIGKILL what is left after ``grace``, wait for the port."""
    pgid = server.proc.pid  # start_new_session: the leader's pid is the group id
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        if not _group_alive(pgid):
            break
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and _group_alive(pgid):
            server.proc.poll()  # reap the leader so the group can empty
            time.sleep(0.1)
    try:
        server.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        print(f"bench: {server.name} (pid {server.proc.pid}) did not exit", file=sys.stderr)
    server.log_file.close()
    wait_port_closed(server.port)
