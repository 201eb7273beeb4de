"""Admin actions: (re)load, unload and upload checkpoints, each with one audit line.

Uploads are state_dict checkpoints only. A version is immutable and complete or
absent: the upload is streamed into the store's staging folder (which discovery
never reads), validated there off the event loop (weights-only read, then a
strict load into the configured architecture), and only then does the whole
version folder (with the model folder, for a new model) appear by one rename.
The admin API can never widen what loading may execute: ``trusted`` and
``format = "whole_model"`` are refused in an uploaded model.toml.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Any

import torch

from app.errors import Conflict, InvalidInput, ServiceError
from app.loading import CheckpointSpec, file_sha256, load_checkpoint
from app.nets import net_spec
from app.nets.declared import ExportedNet, PythonNet
from app.runtime.factory import RUNTIMES
from app.registry import ModelRegistry, ModelStatus
from app.store import ModelStore
from app.store.model_config import ModelConfig, load_model_config, parse_model_config
from app.store.store import check_name, check_version
from app.store.writer import fsync_dir, upload_lock

_WRITE_BLOCK = 4 << 20  # bytes gathered before one write (and digest update) in a worker thread

audit_log = logging.getLogger("modserve.audit")


def audit(client: str, action: str, model: str, *, version: str | None = None,
          sha256: str | None = None, result: str = "ok") -> None:
    audit_log.info(json.dumps({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "client": client, "action": action,
        "model": model, "version": version, "sha256": sha256, "result": result,
    }))


@dataclass
class UploadResult:
    name: str
    version: str
    sha256: str
    path: Path


class AdminService:
    def __init__(self, registry: ModelRegistry, store: ModelStore) -> None:
        self.registry, self.store = registry, store
        self._upload_locks: dict[str, asyncio.Lock] = {}

    async def load(self, name: str, version: str | None, client: str) -> ModelStatus:
        check_name(name)
        if version is not None:
            version = check_version(version)
        try:
            status = await self.registry.load(name, version)
        except ServiceError as exc:
            audit(client, "load", name, version=version, result=f"failed ({exc.status_code}): {exc.message}")
            raise
        sha = status.live.runtime.sha256 if status.live else None
        audit(client, "load", name, version=status.version, sha256=sha)
        return status

    async def unload(self, name: str, client: str) -> ModelStatus:
        check_name(name)
        try:
            status = await self.registry.unload(name)
        except ServiceError as exc:
            audit(client, "unload", name, result=f"failed ({exc.status_code}): {exc.message}")
            raise
        audit(client, "unload", name, version=status.version)
        return status

    async def upload(
        self, name: str, version: str, chunks: AsyncIterator[bytes], model_toml: bytes | None, client: str
    ) -> UploadResult:
        try:
            result = await self._upload(name, version, chunks, model_toml)
        except ServiceError as exc:
            audit(client, "upload", name, version=version, result=f"failed ({exc.status_code}): {exc.message}")
            raise
        audit(client, "upload", name, version=result.version, sha256=result.sha256)
        return result

    async def _upload(
        self, name: str, version: str, chunks: AsyncIterator[bytes], model_toml: bytes | None
    ) -> UploadResult:
        check_name(name)
        version = check_version(version)
        # One upload per model at a time: what is checked against the store (its model.toml, its
        # versions) must still hold when the new version is published.
        async with self._upload_locks.setdefault(name, asyncio.Lock()):
            with upload_lock(self.store.ensure_staging(), name):  # and across HTTP processes
                return await self._upload_locked(name, version, chunks, model_toml)


    async def _upload_locked(
        self, name: str, version: str, chunks: AsyncIterator[bytes], model_toml: bytes | None
    ) -> UploadResult:
        folder = self.store.root / name
        if folder.exists() or folder.is_symlink():
            self.store.inside(folder)
        toml_path = folder / "model.toml"
        current = load_model_config(self.store.inside(toml_path)) if toml_path.is_file() else None
        if model_toml is not None:
            config = _uploaded_config(model_toml, name, current)
            if current is not None:
                await asyncio.to_thread(self._check_versions_still_load, config, name, version)
        elif current is not None:
            config = current
            _refuse_model_code(config, name)
        else:
            raise InvalidInput(f"model {name!r} does not exist yet: send its model.toml in the same request")
        target = folder / version
        if target.exists() or target.is_symlink():
            self.store.inside(target)
            raise Conflict(
                f"model {name!r} already has version {version}: versions are immutable, upload a new version number"
            )
        stage = self.store.ensure_staging() / uuid.uuid4().hex
        staged_version = stage / version
        staged_version.mkdir(parents=True)
        try:
            checkpoint = staged_version / (config.checkpoint.file or "model.pt")
            sha = await _receive(chunks, checkpoint)
            await asyncio.to_thread(validate_upload, config, checkpoint, version)
            if model_toml is not None:
                (stage / "model.toml").write_bytes(model_toml)
            await asyncio.to_thread(self._publish, stage, folder, version, model_toml is not None)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
        return UploadResult(name, version, sha, target / checkpoint.name)

    def _check_versions_still_load(self, config: ModelConfig, name: str, version: str) -> None:
        """An uploaded model.toml replaces the model's config for every version: it may not pin a version
        that will not exist, or record digests that the versions on disk do not have."""
        entry = self.store.entry(name)
        if config.version is not None and config.version not in {*entry.versions, version}:
            raise InvalidInput(
                f"uploaded model.toml pins version {config.version}, which does not exist"
                f" (have: {', '.join(entry.versions) or 'none'}; uploading {version})"
            )
        if isinstance(config.checkpoint.sha256, str) and entry.versions:
            raise InvalidInput(
                "uploaded model.toml gives one sha256 for every version of a model that already has versions; "
                "use a table {version = digest}"
            )
        for existing in entry.versions:
            try:  # the new checkpoint.file must still name each version's file
                path = self.store.checkpoint_path(replace(entry, config=config), existing)
            except ServiceError as exc:
                raise InvalidInput(f"uploaded model.toml does not fit version {existing}: {exc.message}") from None
            want = config.checkpoint.sha256_for(existing)
            if want is not None and want.strip().lower().removeprefix("sha256:") != file_sha256(path):
                raise InvalidInput(
                    f"uploaded model.toml records sha256 {want} for version {existing}, but its file differs"
                )
        if entry.versions:  # the version a fallback or a rollback would serve must still load under it
            newest = entry.versions[-1]
            try:
                check_loads(config, self.store.checkpoint_path(replace(entry, config=config), newest), newest)
            except ServiceError as exc:
                raise InvalidInput(
                    f"uploaded model.toml does not fit version {newest}, which would stop loading: {exc.message}"
                ) from None

    def _publish(self, stage: Path, folder: Path, version: str, new_toml: bool) -> None:
        """Make the validated version visible with one rename (the whole folder for a new model)."""
        try:
            if not folder.exists():
                os.rename(stage, folder)
                fsync_dir(self.store.root)
                return
            os.rename(stage / version, folder / version)
            fsync_dir(folder)
            if new_toml:
                os.replace(stage / "model.toml", folder / "model.toml")
                fsync_dir(folder)
        except OSError as exc:  # a concurrent upload of the same version or model won the rename
            raise Conflict(f"{folder.name} version {version} was created by another upload: {exc.strerror}") from None


def _uploaded_config(data: bytes, name: str, current: ModelConfig | None) -> ModelConfig:
    """Parse an uploaded model.toml and refuse anything that would widen what loading may execute."""
    raw = _toml(data)
    checkpoint = raw.get("checkpoint")
    if isinstance(checkpoint, dict):
        if "trusted" in checkpoint:
            raise InvalidInput(
                "checkpoint.trusted cannot be set through the admin API: full unpickling runs the file's code, "
                "so only an operator can allow it, on disk and with MODSERVE_ALLOW_TRUSTED_CHECKPOINTS"
            )
        if checkpoint.get("format") == "whole_model":
            what = "changing the format of an existing model" if current is not None else "a new model with"
            raise InvalidInput(
                f'{what} format = "whole_model" is refused through the admin API: uploads are state_dict '
                'checkpoints (use format = "state_dict" or "auto")'
            )
    config = parse_model_config(raw, source=f"{name}/model.toml (uploaded)")
    _refuse_model_code(config, name)
    return config


def _refuse_model_code(config: ModelConfig, name: str) -> None:
    """Models whose classes come from a model.py are the operator's, on disk: never changed by upload."""
    if net_spec(config.architecture).root_class is PythonNet:
        raise InvalidInput(
            f"model {name!r}: architecture {config.architecture} imports a model.py, which is Python code; such models"
            " are installed and changed by the operator on disk, never through the admin API"
        )


async def _receive(chunks: AsyncIterator[bytes], target: Path) -> str:
    """Stream the body to ``target``; writes and hashing run in a worker thread, never on the loop."""
    digest = hashlib.sha256()
    with open(target, "wb") as fh:
        block = bytearray()
        async for chunk in chunks:
            block += chunk
            if len(block) >= _WRITE_BLOCK:
                await asyncio.to_thread(_write, fh, digest, bytes(block))
                block.clear()
        await asyncio.to_thread(_write, fh, digest, bytes(block), True)
    return digest.hexdigest()


def _write(fh: IO[bytes], digest: Any, data: bytes, last: bool = False) -> None:
    digest.update(data)
    fh.write(data)
    if last:
        fh.flush()
        os.fsync(fh.fileno())


def _toml(data: bytes) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"uploaded model.toml is not valid TOML: {exc}") from None
    except RecursionError:
        raise InvalidInput("uploaded model.toml is not valid TOML: nested too deeply") from None


def validate_upload(config: ModelConfig, path: Path, version: str) -> None:
    """The staged file must be a plain state_dict that loads strictly into the configured net."""
    if path.stat().st_size == 0:
        raise InvalidInput("uploaded checkpoint is empty")
    if net_spec(config.architecture).root_class is ExportedNet:
        raise InvalidInput(
            f"architecture {config.architecture} serves a torch.export program, which the operator installs on disk;"
            " uploads are state_dict checkpoints"
        )
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means we refuse the file
        reason = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        raise InvalidInput(
            "uploads must be state_dict checkpoints readable with weights_only=True "
            f"(whole-model pickles are refused): {reason}"
        ) from None
    if not isinstance(obj, dict) or not any(isinstance(v, (torch.Tensor, dict)) for v in obj.values()):
        raise InvalidInput("uploaded checkpoint holds no state_dict (a dict of tensors)")
    del obj
    try:
        check_loads(config, path, version, fmt="state_dict")
    except ServiceError as exc:  # the staging path means nothing to the client
        exc.message = exc.message.replace(str(path), "the uploaded checkpoint")
        raise


def check_loads(config: ModelConfig, path: Path, version: str, *, fmt: str | None = None) -> None:
    """What a load would do, on the CPU: strict load into the configured net, finite weights, the
    runtime family's configuration checks (labels, mask values, heads) and one smoke forward."""
    spec = CheckpointSpec(
        path=path, format=fmt or config.checkpoint.format,  # type: ignore[arg-type]
        sha256=config.checkpoint.sha256_for(version), pickled_class_names=config.checkpoint.pickled_class_names,
    )
    loaded = load_checkpoint(config.architecture, config.arguments, spec, "cpu")
    bad = [k for k, t in loaded.model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise InvalidInput(f"weights hold NaN or infinite values (e.g. {', '.join(bad[:3])})")
    family = RUNTIMES[net_spec(config.architecture).task]
    runtime = family(name="upload", version=version, config=config, model=loaded.model,
                     device=torch.device("cpu"), sha256=loaded.sha256, metadata=loaded.metadata)
    runtime.smoke_test()
