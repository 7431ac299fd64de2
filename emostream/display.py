"""What a file or microphone source shows while it runs: the live :class:`~emostream.dashboard.Dashboard`
on an interactive terminal, else :class:`PlainPrinter`'s one line per event (pipes, logs,
``--no-dashboard``); :func:`make_display` picks."""

from __future__ import annotations

import sys
from typing import IO, Any, Mapping

from rich.console import Console

from .dashboard import Dashboard, DashboardInfo, format_clock, format_rtf, is_speech, top_shares


class PlainPrinter:
    """One plain text line per event (no colours, no escape codes): for pipes, logs, ``--no-dashboard``."""

    def __init__(self, info: DashboardInfo, file: IO[str] | None = None):
        self.info = info
        self.file = file if file is not None else sys.stdout
        self._width = max([len(c) for c in info.channels] + [1])
        self._audio_seconds = 0.0
        self._wall_seconds = 0.0

    def __enter__(self) -> "PlainPrinter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.file.flush()

    def _write(self, line: str) -> None:
        self.file.write(line + "\n")
        self.file.flush()

    def format_event(self, event: Mapping[str, Any]) -> str:
        """The line for one event, e.g. ``[call-42] customer  12.0-18.0s  Angry     0.81``."""
        stream = event.get("stream", self.info.stream)
        channel = str(event.get("channel", "?"))
        span = f"{float(event.get('t_start') or 0.0):.1f}-{float(event.get('t_end') or 0.0):.1f}s"
        head = f"[{stream}] {channel:<{self._width}}  {span}  "
        if not is_speech(event):
            return head + "silence"
        return head + f"{event['label']:<9} {float(event.get('confidence') or 0.0):.2f}"

    def update(self, event: dict) -> None:
        """Print one line for the event (summary dicts go to :meth:`finish`)."""
        if event.get("type") == "summary":
            self.finish(event)
            return
        self._width = max(self._width, len(str(event.get("channel", ""))))
        self._audio_seconds = max(self._audio_seconds, float(event.get("t_end") or 0.0))
        self._write(self.format_event(event))

    def set_clock(self, audio_seconds: float, wall_seconds: float) -> None:
        """Record progress (printed by :meth:`finish`)."""
        self._audio_seconds = max(self._audio_seconds, float(audio_seconds))
        self._wall_seconds = float(wall_seconds)

    def log(self, message: str) -> None:
        """Print a free-text line, marked with ``#``."""
        self._write(f"# [{self.info.stream}] {message}")

    def finish(self, summary: dict | None) -> None:
        """Print the audio time / speed line and one summary line per channel."""
        rtf = self._audio_seconds / self._wall_seconds if self._wall_seconds > 0 else None
        stream = (summary or {}).get("stream", self.info.stream)
        duration = float((summary or {}).get("duration") or self._audio_seconds)
        self._write(f"[{stream}] done  {format_clock(duration)} of audio  {format_rtf(rtf)}")
        if not summary:
            return
        for name, ch in (summary.get("channels") or {}).items():
            shares = " ".join(f"{c} {s:.0%}" for c, s in top_shares(ch.get("shares") or {}))
            dominant = ch.get("dominant") or "none"
            line = (
                f"[{stream}] {name:<{self._width}}  dominant {dominant}  "
                f"speech {float(ch.get('speech_seconds') or 0.0):.1f}s "
                f"({ch.get('speech_windows', 0)}/{ch.get('windows', 0)} windows)"
            )
            if shares:
                line += f"  {shares}"
            self._write(line)


def make_display(info: DashboardInfo, enabled: bool, console: Console | None = None) -> Dashboard | PlainPrinter:
    """A :class:`Dashboard` when ``enabled`` and the console is an interactive terminal,
    else a :class:`PlainPrinter` writing to the console's file."""
    console = console if console is not None else Console()
    if enabled and console.is_terminal and not console.is_dumb_terminal:
        return Dashboard(info, console=console)
    return PlainPrinter(info, file=console.file)
