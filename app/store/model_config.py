"""``model.toml``: what a model is, how its checkpoint loads, and how it is served.

Read with ``tomllib`` and validated by pydantic with ``extra="forbid"`` so a typo
is an error naming the file and the key instead of a silently ignored setting.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from app.errors import ConfigError

_Strict = ConfigDict(extra="forbid", frozen=True)


class CheckpointConfig(BaseModel):
    model_config = _Strict

    file: str | None = None
    """File name inside each version folder; None = the single .pt/.pth/.pkl found there."""
    format: Literal["state_dict", "whole_model", "auto"] = "auto"
    sha256: str | dict[str, str] | None = None
    """One digest, or a table ``{version = digest}``; checked before unpickling."""
    trusted: bool = False
    """Allow full unpickling of a whole-model file. Never set this for files you did not write."""
    pickled_class_names: tuple[str, ...] = ()
    """Names a whole-model pickle may use for the architecture's class, e.g. ``__main__.Model``."""

    @field_validator("file")
    @classmethod
    def _plain_name(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or "/" in value or "\\" in value or value in {".", ".."} or len(value) > 200
            or not value.isprintable() or value.startswith(".")
        ):
            raise ValueError("must be a plain, printable file name (at most 200 characters) inside the version folder")
        return value

    def sha256_for(self, version: str) -> str | None:
        if isinstance(self.sha256, dict):
            return self.sha256.get(version)
        return self.sha256


class RuntimeConfig(BaseModel):
    model_config = _Strict

    device: str = "auto"
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Autocast dtype on GPU; CPU runs float32 unless bfloat16 is asked for."""
    channels_last: bool = False
    max_batch_size: int = Field(8, ge=1, le=1024)
    max_batch_delay_ms: float = Field(2.0, ge=0, le=10_000)
    adaptive_batch_delay: bool = True
    """Skip the batch delay when the model is idle, so a lone request does not wait for company."""
    max_queue_size: int = Field(256, ge=1)
    timeout_ms: float | None = Field(None, gt=0)

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from app.devices import validate_device_string

        return validate_device_string(value)


class PreprocessConfig(BaseModel):
    model_config = _Strict

    resize: tuple[int, int] | None = None
    """Fixed (height, width); classifiers default to 224 x 224."""
    scale: float | None = Field(None, gt=0, le=4)
    """Scale factor applied to each image (the U-Net reference's ``--scale``)."""
    resample: Literal["nearest", "bilinear", "bicubic"] | None = None
    """Unset: with ``scale``, the U-Net reference's own resize (PIL bicubic, see Preprocessor); else bilinear."""
    color_mode: Literal["RGB", "L"] = "RGB"
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    warmup_size: tuple[int, int] | None = None
    """(height, width) of the warm-up forward when ``resize`` is not set."""
    max_processed_pixels: int | None = Field(None, ge=1)
    """Most pixels the network may process per image (after scale/resize); 413 beyond. Unset: derived
    at load time from the model's activation size and the device's memory."""
    fast_jpeg: bool | None = None
    """Decode a JPEG much larger than the input at 1/2, 1/4 or 1/8 scale (Pillow's draft, DCT domain),
    then resize exactly. Unset: on, except for the U-Net reference pre-processing (bench/README.md,
    "JPEG draft decode", has the effect on outputs)."""

    @model_validator(mode="after")
    def _one_geometry(self) -> "PreprocessConfig":
        if self.resize is not None and self.scale is not None:
            raise ValueError("set either resize or scale, not both")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if self.resize is not None and min(self.resize) < 1:
            raise ValueError("resize sizes must be positive")
        return self


class PostprocessConfig(BaseModel):
    model_config = _Strict

    labels: tuple[str, ...] | None = None
    output_names: tuple[str, ...] | None = None
    """Names of the heads in forward order; defaults ``probs`` (, ``features``)."""
    mask_threshold: float = Field(0.5, ge=0, le=1)
    mask_values: tuple[int, ...] | tuple[tuple[int, ...], ...] | None = None
    """Pixel value painted for class i; RGB triples give a colour mask."""

    @field_validator("mask_values")
    @classmethod
    def _pixel_values(cls, value: Any) -> Any:
        """Grey levels 0..255, or RGB triples of them: what a mask PNG can hold."""
        if value is None:
            return value
        for v in value:
            items = v if isinstance(v, tuple) else (v,)
            if isinstance(v, tuple) and len(v) != 3:
                raise ValueError("colour mask values must be [r, g, b] triples")
            if any(not 0 <= c <= 255 for c in items):
                raise ValueError("mask values must be within 0..255")
        return value


class ModelConfig(BaseModel):
    model_config = _Strict

    architecture: str
    arguments: dict[str, Any] = Field(default_factory=dict)
    version: str | None = None
    """Pinned version; default is the newest version folder."""
    description: str = ""
    checkpoint: CheckpointConfig = CheckpointConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    postprocess: PostprocessConfig = PostprocessConfig()

    @field_validator("version", mode="before")
    @classmethod
    def _digits(cls, value: Any) -> Any:
        if value is None:
            return None
        text = str(value)
        if not text.isdigit():
            raise ValueError("version must be digits only")
        return str(int(text))

    @model_validator(mode="after")
    def _known_architecture(self) -> "ModelConfig":
        from app import nets

        if self.architecture not in nets.list_nets():
            raise ValueError(
                f"unknown architecture {self.architecture!r}; known: {', '.join(nets.list_nets())}"
            )
        unknown = set(self.arguments) - nets.builder_params(self.architecture)
        if unknown:
            raise ValueError(
                f"unknown arguments for {self.architecture}: {', '.join(sorted(unknown))}"
                f" (accepted: {', '.join(sorted(nets.builder_params(self.architecture)))})"
            )
        return self


def load_model_config(path: Path) -> ModelConfig:
    """Parse and validate one ``model.toml``; errors name the file and the key."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: nested too deeply") from None
    return parse_model_config(raw, source=str(path))


def parse_model_config(raw: dict[str, Any], *, source: str) -> ModelConfig:
    try:
        return ModelConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            key = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{key}: {err['msg']}")
        raise ConfigError(f"{source}: " + "; ".join(problems)) from None
