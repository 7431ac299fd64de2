"""The server's plain HTTP side, on the websocket port: response helpers, the supervisor page's files
(package data ``emostream/web``), single-use ``/v1/events`` tickets and the GET routes
(:func:`http_route`: ``/``, ``/static/*``, ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/ticket``,
``/v1/calls``, ``/v1/calls/<id>``)."""
from __future__ import annotations

import email.utils
import json
import secrets
import time
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import unquote

from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import __version__
from .auth import token_ok
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

CALL_PATHS = {"/v1/pcm": "pcm", "/v1/twilio": "twilio", "/v1/audiohook": "audiohook"}
EVENTS_PATH = "/v1/events"
TICKET_PATH = "/v1/ticket"
CALLS_PATH = "/v1/calls"
TICKET_SECONDS = 30.0           # a /v1/events ticket is valid this long, once
WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
PAGE_HEADERS = {  # the page loads nothing from anywhere but this server
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
}
MAX_CLOSE_REASON = 120          # bytes; RFC 6455 allows 123


def response(status: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> Response:
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                       ("Content-Length", str(len(body))), ("Content-Type", content_type),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
    for name, value in (extra or {}).items():
        headers[name] = value
    return Response(status.value, status.phrase, headers, body)


def json_response(status: HTTPStatus, body: dict, extra: dict[str, str] | None = None) -> Response:
    return response(status, json.dumps(body, separators=(",", ":")).encode(), "application/json", extra)


WEB_CACHE: dict[str, bytes] = {}


def static_response(name: str) -> Response:
    """A file of the supervisor page (package data ``emostream/web``)."""
    if name not in WEB_CACHE:
        try:
            WEB_CACHE[name] = (resources.files("emostream") / "web" / name).read_bytes()
        except (FileNotFoundError, OSError):
            return json_response(HTTPStatus.NOT_FOUND, {"error": "not found"})
    headers = {k: v for k, v in PAGE_HEADERS.items() if k != "X-Content-Type-Options"}
    return response(HTTPStatus.OK, WEB_CACHE[name], WEB_FILES[name], headers)


def closed_reason(closed: ConnectionClosed) -> str:
    """``end_reason`` of a connection that closed under the handler: who closed it and why."""
    sent, rcvd = closed.sent, closed.rcvd
    if sent is not None and (rcvd is None or not closed.rcvd_then_sent):
        return f"server closed: {sent.code} {sent.reason}".rstrip()  # e.g. 1009 too big, 1007 bad UTF-8
    if rcvd is not None:
        return f"peer closed: {rcvd.code} {rcvd.reason}".rstrip()
    return "peer disconnected"  # no close frame: the connection vanished


def close_reason_text(text: str) -> str:
    data = text.encode("utf-8")[:MAX_CLOSE_REASON]
    return data.decode("utf-8", errors="ignore")


class Tickets:
    """Single-use ``/v1/events`` tickets for the page (browsers cannot send headers on a websocket,
    and a token must not travel in a URL), each valid ``TICKET_SECONDS``."""

    def __init__(self):
        self._expiry: dict[str, float] = {}  # ticket -> expiry (monotonic)

    def issue(self) -> str:
        now = time.monotonic()
        for ticket, expiry in list(self._expiry.items()):
            if expiry < now:
                del self._expiry[ticket]
        ticket = secrets.token_urlsafe(24)
        self._expiry[ticket] = now + TICKET_SECONDS
        return ticket

    def redeem(self, ticket: str) -> bool:
        expiry = self._expiry.pop(ticket, None)
        return expiry is not None and expiry >= time.monotonic()


def http_route(server: Any, request: Request, path: str) -> Response:
    """The plain HTTP routes of ``server`` (an :class:`~emostream.server.EmoServer`; GET only: other
    methods get 405 before this)."""
    if path in ("/", "/index.html"):
        return static_response("index.html")
    if path.startswith("/static/"):
        name = path[len("/static/"):]
        if name in WEB_FILES:
            return static_response(name)
    elif path == "/healthz":
        return json_response(HTTPStatus.OK, {"status": "ok", "version": __version__,
                                              "uptime_seconds": round(time.time() - server.started_at, 1)})
    elif path == "/readyz":
        reason = None if server.ready else (server.ready_error or "warming up the model")
        body = {"ready": server.ready, "device": server.device, "live_calls": len(server.calls)}
        if reason:
            body["reason"] = reason
        return json_response(HTTPStatus.OK if server.ready else HTTPStatus.SERVICE_UNAVAILABLE, body)
    elif path in ("/metrics", TICKET_PATH, CALLS_PATH) or path.startswith(CALLS_PATH + "/"):
        if server.config.token is not None and not token_ok(server.config.token, request.headers, request.path):
            server.metrics.rejected.labels("unauthorized").inc()
            return json_response(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"},
                                  {"WWW-Authenticate": 'Bearer realm="emostream"'})
        if path == "/metrics":
            return response(HTTPStatus.OK, server.metrics.render(), METRICS_CONTENT_TYPE)
        if path == TICKET_PATH:
            return json_response(HTTPStatus.OK, {"ticket": server.tickets.issue(), "expires_in": TICKET_SECONDS})
        server.prune_ended()
        if path == CALLS_PATH:
            calls = [c.listing() for c in server.calls.values() if c.hub is not None]
            calls += [c.listing() for c in server.ended.values() if c.call_id not in server.calls]
            return json_response(HTTPStatus.OK, {"calls": calls})
        call_id = unquote(path[len(CALLS_PATH) + 1:])
        call = server.calls.get(call_id) or server.ended.get(call_id)
        if call is None or (call.hub is None):
            return json_response(HTTPStatus.NOT_FOUND, {"error": f"no live or recent call {call_id[:80]!r}"})
        return json_response(HTTPStatus.OK, call.detail())
    server.metrics.rejected.labels("unknown_path").inc()
    return json_response(HTTPStatus.NOT_FOUND, {"error": "not found"})
