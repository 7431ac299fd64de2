"""Alert webhook: POSTs escalation alerts as JSON to a URL, off the caller's thread, with retries.

``AlertWebhook.send(alert)`` never blocks and never raises: the message goes into a bounded queue
that one background thread delivers in order. Each message is one ``POST`` with the alert object
(see :mod:`emostream.alerts`) as its JSON body. A 2xx answer delivers it; a connection error, a
timeout, 408, 429 or a 5xx answer is retried after ``backoff_seconds``, doubling each time, up to
``retries`` more attempts; any other answer (a 4xx: the endpoint refuses this message) and running
out of attempts give it up. Every outcome is counted and logged (URL without its query string or
credentials); a full queue drops the new message (counted) instead of holding a call up.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import urlsplit

from . import __version__

log = logging.getLogger("emostream.webhook")

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
OUTCOMES = ("delivered", "failed", "dropped")


@dataclass(frozen=True)
class WebhookConfig:
    """Where and how persistently alerts are POSTed."""

    url: str
    retries: int = 3  # attempts after the first one
    backoff_seconds: float = 0.5  # wait before the first retry, doubled for each next one
    timeout_seconds: float = 5.0  # per attempt (connect + answer)
    max_queue: int = 1000  # messages waiting; beyond that new ones are dropped
    headers: tuple[tuple[str, str], ...] = ()  # extra request headers, e.g. (("Authorization", "Bearer T"),)

    def __post_init__(self):
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"alert webhook must be an http:// or https:// URL, got {redact_url(self.url)!r}")
        if self.retries < 0 or self.backoff_seconds < 0 or not self.timeout_seconds > 0 or self.max_queue < 1:
            raise ValueError("alert webhook: retries and backoff must be >= 0, timeout > 0, queue >= 1")


def redact_url(url: str) -> str:
    """``url`` without user info, query or fragment (for logs: they may hold a token)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}" if parts.scheme else url.split("?")[0]


@dataclass
class WebhookStats:
    """What happened to the messages so far."""

    delivered: int = 0
    failed: int = 0  # given up: attempts exhausted or refused by the endpoint
    dropped: int = 0  # never tried: the queue was full or the sender closed
    retries: int = 0  # attempts after a message's first
    last_error: str | None = None

    def as_dict(self) -> dict:
        return {
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "retries": self.retries,
            "last_error": self.last_error,
        }


@dataclass
class AlertWebhook:
    """The background sender. ``send`` from anywhere; ``close`` waits (bounded) for the queue."""

    config: WebhookConfig
    on_outcome: Callable[[str], None] | None = None  # "delivered" | "failed" | "dropped" | "retry"
    stats: WebhookStats = field(default_factory=WebhookStats)

    def __post_init__(self):
        self._queue: queue.Queue = queue.Queue(self.config.max_queue)
        self._closing = threading.Event()  # no new messages
        self._abort = threading.Event()  # stop retrying: close's deadline passed
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="emostream-webhook", daemon=True)
        self._thread.start()

    def send(self, message: dict) -> bool:
        """Queue ``message`` for delivery; False (and counted as dropped) when it cannot be queued."""
        if not self._closing.is_set():
            try:
                self._queue.put_nowait(message)
                return True
            except queue.Full:
                pass
        self._count("dropped", "queue full" if not self._closing.is_set() else "sender closed")
        return False

    def close(self, timeout: float = 10.0) -> None:
        """Stop accepting messages and wait up to ``timeout`` s for the queued ones; what is still
        waiting then is given up (counted as dropped)."""
        self._closing.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._abort.set()
            self._thread.join(self.config.timeout_seconds + 1)

    def _count(self, outcome: str, error: str | None = None) -> None:
        with self._lock:
            setattr(
                self.stats,
                outcome if outcome != "retry" else "retries",
                getattr(self.stats, outcome if outcome != "retry" else "retries") + 1,
            )
            if error:
                self.stats.last_error = error
        if self.on_outcome is not None:
            try:
                self.on_outcome(outcome)
            except Exception:  # a metrics hook must not stop deliveries
                log.exception("webhook outcome hook failed")

    def _run(self) -> None:
        while True:
            try:
                message = self._queue.get(timeout=0.1)
            except queue.Empty:
                if self._closing.is_set():
                    return
                continue
            if self._abort.is_set():  # close's deadline passed: the rest is given up
                self._count("dropped", "sender closed")
                continue
            self._deliver(message)

    def _deliver(self, message: dict) -> None:
        cfg = self.config
        body = json.dumps(message, separators=(",", ":")).encode()
        headers = {"Content-Type": "application/json", "User-Agent": f"emostream/{__version__}", **dict(cfg.headers)}
        delay = cfg.backoff_seconds
        what = f"{message.get('rule')} {message.get('state')} on {message.get('call_id')}/{message.get('channel')}"
        for attempt in range(cfg.retries + 1):
            if attempt:
                self._count("retry")
                if self._abort.wait(delay):
                    self._count("failed", "sender closed during retries")
                    return
                delay *= 2
            error, retry = self._post(body, headers)
            if error is None:
                self._count("delivered")
                return
            if not retry:
                break
        log.warning(
            "alert webhook %s: gave up on %s after %d attempt(s): %s", redact_url(cfg.url), what, attempt + 1, error
        )
        self._count("failed", error)

    def _post(self, body: bytes, headers: dict) -> tuple[str | None, bool]:
        """One attempt: ``(None, _)`` when delivered, else ``(error, worth retrying)``."""
        request = urllib.request.Request(self.config.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.config.timeout_seconds) as response:
                response.read(65536)
                return None, False
        except urllib.error.HTTPError as exc:
            return f"HTTP {exc.code}", exc.code in RETRY_STATUSES
        except (urllib.error.URLError, OSError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            return f"{type(reason).__name__}: {reason}"[:200], True
        except Exception as exc:  # anything else must not kill the sender thread
            return f"{type(exc).__name__}: {exc}"[:200], False


def webhook_from_args(
    url: str | None, token: str | None = None, on_outcome: Callable[[str], None] | None = None
) -> AlertWebhook | None:
    """The sender for ``--alert-webhook URL`` (``token`` becomes a Bearer header), or None."""
    if not url:
        return None
    headers = (("Authorization", f"Bearer {token}"),) if token else ()
    return AlertWebhook(WebhookConfig(url, headers=headers), on_outcome)
