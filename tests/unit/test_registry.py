"""The registry alone, with a fake builder: swaps, fallbacks, readiness, leases, no phantom entries."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from app.config import Settings
from app.errors import CheckpointCorrupt, Conflict, ModelLoadFailed, ModelNotFound
from app.registry import ModelEvent, ModelRegistry, ModelState
from app.store import ModelStore
from app.store.model_config import RuntimeConfig

TOML = 'architecture = "unet"\n'


def _model(root: Path, name: str, versions: tuple[str, ...], toml: str = TOML) -> None:
    (root / name).mkdir(parents=True, exist_ok=True)
    (root / name / "model.toml").write_text(toml)
    for v in versions:
        (root / name / v).mkdir()
        (root / name / v / "model.pth").write_bytes(b"x")


class FakeBuilder:
    """Builds a runtime-shaped object per (name, version); ``broken`` versions raise."""

    def __init__(self, broken: set[tuple[str, str]] | None = None) -> None:
        self.broken = broken or set()
        self.built: list[tuple[str, str]] = []
        self.gate: threading.Event | None = None

    def __call__(self, store: ModelStore, entry: Any, version: str, settings: Settings) -> Any:
        if self.gate is not None:
            assert self.gate.wait(10)
        self.built.append((entry.name, version))
        if (entry.name, version) in self.broken:
            raise CheckpointCorrupt(f"{entry.name} v{version}: truncated")
        return SimpleNamespace(
            name=entry.name, version=version, device=torch.device("cpu"), sha256="0" * 64,
            config=SimpleNamespace(runtime=RuntimeConfig()),
            run_batch=lambda items: [{"version": version} for _ in items], model=None,
        )


def _registry(root: Path, builder: FakeBuilder) -> tuple[ModelRegistry, list[ModelEvent]]:
    registry = ModelRegistry(ModelStore(root), Settings(store=root, warmup=False), builder=builder)
    events: list[ModelEvent] = []
    registry.subscribe(events.append)
    return registry, events


def test_unpinned_load_falls_back_to_the_newest_version_that_loads(tmp_path: Path) -> None:
    _model(tmp_path, "m", ("1", "2", "3"))
    builder = FakeBuilder({("m", "3")})
    registry, events = _registry(tmp_path, builder)

    async def main() -> None:
        await registry.load_all()
        status = registry.status("m")
        assert status.state == ModelState.READY and status.version == "2"
        assert "version 3" in (status.last_error or "") and "truncated" in (status.last_error or "")
        assert [e.kind for e in events] == ["fallback", "loaded"]
        assert registry.readiness(strict=True) == []
        await registry.close()

    asyncio.run(main())
    assert builder.built == [("m", "3"), ("m", "2")]


def test_reload_whose_newest_fails_keeps_the_serving_version_without_rebuilding(tmp_path: Path) -> None:
    _model(tmp_path, "m", ("1",))
    builder = FakeBuilder({("m", "2")})
    registry, events = _registry(tmp_path, builder)

    async def main() -> None:
        await registry.load_all()
        live = registry.get("m")
        (tmp_path / "m" / "2").mkdir()
        (tmp_path / "m" / "2" / "model.pth").write_bytes(b"x")
        with pytest.raises(ModelLoadFailed) as err:
            await registry.load("m")
        assert err.value.status_code == 422 and "version 1 keeps serving" in err.value.message
        assert registry.get("m") is live  # not swapped, not rebuilt
        await registry.close()

    asyncio.run(main())
    assert builder.built == [("m", "1"), ("m", "2")]
    assert [e.kind for e in events] == ["loaded", "fallback"]


@pytest.mark.parametrize("how", ["toml", "call"])
def test_a_pinned_version_is_strict(tmp_path: Path, how: str) -> None:
    toml = TOML + ('version = 2\n' if how == "toml" else "")
    _model(tmp_path, "m", ("1", "2"), toml)
    builder = FakeBuilder({("m", "2")})
    registry, events = _registry(tmp_path, builder)

    async def main() -> None:
        if how == "toml":
            await registry.load_all()
        else:
            await registry.load("m", "1")
            with pytest.raises(CheckpointCorrupt):
                await registry.load("m", "2")
        status = registry.status("m")
        if how == "toml":
            assert status.live is None and status.state == ModelState.UNAVAILABLE
            assert [v.name for v in registry.readiness(strict=False)] == ["m"]  # the only model: nothing serves
        else:
            assert status.version == "1" and "truncated" in (status.last_error or "")
        await registry.close()

    asyncio.run(main())
    assert ("m", "1") not in builder.built or how == "call"
    assert "fallback" not in [e.kind for e in events]


def test_every_version_broken_names_them_all(tmp_path: Path) -> None:
    _model(tmp_path, "m", ("1", "2"))
    registry, _ = _registry(tmp_path, FakeBuilder({("m", "1"), ("m", "2")}))

    async def main() -> None:
        with pytest.raises(ModelLoadFailed) as err:
            await registry.load("m")
        assert "version 2" in err.value.message and "version 1" in err.value.message

    asyncio.run(main())


def test_loading_an_unknown_name_leaves_no_trace(tmp_path: Path) -> None:
    _model(tmp_path, "m", ("1",))
    registry, events = _registry(tmp_path, FakeBuilder())

    async def main() -> None:
        await registry.load_all()
        for name in ("ghost", "m2"):
            with pytest.raises(ModelNotFound):
                await registry.load(name)
        assert [s.name for s in registry.statuses()] == ["m"]
        assert registry.readiness(strict=True) == []
        await registry.close()

    asyncio.run(main())
    assert [e.kind for e in events] == ["loaded"]


def test_discovery_skips_incomplete_versions_with_a_warning(tmp_path: Path) -> None:
    _model(tmp_path, "m", ("1",))
    (tmp_path / "m" / "2").mkdir()  # empty: an interrupted copy
    (tmp_path / "m" / "3").mkdir()
    (tmp_path / "m" / "3" / "a.pt").write_bytes(b"x")
    (tmp_path / "m" / "3" / "b.pt").write_bytes(b"x")
    (tmp_path / "m" / "04").mkdir()
    builder = FakeBuilder()
    registry, _ = _registry(tmp_path, builder)

    async def main() -> None:
        await registry.load_all()
        status = registry.status("m")
        assert status.version == "1"
        assert len(status.warnings) == 3 and any("found 2" in w for w in status.warnings)
        await registry.close()

    asyncio.run(main())
    assert builder.built == [("m", "1")]


def test_readiness_rules(tmp_path: Path) -> None:
    _model(tmp_path, "a", ("1",))
    _model(tmp_path, "b", ("1",))
    registry, _ = _registry(tmp_path, FakeBuilder({("b", "1")}))

    async def main() -> None:
        assert registry.readiness(strict=False) == []  # an empty registry waits for nothing
        await registry.load_all()
        assert [s.name for s in registry.readiness(strict=True)] == ["b"]
        assert registry.readiness(strict=False) == []  # a serves
        await registry.unload("a")
        assert [s.name for s in registry.readiness(strict=False)] == ["b"]  # nothing that should serve does
        await registry.unload("b")
        assert registry.readiness(strict=False) == [] and registry.readiness(strict=True) == []
        await registry.close()

    asyncio.run(main())


def test_a_model_loading_for_the_first_time_keeps_the_server_unready(tmp_path: Path) -> None:
    _model(tmp_path, "a", ("1",))
    _model(tmp_path, "b", ("1",))
    builder = FakeBuilder()
    registry, _ = _registry(tmp_path, builder)

    async def main() -> None:
        await registry.load("a")
        builder.gate = threading.Event()
        task = asyncio.ensure_future(registry.load("b"))
        await asyncio.sleep(0.05)
        assert [s.name for s in registry.readiness(strict=False)] == ["b"]
        with pytest.raises(Conflict):  # deterministic: the first load holds the lock
            await registry.load("b")
        builder.gate.set()
        await task
        assert registry.readiness(strict=False) == []
        await registry.close()

    asyncio.run(main())


def test_swap_waits_for_leases_and_a_failed_reload_keeps_the_old_model(tmp_path: Path) -> None:
    _model(tmp_path, "m", ("1", "2"), TOML + "version = 1\n")
    builder = FakeBuilder({("m", "3")})
    registry, events = _registry(tmp_path, builder)

    async def main() -> None:
        await registry.load_all()
        async with registry.lease("m") as old:
            reload = asyncio.ensure_future(registry.load("m", "2"))
            await asyncio.sleep(0.05)
            assert registry.get("m").runtime.version == "2"  # new requests see the new model
            assert not reload.done()  # but the old one is not released while leased
            assert old.runtime.version == "1"
        await reload
        (tmp_path / "m" / "3").mkdir()
        (tmp_path / "m" / "3" / "model.pth").write_bytes(b"x")
        with pytest.raises(CheckpointCorrupt):
            await registry.load("m", "3")
        assert registry.get("m").runtime.version == "2"
        await registry.close()

    asyncio.run(main())
    assert [e.kind for e in events] == ["loaded", "swapped", "failed"]
