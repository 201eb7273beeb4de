"""Checkpoint loading and inspection: user files in, fresh architectures with their weights out.

Never runs a checkpoint's code unless its spec says ``trusted``; see checkpoint.py.
"""

from app.errors import CheckpointFormatMismatch
from app.loading.checkpoint import (
    CheckpointSpec,
    LoadedCheckpoint,
    load_checkpoint,
)
from app.loading.files import file_sha256
from app.loading.inspect import ArchFit, CheckpointFacts, inspect_checkpoint

__all__ = [
    "ArchFit",
    "CheckpointFacts",
    "CheckpointFormatMismatch",
    "CheckpointSpec",
    "LoadedCheckpoint",
    "file_sha256",
    "inspect_checkpoint",
    "load_checkpoint",
]
