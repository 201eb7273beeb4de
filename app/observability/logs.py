"""Log set-up: JSON lines (or plain text) with the request id on every record of a request."""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

from app.observability.context import current

_RESERVED = set(vars(logging.makeLogRecord({})))


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        info = current.get()
        if not hasattr(record, "request_id"):
            record.request_id = info.request_id if info else None
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,  # which process of a multi-process server (MODSERVE_WORKERS)
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and key not in doc and not key.startswith("_") and value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


# C0 and C1 control characters (newlines, ANSI escapes, ...) and the Unicode line separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_control(text: str) -> str:
    """``\n`` -> ``\\n``, ESC -> ``\\x1b``: a client cannot forge a log line or drive a terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class TextFormatter(logging.Formatter):
    """One line per record with every field escaped; a traceback follows indented, so no line a
    client controls can pass for a record of its own."""

    def format(self, record: logging.LogRecord) -> str:
        request_id = escape_control(str(getattr(record, "request_id", None)))
        line = f"{record.levelname:<8} {record.name} [{request_id}]: {escape_control(record.getMessage())}"
        if record.exc_info:
            trace = self.formatException(record.exc_info)
            line += "".join(f"\n    | {escape_control(t)}" for t in trace.splitlines())
        return line


def configure_logging(level: str = "info", fmt: str | None = None) -> None:
    """``fmt`` None: plain text when stderr is a terminal (a person reads it), JSON otherwise."""
    if fmt is None:
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error"):  # uvicorn's own lines go through the same handler
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # our request line replaces it
