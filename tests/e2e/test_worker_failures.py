"""Failure modes of the multi-process server (``MODSERVE_WORKERS=2``, issue 17), on real processes:

- a worker SIGKILLed while its request is in the device process: that client's connection drops, a
  request on the other worker is answered, the supervisor starts a replacement, no payload is left;
- SIGTERM to the whole process group drains a request in flight and exits 0;
- a client trickling its head, then its body, a byte at a time does not stop its own worker (nor the
  other) from answering;
- 10,000 requests (valid images, undecodable ones, clients that hang up mid-body or before the answer)
  leave no file in ``payload/`` and nothing of it mapped or open in any process;
- the device process SIGKILLed: every HTTP process reports not live (503) and refuses inference
  (503) until the supervisor has restarted it, then live, ready and correct again.

Two servers, one after the other: ``slow``, whose forwards sleep 500 ms (``MODSERVE_FAULT_INJECTION``)
so that a request can be caught inside the device process (its SIGTERM test ends it), then ``fast``.
Which HTTP process holds a connection is read from /proc, never assumed; ``connect_to`` reaches a
chosen one by pausing the other while it connects.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from app.store.writer import write_model
from support.models import build_small, image_bytes, small_configs
from support.workers import (
    assert_no_new_inference,
    ARCH, ATOL, Deployment, alive, connect, connect_to, exchange, expected_probs, log_tail,
    multipart_request, one_metric, payload_files, payload_references, pids_of, predict, predict_on,
    probs_in, probs_of, read_response, read_until_closed, run_dir_entries, serve_workers, shm_folder,
    wait_until,
)

pytestmark = pytest.mark.e2e

MODEL = "cls"
PATH = f"/v1/models/{MODEL}/predict"


def _store(root: Path) -> Path:
    config = small_configs()[ARCH]
    # fuller batches: the 10,000 requests go faster
    config["runtime"] = {**config["runtime"], "max_batch_size": 16, "max_batch_delay_ms": 20.0}
    write_model(root, MODEL, config, build_small(ARCH, seed=0).state_dict())
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _store(tmp_path_factory.mktemp("failures-store"))


@pytest.fixture(scope="module")
def slow(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """Every forward sleeps 500 ms: long enough to catch a request inside the device process."""
    env = {"MODSERVE_FAULT_INJECTION": "sleep_ms=500", "MODSERVE_GRACEFUL_TIMEOUT": "30"}
    with shm_folder("modserve-e2e-slow-") as shm, serve_workers(
        store, tmp_path_factory.mktemp("slow-logs"), shm / "run", workers=2, env=env, via="env",
    ) as deployment:
        yield deployment


@pytest.fixture(scope="module")
def fast(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    with shm_folder("modserve-e2e-fast-") as shm, serve_workers(
        store, tmp_path_factory.mktemp("fast-logs"), shm / "run", workers=2, via="env",
    ) as deployment:
        yield deployment


def _all_pids(dep: Deployment) -> list[int]:
    pids = dep.pids()
    return [pids["supervisor"], pids["device"], *pids["workers"]]


def _no_payload_left(dep: Deployment) -> None:
    wait_until(lambda: dep.payload_files() == [], "payload/ to be empty", timeout=30)
    assert dep.payload_files() == []
    assert payload_references(_all_pids(dep), dep.run_dir) == []


def _five_xx(dep: Deployment) -> float:
    text = httpx.get(dep.server.url + "/metrics", timeout=30).text
    return sum(one_metric(text, "modserve_requests_total", model=MODEL, family="native", code=code)
               for code in ("500", "502", "503", "504"))


# ---- a worker killed in the middle of a request --------------------------------------------------------


def test_worker_killed_mid_request(slow: Deployment) -> None:
    before = slow.pids()
    image = image_bytes(40, 30, seed=1)
    want = expected_probs([image])[0]
    head, body = multipart_request(PATH, image)

    victim, other = before["workers"]
    victim_sock, other_sock = connect_to(slow, victim), connect_to(slow, other)
    with victim_sock, other_sock:
        victim_sock.sendall(head + body)
        in_flight = wait_until(slow.payload_files, "the request's payload to reach the device process",
                               interval=0.01)
        assert 1 <= len(in_flight) <= 2, in_flight  # one request in flight: its request file (and result)
        other_sock.sendall(head + body)  # the other worker's request, in flight during the kill too
        assert select.select([victim_sock], [], [], 0)[0] == [], "the request must still be in flight"
        os.kill(victim, signal.SIGKILL)
        assert read_until_closed(victim_sock) == b""  # the connection drops with no answer
        status, headers, answer = read_response(other_sock)
    assert status == 200, answer
    assert np.abs(probs_in(answer)[0] - want).max() < ATOL
    wait_until(lambda: not alive(victim), "the killed worker to be gone")

    # the surviving worker keeps serving while (and after) the replacement starts
    for _ in range(3):
        r = predict(slow.server.url, MODEL, image)
        assert r.status_code == 200, r.text
        assert np.abs(probs_of(r)[0] - want).max() < ATOL

    def replaced() -> dict | None:
        pids = slow.pids()
        ok = (len(pids["workers"]) == 2 and victim not in pids["workers"] and other in pids["workers"]
              and all(alive(p) for p in pids["workers"]))
        return pids if ok else None

    after = wait_until(replaced, "a replacement worker in pids.json", timeout=120)
    assert after["supervisor"] == before["supervisor"] == slow.server.proc.pid
    assert after["device"] == before["device"] and alive(after["device"])  # the device process stayed
    (fresh,) = set(after["workers"]) - {other}
    assert fresh not in before["workers"]

    # the replacement serves: a connection it accepted (once started) gets a correct answer
    with connect_to(slow, fresh, timeout=120) as sock:
        sock.sendall(head + body)
        status, headers, answer = read_response(sock)
    assert status == 200, answer
    assert np.abs(probs_in(answer)[0] - want).max() < ATOL
    assert headers["x-model-version"] == "1"
    _no_payload_left(slow)  # the dead worker's request and result files are gone too
    assert httpx.get(slow.server.url + "/v2/health/live", timeout=30).status_code == 200


# ---- SIGTERM to the process group: it ends the slow server ---------------------------------------------


def test_sigterm_to_the_process_group_drains_in_flight_and_exits_zero(slow: Deployment) -> None:
    """The slow server's last test: it ends it (as ``docker stop`` or run_server's stop() would)."""
    proc = slow.server.proc
    pids = _all_pids(slow)
    image = image_bytes(40, 30, seed=2)
    want = expected_probs([image])[0]
    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            result["r"] = predict(slow.server.url, MODEL, image)
        except httpx.TransportError as exc:
            result["error"] = exc

    worker = threading.Thread(target=slow_request)
    worker.start()
    wait_until(slow.payload_files, "the request's payload to reach the device process", interval=0.01)
    assert result == {}, "the request should still be in flight"
    os.killpg(proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    assert_no_new_inference(slow.server.url, MODEL, image)
    worker.join(60)
    code = proc.wait(60)
    assert "error" not in result, result
    response = result["r"]
    assert isinstance(response, httpx.Response) and response.status_code == 200, response
    assert np.abs(probs_of(response)[0] - want).max() < ATOL
    assert code == 0, log_tail(slow.server)
    wait_until(lambda: not any(alive(p) for p in pids), "every process of the server to exit", timeout=30)
    assert payload_files(slow.run_dir) == []
    assert "Traceback" not in slow.server.output()


# ---- a slow client -------------------------------------------------------------------------------------


def test_a_client_sending_a_byte_at_a_time_does_not_block_its_worker(fast: Deployment) -> None:
    image = image_bytes(6, 5, seed=3)
    want = expected_probs([image])[0]
    head, body = multipart_request(PATH, image, request_id="trickler")
    slow_pid, other_pid = fast.pids()["workers"]
    sock = connect_to(fast, slow_pid)
    mid_head, mid_body, go_on = threading.Event(), threading.Event(), threading.Event()
    answer: dict[str, object] = {}

    def trickle() -> None:
        try:
            for i, byte in enumerate(head):
                if i == len(head) // 2:
                    mid_head.set()
                    go_on.wait(30)
                    go_on.clear()
                sock.sendall(bytes([byte]))
                time.sleep(0.002)
            for i, byte in enumerate(body):
                if i == len(body) // 2:
                    mid_body.set()
                    go_on.wait(30)
                sock.sendall(bytes([byte]))
                time.sleep(0.002)
            answer["response"] = read_response(sock)
        except OSError as exc:
            answer["error"] = exc

    def others_answered(stage: str) -> None:
        # one request on the trickler's own worker, one on the other worker, two wherever the kernel puts them
        for pid in (slow_pid, other_pid):
            with connect_to(fast, pid) as s:
                status, _, data = predict_on(s, MODEL, image, request_id=f"{stage}-{pid}")
                assert status == 200, data
                assert np.abs(probs_in(data)[0] - want).max() < ATOL
        for _ in range(2):
            r = predict(fast.server.url, MODEL, image)
            assert r.status_code == 200 and np.abs(probs_of(r)[0] - want).max() < ATOL
        assert httpx.get(fast.server.url + "/v2/health/live", timeout=30).status_code == 200
        assert answer == {}, f"the trickled request was answered before it was complete: {answer}"

    thread = threading.Thread(target=trickle)
    with sock:
        thread.start()
        try:
            assert mid_head.wait(60)
            others_answered("mid-head")
            go_on.set()
            assert mid_body.wait(60)
            others_answered("mid-body")
        finally:
            go_on.set()
            thread.join(60)
    assert "error" not in answer, answer
    status, headers, data = answer["response"]  # type: ignore[misc]
    assert status == 200 and headers["x-request-id"] == "trickler", data
    assert np.abs(probs_in(data)[0] - want).max() < ATOL
    assert pids_of(fast.server, ["trickler"]) == {"trickler": slow_pid}


# ---- 10,000 requests leave no payload ------------------------------------------------------------------


def test_ten_thousand_requests_leave_no_payload(fast: Deployment) -> None:
    total, threads = 10_000, 16
    valid = [image_bytes(40, 30, seed=s) for s in range(4)]
    want = expected_probs(valid)
    invalid = [b"\x00not an image" * 20, valid[0][: len(valid[0]) // 2]]  # garbage, truncated PNG: both 422
    requests = {
        "valid": [multipart_request(PATH, img, keep_alive=True) for img in valid],
        "invalid": [multipart_request(PATH, img, keep_alive=True) for img in invalid],
        "close": [multipart_request(PATH, img) for img in valid],
    }
    kinds = ["valid", "invalid", "hang_up_mid_body", "hang_up_before_answer"]
    # request i is sent by thread i % threads; each thread takes every kind in turn, so most threads
    # are waiting on a valid request at any moment and the device process gets full batches
    plan = [kinds[(i // threads) % len(kinds)] for i in range(total)]
    # first one valid and one invalid request to each HTTP process: files a process makes once exist now
    for pid in fast.worker_pids():
        with connect_to(fast, pid) as sock:
            for kind in ("valid", "invalid"):
                head, body = requests[kind][0]
                sock.sendall(head + body)
                assert read_response(sock)[0] == (200 if kind == "valid" else 422)
    wait_until(lambda: fast.payload_files() == [], "payload/ to be empty before the run")
    entries_before = run_dir_entries(fast.run_dir)
    metrics = httpx.get(fast.server.url + "/metrics", timeout=30).text
    count_422 = one_metric(metrics, "modserve_requests_total", model=MODEL, family="native", code="422")
    five_xx = _five_xx(fast)
    log_start = len(fast.server.output().splitlines())

    def run(thread: int) -> dict[str, int]:
        counts = {"valid": 0, "invalid": 0, "hang_up_mid_body": 0, "hang_up_before_answer": 0}
        sock: socket.socket | None = None
        for i in range(thread, total, threads):
            kind = plan[i]
            if kind in ("valid", "invalid"):
                if sock is None or i % 97 < threads:  # a new connection now and then: both workers get some
                    if sock is not None:
                        sock.close()
                    sock = connect(fast)
                which = i % len(requests[kind])
                head, body = requests[kind][which]
                sock.sendall(head + body)
                status, _, data = read_response(sock)
                if kind == "valid":
                    assert status == 200, data
                    assert np.abs(probs_in(data)[0] - want[which]).max() < ATOL
                else:
                    assert status == 422, data
            else:
                head, body = requests["close"][i % len(valid)]
                with connect(fast) as hang:
                    if kind == "hang_up_mid_body":
                        hang.sendall(head + body[: len(body) // 2])
                    else:
                        hang.sendall(head + body)
                        # at once, or once the request is in the device process (queued, or in a forward)
                        time.sleep(0.015 * (i % 7))
                    if i % 2:  # a reset rather than an orderly close
                        hang.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            counts[kind] += 1
        if sock is not None:
            sock.close()
        return counts

    with ThreadPoolExecutor(threads) as pool:
        per_thread = list(pool.map(run, range(threads)))
    counts = {k: sum(c[k] for c in per_thread) for k in per_thread[0]}
    assert counts == {k: plan.count(k) for k in kinds} and sum(counts.values()) == total, counts
    assert min(counts.values()) > 2400, counts  # about a quarter each

    _no_payload_left(fast)  # counted, not assumed: no file under payload/, none open or mapped
    assert run_dir_entries(fast.run_dir) == entries_before  # and nothing else appeared in the run folder
    metrics = httpx.get(fast.server.url + "/metrics", timeout=30).text
    assert one_metric(metrics, "modserve_requests_total", model=MODEL, family="native", code="422") \
        == count_422 + counts["invalid"]
    assert _five_xx(fast) == five_xx  # hang-ups are not server errors
    lines = fast.server.output().splitlines()[log_start:]
    logged = [json.loads(line) for line in lines if line.startswith("{")]
    errors = [d for d in logged if d.get("level") in ("error", "critical")]
    assert errors == [], errors[:3]  # nor logged as errors, by any process
    assert httpx.get(fast.server.url + "/v2/health/live", timeout=30).status_code == 200
    assert httpx.get(fast.server.url + "/v2/health/ready", timeout=30).status_code == 200
    r = predict(fast.server.url, MODEL, valid[1])
    assert r.status_code == 200 and np.abs(probs_of(r)[0] - want[1]).max() < ATOL
    assert all(alive(p) for p in _all_pids(fast))


# ---- the device process killed -------------------------------------------------------------------------


def test_device_process_killed_then_restarted(fast: Deployment) -> None:
    url = fast.server.url
    before = fast.pids()
    workers = before["workers"]
    image = image_bytes(40, 30, seed=4)
    want = expected_probs([image])[0]
    assert predict(url, MODEL, image).status_code == 200
    os.kill(before["device"], signal.SIGKILL)

    def live_on(pid: int) -> int:
        with connect_to(fast, pid) as sock:
            return exchange(sock, "GET", "/v2/health/live")[0]

    history: dict[int, list[int]] = {pid: [] for pid in workers}

    def probe_until(status: int) -> bool:
        for pid in workers:
            if not history[pid] or history[pid][-1] != status:
                history[pid].append(live_on(pid))
        return all(h[-1] == status for h in history.values())

    wait_until(lambda: probe_until(503), "every HTTP process to report the device process down", timeout=30,
               interval=0.01)
    for pid in workers:  # and to refuse inference meanwhile
        with connect_to(fast, pid) as sock:
            status, _, body = predict_on(sock, MODEL, image)
        assert status == 503, body
        assert "error" in json.loads(body)
    wait_until(lambda: probe_until(200), "the device process to be restarted", timeout=180, interval=0.05)
    for pid, statuses in history.items():  # once down, down until the restart: then up
        first = statuses.index(503)
        assert statuses[first:] == [503] * (len(statuses) - first - 1) + [200], (pid, statuses)

    # live again once the new device process answers; ready once it has reloaded the store (as at start-up)
    def ready_everywhere() -> bool:
        statuses = []
        for pid in workers:
            with connect_to(fast, pid) as sock:
                statuses.append(exchange(sock, "GET", "/v2/health/ready")[0])
        return statuses == [200] * len(workers)

    wait_until(ready_everywhere, "every HTTP process to be ready again", timeout=180, interval=0.05)
    after = fast.pids()
    assert after["device"] != before["device"] and alive(after["device"])
    assert after["workers"] == workers  # the HTTP processes stayed
    assert after["supervisor"] == fast.server.proc.pid
    for pid in workers:
        with connect_to(fast, pid) as sock:
            assert exchange(sock, "GET", "/v2/health/live")[0] == 200
            status, headers, body = predict_on(sock, MODEL, image)
        assert status == 200, body
        assert headers["x-model-version"] == "1"
        assert np.abs(probs_in(body)[0] - want).max() < ATOL
    _no_payload_left(fast)
