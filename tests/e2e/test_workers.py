"""The service with ``--workers 1`` and ``--workers 2`` (issue 17), one real server per worker count:
the processes it runs, the same answers as a local forward (native multipart and JSON, tritonclient),
the access log naming the process that answered, ``/metrics`` summed over every process, an admin
reload under load that loses no request and leaves every process on the new version, and SIGTERM to
the supervisor draining a request in flight and exiting 0 (the last test of each server: it ends it).

The HTTP processes share one listening socket and the kernel decides which accepts a connection, so
what must reach every process is sent to each in turn (``connect_to``: the others are paused while it
connects, and the process that accepted is read from /proc). Every forward sleeps 200 ms
(``MODSERVE_FAULT_INJECTION``) so that a request can be caught in flight. Nothing asserts on durations.
"""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import torch
import tritonclient.http as httpclient

from app.store.writer import write_model
from support.models import build_small, image_bytes, small_configs
from support.workers import (
    assert_no_new_inference,
    ARCH, ATOL, AUTH, Deployment, alive, b64_instances, children, connect, connect_to, exchange,
    expected_probs, local_forward, log_tail, one_metric, others_paused, owner_of, pids_of, predict,
    predict_on, preprocessed, probs_in, probs_of, serve_workers, shm_folder, wait_until,
)

pytestmark = pytest.mark.e2e

ENV = {"MODSERVE_FAULT_INJECTION": "sleep_ms=200", "MODSERVE_GRACEFUL_TIMEOUT": "30"}


@pytest.fixture(scope="module", params=[1, 2], ids=lambda n: f"workers{n}")
def dep(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """A store of two copies of the small resnet50_head: ``cls`` (read only) and ``swap`` (reloaded)."""
    workers = request.param
    store = tmp_path_factory.mktemp(f"workers{workers}-store")
    for name in ("cls", "swap"):
        write_model(store, name, small_configs()[ARCH], build_small(ARCH, seed=0).state_dict())
    with shm_folder(f"modserve-e2e-w{workers}-") as shm, serve_workers(
        store, tmp_path_factory.mktemp(f"workers{workers}-logs"), shm / "run", workers=workers, env=ENV,
    ) as deployment:
        yield deployment


def _concurrently(fn, args: list, threads: int = 4) -> list:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, args))


# ---- the processes ------------------------------------------------------------------------------------


def test_process_layout(dep: Deployment) -> None:
    proc = dep.server.proc
    if dep.workers == 1:  # today's single-process path: no other process at all
        assert children(proc.pid) == []
        return
    pids = dep.pids()
    assert set(pids) >= {"supervisor", "device", "workers"}, pids
    assert pids["supervisor"] == proc.pid
    workers, device = pids["workers"], pids["device"]
    assert len(workers) == 2 and len(set(workers)) == 2
    assert len({proc.pid, device, *workers}) == 4
    for pid in (device, *workers):
        assert alive(pid), pid
        assert pid in children(proc.pid), f"{pid} is not a child of the supervisor"
        # one process group: stopping the group (docker, run_server's stop) reaches every process
        assert os.getpgid(pid) == proc.pid
    assert (dep.run_dir / "payload").is_dir()
    assert dep.payload_files() == []  # idle: no request, no payload


# ---- answers equal a local forward -------------------------------------------------------------------


def test_native_multipart_and_json_match_local_forward(dep: Deployment) -> None:
    images = [image_bytes(50, 40, seed=s) for s in range(4)]
    expected = expected_probs(images)
    as_json = json.dumps(b64_instances(images)).encode()
    for pid in dep.worker_pids():  # every HTTP process decodes and preprocesses alike
        for image, want in zip(images, expected):
            with connect_to(dep, pid) as sock:
                status, headers, body = predict_on(sock, "cls", image)
            assert status == 200, body
            assert headers["x-model-name"] == "cls" and headers["x-model-version"] == "1"
            assert np.abs(probs_in(body)[0] - want).max() < ATOL
        with connect_to(dep, pid) as sock:
            status, _, body = exchange(sock, "POST", "/v1/models/cls/predict", body=as_json,
                                       headers={"Content-Type": "application/json"})
        assert status == 200, body
        answer = json.loads(body)
        assert answer["model_name"] == "cls" and answer["model_version"] == "1"
        assert np.abs(probs_in(body) - expected).max() < ATOL
        assert [p["label"]["index"] for p in answer["predictions"]] == list(expected.argmax(1))
    responses = _concurrently(lambda img: predict(dep.server.url, "cls", img), images)  # and all at once
    for response, want in zip(responses, expected):
        assert response.status_code == 200, response.text
        assert np.abs(probs_of(response)[0] - want).max() < ATOL


def test_tritonclient_infer_matches_local_forward(dep: Deployment) -> None:
    pngs = [image_bytes(50, 40, seed=s) for s in (5, 6)]
    tensor = np.stack([preprocessed(p) for p in pngs])
    ref = local_forward(tensor)
    cases = [(pid, binary) for pid in dep.worker_pids() for binary in (True, False)]
    for pid, binary in cases:
        # the client's connections are opened while only ``pid`` accepts: that process answers them
        with others_paused(dep, pid):
            client = httpclient.InferenceServerClient(dep.hostport)
            try:
                assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("cls")
                assert client.get_model_metadata("cls")["versions"] == ["1"]
                image = httpclient.InferInput("image", list(tensor.shape), "FP32")
                image.set_data_from_numpy(tensor, binary_data=binary)
                probs = httpclient.InferRequestedOutput("probs", binary_data=binary)
                rid = f"t-{pid}-{binary}"
                result = client.infer("cls", [image], outputs=[probs], request_id=rid,
                                      headers={"X-Request-ID": rid})  # the id the access log shows
                response = result.get_response()
                assert response["model_name"] == "cls" and response["model_version"] == "1"
                assert response["id"] == rid
                np.testing.assert_allclose(result.as_numpy("probs"), ref, atol=ATOL, rtol=0)
                files = httpclient.InferInput("image_bytes", [len(pngs)], "BYTES")
                files.set_data_from_numpy(np.array(pngs, dtype=object), binary_data=True)  # bytes: binary
                result = client.infer("cls", [files], request_id=f"b-{pid}-{binary}")
                np.testing.assert_allclose(result.as_numpy("probs"), ref, atol=ATOL, rtol=0)
            finally:
                client.close()
    answered = pids_of(dep.server, [f"t-{pid}-{binary}" for pid, binary in cases])
    assert answered == {f"t-{pid}-{binary}": pid for pid, binary in cases}


# ---- access logs and metrics -----------------------------------------------------------------------------


def test_access_logs_name_the_process_that_answered(dep: Deployment) -> None:
    """Each access-log line carries the pid of the HTTP process that held the request's connection
    (read from /proc): for connections wherever the kernel put them, and for some sent to each process."""
    owners: dict[str, int] = {}
    image = image_bytes(seed=3)
    for i in range(8):  # wherever the kernel puts them
        with connect(dep) as sock:
            owners[f"free-w{dep.workers}-{i}"] = owner_of(dep, sock)
            status, _, body = predict_on(sock, "cls", image, request_id=f"free-w{dep.workers}-{i}")
            assert status == 200, body
    for pid in dep.worker_pids():  # and to each HTTP process in turn
        for i in range(3):
            rid = f"to-{pid}-{i}"
            with connect_to(dep, pid) as sock:
                owners[rid] = pid
                status, _, body = predict_on(sock, "cls", image, request_id=rid)
                assert status == 200, body
    logged = pids_of(dep.server, list(owners))
    assert logged == owners
    assert set(logged.values()) == set(dep.worker_pids())
    if dep.workers == 1:
        assert dep.worker_pids() == [dep.server.proc.pid]


def test_metrics_aggregate_every_process(dep: Deployment) -> None:
    def scrape(pid: int) -> tuple[float, float]:
        with connect_to(dep, pid) as sock:
            status, _, body = exchange(sock, "GET", "/metrics")
        assert status == 200, body
        text = body.decode()
        return (one_metric(text, "modserve_requests_total", model="cls", family="native", code="200"),
                one_metric(text, "modserve_batch_size_sum", model="cls"))

    workers = dep.worker_pids()
    baseline = {pid: scrape(pid) for pid in workers}
    assert len(set(baseline.values())) == 1, f"the HTTP processes disagree before any request: {baseline}"
    count0, items0 = baseline[workers[0]]
    k = 12
    image = image_bytes(seed=4)

    def one(i: int) -> None:
        with connect_to(dep, workers[i % len(workers)]) if i % 2 else connect(dep) as sock:
            status, _, body = predict_on(sock, "cls", image)
            assert status == 200, body

    for i in range(k):  # half to chosen processes (both get some), half wherever the kernel puts them
        one(i)
    want = (count0 + k, items0 + k)  # k more 200s (HTTP processes), k more items forwarded (device process)
    # a request is counted just after its response went out: wait for the last one to be counted
    wait_until(lambda: scrape(workers[0]) >= want, f"/metrics to count {k} more requests")
    reads = [(pid, scrape(pid)) for _ in range(3) for pid in workers]  # every HTTP process answers the same
    assert [values for _, values in reads] == [want] * len(reads), reads


# ---- admin reload under load ----------------------------------------------------------------------------


def test_admin_reload_under_load_loses_no_request(dep: Deployment) -> None:
    url = dep.server.url
    image = image_bytes(50, 40, seed=9)
    old, new = expected_probs([image], seed=0)[0], expected_probs([image], seed=1)[0]
    stop = threading.Event()
    results: list[list[tuple[int, str | None, np.ndarray | None, str]]] = [[], []]

    def load(out: list) -> None:
        while not stop.is_set():
            r = predict(url, "swap", image)  # a new connection each time: spread over the workers
            probs = probs_of(r)[0] if r.status_code == 200 else None
            out.append((r.status_code, r.headers.get("x-model-version"), probs, r.text[:300]))

    threads = [threading.Thread(target=load, args=(out,)) for out in results]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: all(len(out) >= 2 for out in results), "requests before the reload")
        buf = io.BytesIO()
        torch.save(build_small(ARCH, seed=1).state_dict(), buf)
        up = httpx.put(f"{url}/admin/models/swap/versions/2", content=buf.getvalue(),
                       headers={**AUTH, "Content-Type": "application/octet-stream"}, timeout=120)
        assert up.status_code == 200, up.text
        assert up.json()["version"] == "2"
        client = httpclient.InferenceServerClient(dep.hostport, network_timeout=120)
        try:
            client.load_model("swap", headers=AUTH)  # the newest version: 2
        finally:
            client.close()
        marks = [len(out) for out in results]
        wait_until(lambda: all(len(out) >= m + 2 for out, m in zip(results, marks)),
                   "requests after the reload")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    for out in results:
        assert [o for o in out if o[0] != 200] == []
        versions = [o[1] for o in out]
        # each thread's requests follow one another: once one got version 2, none after it gets 1
        assert versions == sorted(versions), versions
        assert versions[0] == "1" and versions[-1] == "2", versions
        for _, version, probs, _ in out:
            np.testing.assert_allclose(probs, old if version == "1" else new, atol=ATOL, rtol=0)

    for pid in dep.worker_pids():  # every HTTP process answers with the new version
        for _ in range(10):
            with connect_to(dep, pid) as sock:
                status, headers, body = predict_on(sock, "swap", image)
                assert status == 200, body
                assert headers["x-model-version"] == "2" and json.loads(body)["model_version"] == "2"
                assert np.abs(probs_in(body)[0] - new).max() < ATOL
                status, _, body = exchange(sock, "GET", "/v2/models/swap")
                assert status == 200 and json.loads(body)["versions"] == ["2"], body
                status, _, body = exchange(sock, "GET", "/v1/models/swap")
                described = json.loads(body)
                assert status == 200 and described["version"] == "2" and described["ready"] is True, body
    client = httpclient.InferenceServerClient(dep.hostport)
    try:
        assert client.get_model_metadata("swap")["versions"] == ["2"]
        assert client.get_model_config("swap")["version_policy"] == {"specific": {"versions": [2]}}
    finally:
        client.close()


# ---- SIGTERM: last, it ends the server -----------------------------------------------------------------


def test_sigterm_to_the_supervisor_drains_in_flight_and_exits_zero(dep: Deployment) -> None:
    url, proc = dep.server.url, dep.server.proc
    images = [image_bytes(40, 30, seed=s) for s in range(16)]  # 4 forwards of 4 (max_batch_size), 200 ms each
    expected = expected_probs(images)
    others = [] if dep.workers == 1 else [dep.pids()["device"], *dep.pids()["workers"]]
    batches_before = httpx.get(f"{url}/v1/models/cls", timeout=30).json()["batching"]["batches_run"]
    result: dict[str, object] = {}

    def slow_request() -> None:
        try:
            result["r"] = httpx.post(f"{url}/v1/models/cls/predict", json=b64_instances(images), timeout=60)
        except httpx.TransportError as exc:
            result["error"] = exc

    worker = threading.Thread(target=slow_request)
    worker.start()
    if dep.workers == 1:
        wait_until(lambda: httpx.get(f"{url}/v1/models/cls", timeout=30).json()["batching"]["batches_run"]
                   > batches_before, "the request's first batch")
    else:
        wait_until(dep.payload_files, "the request's payload to reach the device process", interval=0.01)
    assert result == {}, "the request should still be in flight"
    proc.send_signal(signal.SIGTERM)  # the supervisor only: it passes the signal on
    time.sleep(0.3)
    assert_no_new_inference(url, "cls")
    worker.join(60)
    code = proc.wait(60)
    assert "error" not in result, result
    response = result["r"]
    assert isinstance(response, httpx.Response)
    assert response.status_code == 200, response.text
    assert np.abs(probs_of(response) - expected).max() < ATOL
    assert code == 0, log_tail(dep.server)
    if dep.workers == 1:
        assert "draining" in dep.server.output()
    else:
        wait_until(lambda: not any(alive(p) for p in others), "the workers and the device process to exit",
                   timeout=30)
        assert dep.payload_files() == []
    assert "Traceback" not in dep.server.output()
