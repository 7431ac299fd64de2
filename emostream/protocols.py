"""Bridge protocols as pure state machines: frames in, actions out (no I/O).

A session turns each websocket frame of one call into a list of actions for the server:
:class:`Start` (a call with named channels begins), :class:`Audio` (float32 samples of one channel
at the session's sample rate), :class:`Silence` (a gap to fill so the channel clock stays on the
peer's clock), :class:`Send` (a JSON reply), :class:`Note` (something to log) and :class:`End`
(the peer ended the call). Bad input raises :class:`ProtocolError` with a websocket close code and
a one-line reason. The server owns sockets, models and files; these classes only keep protocol state.

- :class:`PcmSession` - ``/v1/pcm``: emostream's raw bridge protocol (JSON start/stop + binary PCM).
- :class:`~emostream.twilio_media.TwilioSession` - ``/v1/twilio``: Twilio Media Streams
  (``connected``, ``start``, ``media``, ``dtmf``, ``mark``, ``stop``); each track is a channel.
- :class:`~emostream.audiohook.AudioHookSession` - ``/v1/audiohook``: server side of Genesys
  AudioHook protocol v2.

This module holds the actions, the base :class:`Session`, the helpers the protocols share and the PCM
protocol; the other two have a module each.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from .audio import alaw_decode, int16_to_float32, mulaw_decode

# --- websocket close codes (RFC 6455 section 7.4.1) --------------------------------------------
CLOSE_NORMAL = 1000
CLOSE_GOING_AWAY = 1001
CLOSE_INVALID = 1007  # malformed or out-of-protocol data
CLOSE_POLICY = 1008  # authentication / policy
CLOSE_TOO_BIG = 1009
CLOSE_INTERNAL = 1011
CLOSE_TRY_LATER = 1013  # capacity

SUPPORTED_RATES = (8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000)
PCM_ENCODINGS = {"pcm_s16le": 2, "mulaw": 1, "alaw": 1}  # bytes per sample
CALL_ID_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # used with fullmatch
MAX_CHANNEL_NAME = 64
MAX_GAP_SECONDS = 3600.0  # longest gap one message may claim (longer: close 1007)
DURATION_PATTERN = re.compile(r"PT(\d*\.)?\d+S")  # fullmatch


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


def is_int(value: Any) -> bool:
    """An int that is not a bool (JSON numbers as protocols mean them)."""
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
        if not is_int(rate) or rate not in SUPPORTED_RATES:
            raise ProtocolError(
                f"sample_rate {str(rate)[:20]} not supported; use 8000 or 16000 "
                f"(also accepted: {', '.join(map(str, SUPPORTED_RATES))})"
            )
        channels = msg.get("channels", 1)
        if not is_int(channels) or channels not in (1, 2):
            raise ProtocolError(f"channels must be 1 or 2, got {str(channels)[:20]}")
        encoding = msg.get("encoding", "pcm_s16le")
        if not isinstance(encoding, str) or encoding not in PCM_ENCODINGS:  # (a list is unhashable)
            raise ProtocolError(f"encoding {str(encoding)[:30]!r} not supported; use one of {', '.join(PCM_ENCODINGS)}")
        names = msg.get("channel_names")
        if names is None:
            names = [f"ch{i}" for i in range(channels)]
        if (
            not isinstance(names, list)
            or len(names) != channels
            or len(set(map(str, names))) != channels
            or not all(isinstance(n, str) and 0 < len(n) <= MAX_CHANNEL_NAME for n in names)
        ):
            raise ProtocolError(f"channel_names must be {channels} distinct non-empty strings")
        self.started = True
        self.sample_rate, self.channels, self.encoding = rate, tuple(names), encoding
        self._frame_bytes = PCM_ENCODINGS[encoding] * channels
        info = {"encoding": encoding, "input_rate": rate}
        return [
            Start(call_id, self.channels, rate, info, source_channels=self.channels),
            Send(
                {
                    "type": "started",
                    "call_id": call_id,
                    "channels": list(self.channels),
                    "sample_rate": rate,
                    "encoding": encoding,
                }
            ),
        ]

    def on_binary(self, data: bytes) -> list[Action]:
        if not self.started:
            raise ProtocolError("audio before the start message")
        if self.ended:
            raise ProtocolError("audio after the stop message")
        if len(data) == 0:
            return []
        if len(data) % self._frame_bytes:
            raise ProtocolError(
                f"audio frame of {len(data)} bytes is not a whole number of "
                f"{self._frame_bytes}-byte sample frames ({self.encoding}, {len(self.channels)} ch)"
            )
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
