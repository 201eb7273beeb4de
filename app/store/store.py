"""Discover and validate model folders; never read or write outside the store root.

Layout: ``<root>/<name>/model.toml`` and numbered version folders
``<root>/<name>/<version>/`` holding the checkpoint file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from app.errors import ConfigError, InvalidInput, ModelNotFound, ServiceError
from app.store.model_config import ModelConfig, load_model_config

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
VERSION_RE = re.compile(r"^[0-9]{1,9}$")
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".pkl", ".bin", ".ckpt")


def check_name(name: str) -> str:
    if not NAME_RE.match(name) or ".." in name:
        raise InvalidInput(f"invalid model name {name!r}: letters, digits, '_', '-', '.' only")
    return name


def check_version(version: str) -> str:
    if not VERSION_RE.match(version):
        raise InvalidInput(f"invalid version {version!r}: digits only")
    return str(int(version))


@dataclass
class ModelEntry:
    """One model folder as found on disk: its config (or why it is invalid) and versions."""

    name: str
    folder: Path
    config: ModelConfig | None
    error: str | None = None
    versions: list[str] = field(default_factory=list)

    def resolve_version(self, version: str | None = None) -> str:
        """The explicit version, else the pinned one, else the newest."""
        if version is not None:
            version = check_version(version)
        elif self.config is not None and self.config.version is not None:
            version = self.config.version
        elif self.versions:
            version = self.versions[-1]
        else:
            raise ServiceError(f"model {self.name} has no version folders", status_code=404)
        if version not in self.versions:
            raise ServiceError(
                f"model {self.name} has no version {version} (have: {', '.join(self.versions) or 'none'})",
                status_code=404,
            )
        return version


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

    def entry(self, name: str) -> ModelEntry:
        check_name(name)
        folder = self.root / name
        if not (folder / "model.toml").is_file():
            raise ModelNotFound(f"model {name!r} is not in the store")
        self.inside(folder)
        versions = sorted(
            (p.name for p in folder.iterdir() if p.is_dir() and VERSION_RE.match(p.name)),
            key=int,
        )
        try:
            config = load_model_config(self.inside(folder / "model.toml"))
        except ConfigError as exc:
            return ModelEntry(name, folder, None, exc.message, versions)
        return ModelEntry(name, folder, config, None, versions)

    def version_dir(self, name: str, version: str) -> Path:
        check_name(name)
        return self.inside(self.root / name / check_version(version))

    def checkpoint_path(self, entry: ModelEntry, version: str) -> Path:
        """The checkpoint file of one version, checked to stay inside the store."""
        if entry.config is None:
            raise ConfigError(entry.error or f"model {entry.name} has no valid model.toml")
        folder = self.version_dir(entry.name, version)
        if entry.config.checkpoint.file:
            return self.inside(folder / entry.config.checkpoint.file)
        found = sorted(
            p for p in folder.iterdir() if p.is_file() and p.suffix in CHECKPOINT_SUFFIXES
        )
        if len(found) != 1:
            raise ConfigError(
                f"{folder}: expected exactly one checkpoint file ({', '.join(CHECKPOINT_SUFFIXES)}),"
                f" found {len(found)}; set checkpoint.file in model.toml"
            )
        return self.inside(found[0])
