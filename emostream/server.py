"""``emostream serve``: the asyncio websocket server for live calls.

Websocket routes: ``/v1/pcm``, ``/v1/twilio``, ``/v1/audiohook`` (calls, see
:mod:`emostream.protocols`) and ``/v1/events`` (read-only feed of every live call). Upgrade requests
are authenticated before the handshake (HTTP 401, or 404 for unknown paths, 503 when full).

Plain HTTP routes on the same port (no second server): ``/`` and ``/static/*`` (the supervisor page,
package data in ``emostream/web``), ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), and for the
page ``/v1/ticket`` (a short-lived ticket for ``/v1/events``: browsers cannot send headers on a
websocket, and a token must not travel in a URL), ``/v1/calls`` and ``/v1/calls/<id>``.

Each call gets a :class:`~emostream.live_call.LiveCall`: the channels chosen by ``analyse`` (see
:mod:`emostream.compliance`; the others are dropped here) -> per-channel streaming resampler ->
:class:`StreamWindower` -> :class:`Analyzer` whose model calls go through the one shared
:class:`InferenceWorker`; events fan out to the peer, the call's JSONL file in ``events_dir``
(appended and flushed per line; a summary is written whenever the call ends, also when the peer
vanishes) and the :class:`~emostream.hub.EventsHub`; alerts also go to the optional webhook (:mod:`emostream.webhook`,
queued, never waited for). One call's bad input closes that call only. Audio is written to disk only
with ``record_dir``. With a ``worker`` given (``serve --ray``: :class:`emostream.scale.RayWorker`)
the model runs on a Ray Serve deployment instead; nothing else changes. With a ``fleet``
(``serve --workers N``) it is one of several front ends on the port (:mod:`emostream.fleet`).

This module is the connection handling; the configuration is :mod:`emostream.server_config`, the
plain HTTP routes :mod:`emostream.http_routes`, one call :mod:`emostream.live_call` and the fan-out
:mod:`emostream.hub`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .audiohook import AudioHookSession
from .auth import NonceCache
from .compliance import ROLE_CHANNELS, ChannelSelectionError, expire_recordings, expire_timelines
from .fleet import FleetLink
from .http_routes import CALL_PATHS, EVENTS_PATH, Tickets, close_reason_text, closed_reason, upgrade_response
from .hub import EventsHub, serve_subscriber
from .keepalive import KeepaliveServerConnection
from .live_call import EndedCall, LiveCall
from .logs import set_call_id
from .metrics import ServerMetrics
from .protocols import (
    CLOSE_GOING_AWAY,
    CLOSE_INTERNAL,
    CLOSE_NORMAL,
    CLOSE_POLICY,
    CLOSE_TRY_LATER,
    Audio,
    End,
    Note,
    PcmSession,
    ProtocolError,
    Send,
    Session,
    Silence,
    Start,
)
from .server_config import ServerConfig
from .twilio_media import TwilioSession
from .webhook import AlertWebhook
from .worker import InferenceWorker, PredictFn, WorkerOverloaded

__all__ = ["EmoServer", "ServerConfig", "LiveCall"]

log = logging.getLogger("emostream.server")

ENDED_CALL_SECONDS = 60.0  # ended calls stay listed (and greyed on the page) this long
RETENTION_CHECK_SECONDS = 3600.0
RECV_QUEUE_FRAMES = 16  # frames a connection buffers before reading pauses (x max_message_bytes)
ENDED_PRUNE_SECONDS = 10.0  # how often ended calls past ENDED_CALL_SECONDS are dropped
AUDIOHOOK_ERROR_GRACE = 5.0  # after a disconnect(error), wait this long for the client's close
WEBHOOK_CLOSE_SECONDS = 5.0  # on stop, queued alert POSTs get this long


class EmoServer:
    """The websocket server. ``await start()``, then ``await stop()`` (or ``serve_forever``)."""

    def __init__(
        self,
        config: ServerConfig,
        predict: PredictFn | None,
        device: str = "cpu",
        model_info: dict[str, str] | None = None,
        worker: InferenceWorker | None = None,
        fleet: FleetLink | None = None,
    ):
        """``predict`` runs in the shared in-process worker; or pass a ready ``worker`` with the same
        interface (``emostream.scale.RayWorker``: inference on a Ray Serve deployment). With a
        ``fleet`` (``serve --workers``), this server is one front end of several: its events, call
        listings and metrics cover every front end's calls (:mod:`emostream.fleet`)."""
        if worker is None and predict is None:
            raise ValueError("EmoServer needs a predict function or a worker")
        self.config = config
        self.device = device
        self.worker = worker if worker is not None else InferenceWorker(predict, config.worker)
        self.webhook: AlertWebhook | None = None
        self.hub = EventsHub()
        self.fleet = fleet
        self.front_end = None if fleet is None else fleet.worker
        self.calls: dict[str, LiveCall] = {}
        self.ended: dict[str, EndedCall] = {}  # calls that ended less than ENDED_CALL_SECONDS ago
        self.connections = 0
        self.completed = 0
        self.errors = 0
        self.ready = False
        self.ready_error: str | None = None
        self.started_at = time.time()
        self._server = None
        self._tasks: list[asyncio.Task] = []
        self.tickets = Tickets(config.token)  # /v1/events tickets, good on every front end with the token
        self.audiohook_keys = {k.key: k.secret for k in config.audiohook_keys}
        self.nonces = NonceCache()  # AudioHook signatures already accepted: replays are refused
        self.unstarted: set[ServerConnection] = set()  # call connections accepted, call not started yet
        self.metrics = ServerMetrics(self._metrics_state, model_info)
        self.model_info = model_info
        self.worker.batch_observers.append(self.metrics.observe_batch)
        for directory in (config.events_dir, config.record_dir):
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)

    # -- lifecycle

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0). The model is warmed up in the
        background (batch 1, or every batch size with ``warm_up``); ``/readyz`` says when it is done
        and :meth:`wait_ready` waits for it."""
        await self.worker.start()
        if self.config.alert_webhook is not None and self.webhook is None:
            self.webhook = AlertWebhook(self.config.alert_webhook, self.metrics.count_webhook)
        if self.config.events_retention_days is not None or self.config.record_retention_days is not None:
            self._apply_retention()
            self._tasks.append(asyncio.create_task(self._retention_loop(), name="emostream-retention"))
        self._server = await serve(
            self._handle,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            max_size=self.config.max_message_bytes,
            max_queue=RECV_QUEUE_FRAMES,
            ping_interval=self.config.ping_interval,
            ping_timeout=self.config.ping_timeout,
            close_timeout=5,
            server_header="emostream",
            create_connection=KeepaliveServerConnection,
            reuse_port=self.config.reuse_port or None,
        )
        if self.fleet is not None:
            self.hub.forward = self.fleet.forward
            own = lambda: [c.detail() for c in self.calls.values() if c.hub is not None]  # noqa: E731
            await self.fleet.start(self.hub, self._own_state, own)  # own: for a registry that restarted
        self._tasks.append(asyncio.create_task(self._warm_up(), name="emostream-warm-up"))
        self._tasks.append(asyncio.create_task(self._prune_loop(), name="emostream-prune-ended"))
        sock = next(iter(self._server.sockets))
        return sock.getsockname()[1]

    async def _warm_up(self) -> None:
        sizes = None if self.config.warm_up else [1]
        try:
            seconds = await self.worker.warm_up(sizes)
        except Exception as exc:
            self.ready_error = f"warm-up failed: {exc}"
            log.error("model warm-up failed: %s", exc)
            return
        self.ready = True
        log.info(
            "ready: model warmed up for batch sizes %s in %.1f s",
            f"1-{self.config.worker.max_batch}" if sizes is None else "1",
            seconds,
        )

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Wait until the warm-up is done (raises RuntimeError when it failed)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while not self.ready:
            if self.ready_error:
                raise RuntimeError(self.ready_error)
            if deadline is not None and loop.time() > deadline:
                raise asyncio.TimeoutError("server not ready")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        """Close every connection (calls finish and write their summaries), then the worker."""
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None
        for call in list(self.calls.values()):
            await call.finish("server stopped")
        if self.fleet is not None:  # the summaries reach the other front ends
            await self.fleet.stop()
        await self.worker.stop()
        if self.webhook is not None:  # alerts still queued get a few seconds, off the event loop
            await asyncio.get_running_loop().run_in_executor(None, self.webhook.close, WEBHOOK_CLOSE_SECONDS)

    # -- retention and the registry of ended calls

    def _apply_retention(self) -> list[Path]:
        """Apply the retention options: old timelines and old recordings, never a live call's."""
        deleted = []
        if self.config.events_retention_days is not None:
            live = {c.path for c in self.calls.values() if c.path is not None}
            deleted += expire_timelines(Path(self.config.events_dir), self.config.events_retention_days, live)
        if self.config.record_retention_days is not None:
            live = {c.recorder.path for c in self.calls.values() if c.recorder is not None}
            deleted += expire_recordings(Path(self.config.record_dir), self.config.record_retention_days, live)
        return deleted

    async def _retention_loop(self) -> None:
        while True:
            await asyncio.sleep(RETENTION_CHECK_SECONDS)
            try:
                self._apply_retention()
            except Exception:
                log.exception("timeline retention failed")

    def prune_ended(self) -> None:
        """Ended calls stay listed ENDED_CALL_SECONDS, and at most ``max_ended_calls`` of them (the newest)."""
        now = time.time()
        for call_id, call in list(self.ended.items()):
            if call.ended_at is None or now - call.ended_at > ENDED_CALL_SECONDS:
                del self.ended[call_id]
        while len(self.ended) > self.config.max_ended_calls:
            del self.ended[next(iter(self.ended))]  # insertion order: the oldest first
        if self.fleet is not None:
            self.fleet.prune()

    def listed_calls(self) -> list:
        """``GET /v1/calls``: live calls, recently ended ones, then (in a fleet) the other front ends'."""
        self.prune_ended()
        calls = [c for c in self.calls.values() if c.hub is not None]
        calls += [c for c in self.ended.values() if c.call_id not in self.calls]
        remote = self.fleet.remote.values() if self.fleet is not None else ()
        return calls + [c for c in remote if c.call_id not in self.calls and c.call_id not in self.ended]

    def find_call(self, call_id: str):
        """A live, recently ended or (in a fleet) remote call by id, or None."""
        call = self.calls.get(call_id) or self.ended.get(call_id)
        if call is None and self.fleet is not None:
            call = self.fleet.remote.get(call_id)
        return call

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(ENDED_PRUNE_SECONDS)
            self.prune_ended()

    def _metrics_state(self) -> dict:
        own = self._own_state()
        return own if self.fleet is None else self.fleet.fleet_state(own)

    def _own_state(self) -> dict:
        """This process's share of the live gauges (a fleet's front ends report it to each other)."""
        live: dict[str, int] = {}
        for call in self.calls.values():
            live[call.protocol] = live.get(call.protocol, 0) + 1
        return {
            "live_calls": live,
            "queue": self.worker.pending,
            "subscribers": self.hub.subscribers,
            "ready": int(self.ready),
            "dropped": self.worker.stats.refused,
        }

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.stop()

    # -- HTTP stage: plain HTTP routes, then websocket routing, authentication, capacity

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        return upgrade_response(self, connection, request)

    # -- websocket stage

    async def _handle(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path).path.rstrip("/")
        authenticated = getattr(ws, "emostream_authenticated", False)
        self.connections += 1
        try:
            if path == EVENTS_PATH:
                await serve_subscriber(self.hub, ws, self.device, self.front_end)
            else:
                await self._handle_call(ws, CALL_PATHS[path], authenticated)
        except Exception:  # never let one connection take the server down
            self.errors += 1
            log.exception("connection %s failed", ws.remote_address)
            try:
                await ws.close(CLOSE_INTERNAL, "internal error")
            except Exception:
                pass
        finally:
            self.connections -= 1

    def _session(self, protocol: str, ws: ServerConnection, authenticated: bool) -> Session:
        if protocol == "pcm":
            return PcmSession()
        if protocol == "twilio":
            return TwilioSession(token=None if authenticated else self.config.token)
        analysable = None if self.config.analyse == "all" else (ROLE_CHANNELS["audiohook"][self.config.analyse],)
        return AudioHookSession(
            ws.request.headers.get("Audiohook-Session-Id"), self.config.supported_languages, analysable
        )

    async def _handle_call(self, ws: ServerConnection, protocol: str, authenticated: bool) -> None:
        session = self._session(protocol, ws, authenticated)
        call: LiveCall | None = None
        end_reason = "peer disconnected"
        peer_gone = False  # a send failed: keep analysing what already arrived, recv says how it ended
        loop = asyncio.get_running_loop()
        connected_at = active_at = loop.time()
        not_analysed_counted = False

        async def send(message: dict | None) -> None:
            nonlocal peer_gone
            if message is not None and not peer_gone:
                try:
                    await ws.send(json.dumps(message, separators=(",", ":")))
                except ConnectionClosed:
                    peer_gone = True

        async def deliver(events: list[dict], received: float | None = None) -> None:
            for event in events:
                await send(session.event_message(event))
            if received is not None and events:
                self.metrics.observe_latency(len(events), time.monotonic() - received, self.config.hop_seconds)

        try:
            while True:
                established = session.established
                if established:
                    self.unstarted.discard(ws)
                    left = self.config.idle_timeout - (loop.time() - active_at)
                else:
                    left = self.config.start_timeout - (loop.time() - connected_at)
                try:
                    if left <= 0:
                        raise asyncio.TimeoutError
                    data = await asyncio.wait_for(ws.recv(), left)
                    received = time.monotonic()
                except asyncio.TimeoutError:
                    if established:
                        end_reason = "idle timeout"
                        await ws.close(CLOSE_GOING_AWAY, f"idle: no audio for {self.config.idle_timeout:g} s")
                    else:
                        end_reason = "start timeout"
                        self.metrics.rejected.labels("start_timeout").inc()
                        log.info(
                            "%s connection %s closed: no start within %g s",
                            protocol,
                            ws.remote_address,
                            self.config.start_timeout,
                        )
                        await ws.close(CLOSE_POLICY, f"no start within {self.config.start_timeout:g} s")
                    return
                except ConnectionClosed as closed:
                    end_reason = closed_reason(closed)
                    log.info("%s call %s ended: %s", protocol, call.call_id if call else "-", end_reason)
                    return
                try:
                    actions = session.on_text(data) if isinstance(data, str) else session.on_binary(data)
                    if not session.expects_audio or any(isinstance(a, Audio) and len(a.samples) for a in actions):
                        active_at = loop.time()  # idle time counts audio (any message while none is expected)
                    if session.not_analysed and not not_analysed_counted:
                        not_analysed_counted = True
                        self.metrics.calls.labels(protocol, "not_analysed").inc()
                    audio: list[tuple[int, np.ndarray]] = []  # consecutive Audio: classified together
                    for action in actions + [None]:
                        if isinstance(action, Audio):
                            audio.append((action.channel, action.samples))
                            continue
                        if audio and call is not None:
                            await deliver(await call.push(audio), received)
                        audio = []
                        if action is None:
                            break
                        if isinstance(action, Silence):
                            if call is not None:
                                await deliver(await call.silence(action.channel, action.samples), received)
                        elif isinstance(action, Send):
                            await send(action.message)
                        elif isinstance(action, Start):
                            set_call_id(action.call_id)  # on every log line of this connection from now on
                            call = self._open_call(action, protocol)
                            self.unstarted.discard(ws)
                            active_at = loop.time()
                        elif isinstance(action, Note):
                            log.info("call %s: %s", call.call_id if call else "-", action.text)
                        elif isinstance(action, End):
                            end_reason = "completed" if action.reason in ("stop", "close") else action.reason
                            summary = None
                            if call is not None:
                                summary = await call.finish(end_reason)
                                await deliver(call.tail_events, received)
                                self.completed += 1
                            for message in session.summary_messages(summary):
                                await send(message)
                            await ws.close(CLOSE_NORMAL, "end of call")
                            return
                    await asyncio.sleep(0)  # queued frames never run back to back: other calls get the loop
                except WorkerOverloaded as exc:
                    raise ProtocolError(f"server overloaded: {exc}", CLOSE_TRY_LATER) from None
        except ProtocolError as err:
            self.errors += 1
            end_reason = f"error: {err}"
            log.info("%s call %s closed: %s", protocol, call.call_id if call else "-", err)
            try:
                for message in session.error_messages(err):
                    await send(message)
                if session.graceful_errors and err.code not in (CLOSE_POLICY, CLOSE_TRY_LATER) and not peer_gone:
                    # AudioHook: the client answers disconnect with close; keep serving it briefly
                    await self._audiohook_after_error(ws, session, call, send)
                else:
                    await ws.close(err.code, close_reason_text(str(err)))
            except ConnectionClosed:
                pass
        finally:
            self.unstarted.discard(ws)
            if call is not None:
                self.calls.pop(call.call_id, None)
                if not call.finished:
                    await call.finish(end_reason)
                if call.hub is not None:  # listed (greyed out on the page) for a while
                    self.ended.pop(call.call_id, None)  # re-inserted: the newest
                    self.ended[call.call_id] = EndedCall.of(call)
                    self.prune_ended()

    async def _audiohook_after_error(self, ws, session: Session, call: LiveCall | None, send) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AUDIOHOOK_ERROR_GRACE
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(ws.recv(), left)
            except (asyncio.TimeoutError, ConnectionClosed):
                break
            try:
                actions = session.on_text(data) if isinstance(data, str) else session.on_binary(data)
            except ProtocolError:
                continue
            if any(isinstance(a, End) for a in actions):
                summary = await call.finish("error") if call is not None else None
                for message in session.summary_messages(summary):
                    await send(message)
                break
        await ws.close(CLOSE_NORMAL, "error")

    def _open_call(self, start: Start, protocol: str) -> LiveCall:
        remote = self.fleet.remote.get(start.call_id) if self.fleet is not None else None
        if start.call_id in self.calls or (remote is not None and remote.live):  # here or on another front end
            raise ProtocolError(f"call_id {start.call_id} is already streaming", CLOSE_POLICY)
        if len(self.calls) >= self.config.max_calls:
            raise ProtocolError("server is at its call limit", CLOSE_TRY_LATER)
        try:
            call = LiveCall(
                start,
                protocol,
                self.worker,
                self.hub if start.persist else None,
                self.config,
                self.metrics,
                self.webhook,
                model=self.model_info,
                front_end=self.front_end,
            )
        except ChannelSelectionError as exc:
            raise ProtocolError(str(exc), CLOSE_POLICY) from None
        except OSError as exc:
            log.error("cannot open timeline file for %s: %s", start.call_id, exc)
            raise ProtocolError("cannot store this call's timeline", CLOSE_INTERNAL) from None
        self.calls[start.call_id] = call
        return call

    def status(self) -> dict:
        """Counters for logs and tests."""
        return {
            "calls": len(self.calls),
            "connections": self.connections,
            "completed": self.completed,
            "errors": self.errors,
            "subscribers": self.hub.subscribers,
            "worker": self.worker.stats.as_dict(),
            "webhook": self.webhook.stats.as_dict() if self.webhook is not None else None,
        }
