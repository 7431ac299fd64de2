"""Bridge protocols as pure state machines: frames in, actions out (no I/O).

A session turns each websocket frame of one call into a list of actions for the server:
:class:`Start` (a call with named channels begins), :class:`Audio` (float32 samples of one channel
at the session's sample rate), :class:`Silence` (a gap to fill so the channel clock stays on the
peer's clock), :class:`Send` (a JSON reply), :class:`Note` (something to log) and :class:`End`
(the peer ended the call). Bad input raises :class:`ProtocolError` with a websocket close code and
a one-line reason. The server owns sockets, models and files; these classes only keep protocol state.

- :class:`PcmSession` - ``/v1/pcm``: emostream's raw bridge protocol (JSON start/stop + binary PCM).
- :class:`TwilioSession` - ``/v1/twilio``: Twilio Media Streams (``connected``, ``start``,
  ``media``, ``dtmf``, ``mark``, ``stop``); each track is a channel.
- :class:`AudioHookSession` - ``/v1/audiohook``: server side of Genesys AudioHook protocol v2.
"""
from __future__ import annotations

import base64
import binascii
import hmac
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from .audio import TELEPHONE_RATE, alaw_decode, int16_to_float32, mulaw_decode

# --- websocket close codes (RFC 6455 section 7.4.1) --------------------------------------------
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID = 1007      # malformed or out-of-protocol data
CLOSE_POLICY = 1008       # authentication / policy
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013    # capacity

SUPPORTED_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
PCM_ENCODINGS = {"pcm_s16le": 2, "mulaw": 1, "alaw": 1}  # bytes per sample
CALL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch
MAX_CHANNEL_NAME = 64
MAX_GAP_SECONDS = 3600.0       # longest gap one message may claim (longer: close 1007)
TWILIO_GAP_TOLERANCE_MS = 40   # timestamp jitter below this is not a gap
NULL_UUID = "00000000-0000-0000-0000-000000000000"
UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")  # fullmatch
DURATION_PATTERN = re.compile(r"PT(\d*\.)?\d+S")  # fullmatch
AUDIOHOOK_MAX_TEXT = 65535
AUDIOHOOK_RATE = 8000
AUDIOHOOK_FORMATS = {"PCMU": 1, "L16": 2}  # bytes per sample
AUDIOHOOK_CHANNEL_NAMES = {"external": "customer", "internal": "agent"}
TWILIO_TRACKS = ("inbound", "outbound")
TWILIO_CHANNEL_NAMES = {"inbound": "customer", "outbound": "agent"}  # one vocabulary in every event
TWILIO_ENCODING = "audio/x-mulaw"


class ProtocolError(Exception):
    """Bad input from the peer: ``code`` is the websocket close code, ``str(err)`` the reason."""

    def __init__(self, message: str, code: int = CLOSE_INVALID):
        super().__init__(message)
        self.code = code


# --- actions -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Start:
    """A call begins: ``channels`` names in channel order, audio at ``sample_rate``."""

    call_id: str
    channels: tuple[str, ...]
    sample_rate: int
    info: dict = field(default_factory=dict)
    persist: bool = True  # False for AudioHook connection probes: no timeline file, no hub entry
    source_channels: tuple[str, ...] = ()  # the bridge's own names (Twilio tracks, AudioHook channels)


@dataclass(frozen=True)
class Audio:
    """Samples (float32 in [-1, 1], at the session rate) for channel index ``channel``."""

    channel: int
    samples: np.ndarray


@dataclass(frozen=True)
class Silence:
    """``samples`` of silence for channel ``channel`` (``None``: every channel)."""

    channel: int | None
    samples: int


@dataclass(frozen=True)
class Send:
    """A JSON message to send back to the peer."""

    message: dict


@dataclass(frozen=True)
class Note:
    """A protocol event worth logging (DTMF, marks, pauses, client errors)."""

    text: str


@dataclass(frozen=True)
class End:
    """The peer ended the call cleanly."""

    reason: str


Action = Union[Start, Audio, Silence, Send, Note, End]


# --- helpers -----------------------------------------------------------------------------------

def parse_json_object(text: str | bytes, what: str = "message") -> dict:
    """A JSON object from a text frame, or a :class:`ProtocolError` saying what is wrong."""
    try:
        obj = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"malformed JSON in {what}: {str(exc).splitlines()[0][:80]}") from None
    except RecursionError:  # e.g. 100,000 "[": nested deeper than the parser goes
        raise ProtocolError(f"malformed JSON in {what}: nested too deeply") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"{what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def valid_call_id(call_id: Any) -> bool:
    """Call ids become file names: letters, digits, ``.``, ``_``, ``-``; at most 128 characters."""
    return isinstance(call_id, str) and bool(CALL_ID_PATTERN.fullmatch(call_id)) and ".." not in call_id


def deinterleave(pcm: np.ndarray, channels: int) -> list[np.ndarray]:
    """Interleaved samples ``(n * channels,)`` to one array per channel."""
    return [np.ascontiguousarray(pcm[i::channels]) for i in range(channels)]


def check_gap(seconds: float, what: str) -> None:
    """What one message may claim: a gap longer than ``MAX_GAP_SECONDS`` is bad input (1007)."""
    if seconds > MAX_GAP_SECONDS:
        raise ProtocolError(f"{what} jumps {seconds:.0f} s ahead (limit {MAX_GAP_SECONDS:g} s per message)")


def format_duration(seconds: float) -> str:
    """ISO 8601 duration in seconds as AudioHook writes it, e.g. ``PT12.5S``."""
    text = f"{max(0.0, float(seconds)):.3f}".rstrip("0").rstrip(".")
    return f"PT{text}S"


def parse_duration(value: Any) -> float:
    """Seconds of an AudioHook duration (``PT1.25S``); :class:`ProtocolError` if malformed."""
    if not isinstance(value, str) or not DURATION_PATTERN.fullmatch(value):
        raise ProtocolError(f"invalid duration {str(value)[:40]!r} (expected PT<seconds>S)")
    seconds = float(value[2:-1])
    if not math.isfinite(seconds):
        raise ProtocolError(f"duration {value[:40]!r} out of range")
    return seconds


class Session:
    """Common shape of the protocol sessions (see the module docstring)."""

    protocol = "base"
    graceful_errors = False  # True: after an error, keep reading until the peer closes (AudioHook)

    def __init__(self):
        self.sample_rate = 0
        self.channels: tuple[str, ...] = ()
        self.started = False
        self.not_analysed = False  # the peer's call was accepted but nothing in it may be analysed

    @property
    def established(self) -> bool:
        """The peer has started (the server's start deadline no longer applies)."""
        return self.started

    @property
    def expects_audio(self) -> bool:
        """Audio should be flowing (the server's idle timeout counts audio only while this holds)."""
        return self.started

    def on_text(self, text: str) -> list[Action]:
        raise NotImplementedError

    def on_binary(self, data: bytes) -> list[Action]:
        raise NotImplementedError

    def event_message(self, event: dict) -> dict | None:
        """The reply carrying one timeline event, or ``None`` if the peer gets no replies."""
        return None

    def summary_messages(self, summary: dict | None) -> list[dict]:
        """Replies at the clean end of the call."""
        return []

    def error_messages(self, error: ProtocolError) -> list[dict]:
        """Replies that explain an error before the connection is closed."""
        return []


# --- /v1/pcm ---------------------------------------------------------------------------------

class PcmSession(Session):
    """emostream's raw bridge protocol.

    ``{"type": "start", "call_id", "sample_rate", "channels", "encoding", "channel_names"}``, then
    binary frames (interleaved when stereo), then ``{"type": "stop"}``. Replies: ``started``, one
    ``event`` per window, a final ``summary``; ``error`` before a close with a reason.
    """

    protocol = "pcm"

    def __init__(self):
        super().__init__()
        self.encoding = ""
        self.ended = False
        self._frame_bytes = 0

    def on_text(self, text: str) -> list[Action]:
        msg = parse_json_object(text)
        kind = msg.get("type")
        if kind == "start":
            return self._start(msg)
        if kind == "stop":
            if not self.started:
                raise ProtocolError("stop before start")
            self.ended = True
            return [End("stop")]
        if not isinstance(kind, str):
            raise ProtocolError('message needs a string "type" ("start" or "stop")')
        raise ProtocolError(f"unknown message type {kind[:40]!r} (expected start or stop)")

    def _start(self, msg: dict) -> list[Action]:
        if self.started:
            raise ProtocolError("duplicate start message")
        call_id = msg.get("call_id")
        if not valid_call_id(call_id):
            raise ProtocolError("call_id must be 1-128 letters, digits, '.', '_' or '-'")
        rate = msg.get("sample_rate")
        if not _int(rate) or rate not in SUPPORTED_RATES:
            raise ProtocolError(f"sample_rate {str(rate)[:20]} not supported; use 8000 or 16000 "
                                f"(also accepted: {', '.join(map(str, SUPPORTED_RATES))})")
        channels = msg.get("channels", 1)
        if not _int(channels) or channels not in (1, 2):
            raise ProtocolError(f"channels must be 1 or 2, got {str(channels)[:20]}")
        encoding = msg.get("encoding", "pcm_s16le")
        if not isinstance(encoding, str) or encoding not in PCM_ENCODINGS:  # (a list is unhashable)
            raise ProtocolError(f"encoding {str(encoding)[:30]!r} not supported; use one of {', '.join(PCM_ENCODINGS)}")
        names = msg.get("channel_names")
        if names is None:
            names = [f"ch{i}" for i in range(channels)]
        if (not isinstance(names, list) or len(names) != channels or len(set(map(str, names))) != channels
                or not all(isinstance(n, str) and 0 < len(n) <= MAX_CHANNEL_NAME for n in names)):
            raise ProtocolError(f"channel_names must be {channels} distinct non-empty strings")
        self.started = True
        self.sample_rate, self.channels, self.encoding = rate, tuple(names), encoding
        self._frame_bytes = PCM_ENCODINGS[encoding] * channels
        info = {"encoding": encoding, "input_rate": rate}
        return [Start(call_id, self.channels, rate, info, source_channels=self.channels),
                Send({"type": "started", "call_id": call_id, "channels": list(self.channels),
                      "sample_rate": rate, "encoding": encoding})]

    def on_binary(self, data: bytes) -> list[Action]:
        if not self.started:
            raise ProtocolError("audio before the start message")
        if self.ended:
            raise ProtocolError("audio after the stop message")
        if len(data) == 0:
            return []
        if len(data) % self._frame_bytes:
            raise ProtocolError(f"audio frame of {len(data)} bytes is not a whole number of "
                                f"{self._frame_bytes}-byte sample frames ({self.encoding}, {len(self.channels)} ch)")
        if self.encoding == "pcm_s16le":
            samples = int16_to_float32(data)
        elif self.encoding == "mulaw":
            samples = int16_to_float32(mulaw_decode(data))
        else:
            samples = int16_to_float32(alaw_decode(data))
        return [Audio(i, x) for i, x in enumerate(deinterleave(samples, len(self.channels)))]

    def event_message(self, event: dict) -> dict | None:
        return {"type": "event", **event}

    def summary_messages(self, summary: dict | None) -> list[dict]:
        return [summary] if summary else []

    def error_messages(self, error: ProtocolError) -> list[dict]:
        return [{"type": "error", "code": error.code, "message": str(error)}]


# --- /v1/twilio ------------------------------------------------------------------------------

class TwilioSession(Session):
    """Twilio Media Streams, as Twilio sends them.

    Messages are JSON text with an ``event`` field: ``connected``, ``start`` (``start.tracks``,
    ``start.mediaFormat`` = audio/x-mulaw, 8000 Hz, 1 channel, ``start.customParameters``),
    ``media`` (``media.track``, ``media.chunk``, ``media.timestamp`` in ms, base64
    ``media.payload``), ``dtmf``, ``mark``, ``stop``. Each track is one channel named after it.
    Media timestamps keep each track on Twilio's clock: a jump larger than
    ``TWILIO_GAP_TOLERANCE_MS`` is filled with silence. Twilio gets no replies (it accepts only
    ``media``/``mark``/``clear`` back); events go to the timeline file and ``/v1/events``.

    ``token``: when set and the upgrade request was not authenticated, the ``start`` message must
    carry it as ``customParameters.token`` (a ``<Parameter>`` of ``<Stream>``), else close 1008.
    """

    protocol = "twilio"

    def __init__(self, token: str | None = None):
        super().__init__()
        self.token = token
        self.sample_rate = TELEPHONE_RATE
        self.stream_sid: str | None = None
        self.ended = False
        self._received: list[int] = []
        self.marks: list[str] = []
        self.dtmf: list[str] = []

    def on_binary(self, data: bytes) -> list[Action]:
        raise ProtocolError("Twilio Media Streams send JSON text frames, not binary frames")

    def on_text(self, text: str) -> list[Action]:
        msg = parse_json_object(text)
        event = msg.get("event")
        if event == "connected":
            if self.started:
                raise ProtocolError("connected message after start")
            return []
        if event == "start":
            return self._start(msg)
        if event not in ("media", "dtmf", "mark", "stop"):
            if not isinstance(event, str):
                raise ProtocolError('message needs a string "event"')
            raise ProtocolError(f"unknown event {event[:40]!r}")
        if not self.started:
            raise ProtocolError(f"{event} message before start")
        sid = msg.get("streamSid")
        if sid is not None and sid != self.stream_sid:
            raise ProtocolError("streamSid does not match the start message")
        if self.ended:
            raise ProtocolError(f"{event} message after stop")
        if event == "media":
            return self._media(msg.get("media"))
        if event == "dtmf":
            dtmf = msg.get("dtmf") if isinstance(msg.get("dtmf"), dict) else {}
            self.dtmf.append(str(dtmf.get("digit", "")))
            return [Note(f"dtmf {str(dtmf.get('digit', '?'))[:4]} on {str(dtmf.get('track', '?'))[:20]}")]
        if event == "mark":
            mark = msg.get("mark") if isinstance(msg.get("mark"), dict) else {}
            self.marks.append(str(mark.get("name", ""))[:100])
            return [Note(f"mark {str(mark.get('name', ''))[:60]}")]
        self.ended = True
        return [End("stop")]

    def _start(self, msg: dict) -> list[Action]:
        if self.started:
            raise ProtocolError("duplicate start message")
        start = msg.get("start")
        if not isinstance(start, dict):
            raise ProtocolError('start message needs a "start" object')
        sid = start.get("streamSid", msg.get("streamSid"))
        if not isinstance(sid, str) or not sid:
            raise ProtocolError("start.streamSid missing")
        fmt = start.get("mediaFormat")
        if not isinstance(fmt, dict):
            raise ProtocolError("start.mediaFormat missing")
        if fmt.get("encoding") != TWILIO_ENCODING:
            raise ProtocolError(f"mediaFormat.encoding {str(fmt.get('encoding'))[:30]!r} not supported (expected {TWILIO_ENCODING})")
        if fmt.get("sampleRate") != TELEPHONE_RATE:
            raise ProtocolError(f"mediaFormat.sampleRate {str(fmt.get('sampleRate'))[:20]} not supported (expected 8000)")
        if fmt.get("channels", 1) != 1:
            raise ProtocolError("mediaFormat.channels must be 1 (one message per track)")
        tracks = start.get("tracks", ["inbound"])
        if (not isinstance(tracks, list) or not tracks or len(set(map(str, tracks))) != len(tracks)
                or not all(t in TWILIO_TRACKS for t in tracks)):
            raise ProtocolError(f"start.tracks must list distinct tracks out of {', '.join(TWILIO_TRACKS)}")
        params = start.get("customParameters") or {}
        if not isinstance(params, dict):
            raise ProtocolError("start.customParameters must be an object")
        if self.token is not None:
            given = params.get("token")
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), self.token.encode()):
                raise ProtocolError("unauthorized", CLOSE_POLICY)
        call_id = params.get("call_id") or start.get("callSid") or sid
        if not valid_call_id(call_id):
            raise ProtocolError("call id (customParameters.call_id, callSid or streamSid) has invalid characters")
        self.started = True
        self.stream_sid = sid
        self.channels = tuple(tracks)
        self._received = [0] * len(tracks)
        info = {"streamSid": sid, "callSid": start.get("callSid"), "accountSid": start.get("accountSid"),
                "encoding": TWILIO_ENCODING, "input_rate": TELEPHONE_RATE}
        return [Start(call_id, tuple(TWILIO_CHANNEL_NAMES[t] for t in self.channels), TELEPHONE_RATE, info,
                      source_channels=self.channels)]

    def _media(self, media: Any) -> list[Action]:
        if not isinstance(media, dict):
            raise ProtocolError('media message needs a "media" object')
        track = media.get("track", self.channels[0])
        if track not in self.channels:
            raise ProtocolError(f"media for track {str(track)[:20]!r}, not announced in start.tracks")
        ch = self.channels.index(track)
        payload = media.get("payload")
        if not isinstance(payload, str):
            raise ProtocolError("media.payload must be a base64 string")
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("media.payload is not valid base64") from None
        actions: list[Action] = []
        stamp = media.get("timestamp")
        if stamp is not None:
            try:
                ms = int(stamp)
            except (TypeError, ValueError, OverflowError):  # also Infinity and NaN
                raise ProtocolError(f"media.timestamp {str(stamp)[:20]!r} is not a number") from None
            if ms < 0:
                raise ProtocolError("media.timestamp is negative")
            expected = ms * TELEPHONE_RATE // 1000
            gap = expected - self._received[ch]
            if gap > TWILIO_GAP_TOLERANCE_MS * TELEPHONE_RATE // 1000:
                check_gap(gap / TELEPHONE_RATE, "media.timestamp")
                actions.append(Silence(ch, gap))
                self._received[ch] += gap
        if data:
            actions.append(Audio(ch, int16_to_float32(mulaw_decode(data))))
            self._received[ch] += len(data)
        return actions


# --- /v1/audiohook ---------------------------------------------------------------------------

class AudioHookSession(Session):
    """Server side of Genesys AudioHook protocol v2.

    Rules kept (as in Genesys's reference implementation): every server message has
    ``version`` "2", ``id`` = the session id, ``seq`` growing by exactly one from 1 and
    ``clientseq`` = the last client ``seq``; a client ``seq`` must grow by exactly one and its
    ``serverseq`` may not exceed ours; ``opened.media`` holds at most one offered entry, copied
    exactly (stereo preferred, channel order kept); ``supportedLanguages`` answered when asked;
    ``ping`` -> ``pong``; ``close`` -> ``closed``; ``paused``/``resumed``/``update``/``discarded``/
    ``error`` tolerated in any state. Errors are signalled with ``disconnect`` (reason ``error``)
    and the client's ``close`` is still answered with ``closed``. Audio is the position clock:
    ``discarded`` and ``resumed`` gaps are filled with silence so event offsets are stream positions.
    Channels: ``external`` -> "customer", ``internal`` -> "agent".
    """

    protocol = "audiohook"
    graceful_errors = True

    def __init__(self, session_id: str | None = None, supported_languages: tuple[str, ...] = ("en-US",),
                 analysable: tuple[str, ...] | None = None):
        """``analysable``: the channel names (customer, agent) the server may analyse (None: any);
        offers without one of them are answered with an empty media selection."""
        super().__init__()
        self.analysable = analysable
        self.id = session_id if isinstance(session_id, str) and UUID_PATTERN.fullmatch(session_id) else NULL_UUID
        self.supported_languages = tuple(supported_languages)
        self.state = "PREPARING"
        self.seq = 0
        self.clientseq = 0
        self.position = 0  # samples per channel at AUDIOHOOK_RATE, including filled gaps
        self.media: dict | None = None
        self.probe = False
        self.errored = False
        self.language: str | None = None
        self.client_errors: list[dict] = []
        self.sample_rate = AUDIOHOOK_RATE
        self._bytes_per_sample = 1

    @property
    def established(self) -> bool:
        return self.state != "PREPARING"

    @property
    def expects_audio(self) -> bool:
        return self.state == "ACTIVE" and bool(self.media)

    # -- server messages

    def message(self, kind: str, parameters: dict) -> dict:
        """A server message with the next ``seq``."""
        self.seq += 1
        return {"version": "2", "type": kind, "seq": self.seq, "clientseq": self.clientseq,
                "id": self.id, "parameters": parameters}

    def event_message(self, event: dict) -> dict | None:
        if self.state not in ("ACTIVE", "PAUSED", "CLOSING") or self.probe:
            return None
        ch = self.channels.index(event["channel"]) if event["channel"] in self.channels else 0
        data = {"channel": event["channel"], "channelId": ch,
                "offset": format_duration(event["t_start"]),
                "duration": format_duration(event["t_end"] - event["t_start"]),
                **{k: event[k] for k in ("speech", "label", "confidence", "probabilities")}}
        return self.message("event", {"entities": [{"type": "emostream.emotion", "data": data}]})

    def summary_messages(self, summary: dict | None) -> list[dict]:
        out = []
        if summary and not self.probe and self.state == "CLOSING" and not self.errored:
            out.append(self.message("event", {"entities": [{"type": "emostream.summary", "data": summary}]}))
        out.append(self.message("closed", {}))
        self.state = "CLOSED"
        return out

    def error_messages(self, error: ProtocolError) -> list[dict]:
        if self.state in ("CLOSED", "ERROR"):
            return []
        self.state = "ERROR"
        self.errored = True
        return [self.message("disconnect", {"reason": "error", "info": f"Client Error: {error}"})]

    # -- client messages

    def on_text(self, text: str) -> list[Action]:
        if len(text) > AUDIOHOOK_MAX_TEXT:
            raise ProtocolError(f"Text message too large (>64K). Length: {len(text)}")
        try:
            msg = json.loads(text)
        except (ValueError, RecursionError):
            raise ProtocolError("Text message not valid JSON") from None
        if not self._well_formed(msg):
            raise ProtocolError("Message not a well-formed client message")
        if self.state == "ERROR":  # after a signalled error only close matters (whatever its seq)
            self.clientseq = msg["seq"]
            return self._close() if msg["type"] == "close" else []
        if msg["seq"] != self.clientseq + 1:
            raise ProtocolError("Invalid seq value (not monotonically increasing)")
        self.clientseq = msg["seq"]
        if msg["serverseq"] > self.seq:
            raise ProtocolError("Invalid serverseq value")
        if msg["id"] != self.id:
            if self.id == NULL_UUID:
                self.id = msg["id"]
            else:
                raise ProtocolError("Session identifier mismatch")
        kind, params = msg["type"], msg["parameters"]
        handler = {"open": self._open, "ping": self._ping, "close": lambda p: self._close(),
                   "update": self._update, "paused": self._paused, "resumed": self._resumed,
                   "discarded": self._discarded, "error": self._error}.get(kind)
        if handler is None:
            raise ProtocolError(f"Invalid Message: '{str(kind)[:40]}' is not a supported client message")
        return handler(params)

    @staticmethod
    def _well_formed(msg: Any) -> bool:
        return (isinstance(msg, dict) and msg.get("version") == "2" and isinstance(msg.get("type"), str)
                and isinstance(msg.get("id"), str) and bool(UUID_PATTERN.fullmatch(msg["id"]))
                and _int(msg.get("seq")) and msg["seq"] >= 0 and _int(msg.get("serverseq")) and msg["serverseq"] >= 0
                and isinstance(msg.get("position"), str) and bool(DURATION_PATTERN.fullmatch(msg["position"]))
                and isinstance(msg.get("parameters"), dict))

    def _open(self, params: dict) -> list[Action]:
        if self.state != "PREPARING":
            return [Note(f"ignored open in state {self.state}")]
        org, conv = params.get("organizationId"), params.get("conversationId")
        participant = params.get("participant")
        media = params.get("media")
        if (not isinstance(org, str) or not UUID_PATTERN.fullmatch(org) or not isinstance(conv, str)
                or not UUID_PATTERN.fullmatch(conv) or not isinstance(participant, dict)
                or not isinstance(media, list)):
            raise ProtocolError("Invalid Message: Invalid/missing parameters")
        self.probe = conv == NULL_UUID or participant.get("id") == NULL_UUID
        language = params.get("language")
        self.language = language if isinstance(language, str) else None
        self.media = self.select_media(media, self.analysable)
        opened: dict[str, Any] = {"startPaused": False, "media": [self.media] if self.media else []}
        if params.get("supportedLanguages") is True:
            opened["supportedLanguages"] = list(self.supported_languages)
        actions: list[Action] = []
        if not self.media and self.select_media(media) is not None:  # usable audio, but none we may analyse
            self.not_analysed = True
            actions.append(Note(f"not analysed: no offered channel may be analysed "
                                f"({', '.join(self.analysable or ())} wanted); opened with no media"))
        if self.media:
            self.channels = tuple(AUDIOHOOK_CHANNEL_NAMES[c] for c in self.media["channels"])
            self._bytes_per_sample = AUDIOHOOK_FORMATS[self.media["format"]]
            self.started = True
            info = {"conversationId": conv, "organizationId": org, "participant": participant,
                    "format": self.media["format"], "input_rate": AUDIOHOOK_RATE, "probe": self.probe}
            actions.append(Start(self.id, self.channels, AUDIOHOOK_RATE, info, persist=not self.probe,
                                 source_channels=tuple(self.media["channels"])))
        self.state = "ACTIVE"
        actions.append(Send(self.message("opened", opened)))
        return actions

    @staticmethod
    def select_media(offers: list, analysable: tuple[str, ...] | None = None) -> dict | None:
        """The offer to accept: audio, PCMU or L16, 8000 Hz, channels from external/internal
        (with ``analysable``: at least one of them maps to such a channel name);
        the first stereo one, else the first mono one. Returned unchanged (the same object)."""
        good = [m for m in offers if isinstance(m, dict) and m.get("type") == "audio"
                and isinstance(m.get("format"), str) and m["format"] in AUDIOHOOK_FORMATS and m.get("rate") == AUDIOHOOK_RATE
                and isinstance(m.get("channels"), list) and 1 <= len(m["channels"]) <= 2
                and len(set(map(str, m["channels"]))) == len(m["channels"])
                and all(isinstance(c, str) and c in AUDIOHOOK_CHANNEL_NAMES for c in m["channels"])
                and (analysable is None or any(AUDIOHOOK_CHANNEL_NAMES[c] in analysable for c in m["channels"]))]
        stereo = [m for m in good if len(m["channels"]) == 2]
        return (stereo or good or [None])[0]

    def _ping(self, params: dict) -> list[Action]:
        return [Send(self.message("pong", {}))]

    def _close(self) -> list[Action]:
        if self.state in ("CLOSING", "CLOSED"):
            return []
        self.state = "CLOSING"
        return [End("close")]

    def _update(self, params: dict) -> list[Action]:
        if isinstance(params.get("language"), str):
            self.language = params["language"]
        return [Note(f"update: language {self.language}")]

    def _paused(self, params: dict) -> list[Action]:
        if self.state == "ACTIVE":
            self.state = "PAUSED"
        return [Note("paused")]

    def _resumed(self, params: dict) -> list[Action]:
        if self.state == "PAUSED":
            self.state = "ACTIVE"
        return [Note("resumed")] + self._sync(params, "resumed")

    def _discarded(self, params: dict) -> list[Action]:
        return [Note("discarded")] + self._sync(params, "discarded")

    def _sync(self, params: dict, kind: str) -> list[Action]:
        """Fill the gap ``[start, start + discarded)`` with silence (channels stay on the position clock)."""
        if "start" not in params and "discarded" not in params:
            return []
        start = parse_duration(params.get("start"))
        discarded = parse_duration(params.get("discarded"))
        if not self.started or start + discarded <= self.position / AUDIOHOOK_RATE:
            return []
        check_gap(start + discarded - self.position / AUDIOHOOK_RATE, kind)  # before any int(): may be huge
        gap = int(round((start + discarded) * AUDIOHOOK_RATE)) - self.position
        if gap <= 0:
            return []
        self.position += gap
        return [Silence(None, gap)]

    def _error(self, params: dict) -> list[Action]:
        self.client_errors.append(params)
        return [Note(f"client error {str(params.get('code'))[:5]}: {str(params.get('message'))[:100]}")]

    def on_binary(self, data: bytes) -> list[Action]:
        if len(data) == 0:  # connection probes may send an empty frame
            return []
        if self.state == "ERROR":
            return []
        if self.state not in ("ACTIVE", "PAUSED"):
            raise ProtocolError(f"Received audio in state {self.state}")
        if not self.media:
            raise ProtocolError("Unexpected binary message: No media selected")
        frame = self._bytes_per_sample * len(self.channels)
        if len(data) % frame:
            raise ProtocolError(f"Audio data size must be multiple of bytes per sample ({frame})")
        if self.media["format"] == "PCMU":
            samples = int16_to_float32(mulaw_decode(data))
        else:
            samples = int16_to_float32(data)
        parts = deinterleave(samples, len(self.channels))
        self.position += len(parts[0])
        return [Audio(i, x) for i, x in enumerate(parts)]
