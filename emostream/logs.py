"""Logging of ``emostream serve``: text or one JSON object per line, the call id on every line,
secrets scrubbed.

The call id comes from a context variable that the server sets while it handles a call
(:func:`call_context`), so every log line written on behalf of that call (ours or a library's)
carries it without passing it around. Audio is never logged; tokens, tickets, signatures and
``Authorization`` values are replaced by ``***`` in every message, whatever logger wrote it.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from contextlib import contextmanager
from typing import Iterator

LOG_FORMATS = ("text", "json")

_call_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("emostream_call_id", default=None)
_SECRET = re.compile(
    r"(?i)((?:authorization|x-api-key|signature)\"?\s*[:=]\s*\"?(?:(?:bearer|basic)\s+)?)[^\s\",]+"
    r"|((?:token|ticket|signature|secret|key)=)[^&\s\"']+"
    r"|((?:bearer|basic)\s+)[A-Za-z0-9._~+/=-]+"
)


def redact(text: str) -> str:
    """``text`` with anything that looks like a credential replaced by ``***``."""
    return _SECRET.sub(lambda m: (m.group(1) or m.group(2) or m.group(3)) + "***", text)


@contextmanager
def call_context(call_id: str | None) -> Iterator[None]:
    """Log lines written inside this block (and in tasks it starts) carry ``call_id``."""
    token = _call_id.set(call_id)
    try:
        yield
    finally:
        _call_id.reset(token)


def set_call_id(call_id: str | None) -> None:
    """Set the call id of the current context (e.g. once a call's start message names it)."""
    _call_id.set(call_id)


def current_call_id() -> str | None:
    return _call_id.get()


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.call_id = _call_id.get()
        return True


class TextFormatter(logging.Formatter):
    """``2026-11-25 16:00:00 INFO emostream.server [call abc] message``, secrets scrubbed."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s%(call)s %(message)s", "%Y-%m-%d %H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        call_id = getattr(record, "call_id", None)
        record.call = f" [call {call_id}]" if call_id else ""
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (ISO 8601 UTC), ``level``, ``logger``, ``call_id`` (null when
    the line is not about a call), ``msg``, and ``exc`` when an exception is attached."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "call_id": getattr(record, "call_id", None),
            "msg": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["exc"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str = "text", level: int = logging.INFO, stream=None) -> logging.Handler:
    """Route every logger (emostream's and the libraries') through one handler in ``log_format``."""
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else TextFormatter())
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
