"""What ``emostream serve`` can be told: :class:`ServerConfig`, validated when made."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .alerts import AlertRule
from .auth import AudioHookKey
from .compliance import ANALYSE_CHOICES
from .stream import StreamConfig
from .vad import VadConfig
from .webhook import WebhookConfig
from .worker import WorkerConfig


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
    vad: VadConfig = VadConfig()  # speech gate of every call
    idle_timeout: float = 60.0  # seconds without audio before a call is closed (1001)
    start_timeout: float = 5.0  # seconds from connecting to the call's start (1008)
    max_unstarted: int = 32  # connections not yet started (unauthenticated ones included); more: 503
    ping_interval: float = 20.0  # websocket keepalive ping every this many seconds
    ping_timeout: float = 20.0  # no pong this long (and no backlog on our side): close 1011
    max_events_kept: int = 900  # events per channel a call keeps for the page (the summary counts all)
    max_ended_calls: int = 100  # ended calls the page lists (for ENDED_CALL_SECONDS at most)
    max_call_seconds: float = 4 * 3600.0  # audio (gaps included) one call may stream
    max_message_bytes: int = 256 * 1024  # larger frames close the connection (1009)
    max_subscribers: int = 64
    twilio_auth_token: str | None = None
    public_url: str | None = None  # e.g. wss://calls.example.com, for Twilio signatures
    audiohook_keys: tuple[AudioHookKey, ...] = ()
    supported_languages: tuple[str, ...] = ("en-US", "de-DE")
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    warm_up: bool = False  # warm every batch size up (default: batch 1 only) before /readyz
    analyse: str = "customer"  # customer | agent | all (AI Act: customer only in the EU)
    record_dir: Path | None = None  # write each call's audio here (off unless asked for)
    events_retention_days: float | None = None  # delete timelines in events_dir older than this
    record_retention_days: float | None = None  # delete recordings in record_dir older than this
    alerts: tuple[AlertRule, ...] = ()  # escalation rules applied to every analysed channel
    alert_webhook: WebhookConfig | None = None  # also POST every alert message there
    reuse_port: bool = False  # SO_REUSEPORT: several front ends on one port (serve --workers)

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
