"""Privacy and compliance controls: which channels are analysed, opt-in call recording, and
retention of stored timelines.

Analysing the emotions of staff at work is prohibited in the EU since 2 February 2025 (AI Act,
Article 5(1)(f)), so a deployment there analyses the customer only: ``--analyse customer``. The
channels that are not analysed are dropped before resampling, windowing and the model, so they
produce no events, no timeline and no summary entry at all.

Which channel is the customer: AudioHook ``external`` and Twilio's ``inbound`` track (the caller's
audio), both named ``customer`` by the server (the bridge's own name is kept in ``source_channel``),
and on raw PCM and in ``replay`` the channel named ``customer``; the agent is AudioHook ``internal``
and Twilio ``outbound`` (named ``agent``), or the channel named ``agent``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

ANALYSE_CHOICES = ("customer", "agent", "all")
ROLE_CHANNELS = {  # protocol -> role -> channel name
    "pcm": {"customer": "customer", "agent": "agent"},
    "audiohook": {"customer": "customer", "agent": "agent"},
    "twilio": {"customer": "customer", "agent": "agent"},  # the server names Twilio's tracks so
    "file": {"customer": "customer", "agent": "agent"},
}
SECONDS_PER_DAY = 86400.0

log = logging.getLogger("emostream.compliance")


class ChannelSelectionError(ValueError):
    """The stream has no channel with the role that ``--analyse`` asks for."""


def analysed_channels(channels: tuple[str, ...] | list[str], analyse: str, protocol: str = "file") -> tuple[int, ...]:
    """Indices of ``channels`` to analyse under ``analyse`` (customer, agent or all).

    Raises :class:`ChannelSelectionError` when no channel has the wanted role: analysing nothing
    silently would look like a quiet call, and guessing could analyse an employee.
    """
    if analyse not in ANALYSE_CHOICES:
        raise ValueError(f"--analyse must be one of {', '.join(ANALYSE_CHOICES)}, got {analyse!r}")
    if analyse == "all":
        return tuple(range(len(channels)))
    wanted = ROLE_CHANNELS.get(protocol, ROLE_CHANNELS["file"])[analyse]
    picked = tuple(i for i, name in enumerate(channels) if name == wanted)
    if not picked:
        raise ChannelSelectionError(
            f"no {analyse} channel to analyse (channels: {', '.join(channels) or 'none'}; the {analyse} is the "
            f"channel named {wanted!r}); name it so, or analyse every channel with --analyse all"
        )
    return picked


class CallRecorder:
    """Writes a call's audio, as received and with gaps as silence, to a 16-bit WAV file.

    Used only with ``--record DIR``. Channels arrive in separate pieces (Twilio sends one message
    per track), so each channel is buffered until every channel has the samples to write a frame.
    """

    def __init__(self, path: Path, sample_rate: int, channels: int):
        import soundfile as sf

        self.path = Path(path)
        self.channels = channels
        self._file = sf.SoundFile(str(self.path), "w", samplerate=sample_rate, channels=channels, subtype="PCM_16")
        self._pending: list[list[np.ndarray]] = [[] for _ in range(channels)]
        self._lengths = [0] * channels
        self.frames = 0

    def write(self, channel: int, samples: np.ndarray) -> None:
        """Float samples in [-1, 1] for one channel."""
        self._pending[channel].append(np.asarray(samples, dtype=np.float32))
        self._lengths[channel] += len(samples)
        self._drain(min(self._lengths))

    def silence(self, channel: int | None, samples: int) -> None:
        """A gap of ``samples`` on one channel, or on every channel (``None``)."""
        for ch in range(self.channels) if channel is None else [channel]:
            self.write(ch, np.zeros(samples, dtype=np.float32))

    def _take(self, channel: int, n: int) -> np.ndarray:
        data = np.concatenate(self._pending[channel]) if self._pending[channel] else np.zeros(0, np.float32)
        if len(data) < n:
            data = np.concatenate([data, np.zeros(n - len(data), np.float32)])
        self._pending[channel] = [data[n:]] if len(data) > n else []
        self._lengths[channel] = max(0, self._lengths[channel] - n)
        return data[:n]

    def _drain(self, n: int) -> None:
        if n <= 0:
            return
        frame = np.stack([self._take(ch, n) for ch in range(self.channels)], axis=1)
        self._file.write(np.clip(frame, -1.0, 1.0))
        self.frames += n

    def close(self) -> None:
        """Write what is buffered (shorter channels padded with silence) and close the file."""
        if self._file.closed:
            return
        self._drain(max(self._lengths))
        self._file.close()


def expire_timelines(
    events_dir: Path, days: float, keep: set[Path] | frozenset = frozenset(), now: float | None = None
) -> list[Path]:
    """Delete ``*.jsonl`` timelines in ``events_dir`` last written more than ``days`` ago, except
    ``keep`` (the files of live calls). Returns the deleted paths."""
    return expire_files(events_dir, "*.jsonl", days, keep, now, what="timeline")


def expire_recordings(
    record_dir: Path, days: float, keep: set[Path] | frozenset = frozenset(), now: float | None = None
) -> list[Path]:
    """Delete ``*.wav`` call recordings in ``record_dir`` last written more than ``days`` ago,
    except ``keep`` (the recordings of live calls). Returns the deleted paths."""
    return expire_files(record_dir, "*.wav", days, keep, now, what="recording")


def expire_files(
    directory: Path,
    pattern: str,
    days: float,
    keep: set[Path] | frozenset = frozenset(),
    now: float | None = None,
    what: str = "file",
) -> list[Path]:
    """Delete the files matching ``pattern`` in ``directory`` last written more than ``days`` ago,
    except ``keep``. Returns the deleted paths."""
    if days <= 0:
        raise ValueError(f"retention must be > 0 days, got {days:g}")
    cutoff = (time.time() if now is None else now) - days * SECONDS_PER_DAY
    keep = {Path(p).resolve() for p in keep}
    deleted = []
    for path in sorted(Path(directory).glob(pattern)):
        try:
            if path.resolve() in keep or path.stat().st_mtime >= cutoff:
                continue
            path.unlink()
            deleted.append(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            log.warning("cannot delete expired %s %s: %s", what, path.name, exc)
    if deleted:
        log.info("deleted %d %s(s) older than %g days", len(deleted), what, days)
    return deleted
