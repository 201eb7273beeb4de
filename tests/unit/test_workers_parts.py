"""The parts of the multi-process server without processes: payload files, the wire format,
errors crossing, shared slots, the state snapshot, and the device server with its link."""

from __future__ import annotations

import asyncio
import errno
import multiprocessing
import os
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import torch

from app.config import Settings
from app.errors import (
    DeviceUnavailable, InvalidInput, ModelNotReady, Overloaded, ServiceError, StaleModel, from_wire, to_wire,
)
from app.lifecycle import ServerState
from app.registry import ModelRegistry
from app.runtime.items import InferenceItem
from app.runtime.uploads import decode_upload
from app.service import Instance, InferenceService
from app.store import ModelStore
from app.v2 import protocol
from app.workers import wire
from app.workers.device import DeviceServer
from app.workers.link import DeviceLink
from app.workers.mirror import MirrorRegistry
from app.workers.payload import PayloadDir, read_arrays, write_arrays
from app.workers.run_dir import RunDir
from app.workers.snapshot import runtime_card, snapshot_of, weightless_runtime
from support.models import image_bytes, write_small_store

# ---- payload files -----------------------------------------------------------------------


def test_payload_round_trip_keeps_dtype_shape_and_values(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = [
        rng.random((3, 5, 7), dtype=np.float32),
        rng.integers(0, 255, (9, 4, 3), dtype=np.uint8)[:, ::2],  # not contiguous
        np.zeros((0, 4), np.float32),
        np.array(3, np.int64),
        np.array([True, False]),
    ]
    layouts = write_arrays(tmp_path / "1-1.in", arrays)
    back = read_arrays(tmp_path / "1-1.in", layouts)
    for a, b in zip(arrays, back):
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)
    assert all(layout["offset"] % 64 == 0 for layout in layouts)


def test_a_layout_that_does_not_fit_its_file_is_refused(tmp_path: Path) -> None:
    layouts = write_arrays(tmp_path / "f", [np.ones(4, np.float32)])
    with pytest.raises(ServiceError, match="does not match"):
        read_arrays(tmp_path / "f", [{**layouts[0], "shape": [400], "nbytes": 1600}])
    with pytest.raises(ServiceError, match="not understood"):
        read_arrays(tmp_path / "f", [{**layouts[0], "dtype": "|O"}])


def test_full_shared_memory_is_a_503_and_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(Overloaded, match="shared memory"):
        write_arrays(tmp_path / "7-1.in", [np.ones(8, np.float32)])
    assert list(tmp_path.iterdir()) == []


def test_sweep_removes_only_the_dead_processes_files(tmp_path: Path) -> None:
    payload = PayloadDir(tmp_path)
    for pid, request in ((11, 1), (11, 2), (111, 1), (12, 1)):
        Path(payload.path(pid, request, "in")).write_bytes(b"x")
    assert payload.sweep(11) == 2
    assert sorted(p.name for p in payload.files()) == ["111-1.in", "12-1.in"]


# ---- the wire format -----------------------------------------------------------------------


def test_items_cross_with_their_pixels_scalars_and_options() -> None:
    from app.runtime.preprocess import Preprocessor
    from app.store.model_config import PreprocessConfig

    pre = Preprocessor(PreprocessConfig(resize=(8, 10)), default_resize=None)
    upload = decode_upload(image_bytes(), pre, torch.device("cpu"), max_pixels=10**6)
    jpeg = image_bytes(fmt="JPEG")
    items = [
        InferenceItem(image=upload.image, scalar=torch.tensor([0.5, 2.0]), orig_size=(30, 40),
                      outputs=frozenset({"probs"}), solo=True),
        InferenceItem(image=torch.rand(3, 8, 10)),
        InferenceItem(image=torch.empty(3, 8, 10, dtype=torch.uint8, device="meta"),
                      encoded=torch.frombuffer(bytearray(jpeg), dtype=torch.uint8)),
    ]
    arrays, described = wire.items_to_wire(items)
    assert described[0]["hwc"] is True  # the decoder's own HWC array crosses, not a copy in CHW

    class Plain:
        def make_item(self, image: torch.Tensor, **kw: Any) -> InferenceItem:
            return InferenceItem(image=image, scalar=kw["scalar"], orig_size=kw["size"], outputs=kw["outputs"])

    back = wire.items_from_wire(Plain(), arrays, described)  # type: ignore[arg-type]
    assert torch.equal(back[0].image, upload.image) and back[0].image.shape == (3, 8, 10)
    assert back[0].scalar.tolist() == [0.5, 2.0] and back[0].orig_size == (30, 40)  # type: ignore[union-attr]
    assert back[0].outputs == frozenset({"probs"}) and back[0].solo
    assert torch.equal(back[1].image, items[1].image) and back[1].outputs is None and back[1].scalar is None
    assert back[2].image.device.type == "meta" and bytes(back[2].encoded.numpy()) == jpeg  # type: ignore[union-attr]


def test_results_cross_in_order() -> None:
    results = [{"probs": np.arange(4, dtype=np.float32), "features": np.ones((2, 3))}, {}, {"mask": np.eye(3, dtype=np.uint8)}]
    arrays, names = wire.results_to_wire(results)
    back = wire.results_from_wire(arrays, names)
    assert [list(r) for r in back] == [["probs", "features"], [], ["mask"]]
    assert all(np.array_equal(back[i][k], results[i][k]) for i in range(3) for k in results[i])


def test_messages_are_framed_and_an_oversized_length_ends_the_connection() -> None:
    async def main() -> None:
        reader = asyncio.StreamReader()
        reader.feed_data(wire.pack({"op": "infer", "id": 3, "x": np.float32(1.5)}))
        reader.feed_data((wire.MAX_MESSAGE + 1).to_bytes(4, "big") + b"{}")
        reader.feed_eof()
        assert await wire.read_message(reader) == {"op": "infer", "id": 3, "x": 1.5}
        assert await wire.read_message(reader) is None

    asyncio.run(main())


def test_errors_cross_with_their_type_status_and_headers() -> None:
    for exc in (Overloaded("queue full", retry_after=3), ModelNotReady("not ready", reason="loading"),
                InvalidInput("bad image"), StaleModel("swapped")):
        back = from_wire(to_wire(exc))
        assert type(back) is type(exc) and back.status_code == exc.status_code
        assert back.message == exc.message and back.headers == exc.headers and back.body() == exc.body()
    unknown = from_wire({"type": "SystemExit", "message": "m", "status": 500})
    assert type(unknown) is ServiceError


# ---- shared slots ----------------------------------------------------------------------------


def test_the_concurrency_limit_holds_across_processes_sharing_slots() -> None:
    slots = multiprocessing.get_context("spawn").Array("i", 2, lock=False)
    first, second = ServerState(slots, 0), ServerState(slots, 1)
    assert first.take_slot(3) and first.take_slot(3) and second.take_slot(3)
    assert not second.take_slot(3) and not first.take_slot(3)
    first.release_slot()
    assert second.take_slot(3)
    assert list(slots) == [1, 2] and (first.inflight, second.inflight) == (1, 2)


# ---- the snapshot and the device server ---------------------------------------------------------


def test_weightless_runtimes_describe_the_model_as_the_loaded_one_does(tmp_path: Path) -> None:
    root = write_small_store(tmp_path)
    registry = ModelRegistry(ModelStore(root), Settings(store=root, warmup=False))
    asyncio.run(registry.load_all())
    for view in registry.views():
        real = view.runtime
        assert real is not None
        card = orjson.loads(orjson.dumps(runtime_card(real), default=str))
        mirror = weightless_runtime(view.name, card)
        assert protocol.model_metadata(mirror) == protocol.model_metadata(real)
        assert protocol.model_config(mirror) == protocol.model_config(real)
        assert mirror.describe() == real.describe() and mirror.max_processed_pixels == real.max_processed_pixels
        assert list(mirror.model.parameters()) == []


def _mirror_and_service(root: Path, run: RunDir, link: DeviceLink) -> tuple[MirrorRegistry, InferenceService]:
    """An HTTP process's view of the device process: its mirror registry and inference service."""
    mirror = MirrorRegistry(run.snapshot, link, ModelStore(root))
    return mirror, InferenceService(mirror, Settings(store=root, warmup=False), ServerState())  # type: ignore[arg-type]


async def _stop(device: DeviceServer, link: DeviceLink, task: asyncio.Task[None], *services: InferenceService) -> None:
    await link.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await device.registry.close()
    for service in services:
        service.close()


async def _device_and_link(
    root: Path, run: RunDir, **settings: Any
) -> tuple[DeviceServer, DeviceLink, asyncio.Task[None]]:
    device = DeviceServer(Settings(store=root, warmup=False, **settings), run)
    task = asyncio.get_running_loop().create_task(device.serve())
    link = DeviceLink(run.socket, run.payload)
    await link.start(wait=10)
    for _ in range(200):
        if all(v.ready for v in device.registry.views()) and device.registry.views():
            break
        await asyncio.sleep(0.05)
    return device, link, task


def test_the_device_server_answers_through_the_link_as_the_model_does_in_process(tmp_path: Path) -> None:
    root = write_small_store(tmp_path / "store", ["resnet50_extra", "unet"])
    run = RunDir.create(tmp_path / "run", 0)

    async def main() -> None:
        device, link, task = await _device_and_link(root, run)
        mirror, remote = _mirror_and_service(root, run, link)
        local = InferenceService(device.registry, Settings(store=root, warmup=False), ServerState())
        png = image_bytes()
        for name, inst in (("resnet50_extra", Instance(image_bytes=png, scalar=[0.5])),
                           ("unet", Instance(image_bytes=png)),
                           ("unet", Instance(image=np.random.default_rng(0).random((3, 6, 8), np.float32)))):
            a = await remote.predict(name, [inst, inst])
            b = await local.predict(name, [inst])
            assert a.runtime.version == b.runtime.version and a.image_sizes[0] == b.image_sizes[0]
            for key, value in b.results[0].items():
                assert np.allclose(a.results[0][key], value, atol=1e-5) and np.array_equal(a.results[0][key], a.results[1][key])
        with pytest.raises(InvalidInput, match="missing scalar"):  # checked in the HTTP process
            await remote.predict("resnet50_extra", [Instance(image_bytes=png)])
        await mirror.unload("unet")  # the snapshot is read before the call returns
        with pytest.raises(ModelNotReady):
            await remote.predict("unet", [Instance(image_bytes=png)])
        await mirror.load("unet")
        assert mirror.view("unet").ready and mirror.view("unet").version == "1"
        assert run.payload.files() == []
        await link.close()
        assert link.down_reason() is not None
        with pytest.raises(DeviceUnavailable):
            await remote.predict("resnet50_extra", [Instance(image_bytes=png, scalar=[0.5])])
        await _stop(device, link, task, remote, local)

    asyncio.run(main())


def test_a_request_prepared_for_a_replaced_version_is_prepared_again(tmp_path: Path) -> None:
    root = write_small_store(tmp_path / "store", ["resnet50_head"])
    run = RunDir.create(tmp_path / "run", 0)

    async def main() -> None:
        device, link, task = await _device_and_link(root, run)
        mirror, remote = _mirror_and_service(root, run, link)
        mirror.refresh()
        before = dict(mirror._status)
        import shutil

        shutil.copytree(root / "resnet50_head" / "1", root / "resnet50_head" / "2")
        await device.registry.load("resnet50_head")  # another HTTP process's reload
        mirror.refresh()
        mirror._status = before  # as if this process had not read the new snapshot yet
        assert mirror.get("resnet50_head").runtime.version == "1"
        answer = await remote.predict("resnet50_head", [Instance(image_bytes=image_bytes())])
        assert answer.runtime.version == "2"
        await _stop(device, link, task, remote)

    asyncio.run(main())


def test_one_upload_per_model_at_a_time_across_processes(tmp_path: Path) -> None:
    from app.errors import Conflict
    from app.store.writer import upload_lock

    with upload_lock(tmp_path, "unet"):
        with pytest.raises(Conflict, match="upload of model 'unet' is running"):
            with upload_lock(tmp_path, "unet"):  # a second descriptor: what another process holds
                pass
        with upload_lock(tmp_path, "resnet50_head"):
            pass
    with upload_lock(tmp_path, "unet"):
        pass


def test_every_snapshot_write_is_seen_even_two_in_the_same_millisecond(tmp_path: Path) -> None:
    from app.workers.snapshot import SnapshotReader, SnapshotWriter

    reader = SnapshotReader(tmp_path / "state.json")
    assert reader.read_if_changed() is None  # nothing written yet
    writer = SnapshotWriter(tmp_path / "state.json")
    writer.write({"models": [], "fatal": None})
    assert reader.read_if_changed() == {"models": [], "fatal": None}
    assert reader.read_if_changed() is None  # unchanged: no file read
    writer.write({"models": [], "fatal": "a"})
    writer.write({"models": [], "fatal": "b"})  # rename to a freed inode, same coarse mtime: still seen
    assert reader.read_if_changed() == {"models": [], "fatal": "b"}
    writer.write({"models": [], "fatal": "b"})  # same content, not forced: nothing written
    assert reader.read_if_changed() is None


def test_a_device_fault_reaches_every_http_process_as_not_live(tmp_path: Path) -> None:
    from app.errors import DeviceFault

    root = write_small_store(tmp_path / "store", ["resnet50_head"])
    run = RunDir.create(tmp_path / "run", 0)

    async def main() -> None:
        device, link, task = await _device_and_link(root, run, fault_injection="fatal")
        mirror, remote = _mirror_and_service(root, run, link)
        other = MirrorRegistry(run.snapshot, link, ModelStore(root))  # a second HTTP process's view
        assert mirror.down_reason() is None and other.down_reason() is None
        with pytest.raises(DeviceFault):
            await remote.predict("resnet50_head", [Instance(image_bytes=image_bytes())])
        assert "CUDA error" in (other.down_reason() or "")
        assert not other.view("resnet50_head").ready and other.readiness(strict=False)
        await _stop(device, link, task, remote)

    asyncio.run(main())


def test_red_team_findings_stay_fixed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A same-version reload with another model.toml is prepared again; an answer that cannot be read
    fails its own request only; a native U-Net answer carries the mask, not the logits."""
    import app.workers.link as link_module

    root = write_small_store(tmp_path / "store", ["resnet50_head", "unet"])
    run = RunDir.create(tmp_path / "run", 0)

    async def main() -> None:
        device, link, task = await _device_and_link(root, run)
        mirror, remote = _mirror_and_service(root, run, link)
        mirror.refresh()
        before = dict(mirror._status)
        toml = root / "resnet50_head" / "model.toml"
        toml.write_text(toml.read_text().replace("[postprocess]", '[postprocess]\noutput_names = ["scores"]'))
        await device.registry.load("resnet50_head")  # version 1 again, another configuration
        mirror.refresh()
        mirror._status = before  # this process has not read the new state yet
        answer = await remote.predict("resnet50_head", [Instance(image_bytes=image_bytes())])
        assert list(answer.results[0]) == ["scores"] and answer.runtime.head_names == ("scores",)

        real = link_module.read_arrays
        calls = {"n": 0}

        def once_broken(*args: Any) -> Any:
            calls["n"] += 1
            if calls["n"] == 1:
                raise OSError(24, "Too many open files")
            return real(*args)

        monkeypatch.setattr(link_module, "read_arrays", once_broken)
        with pytest.raises(DeviceUnavailable, match="could not be read"):
            await remote.predict("resnet50_head", [Instance(image_bytes=image_bytes())])
        again = await remote.predict("resnet50_head", [Instance(image_bytes=image_bytes())])  # same connection
        assert list(again.results[0]) == ["scores"] and link.down_reason() is None
        seg = await remote.predict("unet", [Instance(image_bytes=image_bytes())], native=True)
        assert list(seg.results[0]) == ["mask"]
        assert run.payload.files() == []
        await _stop(device, link, task, remote)

    asyncio.run(main())


def test_a_snapshot_that_cannot_be_written_is_retried_and_leaves_nothing(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from app.workers.snapshot import SnapshotReader, SnapshotWriter

    writer, reader = SnapshotWriter(tmp_path / "state.json"), SnapshotReader(tmp_path / "state.json")
    real = Path.write_bytes

    def full(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full)
    assert writer.write({"fatal": None, "models": []}) is False
    assert reader.read_if_changed() is None and sorted(p.name for p in tmp_path.iterdir()) == ["state.generation"]
    monkeypatch.setattr(Path, "write_bytes", real)
    assert writer.write({"fatal": None, "models": []}) is True  # the same content, written now
    assert reader.read_if_changed() == {"fatal": None, "models": []}


def test_a_model_this_process_cannot_describe_is_not_ready_and_the_others_serve(tmp_path: Path) -> None:
    from app.workers.snapshot import SnapshotWriter

    root = write_small_store(tmp_path / "store", ["resnet50_head", "unet"])
    registry = ModelRegistry(ModelStore(root), Settings(store=root, warmup=False))
    asyncio.run(registry.load_all())
    doc = orjson.loads(orjson.dumps(snapshot_of(registry, None), default=str))
    doc["models"][0]["runtime"]["config"]["architecture"] = "no_such_architecture"  # resnet50_head
    SnapshotWriter(tmp_path / "state.json").write(doc)
    mirror = MirrorRegistry(tmp_path / "state.json", DeviceLink(tmp_path / "none.sock", PayloadDir(tmp_path)),
                            ModelStore(root))
    with pytest.raises(ModelNotReady, match="cannot describe"):
        mirror.get("resnet50_head")
    assert mirror.view("unet").ready and mirror.readiness(strict=False) == []
