"""Per-channel ring buffers and the sliding 6 s window schedule.

Time is samples: every channel keeps an absolute sample counter, and window times are derived from
it, never from the wall clock, so replay, live and batch give the same windows for the same audio.

Schedule (``hop`` and ``min_seconds`` from :class:`StreamConfig`): a window ends at every multiple
of the hop, ``t = k * hop``, and covers ``[max(0, t - 6 s), t)``. No window is emitted before
``min_seconds`` of audio has arrived; a window shorter than 6 s (the first seconds of a stream) is
zero-padded at the end, as the recipe pads short clips. At end of stream, :meth:`flush` emits one
final window ending at the last sample if any audio arrived after the last window's end (or if the
stream was shorter than ``min_seconds``).

A long gap (the server's collapsed silence, :meth:`ChannelWindower.skip`) ends the schedule like the end
of the stream (the final partial window) and restarts it at the gap's end: windows then end at
``gap_end + k * hop`` and never reach back before ``gap_end``, as if a new stream began there, on the
same absolute clock.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .audio import SAMPLE_RATE, WINDOW_SAMPLES, WINDOW_SECONDS


@dataclass(frozen=True)
class StreamConfig:
    """Window schedule of a stream."""

    hop_seconds: float = 1.0
    min_seconds: float = 1.0
    sample_rate: int = SAMPLE_RATE
    window_seconds: float = WINDOW_SECONDS

    def __post_init__(self):
        if not self.hop_seconds > 0:
            raise ValueError(f"hop must be > 0 seconds, got {self.hop_seconds}")
        if not 0 < self.min_seconds <= self.window_seconds:
            raise ValueError(f"min-seconds must be in (0, {self.window_seconds}], got {self.min_seconds}")
        if round(self.hop_seconds * self.sample_rate) < 1:
            raise ValueError(f"hop {self.hop_seconds} s is shorter than one sample")

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop_seconds * self.sample_rate))

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def min_samples(self) -> int:
        return int(round(self.min_seconds * self.sample_rate))


class RingBuffer:
    """Fixed-capacity float32 ring with an absolute sample clock.

    ``append`` copies each chunk in at most two slices (O(chunk), O(1) per call otherwise);
    ``read(start, end)`` returns absolute samples ``[start, end)`` still held.
    """

    def __init__(self, capacity: int):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self._data = np.zeros(capacity, dtype=np.float32)
        self.total = 0  # absolute number of samples ever appended

    def append(self, samples: np.ndarray) -> None:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        n = len(samples)
        if n == 0:
            return
        if n >= self.capacity:  # only the newest `capacity` samples can be kept
            self.total += n - self.capacity
            samples, n = samples[-self.capacity :], self.capacity
        pos = self.total % self.capacity
        first = min(n, self.capacity - pos)
        self._data[pos : pos + first] = samples[:first]
        if first < n:
            self._data[: n - first] = samples[first:]
        self.total += n

    def skip(self, n: int) -> None:
        """Advance the clock by ``n`` samples without storing them (they are never read)."""
        self.total += max(0, int(n))

    @property
    def oldest(self) -> int:
        """Absolute index of the oldest sample still held."""
        return max(0, self.total - self.capacity)

    def read(self, start: int, end: int) -> np.ndarray:
        """Copy of absolute samples ``[start, end)``."""
        if start < self.oldest or end > self.total or start > end:
            raise IndexError(f"samples [{start}, {end}) not held (held [{self.oldest}, {self.total}))")
        n = end - start
        pos = start % self.capacity
        first = min(n, self.capacity - pos)
        out = np.empty(n, dtype=np.float32)
        out[:first] = self._data[pos : pos + first]
        if first < n:
            out[first:] = self._data[: n - first]
        return out


@dataclass(frozen=True)
class Window:
    """One analysis window of one channel: absolute sample range and its padded samples."""

    channel: str
    start: int
    end: int
    samples: np.ndarray  # float32, exactly the model's window length (zero-padded at the end)
    final: bool = False
    sample_rate: int = SAMPLE_RATE

    @property
    def t_start(self) -> float:
        return self.start / self.sample_rate

    @property
    def t_end(self) -> float:
        return self.end / self.sample_rate


class ChannelWindower:
    """Ring buffer + window schedule for one channel."""

    def __init__(self, channel: str, config: StreamConfig = StreamConfig()):
        self.channel = channel
        self.config = config
        self.buffer = RingBuffer(config.window_samples + config.hop_samples + config.sample_rate)
        self.origin = 0  # where the schedule (re)started: 0, or the end of the last skipped gap
        self.next_end = self._first_end()
        self.last_end = 0

    def _first_end(self) -> int:
        return self.origin + max(self.config.hop_samples, _ceil_to(self.config.min_samples, self.config.hop_samples))

    @property
    def samples_seen(self) -> int:
        return self.buffer.total

    def _window(self, end: int, final: bool) -> Window:
        start = max(self.origin, end - self.config.window_samples)
        out = np.zeros(self.config.window_samples, dtype=np.float32)
        piece = self.buffer.read(start, end)
        out[: len(piece)] = piece
        self.last_end = end
        return Window(self.channel, start, end, out, final, self.config.sample_rate)

    def push(self, samples: np.ndarray) -> list[Window]:
        """Append samples; return every window that became complete."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        windows = []
        # Feed in pieces so no window's samples are overwritten before it is cut.
        step = self.config.hop_samples
        pos = 0
        while pos < len(samples):
            take = min(len(samples) - pos, max(1, self.next_end - self.buffer.total))
            self.buffer.append(samples[pos : pos + take])
            pos += take
            while self.buffer.total >= self.next_end:
                windows.append(self._window(self.next_end, final=False))
                self.next_end += step
        return windows

    def flush(self) -> list[Window]:
        """End of stream: the final partial window, if audio arrived after the last window."""
        total = self.buffer.total
        if total == self.origin or total == self.last_end:
            return []
        return [self._window(total, final=True)]

    def skip(self, samples: int) -> list[Window]:
        """A gap of ``samples`` that is not analysed: O(1) whatever its length. Returns the final
        window of the audio before it (as :meth:`flush`); the schedule restarts after the gap."""
        windows = self.flush()
        self.buffer.skip(samples)
        self.origin = self.last_end = self.buffer.total
        self.next_end = self._first_end()
        return windows


class StreamWindower:
    """All channels of one stream (a call): ``(channel, samples)`` in, windows out."""

    def __init__(self, stream: str, channels: tuple[str, ...] | list[str], config: StreamConfig = StreamConfig()):
        if len(set(channels)) != len(channels) or not channels:
            raise ValueError(f"channel names must be unique and non-empty: {list(channels)}")
        self.stream = stream
        self.config = config
        self.channels = tuple(channels)
        self.windowers = {name: ChannelWindower(name, config) for name in self.channels}

    def push(self, channel: str | int, samples: np.ndarray) -> list[Window]:
        """Samples for one channel (by name or index)."""
        name = self.channels[channel] if isinstance(channel, int) else channel
        return self.windowers[name].push(samples)

    def push_frames(self, frames: np.ndarray) -> list[Window]:
        """Multi-channel samples shaped ``(channels, n)`` (or ``(n,)`` for mono)."""
        frames = np.atleast_2d(frames)
        if frames.shape[0] != len(self.channels):
            raise ValueError(f"got {frames.shape[0]} channels, stream has {len(self.channels)}")
        out = []
        for name, samples in zip(self.channels, frames):
            out += self.windowers[name].push(samples)
        return sorted(out, key=lambda w: (w.end, self.channels.index(w.channel)))

    def skip(self, channel: str | int, samples: int) -> list[Window]:
        """A gap of ``samples`` on one channel (see :meth:`ChannelWindower.skip`)."""
        name = self.channels[channel] if isinstance(channel, int) else channel
        return self.windowers[name].skip(samples)

    def flush(self) -> list[Window]:
        out = []
        for name in self.channels:
            out += self.windowers[name].flush()
        return out

    @property
    def seconds(self) -> float:
        """Audio time received (the longest channel)."""
        return max(w.samples_seen for w in self.windowers.values()) / self.config.sample_rate


def fixed_chunks(samples: np.ndarray, max_seconds: float = 600.0, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The recipe's fixed-chunk inference: consecutive 6 s chunks ``(n, WINDOW_SAMPLES)``, the last
    one zero-padded; at most ``max_seconds`` of audio."""
    x = np.asarray(samples, dtype=np.float32)[: int(max_seconds * sample_rate)]
    n = max(1, -(-len(x) // WINDOW_SAMPLES))
    out = np.zeros((n, WINDOW_SAMPLES), dtype=np.float32)
    for k in range(n):
        piece = x[k * WINDOW_SAMPLES : (k + 1) * WINDOW_SAMPLES]
        out[k, : len(piece)] = piece
    return out


# Placements per clip for whole-file classification (`emostream classify`): run 25 of
# train/EXPERIMENTS.md, adopted because the same models score better with 5 than with the recipe's 1 in
# speaker-grouped 4-fold CV (UA 0.589 vs 0.583, ROC AUC 0.870 vs 0.867).
CLIP_POSITIONS = 5


def placed_windows(
    samples: np.ndarray, positions: int = 1, max_seconds: float = 600.0, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """Test-time window averaging: the windows ``(n, WINDOW_SAMPLES)`` whose logits a clip's
    prediction averages.

    ``positions == 1`` is the recipe's :func:`fixed_chunks` (a short clip at the start of one
    zero-padded window). With ``positions = P > 1`` a clip shorter than the window is placed at P
    evenly spaced offsets, from the start of the window to its end, as the sliding windows of a
    stream hold an utterance in turn; a longer clip is read by windows lying wholly inside it, evenly
    spaced from its start to its end, at most ``WINDOW / (P - 1)`` apart (at least P of them).
    """
    x = np.asarray(samples, dtype=np.float32)[: int(max_seconds * sample_rate)]
    plan = window_placements(len(x), positions)
    out = np.zeros((len(plan), WINDOW_SAMPLES), dtype=np.float32)
    for k, (src, dst) in enumerate(plan):
        piece = x[src : src + WINDOW_SAMPLES - dst]
        out[k, dst : dst + len(piece)] = piece
    return out


def window_placements(n_samples: int, positions: int = 1) -> list[tuple[int, int]]:
    """Where :func:`placed_windows` cuts a clip of ``n_samples``: one ``(src, dst)`` per window, in
    order of ``src``: window ``k`` holds samples ``[src, src + WINDOW - dst)`` of the clip at offset
    ``dst`` (zero-padded). Lets a long file be scored while it is decoded, block by block."""
    if positions < 1:
        raise ValueError(f"positions must be >= 1, got {positions}")
    if positions == 1:
        return [(k * WINDOW_SAMPLES, 0) for k in range(max(1, -(-n_samples // WINDOW_SAMPLES)))]
    spare = abs(WINDOW_SAMPLES - n_samples)
    step = WINDOW_SAMPLES / (positions - 1)
    n = max(positions, int(np.ceil(spare / step)) + 1)
    starts = np.rint(np.linspace(0, spare, n)).astype(int)
    if n_samples <= WINDOW_SAMPLES:
        return [(0, int(s)) for s in starts]
    return [(int(s), 0) for s in starts]


def _ceil_to(x: int, step: int) -> int:
    return -(-x // step) * step


def frame_levels_db(samples: np.ndarray, frame: int = 512) -> np.ndarray:
    """Level in dBFS (RMS) of each whole ``frame``-sample frame; a trailing partial frame is dropped."""
    n = len(samples) // frame
    frames = np.asarray(samples[: n * frame], dtype=np.float32).reshape(n, frame)
    return 10 * np.log10(np.mean(frames**2, axis=1) + 1e-12)
