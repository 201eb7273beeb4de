"""Helpers for the multi-process server (``--workers N``, issue 17): its run folder (``pids.json``,
``payload/``), which process holds a TCP connection, the JSON access log's ``pid`` field, the
aggregated ``/metrics``, raw HTTP over sockets, and the local forward the answers are compared with.

Everything here reads what the operating system and the server expose (``/proc``, files, logs, HTTP);
nothing reaches into the server's code.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np
import torch
from prometheus_client.parser import text_string_to_metric_families

from app.runtime.images import decode_image
from app.runtime.preprocess import Preprocessor
from app.store.model_config import PreprocessConfig
from support.models import build_small, image_bytes, small_configs
from support.server import Server, free_port, run_server

ATOL = 1e-5
ARCH = "resnet50_head"  # every model of these tests is the small resnet50_head, under several names
TOKEN = "e2e-workers-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}

T = TypeVar("T")


# ---- waiting ------------------------------------------------------------------------------------------


def wait_until(condition: Callable[[], T], what: str, timeout: float = 60, interval: float = 0.05) -> T:
    """Poll ``condition`` until it returns something truthy (and return that); fail after ``timeout``.
    The bound only keeps a broken server from hanging the run: no assertion is about durations."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ---- a server with N workers -----------------------------------------------------------------------------


@dataclass
class Deployment:
    server: Server
    workers: int
    run_dir: Path
    store: Path

    @property
    def port(self) -> int:
        return int(self.server.url.rsplit(":", 1)[1])

    @property
    def hostport(self) -> str:
        return self.server.url.removeprefix("http://")  # tritonclient refuses a scheme

    def pids(self) -> dict[str, Any]:
        return read_pids(self.run_dir)

    def payload_files(self) -> list[Path]:
        return payload_files(self.run_dir)

    def worker_pids(self) -> list[int]:
        """The HTTP processes: the workers of pids.json, or the one process when ``workers == 1``."""
        return [self.server.proc.pid] if self.workers == 1 else list(self.pids()["workers"])


@contextmanager
def shm_folder(prefix: str) -> Iterator[Path]:
    """A fresh folder in /dev/shm (where the server keeps its run folder by default), removed afterwards."""
    base = Path("/dev/shm") if os.access("/dev/shm", os.W_OK) else None
    folder = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def serve_workers(
    store: Path, log_dir: Path, run_dir: Path, *, workers: int, env: dict[str, str] | None = None,
    via: str = "flag",
) -> Iterator[Deployment]:
    """A real server on ``store`` with ``workers`` HTTP processes (``--workers N``, or
    ``MODSERVE_WORKERS=N`` when ``via="env"``), its run folder pinned to ``run_dir``; JSON logs, CPU,
    no warm-up, the admin API on. Ready once ``/v2/health/ready`` answers 200."""
    port = free_port()
    base = {"MODSERVE_STORE": str(store), "MODSERVE_PORT": str(port), "MODSERVE_DEVICE": "cpu",
            "MODSERVE_WARMUP": "false", "MODSERVE_LOG_FORMAT": "json", "MODSERVE_ADMIN_TOKEN": TOKEN,
            "MODSERVE_RUN_DIR": str(run_dir)}
    args = ["-m", "app"]
    if via == "flag":
        args += ["--workers", str(workers)]
    else:
        base["MODSERVE_WORKERS"] = str(workers)
    with run_server(args, env={**base, **(env or {})}, port=port, log_dir=log_dir,
                    ready_path="/v2/health/ready", timeout=180) as srv:
        yield Deployment(srv, workers, run_dir, store)


# ---- the run folder ---------------------------------------------------------------------------------------


def read_pids(run_dir: Path) -> dict[str, Any]:
    """``pids.json``: {"supervisor": pid, "device": pid, "workers": [pid, ...]}. Read strictly: the
    server rewrites it whole (a torn read is a finding, not something to retry)."""
    return json.loads((run_dir / "pids.json").read_text())


def payload_files(run_dir: Path) -> list[Path]:
    """Every entry under ``payload/`` that is not a folder (files, links, sockets: leaks when idle)."""
    folder = run_dir / "payload"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if not p.is_dir())


def run_dir_entries(run_dir: Path) -> set[str]:
    """Every path under the run folder, relative to it: a before/after snapshot catches leaks anywhere."""
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*")}


def alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return sorted(found)


def payload_references(pids: Sequence[int], run_dir: Path) -> list[str]:
    """Open descriptors and memory maps of ``pids`` that point into ``payload/``: a file unlinked but
    still mapped keeps its shared memory, so an empty folder alone does not prove nothing leaked."""
    marker = str(run_dir / "payload") + "/"
    found = []
    for pid in pids:
        fd_dir = Path(f"/proc/{pid}/fd")
        try:
            fds = list(fd_dir.iterdir())
            maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if marker in target:
                found.append(f"pid {pid} fd {fd.name} -> {target}")
        found += [f"pid {pid} maps {line.split(None, 5)[-1]}" for line in maps if marker in line]
    return found


# ---- which process holds a connection ------------------------------------------------------------------


def _socket_inode(server_port: int, client_port: int) -> str | None:
    """The inode of the server side of the TCP connection from ``client_port`` to ``server_port``."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            remote_port = int(fields[2].rsplit(":", 1)[1], 16)
            if local_port == server_port and remote_port == client_port and fields[9] != "0":
                return fields[9]
    return None


def connection_owner(sock: socket.socket, server_port: int, candidates: Sequence[int]) -> int | None:
    """The pid among ``candidates`` that has accepted ``sock``'s connection (None until one has)."""
    inode = _socket_inode(server_port, sock.getsockname()[1])
    if inode is None:
        return None
    wanted = f"socket:[{inode}]"
    for pid in candidates:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except (FileNotFoundError, ProcessLookupError):
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == wanted:
                    return pid
            except OSError:
                continue
    return None


def connect(dep: Deployment, timeout: float = 60) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", dep.port), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def owner_of(dep: Deployment, sock: socket.socket, timeout: float = 60) -> int:
    """The HTTP process that accepted ``sock`` (waits for the accept)."""
    workers = dep.worker_pids()
    return wait_until(lambda: connection_owner(sock, dep.port, workers), "an HTTP process to accept",
                      timeout=timeout, interval=0.002)


@contextmanager
def others_paused(dep: Deployment, pid: int) -> Iterator[None]:
    """SIGSTOP every HTTP process but ``pid`` (SIGCONT afterwards). The HTTP processes share one
    listening socket and the kernel picks which one accepts; with the others paused, only ``pid``
    can, so a test reaches the process it means to without relying on how connections spread.
    Only for moments when the paused processes are idle: one paused while it holds a lock the HTTP
    processes share would stall the one the test is waiting for."""
    others = [w for w in dep.worker_pids() if w != pid]
    stopped = []
    try:
        for other in others:
            os.kill(other, signal.SIGSTOP)
            stopped.append(other)
        yield
    finally:
        for other in stopped:
            os.kill(other, signal.SIGCONT)


def connect_to(dep: Deployment, pid: int, timeout: float = 60) -> socket.socket:
    """A connection accepted by the HTTP process ``pid`` (checked in /proc, not assumed). Waits until
    that process accepts, so it also waits for a freshly started one to be serving."""
    with others_paused(dep, pid):
        sock = connect(dep)
        try:
            wait_until(lambda: connection_owner(sock, dep.port, [pid]) == pid,
                       f"HTTP process {pid} to accept", timeout=timeout, interval=0.002)
        except BaseException:
            sock.close()
            raise
    return sock


# ---- raw HTTP ----------------------------------------------------------------------------------------------


def multipart_request(path: str, image: bytes, *, keep_alive: bool = False, request_id: str | None = None,
                      boundary: str = "wkrboundary") -> tuple[bytes, bytes]:
    """(head, body) of a multipart POST with one ``image`` field."""
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: a\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n")
    if request_id:
        head += f"X-Request-ID: {request_id}\r\n"
    head += "" if keep_alive else "Connection: close\r\n"
    return (head + "\r\n").encode(), body


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length framed response (keep-alive connections)."""
    data = b""
    while b"\r\n\r\n" not in data:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError(f"connection closed before a response head: {data!r}")
        data += part
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        part = sock.recv(65536)
        if not part:
            raise ConnectionError("connection closed mid-body")
        body += part
    return int(lines[0].split(" ")[1]), headers, body


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the peer sends until it closes (a reset counts as a close)."""
    data = b""
    while True:
        try:
            part = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not part:
            return data
        data += part


def exchange(sock: socket.socket, method: str, path: str, request_id: str | None = None,
             body: bytes = b"", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request and its response on ``sock`` (kept open)."""
    head = f"{method} {path} HTTP/1.1\r\nHost: a\r\nContent-Length: {len(body)}\r\n"
    for key, value in {**({"X-Request-ID": request_id} if request_id else {}), **(headers or {})}.items():
        head += f"{key}: {value}\r\n"
    sock.sendall((head + "\r\n").encode() + body)
    return read_response(sock)


def predict_on(sock: socket.socket, model: str, image: bytes, request_id: str | None = None
               ) -> tuple[int, dict[str, str], bytes]:
    path = f"/v1/models/{model}/predict"
    head, body = multipart_request(path, image, keep_alive=True, request_id=request_id)
    sock.sendall(head + body)
    return read_response(sock)


def probs_in(body: bytes) -> np.ndarray:
    return np.array([p["probs"] for p in json.loads(body)["predictions"]], np.float32)


# ---- logs and metrics ------------------------------------------------------------------------------------


def access_lines(server: Server) -> list[dict[str, Any]]:
    """The JSON access-log lines of every process (they share the server's output)."""
    text = server.output()
    complete = text if text.endswith("\n") else text[: text.rfind("\n") + 1]  # a line being written: not yet
    lines = [json.loads(line) for line in complete.splitlines() if line.startswith("{")]
    return [d for d in lines if d.get("logger") == "modserve.access"]


def log_tail(server: Server, lines: int = 20) -> str:
    """The server's last ``lines`` log lines other than access lines: what an assertion message needs."""
    kept = [line for line in server.output().splitlines() if '"modserve.access"' not in line]
    return "\n".join(kept[-lines:])


def pids_of(server: Server, request_ids: Sequence[str], timeout: float = 30) -> dict[str, int]:
    """request id -> the ``pid`` its access-log line names; waits until every id has been logged."""
    wanted = set(request_ids)

    def logged() -> dict[str, int] | None:
        found = {d["request_id"]: d.get("pid") for d in access_lines(server) if d.get("request_id") in wanted}
        return found if set(found) == wanted else None

    return wait_until(logged, f"access-log lines for {len(wanted)} request ids", timeout=timeout)


def metric_samples(text: str, name: str, **labels: str) -> list[tuple[dict[str, str], float]]:
    """Samples called ``name`` whose labels include ``labels`` (any further labels kept, so a
    per-process series that should have been summed shows up as a second sample)."""
    found = []
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                found.append((dict(sample.labels), sample.value))
    return found


def one_metric(text: str, name: str, **labels: str) -> float:
    """The single series ``name{labels}`` (absent: 0); more than one series, or extra labels, fail."""
    found = metric_samples(text, name, **labels)
    assert len(found) <= 1, f"{name}{labels}: several series instead of one aggregate: {found}"
    if not found:
        return 0.0
    extra = set(found[0][0]) - set(labels)
    assert not extra, f"{name}{labels}: unexpected labels {extra} (per-process series?)"
    return found[0][1]


# ---- requests and the local forward ------------------------------------------------------------------------


def predict(url: str, model: str, image: bytes | None = None, request_id: str | None = None,
            timeout: float = 60) -> httpx.Response:
    """One multipart prediction on a connection of its own (httpx.post opens a new one each call)."""
    headers = {"X-Request-ID": request_id} if request_id else {}
    return httpx.post(f"{url}/v1/models/{model}/predict", files={"image": ("a.png", image or image_bytes())},
                      headers=headers, timeout=timeout)


def assert_no_new_inference(url: str, model: str, image: bytes | None = None) -> None:
    """Once SIGTERM is in: a new request gets 503 (draining) or a refused connection (nothing listens
    any more); a connection that is accepted and then dropped or never answered is neither."""
    try:
        late = predict(url, model, image, timeout=10)
        assert late.status_code == 503, late.text
    except httpx.TransportError as exc:
        assert isinstance(exc, httpx.ConnectError), f"new request after SIGTERM: {exc!r}"


def b64_instances(images: Sequence[bytes]) -> dict[str, Any]:
    return {"instances": [{"image": {"b64": base64.b64encode(i).decode()}} for i in images]}


def preprocessed(data: bytes) -> np.ndarray:
    pre = Preprocessor(PreprocessConfig(**small_configs()[ARCH]["preprocess"]), default_resize=None)
    return pre(decode_image(data, color_mode="RGB", max_pixels=10**8)).numpy()


def local_forward(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """``probs`` of the small resnet50_head built with ``seed``, on an already preprocessed batch."""
    net = build_small(ARCH, seed=seed)
    with torch.inference_mode():
        return net(torch.from_numpy(images)).numpy()


def expected_probs(images: Sequence[bytes], seed: int = 0) -> np.ndarray:
    return local_forward(np.stack([preprocessed(i) for i in images]), seed=seed)


def probs_of(response: httpx.Response) -> np.ndarray:
    return np.array([p["probs"] for p in response.json()["predictions"]], np.float32)
