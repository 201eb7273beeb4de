"""Text logs cannot be forged or used to drive a terminal: every field is escaped."""

from __future__ import annotations

import logging

from app.observability.logs import JsonFormatter, TextFormatter, escape_control


def _record(msg: str, *args: object, **extra: object) -> logging.LogRecord:
    record = logging.makeLogRecord({"name": "modserve.access", "levelname": "INFO", "levelno": 20,
                                    "msg": msg, "args": args, **extra})
    return record


def test_escape_control_characters() -> None:
    assert escape_control("a\nb\r\x1b[31mc\x00\u2028") == "a\\nb\\r\\x1b[31mc\\x00\\u2028"
    assert escape_control("plain ü text") == "plain ü text"


def test_text_format_keeps_one_line_per_record() -> None:
    path = "/v1/models/x\nERROR    modserve forged line\x1b[2J/predict"
    line = TextFormatter().format(_record("%s %s %d", "GET", path, 404, request_id="id\nX"))
    assert "\n" not in line and "\x1b" not in line
    assert line.startswith("INFO     modserve.access [id\\nX]: GET /v1/models/x\\nERROR")


def test_tracebacks_are_indented_and_escaped() -> None:
    try:
        raise ValueError("bad\nERROR forged")
    except ValueError:
        import sys

        record = _record("failed")
        record.exc_info = sys.exc_info()
    lines = TextFormatter().format(record).split("\n")
    assert lines[0].startswith("INFO ") and all(line.startswith("    | ") for line in lines[1:])
    assert not any(line.startswith("ERROR") for line in lines)


def test_json_format_escapes_by_construction() -> None:
    line = JsonFormatter().format(_record("GET %s", "/a\nb\x1b"))
    assert "\n" not in line and "\x1b" not in line
