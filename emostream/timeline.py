"""Emotion events, per-channel timelines, smoothing, JSON lines output and call summaries."""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterable

import numpy as np

from . import CLASSES


def make_event(stream: str, channel: str, t_start: float, t_end: float, probabilities: np.ndarray | None) -> dict:
    """One timeline event (the stable shape of DESIGN.md). ``None`` probabilities = no speech."""
    event = {
        "type": "event",
        "stream": stream,
        "channel": channel,
        "t_start": round(float(t_start), 6),
        "t_end": round(float(t_end), 6),
        "speech": probabilities is not None,
    }
    if probabilities is None:
        event.update(label=None, confidence=None, probabilities=None)
    else:
        p = np.asarray(probabilities, dtype=np.float64)
        k = int(p.argmax())
        event.update(
            label=CLASSES[k],
            confidence=round(float(p[k]), 4),
            probabilities={c: round(float(v), 4) for c, v in zip(CLASSES, p)},
        )
    return event


def iso_utc(seconds: float | None) -> str | None:
    """A Unix time as UTC ISO 8601 with milliseconds (``2026-12-06T15:30:00.000Z``)."""
    from datetime import datetime, timezone

    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


FILE_START_FROM = "file modification time - duration"  # how a recording's started_at was found


def file_start_time(path: str | Path, duration: float) -> str | None:
    """A recording's wall-clock start as far as the file tells: its modification time (recorders write
    the file as the call ends) minus its duration, as :func:`iso_utc`; None when it cannot be read."""
    try:
        return iso_utc(Path(path).stat().st_mtime - duration)
    except OSError:
        return None


class Smoother:
    """Exponential moving average of probabilities per channel (``alpha`` = weight of the new window).

    ``alpha = 1`` disables smoothing. Silence windows pass through and do not reset the average.
    """

    def __init__(self, alpha: float = 1.0):
        if not 0 < alpha <= 1:
            raise ValueError(f"smoothing alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self._state: dict[str, np.ndarray] = {}

    def __call__(self, channel: str, probabilities: np.ndarray | None) -> np.ndarray | None:
        if probabilities is None or self.alpha == 1:
            return probabilities
        prev = self._state.get(channel)
        cur = np.asarray(probabilities, dtype=np.float64)
        new = cur if prev is None else self.alpha * cur + (1 - self.alpha) * prev
        self._state[channel] = new
        return new


# Candidates a running summary keeps per channel for its peaks: the most confident non-neutral windows.
# The peaks are the best windows that do not overlap (distinct_peaks), chosen among these candidates;
# that equals the choice among all windows while the candidates include every window ranked above the
# n-th peak: n + (n - 1) * (2 * window / hop - 1) of them at most (49 for 3 peaks at hop 0.5 s).
MAX_PEAKS = 64


@dataclass
class ChannelTally:
    """The running summary of one channel: what :meth:`Timeline.summary` reports, in O(1) memory."""

    windows: int = 0
    speech_windows: int = 0
    speech_seconds: float = 0.0
    prev_end: float = 0.0
    duration: float = 0.0
    time_by_label: dict[str, float] = field(default_factory=lambda: dict.fromkeys(CLASSES, 0.0))
    peaks: list[dict] = field(default_factory=list)  # peak candidates, most confident first, ties in time order

    def add(self, e: dict) -> None:
        self.windows += 1
        self.duration = max(self.duration, e["t_end"])
        new = max(0.0, e["t_end"] - max(self.prev_end, e["t_start"]))
        self.prev_end = e["t_end"]
        if not e["speech"]:
            return
        self.speech_windows += 1
        self.speech_seconds += new
        self.time_by_label[e["label"]] += new
        if e["label"] != "Neutral" and (len(self.peaks) < MAX_PEAKS or e["confidence"] > self.peaks[-1]["confidence"]):
            keys = [-p["confidence"] for p in self.peaks]
            self.peaks.insert(bisect.bisect_right(keys, -e["confidence"]), e)
            del self.peaks[MAX_PEAKS:]


def distinct_peaks(events: Iterable[dict], n: int) -> list[dict]:
    """The ``n`` most confident events whose windows do not overlap: each overlapping group keeps
    its best window, so one moment is not listed three times (by confidence, ties by time)."""
    chosen: list[dict] = []
    for e in sorted(events, key=lambda e: (-e["confidence"], e["t_end"])):
        if len(chosen) == n:
            break
        if all(e["t_end"] <= p["t_start"] or p["t_end"] <= e["t_start"] for p in chosen):
            chosen.append(e)
    return chosen


@dataclass
class Timeline:
    """Events of one stream, per channel, and the end-of-stream summary.

    ``max_events``: events kept per channel (the newest; ``None`` keeps all). The summary counts every
    event whatever is kept: it is a running tally (:class:`ChannelTally`)."""

    stream: str
    channels: tuple[str, ...]
    hop_seconds: float = 1.0
    events: dict[str, list[dict]] = field(default_factory=dict)
    max_events: int | None = None

    def __post_init__(self):
        self._tallies: dict[str, ChannelTally] = {}
        for name, evs in self.events.items():
            tally = self._tallies.setdefault(name, ChannelTally())
            for e in evs:
                tally.add(e)

    def add(self, event: dict) -> None:
        kept = self.events.setdefault(event["channel"], [])
        kept.append(event)
        if self.max_events is not None and len(kept) > self.max_events + self.max_events // 4 + 1:
            del kept[: len(kept) - self.max_events]  # amortised O(1) per event
        self._tallies.setdefault(event["channel"], ChannelTally()).add(event)

    def ordered_events(self) -> list[dict]:
        """The kept events of every channel in time order (by window end, then channel order)."""
        order = {ch: k for k, ch in enumerate(self.channels)}
        events = [e for ch in self.channels for e in self.events.get(ch, [])]
        events.sort(key=lambda e: (e["t_end"], order[e["channel"]]))
        return events

    def summary(self, peaks: int = 3) -> dict:
        """Per channel: windows, speech time, share of speech time per emotion, dominant emotion and
        the most confident non-neutral moments (windows that do not overlap). Each window stands for the
        ``hop`` of new audio it adds (its last hop), so shares add up to speech time without double
        counting overlaps."""
        channels = {}
        duration = 0.0
        for name in self.channels:
            tally = self._tallies.get(name, ChannelTally())
            duration = max(duration, tally.duration)
            speech_seconds, time_by_label = tally.speech_seconds, tally.time_by_label
            shares = {c: (round(t / speech_seconds, 4) if speech_seconds else 0.0) for c, t in time_by_label.items()}
            ranked = distinct_peaks(tally.peaks, peaks)
            channels[name] = {
                "windows": tally.windows,
                "speech_windows": tally.speech_windows,
                "speech_seconds": round(speech_seconds, 3),
                "shares": shares,
                "dominant": max(shares, key=shares.get) if speech_seconds else None,
                "peaks": [{k: e[k] for k in ("label", "confidence", "t_start", "t_end")} for e in ranked],
            }
        return {"type": "summary", "stream": self.stream, "duration": round(duration, 3), "channels": channels}


class JsonlWriter:
    """Writes one JSON object per line and flushes after each, so nothing is lost on a crash."""

    def __init__(self, target: str | Path | IO[str]):
        if isinstance(target, (str, Path)):
            path = Path(target)
            if path.parent and not path.parent.exists():
                raise FileNotFoundError(f"directory for events does not exist: {path.parent}")
            self._file: IO[str] = open(path, "w", encoding="utf-8")
            self._owned = True
        else:
            self._file, self._owned = target, False

    def write(self, obj: dict) -> None:
        self._file.write(json.dumps(obj, separators=(", ", ": ")) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._owned:
            self._file.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_events(path: str | Path) -> list[dict]:
    """Events of a JSONL timeline (summary, alert and ``gap`` lines skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            obj = json.loads(line)
            kind = obj.get("type", "event")
            if kind == "event" or (kind != "gap" and "t_start" in obj):  # gap records are not events
                out.append(obj)
    return out
