"""Live terminal display of emotion events: a rich dashboard for a TTY, plain lines otherwise.

Events are the plain dicts of :mod:`emostream.timeline` (one per analysis window and channel);
``speech: false`` marks silence, with ``label``, ``confidence`` and ``probabilities`` set to ``None``.
This module imports neither torch nor numpy, so the display starts fast.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from rich import box
from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from . import CLASSES

# Fixed colour per class (hex, so that every colour system and HTML export agree).
EMOTION_COLORS: dict[str, str] = {
    "Angry": "#e53935",  # red
    "Disgusted": "#8d9a2a",  # olive green
    "Fearful": "#b05bd6",  # purple / magenta
    "Happy": "#f4c430",  # yellow
    "Neutral": "#a8a8a8",  # grey
    "Sad": "#3a7bd5",  # blue
    "Surprised": "#26c6da",  # cyan
}
SILENCE_STYLE = "dim"
UNKNOWN_COLOR = "white"

TIMELINE_BLOCK = "█"  # one speech window in the timeline
TIMELINE_SILENCE = "·"  # one silence window in the timeline
LEGEND_SWATCH = "■"  # legend marker (deliberately not the timeline block)
LOG_LINES = 8  # change-log lines kept on screen
BAR_WIDTH = 22  # width of the probability bars
SIDE_BY_SIDE_WIDTH = 44  # columns per channel panel needed to put the panels side by side
COMPACT_TOP = 3  # compact channel panel: probabilities shown (the screen is too short for all 7)


@dataclass(frozen=True)
class DashboardInfo:
    """Static facts shown in the header."""

    source: str  # e.g. "replay examples/call_stereo.flac" or "mic: default"
    stream: str  # stream / call id
    channels: tuple[str, ...]
    device: str  # "cpu" / "cuda:0"
    hop_seconds: float


# --------------------------------------------------------------------------- formatting helpers


def emotion_style(label: str | None) -> str:
    """Rich style (colour) of an emotion label; the silence style for ``None``."""
    if label is None:
        return SILENCE_STYLE
    return EMOTION_COLORS.get(label, UNKNOWN_COLOR)


def format_clock(seconds: float) -> str:
    """``mm:ss`` (``h:mm:ss`` from one hour on) of a non-negative number of seconds."""
    total = int(max(0.0, float(seconds)))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def format_rtf(rtf: float | None) -> str:
    """Real-time factor as ``x1.00`` / ``x23.5`` / ``x180``; ``x–`` when unknown."""
    if rtf is None or rtf != rtf or rtf < 0:  # None or NaN
        return "x–"
    if rtf < 10:
        return f"x{rtf:.2f}"
    if rtf < 100:
        return f"x{rtf:.1f}"
    return f"x{rtf:.0f}"


def _probabilities(event: Mapping[str, Any]) -> dict[str, float]:
    """Class → probability of an event (a dict or a 7-sequence); empty for silence."""
    probs = event.get("probabilities")
    if not probs:
        return {}
    if isinstance(probs, Mapping):
        return {c: float(probs.get(c, 0.0) or 0.0) for c in CLASSES}
    return {c: float(p) for c, p in zip(CLASSES, probs)}


def is_speech(event: Mapping[str, Any]) -> bool:
    return bool(event.get("speech")) and event.get("label") is not None


def _change_time(event: Mapping[str, Any], hop_seconds: float) -> float:
    """Time a label change is dated at: start of the window's newest hop (as the summary counts it)."""
    t_start = float(event.get("t_start") or 0.0)
    t_end = float(event.get("t_end") or t_start)
    return max(t_start, t_end - hop_seconds) if hop_seconds > 0 else t_start


def top_shares(shares: Mapping[str, float], n: int = 3) -> list[tuple[str, float]]:
    ranked = sorted(((c, float(s)) for c, s in shares.items() if s and float(s) > 0), key=lambda x: -x[1])
    return ranked[:n]


class _Timeline:
    """Renderable colour strip of one channel, cropped from the left to the width available."""

    def __init__(self, cells: Iterable[str | None]):
        self.cells = list(cells)  # label per window, None = silence

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = max(1, options.max_width)
        text = Text(no_wrap=True, overflow="crop")
        for label in self.cells[-width:]:
            if label is None:
                text.append(TIMELINE_SILENCE, style=SILENCE_STYLE)
            else:
                text.append(TIMELINE_BLOCK, style=emotion_style(label))
        yield text


class _Row:
    """Panels side by side when there is room, otherwise stacked."""

    def __init__(self, panels: list[RenderableType], min_width: int = SIDE_BY_SIDE_WIDTH):
        self.panels = panels
        self.min_width = min_width

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        if len(self.panels) > 1 and options.max_width >= self.min_width * len(self.panels):
            grid = Table.grid(expand=True, padding=0)
            for _ in self.panels:
                grid.add_column(ratio=1)
            grid.add_row(*self.panels)
            yield grid
        else:
            yield from self.panels


def legend(gap: str = "  ") -> Text:
    """Legend of the class colours and the silence marker (wraps between entries on a narrow screen)."""
    text = Text()
    for cls in CLASSES:
        text.append(LEGEND_SWATCH + " ", style=emotion_style(cls))
        text.append(cls + gap)
    text.append(TIMELINE_SILENCE + " ", style=SILENCE_STYLE)
    text.append("silence", style=SILENCE_STYLE)
    return text


def summary_table(summary: Mapping[str, Any]) -> Table:
    """Table of an end-of-stream summary: channel, dominant emotion, top shares, speech time, peak."""
    duration = float(summary.get("duration") or 0.0)
    table = Table(
        title=f"Summary · {summary.get('stream', '')} · {format_clock(duration)} of audio",
        box=box.SIMPLE_HEAD,
        expand=True,
        title_justify="left",
    )
    table.add_column("Channel", style="bold", no_wrap=True)
    table.add_column("Dominant", no_wrap=True)
    table.add_column("Top shares")
    table.add_column("Speech", justify="right", no_wrap=True)
    table.add_column("Strongest moment")
    for name, ch in (summary.get("channels") or {}).items():
        dominant = ch.get("dominant")
        dom = (
            Text(dominant, style=f"bold {emotion_style(dominant)}")
            if dominant
            else Text("no speech", style=SILENCE_STYLE)
        )
        shares = Text()
        for i, (cls, share) in enumerate(top_shares(ch.get("shares") or {})):
            if i:
                shares.append("  ")
            shares.append(cls, style=emotion_style(cls))
            shares.append(f" {share:.0%}")
        speech = f"{float(ch.get('speech_seconds') or 0.0):.1f}s"
        windows = ch.get("windows")
        if windows is not None:
            speech += f" ({ch.get('speech_windows', 0)}/{windows} win)"
        peaks = ch.get("peaks") or []
        peak = Text()
        if peaks:
            p = peaks[0]
            peak.append(str(p.get("label")), style=emotion_style(p.get("label")))
            peak.append(f" {float(p.get('confidence') or 0.0):.2f} at {format_clock(float(p.get('t_start') or 0.0))}")
        table.add_row(name, dom, shares, speech, peak)
    return table


# --------------------------------------------------------------------------- rich dashboard


@dataclass
class _ChannelState:
    last: dict | None = None  # latest event
    last_speech: dict | None = None  # latest speech event
    windows: int = 0
    speech_windows: int = 0


class Dashboard:
    """Full-screen live view (``rich.Live``) for a terminal: header, one panel per channel with
    the current emotion, probability bars and a colour timeline, a legend, and a log of changes."""

    def __init__(
        self,
        info: DashboardInfo,
        console: Console | None = None,
        timeline_width: int = 60,
        refresh_per_second: float = 4,
    ):
        if timeline_width < 1:
            raise ValueError(f"timeline_width must be >= 1, got {timeline_width}")
        self.info = info
        self.console = console if console is not None else Console()
        self.timeline_width = int(timeline_width)
        self.refresh_per_second = refresh_per_second
        self._lock = threading.RLock()
        self._channels: dict[str, _ChannelState] = {}
        self._timelines: dict[str, deque[str | None]] = {}
        for name in info.channels:
            self._add_channel(name)
        self._log: deque[Text] = deque(maxlen=LOG_LINES)
        self._audio_seconds = 0.0
        self._wall_seconds = 0.0
        self._summary: Mapping[str, Any] | None = None
        self._finished = False
        self._live: Live | None = None

    # -- context management

    def __enter__(self) -> "Dashboard":
        """Start the live display."""
        self._live = Live(
            get_renderable=self.render,
            console=self.console,
            refresh_per_second=self.refresh_per_second,
            transient=False,
        )
        self._live.start(refresh=True)
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the live display, leaving the last screen in place."""
        if self._live is not None:
            try:
                self._live.refresh()
            finally:
                self._live.stop()
                self._live = None

    # -- feeding

    def _add_channel(self, name: str) -> None:
        if name not in self._channels:
            self._channels[name] = _ChannelState()
            self._timelines[name] = deque(maxlen=self.timeline_width)

    def update(self, event: dict) -> None:
        """Add one event; log an emotion change when the channel's (speech) label changes."""
        if event.get("type") == "summary":
            with self._lock:
                self._summary = event
            return
        channel = str(event.get("channel", "?"))
        with self._lock:
            self._add_channel(channel)
            state = self._channels[channel]
            state.windows += 1
            state.last = event
            self._audio_seconds = max(self._audio_seconds, float(event.get("t_end") or 0.0))
            if not is_speech(event):
                self._timelines[channel].append(None)
                return
            label = str(event["label"])
            self._timelines[channel].append(label)
            state.speech_windows += 1
            previous = state.last_speech["label"] if state.last_speech else None
            state.last_speech = event
            if label != previous:
                self._log_change(event, channel, previous, label)

    def _log_change(self, event: Mapping[str, Any], channel: str, previous: str | None, label: str) -> None:
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(format_clock(_change_time(event, self.info.hop_seconds)) + " ", style="dim")
        text.append(channel + " ", style="bold")
        if previous is None:
            text.append("—", style=SILENCE_STYLE)
        else:
            text.append(previous, style=emotion_style(previous))
        text.append(" → ")
        text.append(label, style=f"bold {emotion_style(label)}")
        conf = event.get("confidence")
        if conf is not None:
            text.append(f" ({float(conf):.2f})")
        self._log.append(text)

    def set_clock(self, audio_seconds: float, wall_seconds: float) -> None:
        """Audio processed so far and wall time spent; real-time factor = audio / wall."""
        with self._lock:
            self._audio_seconds = max(self._audio_seconds, float(audio_seconds))
            self._wall_seconds = float(wall_seconds)

    def log(self, message: str) -> None:
        """Add a free-text line to the log, stamped with the current audio time."""
        with self._lock:
            text = Text(no_wrap=True, overflow="ellipsis")
            text.append(format_clock(self._audio_seconds) + " ", style="dim")
            text.append(str(message), style="italic")
            self._log.append(text)

    @property
    def real_time_factor(self) -> float | None:
        """Audio seconds per wall second, ``None`` before the first ``set_clock``."""
        return self._audio_seconds / self._wall_seconds if self._wall_seconds > 0 else None

    # -- rendering

    def _header(self) -> Panel:
        # one line of facts that wraps between them on a narrow terminal (a grid would cut the source)
        grid = Text.assemble(
            ("source ", "dim"),
            (self.info.source, "bold"),
            "   ",
            ("stream ", "dim"),
            (self.info.stream, "bold"),
            "   ",
            ("audio ", "dim"),
            (format_clock(self._audio_seconds), "bold"),
            "   ",
            ("speed ", "dim"),
            (format_rtf(self.real_time_factor), "bold"),
            "   ",
            ("device ", "dim"),
            self.info.device,
            "   ",
            ("hop ", "dim"),
            f"{self.info.hop_seconds:g}s",
        )
        status = Text(" done ", style="bold black on green") if self._finished else Text(" ● live ", style="bold red")
        return Panel(
            grid,
            title=Text("emostream", style="bold"),
            title_align="left",
            subtitle=status,
            subtitle_align="right",
            box=box.ROUNDED,
        )

    def _channel_panel(self, name: str, compact: bool = False) -> Panel:
        """A channel's panel: current emotion, the seven probabilities and the timeline; ``compact``
        (a short screen): the current emotion, its top ``COMPACT_TOP`` probabilities on one line and
        the timeline, in five rows."""
        state = self._channels[name]
        event = state.last
        body = Table.grid(padding=(0, 1))
        body.add_column(no_wrap=True, min_width=10)
        body.add_column(no_wrap=True)
        body.add_column(no_wrap=True, justify="right")

        if event is None:
            body.add_row(Text("waiting", style=SILENCE_STYLE), "", "")
            probs: dict[str, float] = {}
            border = "dim"
        elif is_speech(event):
            label = str(event["label"])
            conf = float(event.get("confidence") or 0.0)
            color = emotion_style(label)
            body.add_row(
                Text(label, style=f"bold {color}"),
                ProgressBar(total=1.0, completed=conf, width=BAR_WIDTH, complete_style=color, finished_style=color),
                Text(f"{conf:.2f}", style="bold"),
            )
            probs = _probabilities(event)
            border = color
        else:
            last = state.last_speech
            note = Text("", style=SILENCE_STYLE)
            if last is not None:
                note.append(f"last {last['label']} {float(last.get('confidence') or 0.0):.2f}")
            body.add_row(Text("silence", style=f"bold {SILENCE_STYLE}"), note, "")
            probs = {}
            border = "dim"

        strip = _Timeline(self._timelines[name])
        subtitle = Text(f"{state.speech_windows}/{state.windows} windows speech", style="dim")
        if compact:
            top = Text(no_wrap=True, overflow="ellipsis")
            for i, (cls, p) in enumerate(top_shares(probs, COMPACT_TOP)):
                top.append(("  " if i else "") + cls, style=emotion_style(cls))
                top.append(f" {p:.0%}")
            return Panel(
                Group(body, top, strip),
                title=Text(name, style="bold"),
                title_align="left",
                subtitle=subtitle,
                subtitle_align="right",
                border_style=border,
                box=box.ROUNDED,
            )
        body.add_row("", "", "")
        for cls in CLASSES:
            p = probs.get(cls, 0.0)
            color = emotion_style(cls)
            body.add_row(
                Text(cls, style=color),
                ProgressBar(total=1.0, completed=p, width=BAR_WIDTH, complete_style=color, finished_style=color),
                Text(f"{p:4.0%}", style="dim" if p < 0.05 else ""),
            )
        return Panel(
            Group(body, Text(""), strip),
            title=Text(name, style="bold"),
            title_align="left",
            subtitle=subtitle,
            subtitle_align="right",
            border_style=border,
            box=box.ROUNDED,
        )

    def _log_panel(self, lines: int = LOG_LINES) -> Panel:
        shown: list[RenderableType] = list(self._log)[-lines:] or [Text("no emotion changes yet", style=SILENCE_STYLE)]
        return Panel(Group(*shown), title=Text("changes", style="bold"), title_align="left", box=box.ROUNDED)

    def _rows(self, renderable: RenderableType, width: int) -> int:
        """Terminal rows ``renderable`` takes at ``width`` columns."""
        return len(
            self.console.render_lines(renderable, self.console.options.update(width=width, height=None), pad=False)
        )

    def render(self) -> RenderableType:
        """The whole screen (used by ``Live`` and by tests), fitted to the terminal's height: when the
        full channel panels do not fit (stacked on a narrow screen, e.g. 80 x 24) they become compact,
        and the change log gets the rows that are left (none: it is left out)."""
        with self._lock:
            width, height = self.console.size
            header = self._header()
            bottom: list[RenderableType] = [summary_table(self._summary)] if self._summary is not None else []
            key = legend()
            if self._rows(key, width) > 1:
                key = legend(" ")
            fixed = self._rows(header, width) + self._rows(key, width) + sum(self._rows(b, width) for b in bottom)
            channels = _Row([self._channel_panel(name) for name in self._channels])
            if fixed + self._rows(channels, width) + 3 > height:  # not even one log line: compact panels
                channels = _Row([self._channel_panel(name, compact=True) for name in self._channels])
            log_lines = min(LOG_LINES, height - fixed - self._rows(channels, width) - 2)
            parts: list[RenderableType] = [header, channels, key]
            if log_lines > 0:
                parts.append(self._log_panel(log_lines))
            elif bottom:  # the summary at the end of a short screen: it stands for the legend, then the panels
                spare = height - fixed - self._rows(channels, width)
                if spare < 0:
                    parts.remove(key)
                    if spare + self._rows(key, width) < 0:
                        parts.remove(channels)
            return Group(*parts, *bottom)

    def finish(self, summary: dict | None) -> None:
        """Final render, with the summary table when ``summary`` is given."""
        with self._lock:
            if summary is not None:
                self._summary = summary
            self._finished = True
        if self._live is not None:
            self._live.refresh()
        else:
            self.console.print(self.render())
