"""Discover and validate model folders; never read or write outside the store root.

Layout: ``<root>/<name>/model.toml`` and numbered version folders
``<root>/<name>/<version>/`` holding the checkpoint file.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import ConfigError, InvalidInput, ModelNotFound, ServiceError
from app.store.model_config import ModelConfig, load_model_config

log = logging.getLogger("modserve.store")

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^(0|[1-9][0-9]{0,8})$")
"""Canonical digits only: ``1``, never ``01`` (two spellings of one version would be two folders)."""
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".ckpt", ".safetensors", ".pt2")
STAGING = ".staging"
"""Uploads are written and validated here; discovery never reads it (names start with a letter or digit)."""


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise InvalidInput(f"invalid model name {name!r}: letters, digits, '_', '-', '.' only")
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise InvalidInput(f"invalid version {version!r}: digits only, without leading zeros (e.g. 1, 2, 10)")
    return version


@dataclass
class ModelEntry:
    """One model folder as found on disk: its config (or why it is invalid) and versions."""

    name: str
    folder: Path
    config: ModelConfig | None
    error: str | None = None
    versions: list[str] = field(default_factory=list)
    """Complete versions: canonical folder names holding exactly one checkpoint."""
    skipped: dict[str, ServiceError] = field(default_factory=dict)
    """Version folders that discovery skipped, and why."""

    @property
    def warnings(self) -> list[str]:
        return [f"version folder {v!r} skipped: {e.message}" for v, e in sorted(self.skipped.items())]

    def resolve_version(self, version: str | None = None) -> str:
        """The explicit version, else the pinned one, else the newest."""
        if version is not None:
            version = check_version(version)
        elif self.pinned is not None:
            version = self.pinned
        elif self.versions:
            version = self.versions[-1]
        else:
            raise ServiceError(f"model {self.name} has no version folders", status_code=404)
        if version in self.skipped:
            raise self.skipped[version]
        if version not in self.versions:
            raise ServiceError(
                f"model {self.name} has no version {version} (have: {', '.join(self.versions) or 'none'})",
                status_code=404,
            )
        return version

    @property
    def pinned(self) -> str | None:
        return self.config.version if self.config is not None else None


class ModelStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def real_root(self) -> Path:
        return self.root.resolve()

    def inside(self, path: Path) -> Path:
        """Resolve ``path`` (following symlinks) and refuse anything that leaves the store."""
        real = path.resolve()
        if not real.is_relative_to(self.real_root):
            raise InvalidInput(f"{path.name!r} points outside the model store")
        return real

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(
            p.name for p in self.root.iterdir()
            if p.is_dir() and NAME_RE.match(p.name) and (p / "model.toml").is_file()
        )

    def discover(self) -> list[ModelEntry]:
        return [self.entry(name) for name in self.names()]

    def has(self, name: str) -> bool:
        return bool(NAME_RE.match(name)) and ".." not in name and (self.root / name / "model.toml").is_file()

    def entry(self, name: str) -> ModelEntry:
        check_name(name)
        folder = self.root / name
        if not (folder / "model.toml").is_file():
            raise ModelNotFound(f"model {name!r} is not in the store")
        self.inside(folder)
        try:
            config: ModelConfig | None = load_model_config(self.inside(folder / "model.toml"))
            error = None
        except ConfigError as exc:
            config, error = None, exc.message
        versions, skipped = self._versions(folder, config)
        entry = ModelEntry(name, folder, config, error, versions, skipped)
        for warning in entry.warnings:
            log.warning("model %s: %s", name, warning)
        return entry

    def _versions(self, folder: Path, config: ModelConfig | None) -> tuple[list[str], dict[str, ServiceError]]:
        """Version folders that can be served; the others are skipped with the reason."""
        versions, skipped = [], {}
        for path in folder.iterdir():
            if not path.is_dir() or not path.name.isdigit():
                continue
            if not VERSION_RE.match(path.name):
                skipped[path.name] = InvalidInput("not a canonical version number (no leading zeros)")
                continue
            try:
                self._checkpoint_in(path, config)
            except ServiceError as exc:
                skipped[path.name] = exc
                continue
            versions.append(path.name)
        return sorted(versions, key=int), skipped

    def _checkpoint_in(self, folder: Path, config: ModelConfig | None) -> Path:
        named = config.checkpoint.file if config is not None else None
        if named:
            path = folder / named
            if not path.is_file():
                raise ConfigError(f"{folder.name}/{named} (checkpoint.file in model.toml) is missing")
            return self.inside(path)
        found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES)
        if len(found) != 1:
            raise ConfigError(
                f"{folder}: expected exactly one checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}),"
                f" found {len(found)}; set checkpoint.file in model.toml"
            )
        return self.inside(found[0])

    @property
    def staging(self) -> Path:
        return self.root / STAGING

    def ensure_staging(self) -> Path:
        """The staging folder as a real directory inside the store (a link or file there is removed)."""
        path = self.staging
        if path.is_symlink() or (path.exists() and not path.is_dir()):
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
        return path

    def clear_staging(self) -> int:
        """Remove what interrupted uploads left behind (run at start-up); returns how many."""
        if self.staging.is_symlink():
            self.staging.unlink()
            return 1
        if not self.staging.is_dir():
            return 0
        leftovers = list(self.staging.iterdir())
        for path in leftovers:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        if leftovers:
            log.warning("removed %d unfinished upload(s) from %s", len(leftovers), self.staging)
        return len(leftovers)

    def version_dir(self, name: str, version: str) -> Path:
        check_name(name)
        return self.inside(self.root / name / check_version(version))

    def model_code_path(self, name: str) -> Path:
        """The operator's ``model.py`` beside a model's model.toml, checked to stay inside the store."""
        check_name(name)
        return self.inside(self.root / name / "model.py")

    def checkpoint_path(self, entry: ModelEntry, version: str) -> Path:
        """The checkpoint file of one version, checked to stay inside the store."""
        if entry.config is None:
            raise ConfigError(entry.error or f"model {entry.name} has no valid model.toml")
        return self._checkpoint_in(self.version_dir(entry.name, version), entry.config)
