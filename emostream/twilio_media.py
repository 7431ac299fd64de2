"""``/v1/twilio``: Twilio Media Streams as a pure state machine (see :mod:`emostream.protocols`)."""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Any

from .audio import TELEPHONE_RATE, int16_to_float32, mulaw_decode
from .protocols import (
    CLOSE_POLICY,
    Action,
    Audio,
    End,
    Note,
    ProtocolError,
    Session,
    Silence,
    Start,
    check_gap,
    parse_json_object,
    valid_call_id,
)

TWILIO_GAP_TOLERANCE_MS = 40  # timestamp jitter below this is not a gap
TWILIO_TRACKS = ("inbound", "outbound")
TWILIO_CHANNEL_NAMES = {"inbound": "customer", "outbound": "agent"}  # one vocabulary in every event
TWILIO_ENCODING = "audio/x-mulaw"


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
            raise ProtocolError(
                f"mediaFormat.encoding {str(fmt.get('encoding'))[:30]!r} not supported (expected {TWILIO_ENCODING})"
            )
        if fmt.get("sampleRate") != TELEPHONE_RATE:
            raise ProtocolError(
                f"mediaFormat.sampleRate {str(fmt.get('sampleRate'))[:20]} not supported (expected 8000)"
            )
        if fmt.get("channels", 1) != 1:
            raise ProtocolError("mediaFormat.channels must be 1 (one message per track)")
        tracks = start.get("tracks", ["inbound"])
        if (
            not isinstance(tracks, list)
            or not tracks
            or len(set(map(str, tracks))) != len(tracks)
            or not all(t in TWILIO_TRACKS for t in tracks)
        ):
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
        info = {
            "streamSid": sid,
            "callSid": start.get("callSid"),
            "accountSid": start.get("accountSid"),
            "encoding": TWILIO_ENCODING,
            "input_rate": TELEPHONE_RATE,
        }
        return [
            Start(
                call_id,
                tuple(TWILIO_CHANNEL_NAMES[t] for t in self.channels),
                TELEPHONE_RATE,
                info,
                source_channels=self.channels,
            )
        ]

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
