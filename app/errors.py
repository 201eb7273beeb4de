"""Domain errors that carry their HTTP status, so one handler maps them all.

No web-framework import here: the core (loader, batcher, registry) raises these
and the HTTP layer only translates them.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base error; ``status_code`` is what a client sees."""

    status_code: int = 500

    def __init__(self, message: str, *, status_code: int | None = None, **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.extra = extra
        self.headers: dict[str, str] = {}

    def body(self) -> dict[str, Any]:
        return {"error": self.message, **self.extra}


class ModelNotFound(ServiceError):
    status_code = 404


class ModelNotReady(ServiceError):
    status_code = 503


class InvalidInput(ServiceError):
    """Malformed or semantically wrong request content."""

    status_code = 422


class BadRequest(ServiceError):
    """Used by the v2 protocol, which answers 400 where the native API answers 422."""

    status_code = 400


class UnsupportedMediaType(ServiceError):
    status_code = 415


class PayloadTooLarge(ServiceError):
    status_code = 413


class Overloaded(ServiceError):
    """Queue full or server draining: retryable."""

    status_code = 503

    def __init__(self, message: str, *, retry_after: int = 1, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.headers["Retry-After"] = str(retry_after)


class RequestTimeout(ServiceError):
    """The client did not send the whole request in time; the connection is closed."""

    status_code = 408

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.headers["Connection"] = "close"


class ClientClosedRequest(ServiceError):
    """The client hung up before its answer was ready; nobody is left to read the status."""

    status_code = 499  # nginx's "client closed request"


class OutOfDeviceMemory(Overloaded):
    """The batch did not fit on the device even when split; retry later (or elsewhere)."""


class DeviceFault(ServiceError):
    """An unrecoverable device error: the model is unusable until the process restarts."""

    status_code = 503


class CodecError(BadRequest, ValueError):
    """A v2 tensor or request that does not follow the protocol; the message is for the client."""


class DeadlineExceeded(ServiceError):
    status_code = 504


class Conflict(ServiceError):
    status_code = 409


class ModelLoadFailed(ServiceError):
    """A (re)load that did not change what serves; carries the status of the newest failure."""

    status_code = 422


class Unauthorized(ServiceError):
    status_code = 401

    def __init__(self, message: str, **extra: Any) -> None:
        super().__init__(message, **extra)
        self.headers["WWW-Authenticate"] = "Bearer"


class Forbidden(ServiceError):
    status_code = 403


class CheckpointError(ServiceError):
    """A checkpoint that cannot be loaded as configured; a client-side (4xx) fault."""

    status_code = 422


class CheckpointNotFound(CheckpointError):
    pass


class CheckpointCorrupt(CheckpointError):
    """Empty, truncated or not a torch checkpoint at all."""


class ChecksumMismatch(CheckpointError):
    pass


class UnsafeCheckpoint(CheckpointError):
    """Needs globals outside the allowlist; we never fall back to full unpickling."""

    def __init__(self, message: str, *, globals_needed: list[str], **extra: Any) -> None:
        super().__init__(message, **extra)
        self.globals_needed = globals_needed


class TrustNotAllowed(CheckpointError):
    """model.toml says ``trusted = true`` but the server does not allow full unpickling."""


class InvalidModelOutput(CheckpointError):
    """The smoke forward gave non-finite or wrongly shaped outputs (e.g. NaN weights)."""


class StateDictMismatch(CheckpointError):
    """Missing/unexpected keys or shape mismatches against the configured architecture."""


class UnknownArchitecture(CheckpointError):
    pass


class CheckpointFormatMismatch(CheckpointError):
    """The file holds a whole model where a state_dict was configured, the reverse, or TorchScript."""


class ConfigError(ServiceError):
    """A model.toml that does not validate; names the file and the key."""

    status_code = 422


class StaleModel(ServiceError):
    """Items prepared for a model version that another process has replaced since: prepare again."""

    status_code = 503


class DeviceUnavailable(Overloaded):
    """The device process is not reachable (it is restarting): retry shortly."""


def to_wire(exc: ServiceError) -> dict[str, Any]:
    """An error as plain data, to cross from the device process to an HTTP process."""
    return {"type": type(exc).__name__, "message": exc.message, "status": exc.status_code,
            "extra": exc.extra, "headers": exc.headers}


def from_wire(doc: dict[str, Any]) -> ServiceError:
    """The same error type again (ServiceError for a name this module does not define)."""
    cls = globals().get(str(doc.get("type")))
    if not (isinstance(cls, type) and issubclass(cls, ServiceError)):
        cls = ServiceError
    exc = cls.__new__(cls)
    Exception.__init__(exc, doc.get("message", ""))
    exc.message, exc.status_code = str(doc.get("message", "")), int(doc.get("status", 500))
    exc.extra, exc.headers = dict(doc.get("extra") or {}), dict(doc.get("headers") or {})
    return exc


class DemoModelsError(RuntimeError):
    """The committed demo checkpoints are missing, altered or unreadable (a packaging fault)."""
