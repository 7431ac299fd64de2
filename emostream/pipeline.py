"""One call's analysis path: audio frames → resample → windows → speech gate → model → events → sinks,
alerts and summary.

``emostream replay``, ``emostream mic`` and the Python API (:func:`emostream.analyze`,
:class:`emostream.Stream`) run a call through :class:`CallPipeline`, so a file gives the same events
from any of them.
"""

from __future__ import annotations

from typing import Callable, Iterable

import numpy as np

from .analyzer import Analyzer, AnalyzerConfig
from .audio import SAMPLE_RATE, StreamResampler
from .stream import StreamConfig, StreamWindower

REPLAY_CHUNK_SECONDS = 0.1  # a recorded call is fed in chunks of this size (replay, emostream.analyze)

Sink = Callable[[dict], None]


def channel_names(names: Iterable[str] | None, n_channels: int) -> tuple[str, ...]:
    """The names of a recording's channels: ``names`` (stripped) when given, else ch0, ch1, ...;
    raises ValueError unless there are ``n_channels`` distinct non-empty names."""
    if names is None:
        return tuple(f"ch{i}" for i in range(n_channels))
    out = tuple(str(n).strip() for n in names)
    if len(out) != n_channels or len(set(out)) != len(out) or not all(out):
        raise ValueError(f"need {n_channels} distinct channel names, got {list(out)}")
    return out


class CallPipeline:
    """The per-call path of a recording or a live stream.

    ``push`` takes float32 frames ``(channels, n)`` at ``sample_rate`` (resampled to 16 kHz per channel,
    chunk by chunk as if whole); every window that completes is gated, classified
    and turned into an event, which goes to each of ``sinks`` in order, then through the alert rules:
    each raised or cleared alert goes to each of ``alert_sinks``. ``flush`` ends the stream (the final
    partial window); :meth:`summary` is the end-of-call summary line.
    """

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        stream: str,
        channels: tuple[str, ...],
        *,
        stream_config: StreamConfig = StreamConfig(),
        analyzer_config: AnalyzerConfig = AnalyzerConfig(),
        sinks: Iterable[Sink] = (),
        alert_rules: Iterable = (),
        alert_sinks: Iterable[Sink] = (),
        sample_rate: int = SAMPLE_RATE,
    ):
        self.stream = stream
        self.channels = tuple(channels)
        self.resamplers = (
            None if sample_rate == SAMPLE_RATE else [StreamResampler(sample_rate, SAMPLE_RATE) for _ in self.channels]
        )
        self.windower = StreamWindower(stream, self.channels, stream_config)
        sinks = list(sinks)
        self.alerts = None
        rules = tuple(alert_rules)
        if rules:
            from .alerts import AlertTracker

            self.alerts = AlertTracker(rules, stream)
            alert_sinks = list(alert_sinks)

            def alert_sink(event: dict) -> None:
                for alert in self.alerts.update(event):
                    for sink in alert_sinks:
                        sink(alert)

            sinks.append(alert_sink)
        self.analyzer = Analyzer(predict, stream, self.channels, analyzer_config, stream_config.hop_seconds, sinks)

    def push(self, frames: np.ndarray) -> list[dict]:
        """Float32 samples ``(channels, n)`` (or ``(n,)`` for one channel); the events of the windows they complete."""
        if self.resamplers is not None:
            frames = np.stack([r.push(x) for r, x in zip(self.resamplers, np.atleast_2d(frames))])
        return self.analyzer.process(self.windower.push_frames(frames))

    def flush(self) -> list[dict]:
        """End of the audio: the events of the final partial windows."""
        events = []
        if self.resamplers is not None:
            events = self.analyzer.process(self.windower.push_frames(np.stack([r.flush() for r in self.resamplers])))
        return events + self.analyzer.process(self.windower.flush())

    def summary(self) -> dict:
        """The end-of-call summary (:meth:`emostream.timeline.Timeline.summary`)."""
        return self.analyzer.timeline.summary()

    @property
    def seconds(self) -> float:
        """Audio received so far (the longest channel)."""
        return self.windower.seconds
