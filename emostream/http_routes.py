"""The server's plain HTTP side, on the websocket port: response helpers, the supervisor page's files
(package data ``emostream/web``), signed ``/v1/events`` tickets and the GET routes
(:func:`http_route`: ``/``, ``/static/*``, ``/healthz``, ``/readyz``, ``/metrics``, ``/v1/ticket``,
``/v1/calls``, ``/v1/calls/<id>``)."""

from __future__ import annotations

import base64
import email.utils
import hashlib
import hmac
import json
import logging
import os
import secrets
import struct
import time
from http import HTTPStatus
from importlib import resources
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

from . import __version__
from .auth import NonceCache, token_ok, twilio_signature_ok, verify_audiohook_request
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

log = logging.getLogger("emostream.server")

CALL_PATHS = {"/v1/pcm": "pcm", "/v1/twilio": "twilio", "/v1/audiohook": "audiohook"}
EVENTS_PATH = "/v1/events"
TICKET_PATH = "/v1/ticket"
CALLS_PATH = "/v1/calls"
TICKET_SECONDS = 30.0  # a /v1/events ticket is valid this long, once
WEB_FILES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
PAGE_HEADERS = {  # the page loads nothing from anywhere but this server
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
    "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
MAX_CLOSE_REASON = 120  # bytes; RFC 6455 allows 123


def response(status: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> Response:
    headers = Headers(
        [
            ("Date", email.utils.formatdate(usegmt=True)),
            ("Connection", "close"),
            ("Content-Length", str(len(body))),
            ("Content-Type", content_type),
            ("Cache-Control", "no-store"),
            ("X-Content-Type-Options", "nosniff"),
        ]
    )
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
    """``/v1/events`` tickets for the page (browsers cannot send headers on a websocket, and a token
    must not travel in a URL), each valid ``TICKET_SECONDS`` and redeemed once per process.

    A ticket is signed (HMAC-SHA256) with a key derived from ``secret``, the server's token, so any
    process that has the token accepts it: the page gets its ticket from one front end of a fleet
    (``serve --workers``) or host behind a load balancer and its socket may land on another. Without
    a secret the key is random (this process only)."""

    def __init__(self, secret: str | None = None):
        material = secret.encode() if secret is not None else secrets.token_bytes(32)
        self._key = hmac.new(material, b"emostream /v1/events ticket", hashlib.sha256).digest()
        self._used = NonceCache()  # nonces redeemed here, until their tickets expire

    def _mac(self, body: bytes) -> bytes:
        return hmac.new(self._key, body, hashlib.sha256).digest()[:16]

    def issue(self) -> str:
        body = struct.pack(">d", time.time() + TICKET_SECONDS) + secrets.token_bytes(16)
        return base64.urlsafe_b64encode(body + self._mac(body)).decode().rstrip("=")

    def redeem(self, ticket: str) -> bool:
        try:
            raw = base64.urlsafe_b64decode(ticket + "=" * (-len(ticket) % 4))
        except (ValueError, TypeError):
            return False
        if len(raw) != 40 or not hmac.compare_digest(raw[24:], self._mac(raw[:24])):
            return False
        (expiry,), now = struct.unpack(">d", raw[:8]), time.time()
        return expiry >= now and self._used.add(raw[8:24].hex(), expiry, now)


def http_route(server: Any, request: Request, path: str) -> Response:
    """The plain HTTP routes of ``server`` (an :class:`~emostream.server.EmoServer`; GET only: other
    methods get 405 before this)."""
    if path in ("/", "/index.html"):
        return static_response("index.html")
    if path.startswith("/static/"):
        name = path[len("/static/") :]
        if name in WEB_FILES:
            return static_response(name)
    elif path == "/healthz":
        return json_response(
            HTTPStatus.OK,
            {
                "status": "ok",
                "version": __version__,
                "uptime_seconds": round(time.time() - server.started_at, 1),
                **({} if server.front_end is None else {"worker": server.front_end, "pid": os.getpid()}),
            },
        )
    elif path == "/readyz":
        reason = None if server.ready else (server.ready_error or "warming up the model")
        body = {"ready": server.ready, "device": server.device, "live_calls": len(server.calls)}
        if reason:
            body["reason"] = reason
        return json_response(HTTPStatus.OK if server.ready else HTTPStatus.SERVICE_UNAVAILABLE, body)
    elif path in ("/metrics", TICKET_PATH, CALLS_PATH) or path.startswith(CALLS_PATH + "/"):
        if server.config.token is not None and not token_ok(server.config.token, request.headers, request.path):
            server.metrics.rejected.labels("unauthorized").inc()
            return json_response(
                HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"}, {"WWW-Authenticate": 'Bearer realm="emostream"'}
            )
        if path == "/metrics":
            return response(HTTPStatus.OK, server.metrics.render(), METRICS_CONTENT_TYPE)
        if path == TICKET_PATH:
            return json_response(HTTPStatus.OK, {"ticket": server.tickets.issue(), "expires_in": TICKET_SECONDS})
        if path == CALLS_PATH:
            body = {"calls": [c.listing() for c in server.listed_calls()]}
            if server.front_end is not None:
                body["worker"] = server.front_end
            return json_response(HTTPStatus.OK, body)
        server.prune_ended()
        call_id = unquote(path[len(CALLS_PATH) + 1 :])
        call = server.find_call(call_id)
        if call is None or (call.hub is None):
            return json_response(HTTPStatus.NOT_FOUND, {"error": f"no live or recent call {call_id[:80]!r}"})
        return json_response(HTTPStatus.OK, call.detail())
    server.metrics.rejected.labels("unknown_path").inc()
    return json_response(HTTPStatus.NOT_FOUND, {"error": "not found"})


def upgrade_response(server: Any, connection: ServerConnection, request: Request) -> Response | None:
    """The HTTP stage of every request to ``server`` (an :class:`~emostream.server.EmoServer`): plain
    routes (:func:`http_route`), then websocket routing, authentication (token, ticket, Twilio or
    AudioHook signature) and capacity. None lets the upgrade go on; else the refusal."""
    split = urlsplit(request.path)
    path = split.path.rstrip("/") or "/"
    cfg = server.config
    upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
    if request.method != "GET":
        server.metrics.rejected.labels("method_not_allowed").inc()
        return json_response(
            HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{request.method[:20]} not allowed; use GET"}, {"Allow": "GET"}
        )
    if path not in CALL_PATHS and path != EVENTS_PATH:
        if upgrade:
            server.metrics.rejected.labels("unknown_path").inc()
            return connection.respond(
                HTTPStatus.NOT_FOUND, "unknown path; use /v1/pcm, /v1/twilio, /v1/audiohook or /v1/events\n"
            )
        return http_route(server, request, path)
    if not upgrade:
        return json_response(HTTPStatus.UPGRADE_REQUIRED, {"error": f"{path} is a websocket endpoint"})
    headers = request.headers
    authenticated = cfg.token is None
    if cfg.token is not None and token_ok(cfg.token, headers, request.path):
        authenticated = True
    if path == EVENTS_PATH and not authenticated:
        ticket = parse_qs(split.query).get("ticket", [None])[0]
        if ticket is not None:
            if not server.tickets.redeem(ticket):
                server.metrics.rejected.labels("bad_ticket").inc()
                return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized: ticket unknown, used or expired\n")
            authenticated = True
    if path == "/v1/twilio" and cfg.twilio_auth_token:
        url = (cfg.public_url or f"wss://{headers.get('Host', '')}").rstrip("/") + request.path
        if not twilio_signature_ok(cfg.twilio_auth_token, headers.get("X-Twilio-Signature"), url):
            server.metrics.rejected.labels("unauthorized").inc()
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        authenticated = True
    elif path == "/v1/audiohook" and server.audiohook_keys:
        failure = verify_audiohook_request(headers, request.path, server.audiohook_keys, nonces=server.nonces)
        if failure is not None:
            log.info("audiohook signature rejected: %s", failure)
            server.metrics.rejected.labels("unauthorized").inc()
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        authenticated = True
    if not authenticated and path != "/v1/twilio":  # Twilio may carry the token in start
        server.metrics.rejected.labels("unauthorized").inc()
        return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
    if path in CALL_PATHS and len(server.calls) >= cfg.max_calls:
        server.metrics.rejected.labels("at_capacity").inc()
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server is at its call limit\n")
    if path in CALL_PATHS:
        server.unstarted = {c for c in server.unstarted if c.state is not State.CLOSED}
        if len(server.unstarted) >= cfg.max_unstarted:
            server.metrics.rejected.labels("too_many_unstarted").inc()
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections waiting to start\n")
        server.unstarted.add(connection)  # until its call starts or it closes (start_timeout)
    if path == EVENTS_PATH and server.hub.subscribers >= cfg.max_subscribers:
        server.metrics.rejected.labels("too_many_subscribers").inc()
        return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many event subscribers\n")
    connection.emostream_authenticated = authenticated  # read by _handle
    return None
