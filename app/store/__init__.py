"""The model store: discovery and validation of model folders (no live models here)."""

from app.store.model_config import ModelConfig, load_model_config
from app.store.store import ModelEntry, ModelStore

__all__ = ["ModelConfig", "ModelEntry", "ModelStore", "load_model_config"]
