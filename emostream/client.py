"""``emostream send``: stream a recorded call to a server the way a telephony bridge does.

- ``pcm``: emostream's raw protocol, 20 ms binary frames (``pcm_s16le`` 16 kHz by default, or
  μ-law / A-law 8 kHz), the file's channels interleaved.
- ``twilio``: Twilio Media Streams messages (``connected``, ``start``, ``media`` per track with
  base64 μ-law 8 kHz, ``stop``): channel 0 is the ``inbound`` track, channel 1 ``outbound``. Twilio
  gets no replies, so the client reads the call's events from ``/v1/events?call_id=...``.
- ``audiohook``: Genesys AudioHook v2 client (``open`` offering stereo and mono PCMU 8 kHz, binary
  audio, ``ping``, ``close``), channel 0 = external (customer), 1 = internal (agent); events come
  back as AudioHook ``event`` messages.

Real-time pace unless ``fast``. Every JSON message received is handed to ``on_message``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

import numpy as np
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from .audio import STEREO_NAMES, TELEPHONE_RATE, alaw_encode, channel_names, float32_to_int16, load_audio, mulaw_encode
from .auth import AudioHookKey, sign_audiohook_request
from .keepalive import KeepaliveClientConnection
from .protocols import format_duration

PROTOCOLS = ("pcm", "twilio", "audiohook")
FRAME_MS = 20
AUDIOHOOK_PING_SECONDS = 5.0
REPLY_TIMEOUT = 30.0  # seconds to wait for the summary / closed after the end of the audio


class SendError(Exception):
    """The call could not be sent or was rejected (one-line message)."""


@dataclass(frozen=True)
class SendOptions:
    """How to send a file."""

    protocol: str = "pcm"
    fast: bool = False
    token: str | None = None
    call_id: str | None = None
    encoding: str = "pcm_s16le"  # pcm only: pcm_s16le, mulaw or alaw
    sample_rate: int | None = None  # pcm only: default 16000 (8000 for mulaw/alaw)
    channel_names: tuple[str, ...] | None = None  # the file's channels; default ch0 (mono), agent,customer (stereo)
    audiohook_key: AudioHookKey | None = None  # sign AudioHook requests with this key
    frame_ms: int = FRAME_MS
    abort_after: float | None = None  # stop sending after this many seconds of audio and drop the
    # connection without a close (tests: a vanishing client)


@dataclass
class SendResult:
    """What came back."""

    messages: list[dict] = field(default_factory=list)
    summary: dict | None = None
    close_code: int | None = None
    close_reason: str = ""
    call_id: str = ""

    @property
    def events(self) -> list[dict]:
        return [m for m in self.messages if m.get("type") == "event" and "t_start" in m]


def endpoint_url(url: str, protocol: str, query: dict | None = None) -> str:
    """``ws://host:port`` -> ``ws://host:port/v1/<protocol>`` (a URL with a path is kept)."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise SendError(f"URL must look like ws://HOST:PORT, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else f"/v1/{protocol}"
    q = parts.query
    if query:
        q = (q + "&" if q else "") + urlencode(query)
    return urlunsplit((parts.scheme, parts.netloc, path, q, ""))


def _frames(n: int, rate: int, frame_ms: int):
    step = rate * frame_ms // 1000
    for k, pos in enumerate(range(0, n, step)):
        yield k, pos, min(pos + step, n)


async def _pace(t0: float, k: int, frame_ms: int, fast: bool) -> None:
    if fast:
        if k % 50 == 0:
            await asyncio.sleep(0)
        return
    wait = t0 + k * frame_ms / 1000 - time.monotonic()
    if wait > 0:
        await asyncio.sleep(wait)


async def send_file(
    path: str | Path, url: str, options: SendOptions = SendOptions(), on_message: Callable[[dict], None] | None = None
) -> SendResult:
    """Send ``path`` to the server at ``url``; returns every message received and the summary."""
    if options.protocol not in PROTOCOLS:
        raise SendError(f"unknown protocol {options.protocol!r}; use one of {', '.join(PROTOCOLS)}")
    result = SendResult()

    def received(message: dict) -> None:
        result.messages.append(message)
        if message.get("type") == "summary":
            result.summary = message
        if on_message is not None:
            on_message(message)

    sender = {"pcm": _send_pcm, "twilio": _send_twilio, "audiohook": _send_audiohook}[options.protocol]
    try:
        await sender(Path(path), url, options, received, result)
    except InvalidStatus as exc:
        raise SendError(f"server refused the connection: HTTP {exc.response.status_code}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise SendError(f"cannot connect to {url}: {exc or type(exc).__name__}") from None
    return result


def _bearer(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


async def _reader(ws, received: Callable[[dict], None], result: SendResult) -> None:
    try:
        async for data in ws:
            if isinstance(data, str):
                try:
                    received(json.loads(data))
                except ValueError:
                    pass
    except ConnectionClosed:
        pass
    result.close_code = ws.close_code
    result.close_reason = ws.close_reason or ""


def _abort(ws) -> None:
    ws.transport.abort()  # vanish: no close frame, no stop message


def file_channel_names(path: Path, channels: int, names: tuple[str, ...] | None) -> list[str]:
    """Names of a file's channels: given, or ``ch0`` for mono and ``agent,customer`` for stereo
    (as ``replay --channel-names`` names them in the examples)."""
    try:
        return list(channel_names(names, channels, stereo=STEREO_NAMES))
    except ValueError as exc:
        raise SendError(f"{path} has {channels} channel(s): {exc}") from None


def customer_first(path: Path, audio: np.ndarray, names: tuple[str, ...] | None, protocol: str) -> np.ndarray:
    """A stereo file's channels in the order of the telephony protocols: customer first (Twilio
    ``inbound``, AudioHook ``external``), then agent (``outbound`` / ``internal``)."""
    if audio.shape[0] != 2:
        return audio
    order = file_channel_names(path, 2, names)
    if sorted(order) != sorted(STEREO_NAMES):
        raise SendError(f"{protocol} needs a stereo file's channels named agent and customer, got {','.join(order)}")
    return audio[[order.index("customer"), order.index("agent")]]


async def _send_pcm(path: Path, url: str, opt: SendOptions, received, result: SendResult) -> None:
    rate = opt.sample_rate or (16000 if opt.encoding == "pcm_s16le" else TELEPHONE_RATE)
    audio = load_audio(path, rate)
    channels = audio.shape[0]
    if channels > 2:
        raise SendError(f"{path} has {channels} channels; the pcm protocol takes 1 or 2")
    names = file_channel_names(path, channels, opt.channel_names)
    call_id = opt.call_id or path.stem
    result.call_id = call_id
    pcm = float32_to_int16(audio.T)  # (n, channels) interleaved
    async with connect(
        endpoint_url(url, "pcm"),
        additional_headers=_bearer(opt.token),
        open_timeout=10,
        create_connection=KeepaliveClientConnection,
        max_size=2**22,
    ) as ws:
        await ws.send(
            json.dumps(
                {
                    "type": "start",
                    "call_id": call_id,
                    "sample_rate": rate,
                    "channels": channels,
                    "encoding": opt.encoding,
                    "channel_names": names,
                }
            )
        )
        reader = asyncio.create_task(_reader(ws, received, result))
        t0 = time.monotonic()
        try:
            for k, a, b in _frames(pcm.shape[0], rate, opt.frame_ms):
                await _pace(t0, k, opt.frame_ms, opt.fast)
                if opt.abort_after is not None and a >= opt.abort_after * rate:
                    _abort(ws)
                    return
                if reader.done():
                    break
                block = pcm[a:b]
                if opt.encoding == "mulaw":
                    data = mulaw_encode(block.reshape(-1)).tobytes()
                elif opt.encoding == "alaw":
                    data = alaw_encode(block.reshape(-1)).tobytes()
                else:
                    data = block.astype("<i2").tobytes()
                await ws.send(data)
            if not reader.done():
                await ws.send(json.dumps({"type": "stop"}))
        except ConnectionClosed:
            pass
        await asyncio.wait_for(reader, REPLY_TIMEOUT)


async def _send_twilio(path: Path, url: str, opt: SendOptions, received, result: SendResult) -> None:
    audio = load_audio(path, TELEPHONE_RATE)
    if audio.shape[0] > 2:
        raise SendError(f"{path} has {audio.shape[0]} channels; Twilio streams at most 2 tracks")
    audio = customer_first(path, audio, opt.channel_names, "twilio")
    tracks = ["inbound", "outbound"][: audio.shape[0]]
    call_sid = "CA" + uuid.uuid4().hex
    stream_sid = "MZ" + uuid.uuid4().hex
    call_id = opt.call_id or call_sid
    result.call_id = call_id
    codes = [mulaw_encode(float32_to_int16(ch)) for ch in audio]
    params = {"call_id": call_id}
    if opt.token:
        params["token"] = opt.token
    parts = urlsplit(endpoint_url(url, "twilio"))
    events_url = urlunsplit((parts.scheme, parts.netloc, "/v1/events", urlencode({"call_id": call_id}), ""))
    done = asyncio.Event()

    def on_event(message: dict) -> None:
        if message.get("type") == "hello":
            return
        if message.get("type") in ("event", "summary"):
            received(message)
        if message.get("type") in ("summary", "call_ended"):
            done.set()

    async with connect(
        events_url, additional_headers=_bearer(opt.token), open_timeout=10, create_connection=KeepaliveClientConnection
    ) as events_ws:
        hello = json.loads(await asyncio.wait_for(events_ws.recv(), 10))
        if hello.get("type") != "hello":
            raise SendError("unexpected first message from /v1/events")
        events_task = asyncio.create_task(_hub_reader(events_ws, on_event, done))
        async with connect(
            endpoint_url(url, "twilio"), open_timeout=10, create_connection=KeepaliveClientConnection
        ) as ws:
            seq = 0

            async def emit(message: dict) -> None:
                nonlocal seq
                if message["event"] != "connected":  # every later message is numbered from 1
                    seq += 1
                    message = {
                        "event": message["event"],
                        "sequenceNumber": str(seq),
                        **message,
                        "streamSid": stream_sid,
                    }
                await ws.send(json.dumps(message))

            await emit({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            await emit(
                {
                    "event": "start",
                    "start": {
                        "accountSid": "AC" + uuid.uuid4().hex,
                        "streamSid": stream_sid,
                        "callSid": call_sid,
                        "tracks": tracks,
                        "customParameters": params,
                        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": TELEPHONE_RATE, "channels": 1},
                    },
                }
            )
            closed = asyncio.create_task(ws.wait_closed())
            t0 = time.monotonic()
            try:
                for k, a, b in _frames(audio.shape[1], TELEPHONE_RATE, opt.frame_ms):
                    await _pace(t0, k, opt.frame_ms, opt.fast)
                    if opt.abort_after is not None and a >= opt.abort_after * TELEPHONE_RATE:
                        _abort(ws)
                        return
                    if closed.done():
                        break
                    for track, c in zip(tracks, codes):
                        await emit(
                            {
                                "event": "media",
                                "media": {
                                    "track": track,
                                    "chunk": str(k + 1),
                                    "timestamp": str(a * 1000 // TELEPHONE_RATE),
                                    "payload": base64.b64encode(c[a:b].tobytes()).decode("ascii"),
                                },
                            }
                        )
                if not closed.done():
                    await emit({"event": "stop", "stop": {"accountSid": "", "callSid": call_sid}})
                    await asyncio.wait_for(ws.wait_closed(), REPLY_TIMEOUT)
            except ConnectionClosed:
                pass
            result.close_code, result.close_reason = ws.close_code, ws.close_reason or ""
        if result.close_code == 1000:
            try:
                await asyncio.wait_for(done.wait(), REPLY_TIMEOUT)
            except asyncio.TimeoutError:
                pass
        events_task.cancel()


async def _hub_reader(ws, on_event, done: asyncio.Event) -> None:
    try:
        async for data in ws:
            on_event(json.loads(data))
    except (ConnectionClosed, asyncio.CancelledError):
        pass
    finally:
        done.set()


async def _send_audiohook(path: Path, url: str, opt: SendOptions, received, result: SendResult) -> None:
    audio = load_audio(path, TELEPHONE_RATE)
    if audio.shape[0] > 2:
        raise SendError(f"{path} has {audio.shape[0]} channels; AudioHook streams at most 2")
    audio = customer_first(path, audio, opt.channel_names, "audiohook")
    session_id = str(uuid.uuid4())
    result.call_id = session_id
    target = endpoint_url(url, "audiohook")
    parts = urlsplit(target)
    headers = {
        "Audiohook-Organization-Id": str(uuid.uuid4()),
        "Audiohook-Correlation-Id": str(uuid.uuid4()),
        "Audiohook-Session-Id": session_id,
    }
    if opt.audiohook_key is not None:
        headers["X-API-KEY"] = opt.audiohook_key.key
        if opt.audiohook_key.secret:
            signed = {**headers, "Host": parts.netloc}
            request_target = parts.path + ("?" + parts.query if parts.query else "")
            sign_audiohook_request(signed, request_target, opt.audiohook_key.key, opt.audiohook_key.secret)
            headers["Signature-Input"], headers["Signature"] = signed["Signature-Input"], signed["Signature"]
    elif opt.token:
        headers["X-API-KEY"] = opt.token
    stereo = audio.shape[0] == 2
    offers = (
        [{"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000}] if stereo else []
    ) + [{"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}]
    codes = np.stack([mulaw_encode(float32_to_int16(ch)) for ch in audio])
    state = {"seq": 0, "serverseq": 0, "position": 0}
    opened = asyncio.Event()
    closed = asyncio.Event()
    media: list = []

    def on_server(message: dict) -> None:
        state["serverseq"] = max(state["serverseq"], int(message.get("seq", 0) or 0))
        kind = message.get("type")
        params = message.get("parameters") or {}
        if kind == "opened":
            media.extend(params.get("media") or [])
            opened.set()
        elif kind == "event":
            for entity in params.get("entities") or []:
                data = entity.get("data") or {}
                if entity.get("type") == "emostream.emotion":
                    received(
                        {
                            "type": "event",
                            "stream": session_id,
                            **{k: v for k, v in data.items() if k not in ("offset", "duration")},
                            "t_start": float(data["offset"][2:-1]),
                            "t_end": float(data["offset"][2:-1]) + float(data["duration"][2:-1]),
                        }
                    )
                elif entity.get("type") == "emostream.summary":
                    received(data)
        elif kind == "disconnect":
            info = params.get("info") or params.get("reason")
            received({"type": "error", "message": f"disconnect: {info}"})
            closed.set()
        elif kind == "closed":
            closed.set()

    async def reader(ws) -> None:
        try:
            async for data in ws:
                if isinstance(data, str):
                    on_server(json.loads(data))
        except ConnectionClosed:
            pass
        opened.set()
        closed.set()

    async with connect(
        target, additional_headers=headers, open_timeout=10, max_size=2**22, create_connection=KeepaliveClientConnection
    ) as ws:

        async def message(kind: str, parameters: dict) -> None:
            state["seq"] += 1
            await ws.send(
                json.dumps(
                    {
                        "version": "2",
                        "type": kind,
                        "seq": state["seq"],
                        "serverseq": state["serverseq"],
                        "id": session_id,
                        "position": format_duration(state["position"] / TELEPHONE_RATE),
                        "parameters": parameters,
                    }
                )
            )

        task = asyncio.create_task(reader(ws))
        await message(
            "open",
            {
                "organizationId": headers["Audiohook-Organization-Id"],
                "conversationId": str(uuid.uuid4()),
                "participant": {
                    "id": str(uuid.uuid4()),
                    "ani": "+15551230000",
                    "aniName": "emostream send",
                    "dnis": "+15559870000",
                },
                "media": offers,
                "language": "en-US",
            },
        )
        await asyncio.wait_for(opened.wait(), REPLY_TIMEOUT)
        try:
            if media and not closed.is_set():
                chans = [0, 1] if len(media[0]["channels"]) == 2 else [0]
                t0 = time.monotonic()
                next_ping = AUDIOHOOK_PING_SECONDS
                for k, a, b in _frames(codes.shape[1], TELEPHONE_RATE, opt.frame_ms):
                    await _pace(t0, k, opt.frame_ms, opt.fast)
                    if opt.abort_after is not None and a >= opt.abort_after * TELEPHONE_RATE:
                        _abort(ws)
                        return
                    if closed.is_set():
                        break
                    await ws.send(codes[chans, a:b].T.reshape(-1).tobytes())
                    state["position"] = b
                    if b / TELEPHONE_RATE >= next_ping:
                        next_ping += AUDIOHOOK_PING_SECONDS
                        await message("ping", {})
            if not closed.is_set():
                await message("close", {"reason": "end"})
            await asyncio.wait_for(closed.wait(), REPLY_TIMEOUT)
        except ConnectionClosed:
            pass
        await ws.close()
        await asyncio.wait_for(task, REPLY_TIMEOUT)
        result.close_code, result.close_reason = ws.close_code, ws.close_reason or ""
