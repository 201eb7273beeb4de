"""Admin actions: (re)load, unload and upload checkpoints, each with one audit line.

Uploads are state_dict checkpoints only: they are checked with
``torch.load(weights_only=True)`` before they land, and written atomically
(temporary file, fsync, rename) so a crash leaves the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from app.errors import InvalidInput, ServiceError
from app.registry import ModelRegistry, ModelStatus
from app.store import ModelStore
from app.store.model_config import load_model_config, parse_model_config
from app.store.store import check_name, check_version
from app.store.writer import atomic_write_bytes, fsync_dir

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
        folder = self.store.root / name
        toml_path = folder / "model.toml"
        if model_toml is not None:
            config = parse_model_config(_toml(model_toml), source=f"{name}/model.toml (uploaded)")
        elif toml_path.is_file():
            self.store.inside(toml_path)
            config = load_model_config(toml_path)
        else:
            raise InvalidInput(f"model {name!r} does not exist yet: send its model.toml in the same request")
        target_dir = self._version_dir(name, version)
        file_name = config.checkpoint.file or "model.pt"
        target = target_dir / file_name
        sha = await self._receive_checked(chunks, target)
        if model_toml is not None:
            atomic_write_bytes(toml_path, model_toml)
        return UploadResult(name, version, sha, target)

    def _version_dir(self, name: str, version: str) -> Path:
        root = self.store.real_root
        folder = self.store.root / name
        if folder.exists():
            self.store.inside(folder)
        target = folder / version
        if target.is_symlink() or target.exists():
            target = self.store.inside(target)
        target.mkdir(parents=True, exist_ok=True)
        if not target.resolve().is_relative_to(root):
            raise InvalidInput(f"version folder {version!r} points outside the model store")
        return target

    async def _receive_checked(self, chunks: AsyncIterator[bytes], target: Path) -> str:
        """Stream into a temporary file beside ``target``, check it, then rename it in place."""
        digest = hashlib.sha256()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".upload", dir=target.parent)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as fh:
                async for chunk in chunks:
                    digest.update(chunk)
                    fh.write(chunk)
                fh.flush()
                os.fsync(fh.fileno())
            _check_state_dict(tmp)
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(target.parent)
        return digest.hexdigest()


def _toml(data: bytes) -> dict[str, Any]:
    import tomllib

    try:
        return tomllib.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"uploaded model.toml is not valid TOML: {exc}") from None


def _check_state_dict(path: Path) -> None:
    """Accept only what a plain ``weights_only`` load reads: tensors in (nested) dicts."""
    if path.stat().st_size == 0:
        raise InvalidInput("uploaded checkpoint is empty")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means we refuse the file
        reason = str(exc).splitlines()[0][:300]
        raise InvalidInput(
            "uploads must be state_dict checkpoints readable with weights_only=True "
            f"(whole-model pickles are refused): {reason}"
        ) from None
    if not isinstance(obj, dict) or not any(
        isinstance(v, torch.Tensor) or isinstance(v, dict) for v in obj.values()
    ):
        raise InvalidInput("uploaded checkpoint holds no state_dict (a dict of tensors)")
