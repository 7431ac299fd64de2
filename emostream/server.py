"""``emostream serve``: the asyncio websocket server for live calls.

Routes: ``/v1/pcm``, ``/v1/twilio``, ``/v1/audiohook`` (calls, see :mod:`emostream.protocols`) and
``/v1/events`` (read-only feed of every live call). Upgrade requests are authenticated before the
handshake (HTTP 401, or 404 for unknown paths, 503 when full). Each call gets a :class:`LiveCall`:
per-channel streaming resampler -> :class:`StreamWindower` -> :class:`Analyzer` whose model calls go
through the one shared :class:`InferenceWorker`; events fan out to the peer, the call's JSONL file in
``events_dir`` (appended and flushed per line; a summary is written whenever the call ends, also when
the peer vanishes) and the :class:`EventsHub`. One call's bad input closes that call only.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import IO, Callable
from urllib.parse import parse_qs, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .analyzer import Analyzer, AnalyzerConfig
from .audio import SAMPLE_RATE, StreamResampler
from .auth import AudioHookKey, token_ok, twilio_signature_ok, verify_audiohook_request
from .protocols import (CLOSE_GOING_AWAY, CLOSE_INTERNAL, CLOSE_NORMAL, CLOSE_POLICY, CLOSE_TRY_LATER,
                        Audio, AudioHookSession, End, Note, PcmSession, ProtocolError, Send, Session,
                        Silence, Start, TwilioSession)
from .stream import StreamConfig, StreamWindower
from .timeline import JsonlWriter
from .vad import VadConfig
from .worker import InferenceWorker, PredictFn, WorkerConfig, WorkerOverloaded

log = logging.getLogger("emostream.server")

CALL_PATHS = {"/v1/pcm": "pcm", "/v1/twilio": "twilio", "/v1/audiohook": "audiohook"}
EVENTS_PATH = "/v1/events"
SILENCE_CHUNK_SECONDS = 1.0     # silence gaps are fed in pieces of this length
AUDIOHOOK_ERROR_GRACE = 5.0     # after a disconnect(error), wait this long for the client's close
SUBSCRIBER_QUEUE = 2000         # messages buffered per /v1/events subscriber before it is dropped
MAX_CLOSE_REASON = 120          # bytes; RFC 6455 allows 123


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
    idle_timeout: float = 60.0           # seconds without a frame before a call is closed
    max_call_seconds: float = 4 * 3600.0  # audio (gaps included) one call may stream
    max_message_bytes: int = 256 * 1024  # larger frames close the connection (1009)
    max_subscribers: int = 64
    twilio_auth_token: str | None = None
    public_url: str | None = None        # e.g. wss://calls.example.com, for Twilio signatures
    audiohook_keys: tuple[AudioHookKey, ...] = ()
    supported_languages: tuple[str, ...] = ("en-US", "de-DE")
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    warm_up: bool = False                # run every batch size once before listening

    def __post_init__(self):
        if self.max_calls < 1:
            raise ValueError(f"max calls must be >= 1, got {self.max_calls}")
        if not self.max_call_seconds > 0:
            raise ValueError(f"max call length must be > 0 s, got {self.max_call_seconds}")
        if not self.idle_timeout > 0:
            raise ValueError(f"idle timeout must be > 0 s, got {self.idle_timeout}")
        if self.max_message_bytes < 1024:
            raise ValueError("max message size must be at least 1024 bytes")
        StreamConfig(hop_seconds=self.hop_seconds, min_seconds=self.min_seconds)  # validates
        if not 0 < self.smooth <= 1:
            raise ValueError(f"smooth must be in (0, 1], got {self.smooth}")


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


class LiveCall:
    """One call's pipeline: resample -> window -> classify (shared worker) -> sinks."""

    def __init__(self, start: Start, protocol: str, worker: InferenceWorker, hub: EventsHub | None,
                 config: ServerConfig):
        self.call_id = start.call_id
        self.protocol = protocol
        self.channels = start.channels
        self.worker = worker
        self.hub = hub
        self.started_at = time.time()
        self.finished = False
        self.max_seconds = config.max_call_seconds
        self.summary: dict | None = None
        self.tail_events: list[dict] = []  # events of the final windows (sent before the summary)
        self._file: IO[str] | None = None
        self._writer: JsonlWriter | None = None
        if config.events_dir is not None and start.persist:
            path = Path(config.events_dir) / f"{start.call_id}.jsonl"
            self._file = open(path, "a", encoding="utf-8")
            self._writer = JsonlWriter(self._file)
        self.path = Path(config.events_dir) / f"{start.call_id}.jsonl" if self._writer else None
        self.resamplers = [StreamResampler(start.sample_rate, SAMPLE_RATE) for _ in start.channels]
        self.windower = StreamWindower(start.call_id, start.channels,
                                       StreamConfig(hop_seconds=config.hop_seconds, min_seconds=config.min_seconds))
        sinks = []
        if self._writer:
            sinks.append(self._writer.write)
        if hub is not None:
            sinks.append(lambda e: hub.publish({"type": "event", **e}))
        self.analyzer = Analyzer(worker.infer, start.call_id, start.channels,
                                 AnalyzerConfig(smooth=config.smooth, vad=config.vad), config.hop_seconds, sinks)
        if hub is not None:
            hub.publish({"type": "call_started", "call_id": self.call_id, "protocol": protocol,
                         "channels": list(self.channels), "hop_seconds": config.hop_seconds,
                         "started_at": round(self.started_at, 3), "info": start.info})

    async def push(self, audio: list[tuple[int, np.ndarray]]) -> list[dict]:
        """``(channel, samples)`` pieces at the protocol's rate (one frame of every channel);
        the windows they complete are classified in one request. Returns their events."""
        rate = self.resamplers[0].orig_rate
        self._check_length(max(len(samples) for _, samples in audio) / rate)
        windows = []
        for channel, samples in audio:
            x = self.resamplers[channel].push(samples)
            if len(x):
                windows += self.windower.push(channel, x)
        if len(audio) > 1:
            windows.sort(key=lambda w: (w.end, self.channels.index(w.channel)))
        return await self.analyzer.process_async(windows, self.worker.infer)

    async def silence(self, channel: int | None, samples: int) -> list[dict]:
        """A gap of ``samples`` (protocol rate) on one or every channel, fed in short pieces."""
        channels = range(len(self.channels)) if channel is None else [channel]
        rate = self.resamplers[0].orig_rate
        self._check_length(samples / rate)
        piece = int(SILENCE_CHUNK_SECONDS * rate)
        events: list[dict] = []
        for pos in range(0, samples, piece):
            n = min(piece, samples - pos)
            windows = []
            for ch in channels:
                x = self.resamplers[ch].push(np.zeros(n, dtype=np.float32))
                windows += self.windower.push(ch, x) if len(x) else []
            windows.sort(key=lambda w: (w.end, self.channels.index(w.channel)))
            events += await self.analyzer.process_async(windows, self.worker.infer)
        return events

    def _check_length(self, more_seconds: float) -> None:
        if self.windower.seconds + more_seconds > self.max_seconds:
            raise ProtocolError(f"call longer than the limit of {self.max_seconds:g} s", CLOSE_POLICY)

    async def finish(self, reason: str) -> dict:
        """End of the call: last windows, summary to the file and the hub; idempotent."""
        if self.finished:
            return self.summary or self.analyzer.timeline.summary()
        self.finished = True
        events: list[dict] = []
        try:
            windows = []
            for ch, resampler in enumerate(self.resamplers):
                x = resampler.flush()
                windows += self.windower.push(ch, x) if len(x) else []
            windows += self.windower.flush()
            windows.sort(key=lambda w: (w.end, self.channels.index(w.channel)))
            events = await self.analyzer.process_async(windows, self.worker.infer)
        except Exception as exc:  # the summary of what we have still gets written
            log.warning("call %s: last windows not classified: %s", self.call_id, exc)
        self.tail_events = events
        summary = self.analyzer.timeline.summary()
        summary["call_id"] = self.call_id
        summary["protocol"] = self.protocol
        summary["end_reason"] = reason
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

    def __init__(self, config: ServerConfig, predict: PredictFn, device: str = "cpu"):
        self.config = config
        self.device = device
        self.worker = InferenceWorker(predict, config.worker)
        self.hub = EventsHub()
        self.calls: dict[str, LiveCall] = {}
        self.connections = 0
        self.completed = 0
        self.errors = 0
        self._server = None
        self._audiohook_keys = {k.key: k.secret for k in config.audiohook_keys}
        if config.events_dir is not None:
            Path(config.events_dir).mkdir(parents=True, exist_ok=True)

    # -- lifecycle

    async def start(self) -> int:
        """Listen; returns the bound port (useful with port 0)."""
        await self.worker.start()
        if self.config.warm_up:
            seconds = await self.worker.warm_up()
            log.info("model warmed up for batches 1-%d in %.1f s", self.config.worker.max_batch, seconds)
        self._server = await serve(self._handle, self.config.host, self.config.port,
                                   process_request=self._process_request,
                                   max_size=self.config.max_message_bytes, max_queue=64,
                                   ping_interval=20, ping_timeout=20, close_timeout=5,
                                   server_header="emostream")
        sock = next(iter(self._server.sockets))
        return sock.getsockname()[1]

    async def stop(self) -> None:
        """Close every connection (calls finish and write their summaries), then the worker."""
        if self._server is not None:
            self._server.close(close_connections=True)
            await self._server.wait_closed()
            self._server = None
        for call in list(self.calls.values()):
            await call.finish("server stopped")
        await self.worker.stop()

    async def serve_forever(self) -> None:
        await self.start()
        try:
            await asyncio.Future()
        finally:
            await self.stop()

    # -- HTTP stage: routing, authentication, capacity

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path.rstrip("/") or "/"
        cfg = self.config
        if path not in CALL_PATHS and path != EVENTS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "unknown path; use /v1/pcm, /v1/twilio, /v1/audiohook or /v1/events\n")
        headers = request.headers
        authenticated = cfg.token is None
        if cfg.token is not None and token_ok(cfg.token, headers, request.path):
            authenticated = True
        if path == "/v1/twilio" and cfg.twilio_auth_token:
            url = (cfg.public_url or f"wss://{headers.get('Host', '')}").rstrip("/") + request.path
            if not twilio_signature_ok(cfg.twilio_auth_token, headers.get("X-Twilio-Signature"), url):
                return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            authenticated = True
        elif path == "/v1/audiohook" and self._audiohook_keys:
            failure = verify_audiohook_request(headers, request.path, self._audiohook_keys)
            if failure is not None:
                log.info("audiohook signature rejected: %s", failure)
                return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
            authenticated = True
        if not authenticated and path != "/v1/twilio":  # Twilio may carry the token in start
            return connection.respond(HTTPStatus.UNAUTHORIZED, "unauthorized\n")
        if path in CALL_PATHS and len(self.calls) >= cfg.max_calls:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "server is at its call limit\n")
        if path == EVENTS_PATH and self.hub.subscribers >= cfg.max_subscribers:
            return connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many event subscribers\n")
        connection.emostream_authenticated = authenticated  # read by _handle
        return None

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
        return AudioHookSession(ws.request.headers.get("Audiohook-Session-Id"), self.config.supported_languages)

    async def _handle_call(self, ws: ServerConnection, protocol: str, authenticated: bool) -> None:
        session = self._session(protocol, ws, authenticated)
        call: LiveCall | None = None
        end_reason = "peer disconnected"

        async def send(message: dict | None) -> None:
            if message is not None:
                await ws.send(json.dumps(message, separators=(",", ":")))

        async def deliver(events: list[dict]) -> None:
            for event in events:
                await send(session.event_message(event))

        try:
            while True:
                try:
                    data = await asyncio.wait_for(ws.recv(), self.config.idle_timeout)
                except asyncio.TimeoutError:
                    end_reason = "idle timeout"
                    await ws.close(CLOSE_GOING_AWAY, f"idle for {self.config.idle_timeout:g} s")
                    return
                except ConnectionClosed:
                    return
                try:
                    actions = session.on_text(data) if isinstance(data, str) else session.on_binary(data)
                    audio: list[tuple[int, np.ndarray]] = []  # consecutive Audio: classified together
                    for action in actions + [None]:
                        if isinstance(action, Audio):
                            audio.append((action.channel, action.samples))
                            continue
                        if audio and call is not None:
                            await deliver(await call.push(audio))
                        audio = []
                        if action is None:
                            break
                        if isinstance(action, Silence):
                            if call is not None:
                                await deliver(await call.silence(action.channel, action.samples))
                        elif isinstance(action, Send):
                            await send(action.message)
                        elif isinstance(action, Start):
                            call = self._open_call(action, protocol)
                        elif isinstance(action, Note):
                            log.info("call %s: %s", call.call_id if call else "-", action.text)
                        elif isinstance(action, End):
                            end_reason = "completed" if action.reason in ("stop", "close") else action.reason
                            summary = None
                            if call is not None:
                                summary = await call.finish(end_reason)
                                await deliver(call.tail_events)
                                self.completed += 1
                            for message in session.summary_messages(summary):
                                await send(message)
                            await ws.close(CLOSE_NORMAL, "end of call")
                            return
                except WorkerOverloaded as exc:
                    raise ProtocolError(f"server overloaded: {exc}", CLOSE_TRY_LATER) from None
        except ProtocolError as err:
            self.errors += 1
            end_reason = f"error: {err}"
            log.info("%s call %s closed: %s", protocol, call.call_id if call else "-", err)
            try:
                for message in session.error_messages(err):
                    await send(message)
                if session.graceful_errors and err.code not in (CLOSE_POLICY, CLOSE_TRY_LATER):
                    # AudioHook: the client answers disconnect with close; keep serving it briefly
                    await self._audiohook_after_error(ws, session, call, send)
                else:
                    await ws.close(err.code, _reason(str(err)))
            except ConnectionClosed:
                pass
        finally:
            if call is not None:
                self.calls.pop(call.call_id, None)
                if not call.finished:
                    await call.finish(end_reason)

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
            call = LiveCall(start, protocol, self.worker, self.hub if start.persist else None, self.config)
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
                "errors": self.errors, "subscribers": self.hub.subscribers, "worker": self.worker.stats.as_dict()}
