"""Service settings in one place, read from the environment (prefix ``MODSERVE_``).

Injected through ``create_app(settings)`` and the ``get_settings`` dependency so
tests can override every value without touching the environment.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODSERVE_", extra="ignore")

    store: Path = Path("./models_store")
    """Model store folder: one sub-folder per model with model.toml and version folders."""
    host: str = "127.0.0.1"
    """Loopback by default: exposing the port is an explicit decision (ShellTorch)."""
    port: int = Field(8000, ge=0, le=65535)
    device: str = "auto"
    """Default device for models whose model.toml says ``auto``: cuda:0 when present, else cpu."""
    admin_token: SecretStr | None = None
    """Bearer token for the admin API; unset means the admin API answers 403."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] = "json"
    """One JSON object per line (for log pipelines), or plain text for a terminal."""

    # Request handling limits (later issues add more; safe defaults here).
    timeout_ms: float = Field(30_000, gt=0)
    """Default per-request deadline, queue wait and inference included."""
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    """Largest request body (inference), enforced while it streams in."""
    max_upload_bytes: int = Field(4 * 1024**3, gt=0)
    """Largest body on the admin API (checkpoint uploads)."""
    max_concurrency: int = Field(512, gt=0)
    """Inference requests handled at once by the whole server; 503 beyond."""
    max_image_pixels: int = Field(40_000_000, gt=0)
    max_instances: int = Field(64, gt=0)
    graceful_timeout: float = Field(30.0, ge=0)
    warmup: bool = True
    """Run warm-up forwards at load; tests may switch it off for speed."""
    fault_injection: str | None = None
    """Test-only: inject device faults into every model's forward (see app/runtime/faults.py)."""

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        from app.devices import validate_device_string

        return validate_device_string(value)


@lru_cache
def get_settings() -> Settings:
    return Settings()
