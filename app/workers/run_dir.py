"""The folder where the processes of one multi-process server meet."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from app.workers.payload import PayloadDir


@dataclass(frozen=True)
class RunDir:
    root: Path

    @property
    def socket(self) -> Path:
        return self.root / "device.sock"

    @property
    def snapshot(self) -> Path:
        return self.root / "state.json"

    @cached_property
    def payload(self) -> PayloadDir:
        return PayloadDir(self.root / "payload")

    @classmethod
    def create(cls, wanted: Path | None, port: int) -> RunDir:
        """``wanted`` (emptied of a previous run's files), or a new folder in /dev/shm (shared memory)
        where it exists, else in the temporary folder."""
        if wanted is None:
            base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
            root = Path(tempfile.mkdtemp(prefix=f"modserve-{port}-", dir=base))
        else:
            root = wanted
            shutil.rmtree(root / "payload", ignore_errors=True)
            for name in ("device.sock", "state.json", "pids.json"):
                (root / name).unlink(missing_ok=True)
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o700)  # payloads are other people's requests
        (root / "payload").mkdir(mode=0o700, exist_ok=True)
        return cls(root)

    def write_pids(self, supervisor: int, device: int | None, workers: list[int | None]) -> None:
        tmp = self.root / "pids.json.tmp"
        tmp.write_text(json.dumps({"supervisor": supervisor, "device": device, "workers": workers}))
        os.replace(tmp, self.root / "pids.json")

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
