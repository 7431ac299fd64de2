"""Supervisor view of every live call: ``emostream watch ws://HOST:PORT`` and ``serve --dashboard``.

Fed with the messages of ``/v1/events`` (``hello``, ``call_started``, ``event``, ``alert``,
``summary``, ``call_ended``): a rich table with one row per call and channel (current emotion,
confidence, active escalation alerts, colour timeline of recent windows, speech windows) for a
terminal, or one plain line per message.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import IO, Callable
from urllib.parse import urlencode, urlsplit, urlunsplit

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .dashboard import SILENCE_STYLE, TIMELINE_BLOCK, TIMELINE_SILENCE, emotion_style, format_clock, legend

STRIP_WIDTH = 40  # windows shown per channel
ALERT_STYLE = "bold white on red"
ENDED_CALLS_KEPT = 10  # finished calls stay on screen (dimmed) until this many newer ones ended


@dataclass
class _Channel:
    label: str | None = None
    confidence: float | None = None
    t_end: float = 0.0
    windows: int = 0
    speech: int = 0
    strip: deque = field(default_factory=lambda: deque(maxlen=STRIP_WIDTH))
    alerts: list[str] = field(default_factory=list)  # rules raised and not yet cleared


@dataclass
class _Call:
    call_id: str
    protocol: str = ""
    channels: dict[str, _Channel] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    ended: str | None = None
    summary: dict | None = None


class SupervisorView:
    """State of all calls seen on the events feed, rendered as one table (thread-safe)."""

    def __init__(self, source: str, console: Console | None = None):
        self.source = source
        self.console = console if console is not None else Console()
        self.calls: dict[str, _Call] = {}
        self._ended: deque[str] = deque()
        self._lock = threading.RLock()
        self._live: Live | None = None

    def _call(self, call_id: str) -> _Call:
        if call_id not in self.calls:
            self.calls[call_id] = _Call(call_id)
        return self.calls[call_id]

    def update(self, message: dict) -> None:
        """Apply one ``/v1/events`` message."""
        kind = message.get("type")
        with self._lock:
            if kind == "hello":
                for info in message.get("calls") or []:
                    self.update(info)
            elif kind == "call_started":
                call = self._call(str(message.get("call_id")))
                call.protocol = str(message.get("protocol", ""))
                for name in message.get("channels") or []:
                    call.channels.setdefault(str(name), _Channel())
            elif kind == "event":
                call = self._call(str(message.get("stream")))
                ch = call.channels.setdefault(str(message.get("channel")), _Channel())
                ch.windows += 1
                ch.t_end = max(ch.t_end, float(message.get("t_end") or 0.0))
                if message.get("speech") and message.get("label"):
                    ch.speech += 1
                    ch.label, ch.confidence = message["label"], float(message.get("confidence") or 0.0)
                    ch.strip.append(message["label"])
                else:
                    ch.strip.append(None)
            elif kind == "alert":
                call = self._call(str(message.get("call_id") or message.get("stream")))
                ch = call.channels.setdefault(str(message.get("channel")), _Channel())
                rule = str(message.get("rule"))
                if message.get("state") == "raised" and rule not in ch.alerts:
                    ch.alerts.append(rule)
                elif message.get("state") == "cleared" and rule in ch.alerts:
                    ch.alerts.remove(rule)
            elif kind == "summary":
                self._call(str(message.get("call_id") or message.get("stream"))).summary = message
            elif kind == "call_ended":
                call = self._call(str(message.get("call_id")))
                call.ended = str(message.get("reason", "ended"))
                self._ended.append(call.call_id)
                while len(self._ended) > ENDED_CALLS_KEPT:
                    self.calls.pop(self._ended.popleft(), None)

    def render(self) -> RenderableType:
        """The whole screen: header line, the call table, the legend."""
        with self._lock:
            live = sum(1 for c in self.calls.values() if c.ended is None)
            table = Table(
                box=box.SIMPLE_HEAD,
                expand=True,
                title=f"emostream · {self.source} · {live} live call(s)",
                title_justify="left",
            )
            table.add_column("Call", no_wrap=True, style="bold")
            table.add_column("Channel", no_wrap=True)
            table.add_column("Now", no_wrap=True)
            table.add_column("Audio", justify="right", no_wrap=True)
            table.add_column("Timeline", no_wrap=True, ratio=1)
            table.add_column("Speech", justify="right", no_wrap=True)
            for call in self.calls.values():
                for i, (name, ch) in enumerate(call.channels.items()):
                    who = Text(call.call_id[:24] if i == 0 else "")
                    if i == 0 and call.ended is not None:
                        who.append(" (ended)", style="dim")
                    now = Text("—", style=SILENCE_STYLE)
                    if call.ended is not None and call.summary:
                        dom = (call.summary.get("channels") or {}).get(name, {}).get("dominant")
                        now = Text(f"dominant {dom}" if dom else "no speech", style=emotion_style(dom))
                    elif ch.label is not None:
                        now = Text(f"{ch.label} {ch.confidence:.2f}", style=f"bold {emotion_style(ch.label)}")
                    if call.ended is None and ch.alerts:
                        now.append(f"  ALERT {', '.join(ch.alerts)}", style=ALERT_STYLE)
                    strip = Text(no_wrap=True, overflow="crop")
                    for label in ch.strip:
                        strip.append(TIMELINE_SILENCE if label is None else TIMELINE_BLOCK, style=emotion_style(label))
                    table.add_row(who, name, now, format_clock(ch.t_end), strip, f"{ch.speech}/{ch.windows}")
            return Group(table, legend())

    def __enter__(self) -> "SupervisorView":
        self._live = Live(get_renderable=self.render, console=self.console, refresh_per_second=4)
        self._live.start(refresh=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.refresh()
            self._live.stop()
            self._live = None


class PlainWatcher:
    """One plain line per events-feed message (for pipes and ``--no-dashboard``)."""

    def __init__(self, file: IO[str] | None = None):
        self.file = file if file is not None else sys.stdout

    def __enter__(self) -> "PlainWatcher":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.flush()

    def line(self, message: dict) -> str | None:
        """The text for one message (``None`` for messages not shown)."""
        kind = message.get("type")
        if kind == "call_started":
            channels = ", ".join(message.get("channels") or [])
            return f"[{message.get('call_id')}] started ({message.get('protocol')}: {channels})"
        if kind == "event":
            span = f"{float(message.get('t_start') or 0):.1f}-{float(message.get('t_end') or 0):.1f}s"
            head = f"[{message.get('stream')}] {message.get('channel')}  {span}  "
            if not message.get("speech"):
                return head + "silence"
            return head + f"{message.get('label'):<9} {float(message.get('confidence') or 0):.2f}"
        if kind == "alert":
            return (
                f"[{message.get('call_id') or message.get('stream')}] {message.get('channel')}  "
                f"ALERT {message.get('state')}: {message.get('rule')} at {float(message.get('t') or 0):.1f}s"
            )
        if kind == "summary":
            parts = [
                f"{name} {ch.get('dominant') or 'no speech'}" for name, ch in (message.get("channels") or {}).items()
            ]
            return f"[{message.get('call_id') or message.get('stream')}] summary  {'  '.join(parts)}"
        if kind == "call_ended":
            return f"[{message.get('call_id')}] ended ({message.get('reason')})"
        if kind == "hello":
            return f"# connected; {len(message.get('calls') or [])} live call(s)"
        return None

    def update(self, message: dict) -> None:
        text = self.line(message)
        if text is not None:
            self.file.write(text + "\n")
            self.file.flush()


def events_url(url: str, call_id: str | None = None) -> str:
    """``ws://HOST:PORT`` (or any URL on the server) -> its ``/v1/events`` URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"URL must look like ws://HOST:PORT, got {url!r}")
    return urlunsplit(
        (parts.scheme, parts.netloc, "/v1/events", urlencode({"call_id": call_id}) if call_id else "", "")
    )


async def watch(
    url: str,
    on_message: Callable[[dict], None],
    token: str | None = None,
    call_id: str | None = None,
    stop_after: float | None = None,
) -> str | None:
    """Read ``/v1/events`` until the server closes (or ``stop_after`` seconds pass). Returns how the
    server closed it (``"code 1001: going away"``, ``"connection lost"``), None after ``stop_after``."""
    from websockets.asyncio.client import connect
    from websockets.exceptions import ConnectionClosed

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with connect(events_url(url, call_id), additional_headers=headers, open_timeout=10) as ws:

        async def pump() -> None:
            try:
                async for data in ws:
                    on_message(json.loads(data))
            except ConnectionClosed:
                pass

        if stop_after is None:
            await pump()
        else:
            try:
                await asyncio.wait_for(pump(), stop_after)
            except asyncio.TimeoutError:
                return None
        if ws.close_code is None:
            return "connection lost"
        return f"code {ws.close_code}" + (f": {ws.close_reason}" if ws.close_reason else "")
