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


MIN_TOKEN_LENGTH = 16


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
    """Bearer token for the admin API; unset means the admin API answers 403. At least 16 characters."""
    allow_trusted_checkpoints: bool = False
    """Let models whose model.toml (written by the operator on disk) says ``trusted = true`` be fully
    unpickled. Off by default; the admin API can never set ``trusted``."""
    allow_model_code: bool = False
    """Import a ``model.py`` that the operator put beside a model's model.toml (architectures
    ``python_classifier``/``python_segmenter``/``python_tensor``). Off by default: that file is
    Python and runs with the server's rights. The admin API never uploads one."""
    strict_readiness: bool = False
    """Readiness rule. Strict: every model in the store that should serve is serving. Not strict
    (default): at least one model serves and none is still loading for the first time."""
    workers: int = Field(1, ge=1, le=64)
    """HTTP processes. 1: one process parses requests and runs the models. N >= 2: N HTTP processes
    share the port and one device process holds the models and batchers (docs/workers.md)."""
    run_dir: Path | None = None
    """With workers >= 2, the folder where the server's processes meet: request and result payloads
    (shared memory), the device process's socket and the model-state snapshot.
    Unset: a new folder under /dev/shm, removed at exit."""
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    log_format: Literal["json", "text"] | None = None
    """One JSON object per line (for log pipelines), or plain text; unset: text when stderr is a
    terminal, JSON otherwise (containers, CI)."""

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
    """Pixels per image, read from its header before decoding; 413 beyond."""
    max_request_pixels: int = Field(100_000_000, gt=0)
    """Pixels of all images of one request together; 413 beyond."""
    decode_pixel_budget: int = Field(80_000_000, gt=0)
    """Pixels being decoded at once in the whole process; further decodes wait (bounds peak memory)."""
    max_instances: int = Field(64, gt=0)
    graceful_timeout: float = Field(30.0, ge=0)
    max_header_bytes: int = Field(32 * 1024, ge=1024)
    """Total size of the request line and headers; 431 beyond."""
    max_header_count: int = Field(100, ge=8)
    """Number of request headers; 431 beyond."""
    header_timeout: float = Field(10.0, gt=0)
    """Seconds to receive a request's line and headers, counted from the connection's start (or, on a
    keep-alive connection, from the first byte of the next request); 408 beyond."""
    body_timeout: float = Field(60.0, gt=0)
    """Seconds to receive a whole inference request (headers and body); 408 beyond."""
    upload_timeout: float = Field(3600.0, gt=0)
    """Seconds to receive a whole admin request (checkpoint uploads); 408 beyond."""
    keep_alive_timeout: float = Field(75.0, gt=0)
    """Idle keep-alive connections are closed after this; keep it longer than the idle timeout of
    every proxy, load balancer or pooled client in front (AWS ALB 60 s, nginx 60 s)."""
    warmup: bool = True
    """Run warm-up forwards at load; tests may switch it off for speed."""
    fault_injection: str | None = None
    """Test-only: inject device faults into every model's forward (see app/runtime/faults.py)."""

    @field_validator("admin_token")
    @classmethod
    def _long_token(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and value.get_secret_value() and len(value.get_secret_value()) < MIN_TOKEN_LENGTH:
            raise ValueError(
                f"MODSERVE_ADMIN_TOKEN must be at least {MIN_TOKEN_LENGTH} characters"
                " (e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)"
            )
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        from app.devices import validate_device_string

        return validate_device_string(value)


@lru_cache
def get_settings() -> Settings:
    return Settings()
