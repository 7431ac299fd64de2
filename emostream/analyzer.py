"""Windows in, timeline events out: speech gate, batched model call, smoothing, sinks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Awaitable, Callable, Iterable

import numpy as np

from .stream import Window
from .timeline import Smoother, Timeline, make_event
from .vad import SpeechGate, VadConfig


@dataclass(frozen=True)
class AnalyzerConfig:
    """How windows become events."""

    smooth: float = 1.0  # EMA weight of the newest window (1 = no smoothing)
    vad: VadConfig = VadConfig()  # speech gate: windows without enough speech are not classified
    max_batch: int = 32


class Analyzer:
    """Classifies windows of one stream in batches and fans events out to sinks."""

    def __init__(
        self,
        predict: Callable[[np.ndarray], np.ndarray],
        stream: str,
        channels: tuple[str, ...],
        config: AnalyzerConfig = AnalyzerConfig(),
        hop_seconds: float = 1.0,
        sinks: Iterable[Callable[[dict], None]] = (),
        source_channels: dict[str, str] | None = None,
        source_rate: int | None = None,
    ):
        self.predict = predict
        self.stream = stream
        self.config = config
        self.smoother = Smoother(config.smooth)
        self.timeline = Timeline(stream, tuple(channels), hop_seconds)
        self.sinks = list(sinks)
        self.gate = SpeechGate(config.vad, source_rate=source_rate)  # the audio's rate before resampling
        self.source_channels = dict(source_channels or {})  # channel -> the bridge's own name for it

    def process(self, windows: list[Window]) -> list[dict]:
        """Classify ``windows`` (any channels, in time order) and emit one event each."""
        idx = self.speech_indices(windows)
        step = self.config.max_batch
        out = [p for b in range(0, len(idx), step) for p in self.predict(self.model_input(windows, idx[b : b + step]))]
        return self.emit(windows, dict(zip(idx, out)))

    async def process_async(
        self, windows: list[Window], infer: Callable[[np.ndarray], Awaitable[np.ndarray]]
    ) -> list[dict]:
        """:meth:`process` with an awaitable model call (the server's shared inference worker, which
        batches across calls itself: one request per call of this method)."""
        idx = self.speech_indices(windows)
        out = await infer(self.model_input(windows, idx)) if idx else ()
        return self.emit(windows, dict(zip(idx, out)))

    @staticmethod
    def model_input(windows: list[Window], indices: list[int]) -> np.ndarray:
        """The samples of ``windows[indices]`` stacked as one model batch ``(n, WINDOW_SAMPLES)``."""
        return np.stack([windows[i].samples for i in indices])

    def speech_indices(self, windows: list[Window]) -> list[int]:
        """Indices of the windows that hold speech (the ones the model classifies)."""
        return self.gate.select(windows)

    def emit(self, windows: list[Window], probs: dict[int, np.ndarray]) -> list[dict]:
        """Smooth, build one event per window (``probs`` by window index; missing = silence),
        add them to the timeline and hand them to the sinks."""
        events = []
        for i, w in enumerate(windows):
            p = self.smoother(w.channel, probs.get(i))
            event = make_event(self.stream, w.channel, w.t_start, w.t_end, p)
            if w.channel in self.source_channels:
                event["source_channel"] = self.source_channels[w.channel]
            self.timeline.add(event)
            for sink in self.sinks:
                sink(event)
            events.append(event)
        return events
