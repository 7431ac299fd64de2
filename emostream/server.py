"""``emostream serve``: the asyncio websocket server for live calls.

Websocket routes: ``/v1/pcm``, ``/v1/twilio``, ``/v1/audiohook`` (calls, see
:mod:`emostream.protocols`) and ``/v1/events`` (read-only feed of every live call). Upgrade requests
are authenticated before the handshake (HTTP 401, or 404 for unknown paths, 503 when full).

Plain HTTP routes on the same port (no second server): ``/`` and ``/static/*`` (the supervisor page,
package data in ``emostream/web``), ``/healthz``, ``/readyz``, ``/metrics`` (Prometheus), and for the
page ``/v1/ticket`` (a single-use ticket for ``/v1/events``: browsers cannot send headers on a
websocket, and a token must not travel in a URL), ``/v1/calls`` and ``/v1/calls/<id>``.

Each call gets a :class:`LiveCall`: the channels chosen by ``analyse`` (see
:mod:`emostream.compliance`; the others are dropped here) -> per-channel streaming resampler ->
:class:`StreamWindower` -> :class:`Analyzer` whose model calls go through the one shared
:class:`InferenceWorker`; events fan out to the peer, the call's JSONL file in ``events_dir``
(appended and flushed per line; a summary is written whenever the call ends, also when the peer
vanishes) and the :class:`EventsHub`; alerts also go to the optional webhook (:mod:`emostream.webhook`,
queued, never waited for). One call's bad input closes that call only. Audio is written to disk only
with ``record_dir``. With a ``worker`` given (``serve --ray``: :class:`emostream.scale.RayWorker`)
the model runs on a Ray Serve deployment instead; nothing else changes.
"""
from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import secrets
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from importlib import resources
from pathlib import Path
from typing import IO, Callable
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.datastructures import Headers
from websockets.http11 import Request, Response
from websockets.protocol import State

from . import __version__
from .alerts import AlertRule, AlertTracker
from .analyzer import Analyzer, AnalyzerConfig
from .audio import SAMPLE_RATE, StreamResampler
from .auth import AudioHookKey, NonceCache, token_ok, twilio_signature_ok, verify_audiohook_request
from .compliance import (ANALYSE_CHOICES, ROLE_CHANNELS, CallRecorder, ChannelSelectionError, analysed_channels,
                         expire_recordings, expire_timelines)
from .keepalive import KeepaliveServerConnection
from .logs import set_call_id
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import ServerMetrics, call_outcome
from .protocols import (CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TRY_LATER,
                        Audio, AudioHookSession, End, Note, PcmSession, ProtocolError, Send, Session,
                        Silence, Start, TwilioSession)
from .stream import StreamConfig, StreamWindower
from .timeline import JsonlWriter, iso_utc
from .vad import VadConfig
from .webhook import AlertWebhook, WebhookConfig
from .worker import InferenceWorker, PredictFn, WorkerConfig, WorkerOverloaded

log = logging.getLogger("emostream.server")

CALL_PATHS = {"/v1/pcm": "pcm", "/v1/twilio": "twilio", "/v1/audiohook": "audiohook"}
EVENTS_PATH = "/v1/events"
TICKET_PATH = "/v1/ticket"
CALLS_PATH = "/v1/calls"
TICKET_SECONDS = 30.0           # a /v1/events ticket is valid this long, once
ENDED_CALL_SECONDS = 60.0       # ended calls stay listed (and greyed on the page) this long
RETENTION_CHECK_SECONDS = 3600.0
WEB_FILES = {"index.html": "text/html; charset=utf-8", "app.js": "text/javascript; charset=utf-8",
             "style.css": "text/css; charset=utf-8", "favicon.svg": "image/svg+xml"}
PAGE_HEADERS = {  # the page loads nothing from anywhere but this server
    "Content-Security-Policy": "default-src 'self'; connect-src 'self' ws: wss:; img-src 'self' data:; "
                               "style-src 'self'; script-src 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
}
SILENCE_CHUNK_SECONDS = 1.0     # silence gaps are fed in pieces of this length
GAP_FILL_SECONDS = 6.0          # gaps up to this (one window) are filled with silence; longer ones are
                                # collapsed into one ``gap`` record and the window schedule restarts after them
RECV_QUEUE_FRAMES = 16          # frames a connection buffers before reading pauses (x max_message_bytes)
ENDED_PRUNE_SECONDS = 10.0      # how often ended calls past ENDED_CALL_SECONDS are dropped
AUDIOHOOK_ERROR_GRACE = 5.0     # after a disconnect(error), wait this long for the client's close
SUBSCRIBER_QUEUE = 2000         # messages buffered per /v1/events subscriber before it is dropped
MAX_CLOSE_REASON = 120          # bytes; RFC 6455 allows 123
WEBHOOK_CLOSE_SECONDS = 5.0     # on stop, queued alert POSTs get this long


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``emostream serve`` can be told."""

    host: str = "127.0.0.1"
    port: int = 8765
    token: str | None = None
    max_calls: int = 100
    events_dir: Path | None = None
    hop_seconds: float = 1.0
    min_seconds: float = 1.0
    smooth: float = 1.0
    vad: VadConfig = VadConfig()         # speech gate of every call
    idle_timeout: float = 60.0           # seconds without audio before a call is closed (1001)
    start_timeout: float = 5.0           # seconds from connecting to the call's start (1008)
    max_unstarted: int = 32              # connections not yet started (unauthenticated ones included); more: 503
    ping_interval: float = 20.0          # websocket keepalive ping every this many seconds
    ping_timeout: float = 20.0           # no pong this long (and no backlog on our side): close 1011
    max_events_kept: int = 900           # events per channel a call keeps for the page (the summary counts all)
    max_ended_calls: int = 100           # ended calls the page lists (for ENDED_CALL_SECONDS at most)
    max_call_seconds: float = 4 * 3600.0  # audio (gaps included) one call may stream
    max_message_bytes: int = 256 * 1024  # larger frames close the connection (1009)
    max_subscribers: int = 64
    twilio_auth_token: str | None = None
    public_url: str | None = None        # e.g. wss://calls.example.com, for Twilio signatures
    audiohook_keys: tuple[AudioHookKey, ...] = ()
    supported_languages: tuple[str, ...] = ("en-US", "de-DE")
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    warm_up: bool = False                # warm every batch size up (default: batch 1 only) before /readyz
    analyse: str = "customer"            # customer | agent | all (AI Act: customer only in the EU)
    record_dir: Path | None = None       # write each call's audio here (off unless asked for)
    events_retention_days: float | None = None  # delete timelines in events_dir older than this
    record_retention_days: float | None = None  # delete recordings in record_dir older than this
    alerts: tuple[AlertRule, ...] = ()   # escalation rules applied to every analysed channel
    alert_webhook: WebhookConfig | None = None  # also POST every alert message there

    def __post_init__(self):
        if self.max_calls < 1:
            raise ValueError(f"max calls must be >= 1, got {self.max_calls}")
        if not self.max_call_seconds > 0:
            raise ValueError(f"max call length must be > 0 s, got {self.max_call_seconds}")
        if not self.idle_timeout > 0:
            raise ValueError(f"idle timeout must be > 0 s, got {self.idle_timeout}")
        if not self.start_timeout > 0:
            raise ValueError(f"start timeout must be > 0 s, got {self.start_timeout}")
        if not (self.ping_interval > 0 and self.ping_timeout > 0):
            raise ValueError("keepalive ping interval and timeout must be > 0 s")
        for name in ("max_unstarted", "max_events_kept", "max_ended_calls"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', ' ')} must be >= 1, got {getattr(self, name)}")
        if self.max_message_bytes < 1024:
            raise ValueError("max message size must be at least 1024 bytes")
        StreamConfig(hop_seconds=self.hop_seconds, min_seconds=self.min_seconds)  # validates
        if not 0 < self.smooth <= 1:
            raise ValueError(f"smooth must be in (0, 1], got {self.smooth}")
        if self.analyse not in ANALYSE_CHOICES:
            raise ValueError(f"analyse must be one of {', '.join(ANALYSE_CHOICES)}, got {self.analyse!r}")
        if self.events_retention_days is not None:
            if not self.events_retention_days > 0:
                raise ValueError(f"events retention must be > 0 days, got {self.events_retention_days:g}")
            if self.events_dir is None:
                raise ValueError("events retention needs an events directory")
        if self.record_retention_days is not None:
            if not self.record_retention_days > 0:
                raise ValueError(f"recording retention must be > 0 days, got {self.record_retention_days:g}")
            if self.record_dir is None:
                raise ValueError("recording retention needs --record DIR")


def _response(status: HTTPStatus, body: bytes, content_type: str, extra: dict[str, str] | None = None) -> Response:
    headers = Headers([("Date", email.utils.formatdate(usegmt=True)), ("Connection", "close"),
                       ("Content-Length", str(len(body))), ("Content-Type", content_type),
                       ("Cache-Control", "no-store"), ("X-Content-Type-Options", "nosniff")])
    for name, value in (extra or {}).items():
        headers[name] = value
    return Response(status.value, status.phrase, headers, body)


def _json_response(status: HTTPStatus, body: dict, extra: dict[str, str] | None = None) -> Response:
    return _response(status, json.dumps(body, separators=(",", ":")).encode(), "application/json", extra)


_WEB_CACHE: dict[str, bytes] = {}


def _static_response(name: str) -> Response:
    """A file of the supervisor page (package data ``emostream/web``)."""
    if name not in _WEB_CACHE:
        try:
            _WEB_CACHE[name] = (resources.files("emostream") / "web" / name).read_bytes()
        except (FileNotFoundError, OSError):
            return _json_response(HTTPStatus.NOT_FOUND, {"error": "not found"})
    headers = {k: v for k, v in PAGE_HEADERS.items() if k != "X-Content-Type-Options"}
    return _response(HTTPStatus.OK, _WEB_CACHE[name], WEB_FILES[name], headers)


def closed_reason(closed: ConnectionClosed) -> str:
    """``end_reason`` of a connection that closed under the handler: who closed it and why."""
    sent, rcvd = closed.sent, closed.rcvd
    if sent is not None and (rcvd is None or not closed.rcvd_then_sent):
        return f"server closed: {sent.code} {sent.reason}".rstrip()  # e.g. 1009 too big, 1007 bad UTF-8
    if rcvd is not None:
        return f"peer closed: {rcvd.code} {rcvd.reason}".rstrip()
    return "peer disconnected"  # no close frame: the connection vanished


def _reason(text: str) -> str:
    data = text.encode("utf-8")[:MAX_CLOSE_REASON]
    return data.decode("utf-8", errors="ignore")


class EventsHub:
    """Fan-out of call lifecycle messages and events to ``/v1/events`` subscribers and listeners.

    ``publish`` never blocks: each subscriber has a bounded queue, and one that falls behind is
    disconnected (close 1013) rather than silently losing messages.
    """

    def __init__(self):
        self.calls: dict[str, dict] = {}
        self._queues: dict[asyncio.Queue, str | None] = {}
        self.listeners: list[Callable[[dict], None]] = []
        self.dropped_subscribers = 0

    def subscribe(self, call_id: str | None = None) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._queues[queue] = call_id
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._queues.pop(queue, None)

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    def publish(self, message: dict) -> None:
        call = message.get("call_id") or message.get("stream")
        if message.get("type") == "call_started":
            self.calls[call] = message
        elif message.get("type") == "call_ended":
            self.calls.pop(call, None)
        for listener in self.listeners:
            try:
                listener(message)
            except Exception:  # a display must not break calls
                log.exception("events listener failed")
        for queue, wanted in list(self._queues.items()):
            if wanted is not None and wanted != call:
                continue
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.dropped_subscribers += 1
                self._queues.pop(queue, None)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)  # tells the subscriber's task to close: too slow


@dataclass(frozen=True)
class EndedCall:
    """What the page still gets of an ended call (``GET /v1/calls`` and ``/v1/calls/<id>``): a snapshot
    taken when it ended, so its pipeline (ring buffers, resamplers, speech gate) is freed at once."""

    call_id: str
    ended_at: float | None
    hub: EventsHub | None
    snapshot: dict  # LiveCall.detail() at the end

    @classmethod
    def of(cls, call: "LiveCall") -> "EndedCall":
        return cls(call.call_id, call.ended_at, call.hub, call.detail())

    def listing(self) -> dict:
        return self.snapshot["call"]

    def detail(self) -> dict:
        return self.snapshot


class LiveCall:
    """One call's pipeline: pick analysed channels -> resample -> window -> classify (shared worker) -> sinks."""

    def __init__(self, start: Start, protocol: str, worker: InferenceWorker, hub: EventsHub | None,
                 config: ServerConfig, metrics: ServerMetrics | None = None, webhook: AlertWebhook | None = None,
                 model: dict[str, str] | None = None):
        self.call_id = start.call_id
        self.model = {k: v for k, v in (model or {}).items() if k in ("name", "sha256")}  # named in the summary
        self.protocol = protocol
        self.channels = start.channels
        # Raises ChannelSelectionError before anything is opened: no file, no hub entry.
        analysed = analysed_channels(start.channels, config.analyse, protocol)
        self.analysed = tuple(start.channels[i] for i in analysed)
        self._local = {ch: k for k, ch in enumerate(analysed)}  # protocol channel -> analysed index
        self.worker = worker
        self.hub = hub
        self.metrics = metrics
        self.webhook = webhook
        self.hop_seconds = config.hop_seconds
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.finished = False
        self.max_seconds = config.max_call_seconds
        self.summary: dict | None = None
        self.tail_events: list[dict] = []  # events of the final windows (sent before the summary)
        self.info = start.info
        self._file: IO[str] | None = None
        self._writer: JsonlWriter | None = None
        self.recorder: CallRecorder | None = None
        if config.events_dir is not None and start.persist:
            path = Path(config.events_dir) / f"{start.call_id}.jsonl"
            self._file = open(path, "a", encoding="utf-8")
            self._writer = JsonlWriter(self._file)
        self.path = Path(config.events_dir) / f"{start.call_id}.jsonl" if self._writer else None
        if config.record_dir is not None and start.persist:
            self.recorder = CallRecorder(Path(config.record_dir) / f"{start.call_id}.wav", start.sample_rate,
                                         len(start.channels))
        self.resamplers = [StreamResampler(start.sample_rate, SAMPLE_RATE) for _ in analysed]
        self.windower = StreamWindower(start.call_id, self.analysed,
                                       StreamConfig(hop_seconds=config.hop_seconds, min_seconds=config.min_seconds))
        self.alerts = AlertTracker(config.alerts, start.call_id)
        sinks: list[Callable[[dict], None]] = []
        if self._writer:
            sinks.append(self._writer.write)
        if hub is not None:
            sinks.append(lambda e: hub.publish({"type": "event", **e}))
        if metrics is not None:
            sinks.append(metrics.count_event)
        if config.alerts:
            sinks.append(self._check_alerts)
        self.analyzer = Analyzer(worker.infer, start.call_id, self.analysed,
                                 AnalyzerConfig(smooth=config.smooth, vad=config.vad), config.hop_seconds, sinks,
                                 source_channels=dict(zip(start.channels, start.source_channels)))
        self.analyzer.timeline.max_events = config.max_events_kept  # memory: the file has every event
        self._input = [0] * len(analysed)  # samples per analysed channel at the protocol rate, gaps included
        if hub is not None:
            hub.publish(self.started_message())

    def started_message(self) -> dict:
        """The ``call_started`` message of this call (also the base of its ``/v1/calls`` entry)."""
        return {"type": "call_started", "call_id": self.call_id, "protocol": self.protocol,
                "channels": list(self.channels), "analysed": list(self.analysed), "hop_seconds": self.hop_seconds,
                "started_at": round(self.started_at, 3), "info": self.info}

    def listing(self) -> dict:
        """This call as ``GET /v1/calls`` lists it."""
        return {**self.started_message(), "ended_at": None if self.ended_at is None else round(self.ended_at, 3),
                "end_reason": self.end_reason}

    def detail(self) -> dict:
        """Everything of this call so far, for ``GET /v1/calls/<id>``."""
        order = {ch: k for k, ch in enumerate(self.analysed)}
        events = [e for ch in self.analysed for e in self.analyzer.timeline.events.get(ch, [])]
        events.sort(key=lambda e: (e["t_end"], order[e["channel"]]))
        return {"call": self.listing(), "events": events, "alerts": list(self.alerts.history),
                "summary": self.summary}

    def _check_alerts(self, event: dict) -> None:
        for alert in self.alerts.update(event):
            log.info("alert %s on %s: %s at %.1f s", alert["state"], alert["channel"], alert["rule"], alert["t"])
            if self.metrics is not None and alert["state"] == "raised":
                self.metrics.alerts.labels(alert["rule"]).inc()
            if self._writer:
                self._writer.write(alert)
            if self.hub is not None:
                self.hub.publish(alert)
            if self.webhook is not None:  # queued: never waits for the endpoint
                self.webhook.send(alert)

    def _order(self, window) -> tuple[float, int]:
        return window.end, self.analysed.index(window.channel)

    async def push(self, audio: list[tuple[int, np.ndarray]]) -> list[dict]:
        """``(channel, samples)`` pieces at the protocol's rate (one frame of every channel);
        the windows they complete are classified in one request. Returns their events."""
        rate = self.resamplers[0].orig_rate
        self._check_length(max(len(samples) for _, samples in audio) / rate)
        windows = []
        for channel, samples in audio:
            if self.recorder is not None:
                self.recorder.write(channel, samples)
            local = self._local.get(channel)
            if local is None:  # not analysed: dropped here, never resampled, windowed or classified
                continue
            self._input[local] += len(samples)
            x = self.resamplers[local].push(samples)
            if len(x):
                windows += self.windower.push(local, x)
        if len(windows) > 1:
            windows.sort(key=self._order)
        return await self.analyzer.process_async(windows, self.worker.infer)

    async def silence(self, channel: int | None, samples: int) -> list[dict]:
        """A gap of ``samples`` (protocol rate) on one or every channel: up to ``GAP_FILL_SECONDS``
        fed as silence in short pieces, a longer one collapsed (:meth:`_collapse_gap`)."""
        if channel is None:
            channels = list(range(len(self.analysed)))
        else:
            channels = [self._local[channel]] if channel in self._local else []
        rate = self.resamplers[0].orig_rate
        self._check_length(samples / rate)
        if self.recorder is not None:
            self.recorder.silence(channel, samples)
        if samples > GAP_FILL_SECONDS * rate:
            return await self._collapse_gap(channels, samples)
        for ch in channels:
            self._input[ch] += samples
        piece = int(SILENCE_CHUNK_SECONDS * rate)
        events: list[dict] = []
        for pos in range(0, samples, piece) if channels else ():
            n = min(piece, samples - pos)
            windows = []
            for ch in channels:
                x = self.resamplers[ch].push(np.zeros(n, dtype=np.float32))
                windows += self.windower.push(ch, x) if len(x) else []
            windows.sort(key=self._order)
            events += await self.analyzer.process_async(windows, self.worker.infer)
        return events

    async def _collapse_gap(self, channels: list[int], samples: int) -> list[dict]:
        """A long gap in O(1): each channel's audio before it gets its final window (as at the end of a
        stream), one ``gap`` record per channel goes to the timeline file and ``/v1/events``, and the
        window schedule restarts at the gap's end (on the same clock). Returns the final windows' events."""
        rate = self.resamplers[0].orig_rate
        windows, records = [], []
        for ch in channels:
            x = self.resamplers[ch].flush()
            windows += self.windower.push(ch, x) if len(x) else []
            windower = self.windower.windowers[self.analysed[ch]]
            gap_start = windower.samples_seen
            self._input[ch] += samples
            gap_end = max(gap_start, round(self._input[ch] * SAMPLE_RATE / rate))
            windows += self.windower.skip(ch, gap_end - gap_start)
            self.resamplers[ch] = StreamResampler(rate, SAMPLE_RATE)  # fresh: silence before the new audio
            records.append({"type": "gap", "stream": self.call_id, "channel": self.analysed[ch],
                            "t_start": round(gap_start / SAMPLE_RATE, 6), "t_end": round(gap_end / SAMPLE_RATE, 6)})
        windows.sort(key=self._order)
        events = await self.analyzer.process_async(windows, self.worker.infer)
        for record in records:
            log.info("call %s: gap of %.1f s on %s collapsed", self.call_id, record["t_end"] - record["t_start"],
                     record["channel"])
            if self._writer:
                self._writer.write(record)
            if self.hub is not None:
                self.hub.publish(record)
        return events

    def _check_length(self, more_seconds: float) -> None:
        if self.windower.seconds + more_seconds > self.max_seconds:
            raise ProtocolError(f"call longer than the limit of {self.max_seconds:g} s", CLOSE_POLICY)

    async def finish(self, reason: str) -> dict:
        """End of the call: last windows, summary to the file and the hub; idempotent."""
        if self.finished:
            return self.summary or self.analyzer.timeline.summary()
        self.finished = True
        self.ended_at = time.time()
        self.end_reason = reason
        if self.recorder is not None:
            try:
                self.recorder.close()
            except Exception as exc:
                log.error("call %s: recording not completed: %s", self.call_id, exc)
        events: list[dict] = []
        try:
            windows = []
            for ch, resampler in enumerate(self.resamplers):
                x = resampler.flush()
                windows += self.windower.push(ch, x) if len(x) else []
            windows += self.windower.flush()
            windows.sort(key=self._order)
            events = await self.analyzer.process_async(windows, self.worker.infer)
        except Exception as exc:  # the summary of what we have still gets written
            log.warning("call %s: last windows not classified: %s", self.call_id, exc)
        self.tail_events = events
        if self.metrics is not None:
            self.metrics.calls.labels(self.protocol, call_outcome(reason)).inc()
        summary = self.analyzer.timeline.summary()
        summary["call_id"] = self.call_id
        summary["protocol"] = self.protocol
        summary["end_reason"] = reason
        summary.update(model=self.model, started_at=iso_utc(self.started_at), started_at_from="connection")
        self.summary = summary
        if self._writer:
            try:
                self._writer.write(summary)
            finally:
                self._file.close()
        if self.hub is not None:
            self.hub.publish(summary)
            self.hub.publish({"type": "call_ended", "call_id": self.call_id, "reason": reason})
        return summary


class EmoServer:
    """The websocket server. ``await start()``, then ``await stop()`` (or ``serve_forever``)."""

    def __init__(self, config: ServerConfig, predict: PredictFn | None, device: str = "cpu",
                 model_info: dict[str, str] | None = None, worker: InferenceWorker | None = None):
        """``predict`` runs in the shared in-process worker; or pass a ready ``worker`` with the same
        interface (``emostream.scale.RayWorker``: inference on a Ray Serve deployment)."""
        if worker is None and predict is None:
            raise ValueError("EmoServer needs a predict function or a worker")
        self.config = config
        self.device = device
        self.worker = worker if worker is not None else InferenceWorker(predict, config.worker)
        self.webhook: AlertWebhook | None = None
        self.hub = EventsHub()
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
        self._tickets: dict[str, float] = {}  # single-use /v1/events tickets -> expiry (monotonic)
        self._audiohook_keys = {k.key: k.secret for k in config.audiohook_keys}
        self._nonces = NonceCache()  # AudioHook signatures already accepted: replays are refused
        self._unstarted: set[ServerConnection] = set()  # call connections accepted, call not started yet
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
        self._server = await serve(self._handle, self.config.host, self.config.port,
                                   process_request=self._process_request,
                                   max_size=self.config.max_message_bytes, max_queue=RECV_QUEUE_FRAMES,
                                   ping_interval=self.config.ping_interval, ping_timeout=self.config.ping_timeout,
                                   close_timeout=5, server_header="emostream",
                                   create_connection=KeepaliveServerConnection)
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
        log.info("ready: model warmed up for batch sizes %s in %.1f s",
                 f"1-{self.config.worker.max_batch}" if sizes is None else "1", seconds)

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

    def _prune_ended(self) -> None:
        """Ended calls stay listed ENDED_CALL_SECONDS, and at most ``max_ended_calls`` of them (the newest)."""
        now = time.time()
        for call_id, call in list(self.ended.items()):
            if call.ended_at is None or now - call.ended_at > ENDED_CALL_SECONDS:
                del self.ended[call_id]
        while len(self.ended) > self.config.max_ended_calls:
            del self.ended[next(iter(self.ended))]  # insertion order: the oldest first

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(ENDED_PRUNE_SECONDS)
            self._prune_ended()

    def _metrics_state(self) -> dict:
        live: dict[str, int] = {}
        for call in self.calls.values():
            live[call.protocol] = live.get(call.protocol, 0) + 1
        return {"live_calls": live, "queue": self.worker.pending, "subscribers": self.hub.subscribers,
                "ready": int(self.ready), "dropped": self.worker.stats.refused}

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.stop()

    # -- HTTP stage: plain HTTP routes, then websocket routing, authentication, capacity

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        split = urlsplit(request.path)
        path = split.path.rstrip("/") or "/"
        cfg = self.config
        upgrade = "websocket" in request.headers.get("Upgrade", "").lower()
        if request.method != "GET":
            self.metrics.rejected.labels("method_not_allowed").inc()
            return _json_response(HTTPStatus.METHOD_NOT_ALLOWED, {"error": f"{request.method[:20]} not allowed; use GET"},
                                  {"Allow": "GET"})
        if path not in CALL_PATHS and path != EVENTS_PATH:
            if upgrade:
                self.metrics.rejected.labels("unknown_path").inc()
                return connection.respond(HTTPStatus.NOT_FOUND, "unknown path; use /v1/pcm, /v1/twilio, /v1/audiohook or /v1/events\n")
            return self._http(request, path)
        if not upgrade:
            return _json_response(HTTPStatus.UPGRADE_REQUIRED, {"error": f"{path} is a websocket endpoint"})
        headers = request.headers
        authenticated = cfg.token is None
        if cfg.token is not None and token_ok(cfg.token, headers, request.path):
            authenticated = True
        if path == EVENTS_PATH and not authenticated:
            ticket = parse_qs(split.query).get("ticket", [None])[0]
            if ticket is not None:
                if not self._redeem_ticket(ticket):
                    self.metrics.rejected.labels("bad_ticket").inc()
                    return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized: ticket unknown, used or expired\n")
                authenticated = True
        if path == "/v1/twilio" and cfg.twilio_auth_token:
            url = (cfg.public_url or f"wss://{headers.get('Host', '')}").rstrip("/") + request.path
            if not twilio_signature_ok(cfg.twilio_auth_token, headers.get("X-Twilio-Signature"), url):
                self.metrics.rejected.labels("unauthorized").inc()
                return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            authenticated = True
        elif path == "/v1/audiohook" and self._audiohook_keys:
            failure = verify_audiohook_request(headers, request.path, self._audiohook_keys, nonces=self._nonces)
            if failure is not None:
                log.info("audiohook signature rejected: %s", failure)
                self.metrics.rejected.labels("unauthorized").inc()
                return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            authenticated = True
        if not authenticated and path != "/v1/twilio":  # Twilio may carry the token in start
            self.metrics.rejected.labels("unauthorized").inc()
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        if path in CALL_PATHS and len(self.calls) >= cfg.max_calls:
            self.metrics.rejected.labels("at_capacity").inc()
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server is at its call limit\n")
        if path in CALL_PATHS:
            self._unstarted = {c for c in self._unstarted if c.state is not State.CLOSED}
            if len(self._unstarted) >= cfg.max_unstarted:
                self.metrics.rejected.labels("too_many_unstarted").inc()
                return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections waiting to start\n")
            self._unstarted.add(connection)  # until its call starts or it closes (start_timeout)
        if path == EVENTS_PATH and self.hub.subscribers >= cfg.max_subscribers:
            self.metrics.rejected.labels("too_many_subscribers").inc()
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many event subscribers\n")
        connection.emostream_authenticated = authenticated  # read by _handle
        return None

    def _http(self, request: Request, path: str) -> Response:
        """The plain HTTP routes (GET only: other methods get 405 before this)."""
        if path in ("/", "/index.html"):
            return _static_response("index.html")
        if path.startswith("/static/"):
            name = path[len("/static/"):]
            if name in WEB_FILES:
                return _static_response(name)
        elif path == "/healthz":
            return _json_response(HTTPStatus.OK, {"status": "ok", "version": __version__,
                                                  "uptime_seconds": round(time.time() - self.started_at, 1)})
        elif path == "/readyz":
            reason = None if self.ready else (self.ready_error or "warming up the model")
            body = {"ready": self.ready, "device": self.device, "live_calls": len(self.calls)}
            if reason:
                body["reason"] = reason
            return _json_response(HTTPStatus.OK if self.ready else HTTPStatus.SERVICE_UNAVAILABLE, body)
        elif path in ("/metrics", TICKET_PATH, CALLS_PATH) or path.startswith(CALLS_PATH + "/"):
            if self.config.token is not None and not token_ok(self.config.token, request.headers, request.path):
                self.metrics.rejected.labels("unauthorized").inc()
                return _json_response(HTTPStatus.UNAUTHORIZED, {"error": "unauthorized"},
                                      {"WWW-Authenticate": 'Bearer realm="emostream"'})
            if path == "/metrics":
                return _response(HTTPStatus.OK, self.metrics.render(), METRICS_CONTENT_TYPE)
            if path == TICKET_PATH:
                return _json_response(HTTPStatus.OK, {"ticket": self._issue_ticket(), "expires_in": TICKET_SECONDS})
            self._prune_ended()
            if path == CALLS_PATH:
                calls = [c.listing() for c in self.calls.values() if c.hub is not None]
                calls += [c.listing() for c in self.ended.values() if c.call_id not in self.calls]
                return _json_response(HTTPStatus.OK, {"calls": calls})
            call_id = unquote(path[len(CALLS_PATH) + 1:])
            call = self.calls.get(call_id) or self.ended.get(call_id)
            if call is None or (call.hub is None):
                return _json_response(HTTPStatus.NOT_FOUND, {"error": f"no live or recent call {call_id[:80]!r}"})
            return _json_response(HTTPStatus.OK, call.detail())
        self.metrics.rejected.labels("unknown_path").inc()
        return _json_response(HTTPStatus.NOT_FOUND, {"error": "not found"})

    def _issue_ticket(self) -> str:
        now = time.monotonic()
        for ticket, expiry in list(self._tickets.items()):
            if expiry < now:
                del self._tickets[ticket]
        ticket = secrets.token_urlsafe(24)
        self._tickets[ticket] = now + TICKET_SECONDS
        return ticket

    def _redeem_ticket(self, ticket: str) -> bool:
        expiry = self._tickets.pop(ticket, None)
        return expiry is not None and expiry >= time.monotonic()

    # -- websocket stage

    async def _handle(self, ws: ServerConnection) -> None:
        path = urlsplit(ws.request.path).path.rstrip("/")
        authenticated = getattr(ws, "emostream_authenticated", False)
        self.connections += 1
        try:
            if path == EVENTS_PATH:
                await self._handle_events(ws)
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
        return AudioHookSession(ws.request.headers.get("Audiohook-Session-Id"), self.config.supported_languages,
                                analysable)

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
                    self._unstarted.discard(ws)
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
                        log.info("%s connection %s closed: no start within %g s", protocol, ws.remote_address,
                                 self.config.start_timeout)
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
                            self._unstarted.discard(ws)
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
                    await ws.close(err.code, _reason(str(err)))
            except ConnectionClosed:
                pass
        finally:
            self._unstarted.discard(ws)
            if call is not None:
                self.calls.pop(call.call_id, None)
                if not call.finished:
                    await call.finish(end_reason)
                if call.hub is not None:  # listed (greyed out on the page) for a while
                    self.ended.pop(call.call_id, None)  # re-inserted: the newest
                    self.ended[call.call_id] = EndedCall.of(call)
                    self._prune_ended()

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
        if start.call_id in self.calls:
            raise ProtocolError(f"call_id {start.call_id} is already streaming", CLOSE_POLICY)
        if len(self.calls) >= self.config.max_calls:
            raise ProtocolError("server is at its call limit", CLOSE_TRY_LATER)
        try:
            call = LiveCall(start, protocol, self.worker, self.hub if start.persist else None, self.config,
                            self.metrics, self.webhook, model=self.model_info)
        except ChannelSelectionError as exc:
            raise ProtocolError(str(exc), CLOSE_POLICY) from None
        except OSError as exc:
            log.error("cannot open timeline file for %s: %s", start.call_id, exc)
            raise ProtocolError("cannot store this call's timeline", CLOSE_INTERNAL) from None
        self.calls[start.call_id] = call
        return call

    async def _handle_events(self, ws: ServerConnection) -> None:
        wanted = parse_qs(urlsplit(ws.request.path).query).get("call_id", [None])[0]
        queue = self.hub.subscribe(wanted)

        async def reader() -> None:
            try:
                await ws.recv()
            except ConnectionClosed:
                return
            await ws.close(CLOSE_POLICY, "read-only endpoint")

        read_task = asyncio.create_task(reader())
        try:
            calls = [c for c in self.hub.calls.values() if wanted is None or c["call_id"] == wanted]
            await ws.send(json.dumps({"type": "hello", "calls": calls, "device": self.device}))
            while not read_task.done():
                get = asyncio.create_task(queue.get())
                done, _ = await asyncio.wait({get, read_task}, return_when=asyncio.FIRST_COMPLETED)
                if get not in done:
                    get.cancel()
                    break
                message = get.result()
                if message is None:
                    await ws.close(CLOSE_TRY_LATER, "subscriber too slow")
                    break
                await ws.send(json.dumps(message, separators=(",", ":")))
        except ConnectionClosed:
            pass
        finally:
            self.hub.unsubscribe(queue)
            read_task.cancel()

    def status(self) -> dict:
        """Counters for logs and tests."""
        return {"calls": len(self.calls), "connections": self.connections, "completed": self.completed,
                "errors": self.errors, "subscribers": self.hub.subscribers, "worker": self.worker.stats.as_dict(),
                "webhook": self.webhook.stats.as_dict() if self.webhook is not None else None}
