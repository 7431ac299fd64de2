"""One call's analysis path: audio frames → resample → windows → speech gate → model → events → sinks,
alerts and summary.

``emostream replay``, ``emostream mic``, the Python API (:func:`emostream.analyze`,
:class:`emostream.Stream`), the server's calls (:class:`emostream.live_call.LiveCall`) and
``emostream batch`` run a call through :class:`CallPipeline`, so a file gives the same events from
any of them. A recording or a microphone pushes frames of every channel at once and classifies in
this thread (:meth:`CallPipeline.push`); the server, whose channels arrive in separate pieces and
whose model is a shared awaitable worker, cuts each channel's windows
(:meth:`CallPipeline.channel_windows`) and classifies them with :meth:`CallPipeline.classify_async`;
batch cuts and gates windows in a model worker and emits their events in the driver
(:meth:`CallPipeline.emit`): the same resamplers, windows, gate, model call, smoothing, events,
sinks and alerts.
"""

from __future__ import annotations

from typing import Awaitable, Callable, Iterable

import numpy as np

from .alerts import AlertTracker
from .analyzer import Analyzer, AnalyzerConfig
from .audio import SAMPLE_RATE, StreamResampler
from .stream import StreamConfig, StreamWindower, Window

REPLAY_CHUNK_SECONDS = 0.1  # a recorded call is fed in chunks of this size (replay, emostream.analyze)

Sink = Callable[[dict], None]


class CallPipeline:
    """The per-call path of a recording or a live stream.

    ``push`` takes float32 frames ``(channels, n)`` at ``sample_rate`` (resampled to 16 kHz per channel,
    chunk by chunk as if whole); every window that completes is gated, classified
    and turned into an event, which goes to each of ``sinks`` in order, then through the alert rules:
    each raised or cleared alert goes to each of ``alert_sinks``. ``flush`` ends the stream (the final
    partial window); :meth:`summary` is the end-of-call summary line. ``source_channels`` names each
    channel as the bridge did (events carry it beside the common name).
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
        source_channels: dict[str, str] | None = None,
    ):
        self.stream = stream
        self.channels = tuple(channels)
        self.sample_rate = int(sample_rate)
        # passthrough at 16 kHz
        self.resamplers = [StreamResampler(self.sample_rate, SAMPLE_RATE) for _ in self.channels]
        self.windower = StreamWindower(stream, self.channels, stream_config)
        # channel_windows: each channel's frames held until they can complete a window (see there)
        self._held: list[list[np.ndarray]] = [[] for _ in self.channels]
        self._held_samples = [0] * len(self.channels)
        self._due = [0] * len(self.channels)  # input samples that complete the channel's next window
        sinks = list(sinks)
        rules = tuple(alert_rules)
        self.alerts = AlertTracker(rules, stream)
        if rules:
            alert_sinks = list(alert_sinks)

            def alert_sink(event: dict) -> None:
                for alert in self.alerts.update(event):
                    for sink in alert_sinks:
                        sink(alert)

            sinks.append(alert_sink)
        self.analyzer = Analyzer(
            predict,
            stream,
            self.channels,
            analyzer_config,
            stream_config.hop_seconds,
            sinks,
            source_channels=source_channels,
            source_rate=self.sample_rate,
        )

    def push(self, frames: np.ndarray) -> list[dict]:
        """Float32 samples ``(channels, n)`` (or ``(n,)`` for one channel); the events of the windows they complete."""
        return self.analyzer.process(self.frame_windows(frames))

    def frame_windows(self, frames: np.ndarray) -> list[Window]:
        """The windows that ``frames`` (as :meth:`push` takes them) complete, not classified yet."""
        if self.sample_rate != SAMPLE_RATE:
            frames = np.stack([r.push(x) for r, x in zip(self.resamplers, np.atleast_2d(frames))])
        return self.windower.push_frames(frames)

    def flush(self) -> list[dict]:
        """End of the audio: the events of the final partial windows."""
        events = []
        if self.sample_rate != SAMPLE_RATE:
            events = self.analyzer.process(self.windower.push_frames(np.stack([r.flush() for r in self.resamplers])))
        return events + self.analyzer.process(self.windower.flush())

    # -- windows cut here, classified elsewhere: by an awaitable model (the server, one channel at a
    #    time) or in another process (batch: windows and gate in a model worker, events in the driver)

    def channel_windows(self, channel: int, samples: np.ndarray) -> list[Window]:
        """Samples of channel ``channel`` (index) at ``sample_rate``: the windows they complete (not
        classified yet: :meth:`classify_async`).

        A live call sends small frames (20 ms from Twilio) and completes a window once a hop, so the
        frames are only held here (a list append) until they hold enough input to complete the
        channel's next window, then resampled and windowed in one piece: the same windows, each
        returned by the frame that completes it (never later than if every frame were resampled on
        arrival, where output comes in 100 ms blocks).
        """
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self._held[channel].append(samples)
        self._held_samples[channel] += len(samples)
        if self._held_samples[channel] < self._due[channel]:
            return []
        windows = self._release(channel)
        windower = self.windower.windowers[self.channels[channel]]
        self._due[channel] = self.resamplers[channel].input_needed(windower.next_end - windower.samples_seen)
        return windows

    def _release(self, channel: int) -> list[Window]:
        """Resample and window the frames held for ``channel``."""
        held = self._held[channel]
        x = held[0] if len(held) == 1 else np.concatenate(held)
        self._held[channel], self._held_samples[channel] = [], 0
        x = self.resamplers[channel].push(x)
        return self.windower.push(channel, x) if len(x) else []

    def final_windows(self) -> list[Window]:
        """End of the audio: every channel's final windows (not classified yet)."""
        windows = []
        for ch in range(len(self.channels)):
            windows += self._flush_resampler(ch)
        return windows + self.windower.flush()

    def _flush_resampler(self, channel: int) -> list[Window]:
        """The windows completed by the rest of ``channel``'s held frames and resampler output (at a
        stream's end or a gap)."""
        windows = self._release(channel) if self._held[channel] else []
        self._due[channel] = 0
        x = self.resamplers[channel].flush()
        return windows + (self.windower.push(channel, x) if len(x) else [])

    def collapse_gap(self, channel: int, input_samples: int) -> tuple[list[Window], float, float]:
        """A long gap on channel ``channel`` in O(1): its audio before the gap gets its final window
        (as at the end of a stream) and the window schedule restarts where the channel's input now
        ends, ``input_samples`` at ``sample_rate`` counted from the start, the gap included (on the
        same clock). Returns those windows (not classified yet) and the gap's start and end (s)."""
        windows = self._flush_resampler(channel)
        gap_start = self.windower.windowers[self.channels[channel]].samples_seen
        gap_end = max(gap_start, round(input_samples * SAMPLE_RATE / self.sample_rate))
        windows += self.windower.skip(channel, gap_end - gap_start)
        self.resamplers[channel] = StreamResampler(self.sample_rate, SAMPLE_RATE)  # silence before new audio
        return windows, gap_start / SAMPLE_RATE, gap_end / SAMPLE_RATE

    async def classify_async(
        self, windows: list[Window], infer: Callable[[np.ndarray], Awaitable[np.ndarray]]
    ) -> list[dict]:
        """Gate, classify (one awaited ``infer`` call) and emit ``windows`` (any channels, in time order)."""
        return await self.analyzer.process_async(windows, infer)

    def speech_indices(self, windows: list[Window]) -> list[int]:
        """Indices of the windows the speech gate passes to the model."""
        return self.analyzer.speech_indices(windows)

    def emit(self, windows: list[Window], probs: dict[int, np.ndarray]) -> list[dict]:
        """Events for windows classified elsewhere (``probs`` by window index; missing = silence):
        smoothed, to the timeline, the sinks and the alert rules."""
        return self.analyzer.emit(windows, probs)

    # -- state

    @property
    def timeline(self):
        """The call's :class:`~emostream.timeline.Timeline` (events so far, running summary)."""
        return self.analyzer.timeline

    def summary(self) -> dict:
        """The end-of-call summary (:meth:`emostream.timeline.Timeline.summary`)."""
        return self.analyzer.timeline.summary()

    @property
    def seconds(self) -> float:
        """Audio that reached the windows so far (the longest channel; frames still held by
        :meth:`channel_windows` not counted)."""
        return self.windower.seconds
