"""``/v1/audiohook``: the server side of Genesys AudioHook protocol v2 as a pure state machine (see
:mod:`emostream.protocols`)."""

from __future__ import annotations

import json
import re
from typing import Any

from .audio import int16_to_float32, mulaw_decode
from .protocols import (
    DURATION_PATTERN,
    Action,
    Audio,
    End,
    Note,
    ProtocolError,
    Send,
    Session,
    Silence,
    Start,
    check_gap,
    deinterleave,
    format_duration,
    is_int,
    parse_duration,
)

NULL_UUID = "00000000-0000-0000-0000-000000000000"
UUID_PATTERN = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")  # fullmatch
AUDIOHOOK_MAX_TEXT = 65535
AUDIOHOOK_RATE = 8000
AUDIOHOOK_FORMATS = {"PCMU": 1, "L16": 2}  # bytes per sample
AUDIOHOOK_CHANNEL_NAMES = {"external": "customer", "internal": "agent"}


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

    def __init__(
        self,
        session_id: str | None = None,
        supported_languages: tuple[str, ...] = ("en-US",),
        analysable: tuple[str, ...] | None = None,
    ):
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
        return {
            "version": "2",
            "type": kind,
            "seq": self.seq,
            "clientseq": self.clientseq,
            "id": self.id,
            "parameters": parameters,
        }

    def event_message(self, event: dict) -> dict | None:
        if self.state not in ("ACTIVE", "PAUSED", "CLOSING") or self.probe:
            return None
        ch = self.channels.index(event["channel"]) if event["channel"] in self.channels else 0
        data = {
            "channel": event["channel"],
            "channelId": ch,
            "offset": format_duration(event["t_start"]),
            "duration": format_duration(event["t_end"] - event["t_start"]),
            **{k: event[k] for k in ("speech", "label", "confidence", "probabilities")},
        }
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
        handler = {
            "open": self._open,
            "ping": self._ping,
            "close": lambda p: self._close(),
            "update": self._update,
            "paused": self._paused,
            "resumed": self._resumed,
            "discarded": self._discarded,
            "error": self._error,
        }.get(kind)
        if handler is None:
            raise ProtocolError(f"Invalid Message: '{str(kind)[:40]}' is not a supported client message")
        return handler(params)

    @staticmethod
    def _well_formed(msg: Any) -> bool:
        return (
            isinstance(msg, dict)
            and msg.get("version") == "2"
            and isinstance(msg.get("type"), str)
            and isinstance(msg.get("id"), str)
            and bool(UUID_PATTERN.fullmatch(msg["id"]))
            and is_int(msg.get("seq"))
            and msg["seq"] >= 0
            and is_int(msg.get("serverseq"))
            and msg["serverseq"] >= 0
            and isinstance(msg.get("position"), str)
            and bool(DURATION_PATTERN.fullmatch(msg["position"]))
            and isinstance(msg.get("parameters"), dict)
        )

    def _open(self, params: dict) -> list[Action]:
        if self.state != "PREPARING":
            return [Note(f"ignored open in state {self.state}")]
        org, conv = params.get("organizationId"), params.get("conversationId")
        participant = params.get("participant")
        media = params.get("media")
        if (
            not isinstance(org, str)
            or not UUID_PATTERN.fullmatch(org)
            or not isinstance(conv, str)
            or not UUID_PATTERN.fullmatch(conv)
            or not isinstance(participant, dict)
            or not isinstance(media, list)
        ):
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
            actions.append(
                Note(
                    f"not analysed: no offered channel may be analysed "
                    f"({', '.join(self.analysable or ())} wanted); opened with no media"
                )
            )
        if self.media:
            self.channels = tuple(AUDIOHOOK_CHANNEL_NAMES[c] for c in self.media["channels"])
            self._bytes_per_sample = AUDIOHOOK_FORMATS[self.media["format"]]
            self.started = True
            info = {
                "conversationId": conv,
                "organizationId": org,
                "participant": participant,
                "format": self.media["format"],
                "input_rate": AUDIOHOOK_RATE,
                "probe": self.probe,
            }
            actions.append(
                Start(
                    self.id,
                    self.channels,
                    AUDIOHOOK_RATE,
                    info,
                    persist=not self.probe,
                    source_channels=tuple(self.media["channels"]),
                )
            )
        self.state = "ACTIVE"
        actions.append(Send(self.message("opened", opened)))
        return actions

    @staticmethod
    def select_media(offers: list, analysable: tuple[str, ...] | None = None) -> dict | None:
        """The offer to accept: audio, PCMU or L16, 8000 Hz, channels from external/internal
        (with ``analysable``: at least one of them maps to such a channel name);
        the first stereo one, else the first mono one. Returned unchanged (the same object)."""
        good = [
            m
            for m in offers
            if isinstance(m, dict)
            and m.get("type") == "audio"
            and isinstance(m.get("format"), str)
            and m["format"] in AUDIOHOOK_FORMATS
            and m.get("rate") == AUDIOHOOK_RATE
            and isinstance(m.get("channels"), list)
            and 1 <= len(m["channels"]) <= 2
            and len(set(map(str, m["channels"]))) == len(m["channels"])
            and all(isinstance(c, str) and c in AUDIOHOOK_CHANNEL_NAMES for c in m["channels"])
            and (analysable is None or any(AUDIOHOOK_CHANNEL_NAMES[c] in analysable for c in m["channels"]))
        ]
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
