"""The Python API: load the model, analyse a recorded call, classify a clip, stream live audio.

    import emostream
    model = emostream.load_model()
    result = emostream.analyze("call.flac", model=model, channel_names=("agent", "customer"))
    result.events, result.summary, result.to_pandas()
    emostream.classify("clip.wav", model=model)
    stream = emostream.Stream(model, channels=("customer",), sample_rate=8000)
    events = stream.push(samples)
    summary = stream.close()

The CLI runs the same code: ``emostream replay --fast --events`` writes exactly the lines of
:func:`analyze` (``result.lines``), and ``emostream classify --json`` prints :func:`classify`'s dict.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from .stream import CLIP_POSITIONS

Model = Any  # a loaded predictor: emostream.model.Predictor (torch) or emostream.onnx_model.OnnxPredictor


def load_model(
    path: str | Path | None = None, *, device: str = "auto", backend: str = "auto", fp32: bool = False
) -> Model:
    """The model at ``path``: a checkpoint directory (backend auto or torch; None: the shipped model,
    or ``$EMOSTREAM_CHECKPOINT``) or an ONNX file made by ``emostream export --onnx`` (backend onnx).
    Backend auto runs the checkpoint's int8 model on a CPU (built at first use: :mod:`emostream.int8`)
    and torch on CUDA. ``device``: auto (CUDA when present), cpu or cuda[:N]; ``fp32``: no reduced
    precision (torch fp32). Raises :class:`~emostream.model.CheckpointError` (a ValueError) for a
    missing or foreign model."""
    from .loading import load_predictor
    from .model_files import model_identity

    if backend == "onnx":
        if path is None:
            raise ValueError(
                "backend onnx needs the path of an ONNX file (make one with: emostream export --onnx FILE)"
            )
        predictor = load_predictor(device=device, fp32=fp32, backend="onnx", onnx=path)
        predictor.identity = model_identity(onnx=path)
    else:
        predictor = load_predictor(path, device=device, fp32=fp32, backend=backend)
        predictor.identity = model_identity(path)
    return predictor  # .identity: the "model" field of summaries (name, weights hash)


_shipped: list = []


def _model(model: Model | None) -> Model:
    """``model``, or the shipped model (loaded once per process)."""
    if model is not None:
        return model
    if not _shipped:
        _shipped.append(load_model())
    return _shipped[0]


def classify(
    path: str | Path, model: Model | None = None, *, positions: int = CLIP_POSITIONS, vad: str = "silero"
) -> dict:
    """Whole-file emotion of a recording: the dict ``emostream classify --json`` prints (path, label,
    confidence, probabilities of the 7 classes, duration in seconds, speech, speech_seconds; with less
    than the gate's minimum of speech, ``speech`` is false and label, confidence and probabilities are
    None). ``positions``: placements of a short clip in the 6 s window whose logits are averaged;
    ``vad``: the speech gate (silero, energy, off). Raises ValueError for unreadable audio."""
    from .vad import VadConfig
    from .whole_file import classify_file

    return classify_file(path, _model(model), positions, VadConfig.named(vad))


@dataclass(frozen=True)
class Analysis:
    """A call's timeline: ``events`` (window events, and alert messages when rules were given, in
    the order they happened) and the end-of-call ``summary``."""

    events: list[dict]
    summary: dict

    @property
    def lines(self) -> list[dict]:
        """Every line of the call's JSONL timeline, as ``replay --events`` writes it: events, then the summary."""
        return self.events + [self.summary]

    def to_pandas(self):
        """One row per window: stream, channel, t_start, t_end, speech, label, confidence and one
        column per class (NaN where the window was not classified). Needs pandas."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Analysis.to_pandas needs pandas: pip install pandas") from None
        from . import CLASSES

        rows = []
        for e in self.events:
            if e.get("type", "event") != "event":
                continue
            row = {k: e[k] for k in ("stream", "channel", "t_start", "t_end", "speech", "label", "confidence")}
            probs = e.get("probabilities") or {}
            row.update({c: probs.get(c, float("nan")) for c in CLASSES})
            rows.append(row)
        return pd.DataFrame(
            rows, columns=["stream", "channel", "t_start", "t_end", "speech", "label", "confidence", *CLASSES]
        )


class Stream:
    """Live analysis of one stream: push audio as it arrives, get the events of the windows it completes.

    ``channels``: one name per channel; ``sample_rate``: the rate pushed samples have (resampled to
    16 kHz here, chunk by chunk as if whole); ``hop``: seconds between windows; ``min_seconds``:
    audio before the first window; ``smooth``: EMA weight of the newest window (1 = none); ``vad``:
    silero, energy or off; ``alerts``: rules such as ``"Angry>=0.7 for 10s"`` (their raised/cleared
    messages come back among the events). The events do not depend on how the audio is cut into pushes.
    """

    def __init__(
        self,
        model: Model | None = None,
        *,
        channels: Iterable[str] = ("ch0",),
        sample_rate: int = 16000,
        stream: str = "stream",
        hop: float = 1.0,
        min_seconds: float = 1.0,
        smooth: float = 1.0,
        vad: str = "silero",
        alerts: Iterable[str] = (),
    ):
        from .alerts import AlertRule
        from .analyzer import AnalyzerConfig
        from .pipeline import CallPipeline
        from .stream import StreamConfig
        from .vad import VadConfig

        self.channels = tuple(channels)
        rules = tuple(r if isinstance(r, AlertRule) else AlertRule.parse(r) for r in alerts)
        self._out: list[dict] = []
        self._model = _model(model)
        self._started = time.time()
        self._pipeline = CallPipeline(
            self._model.predict,
            stream,
            self.channels,
            stream_config=StreamConfig(hop_seconds=hop, min_seconds=min_seconds),
            analyzer_config=AnalyzerConfig(smooth=smooth, vad=VadConfig.named(vad)),
            sinks=[self._out.append],
            alert_rules=rules,
            alert_sinks=[self._out.append],
            sample_rate=sample_rate,
        )
        self._summary: dict | None = None
        self.last_events: list[dict] = []  # what close() completed

    def push(self, samples: np.ndarray) -> list[dict]:
        """Add audio: a float32 (-1..1) or int16 array ``(frames, channels)``, or ``(frames,)`` for
        one channel. Returns the events (and alert messages) it completed."""
        from .audio import int16_to_float32

        if self._summary is not None:
            raise RuntimeError("this stream is closed")
        x = np.asarray(samples)
        x = int16_to_float32(x) if x.dtype == np.int16 else x.astype(np.float32, copy=False)
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2 or x.shape[1] != len(self.channels):
            raise ValueError(f"expected samples shaped (frames, {len(self.channels)}), got {np.shape(samples)}")
        self._pipeline.push(x.T)
        return self._take()

    def close(self) -> dict:
        """End of the audio: classify the final windows and return the summary (their events and
        alerts are in :attr:`last_events`)."""
        if self._summary is None:
            from .model_files import model_identity
            from .timeline import iso_utc

            self._pipeline.flush()
            self.last_events = self._take()
            self._summary = self._pipeline.summary()
            self._summary.update(
                model=getattr(self._model, "identity", None) or model_identity(),
                started_at=iso_utc(self._started),
                started_at_from="stream start",
            )
        return self._summary

    @property
    def seconds(self) -> float:
        """Audio received so far, in seconds (per channel)."""
        return self._pipeline.seconds

    def _take(self) -> list[dict]:
        out, self._out[:] = list(self._out), []
        return out


def analyze(
    path: str | Path,
    model: Model | None = None,
    *,
    channel_names: Iterable[str] | None = None,
    analyse: str = "all",
    stream: str | None = None,
    hop: float = 1.0,
    min_seconds: float = 1.0,
    smooth: float = 1.0,
    vad: str = "silero",
    alerts: Iterable[str] = (),
) -> Analysis:
    """A recorded call's timeline, as ``emostream replay FILE --fast --events OUT`` writes it.

    ``channel_names``: one per channel of the file (default ch0, ch1, ...); ``analyse``: all,
    customer or agent (by channel name: only those channels are read); ``stream``: the stream id in
    events (default: the file name without suffix); the rest as :class:`Stream`."""
    from .audio import SAMPLE_RATE, AudioError, audio_info, is_silent, stream_audio
    from .audio import channel_names as resolve_names
    from .compliance import analysed_channels
    from .pipeline import REPLAY_CHUNK_SECONDS
    from .timeline import FILE_START_FROM, file_start_time

    info = audio_info(path)
    if info.frames == 0 or is_silent(path):
        raise AudioError(f"audio is empty or silent: {path}")
    names = resolve_names(channel_names, info.channels)
    keep = analysed_channels(names, analyse)
    names = tuple(names[i] for i in keep)
    predictor = _model(model)
    live = Stream(
        predictor,
        channels=names,
        stream=stream or Path(path).stem,
        hop=hop,
        min_seconds=min_seconds,
        smooth=smooth,
        vad=vad,
        alerts=alerts,
    )
    chunk = int(REPLAY_CHUNK_SECONDS * SAMPLE_RATE)
    events = []
    for block in stream_audio(path):  # decoded block by block, as replay does: memory bounded however long
        block = block[list(keep)]
        for pos in range(0, block.shape[1], chunk):
            events += live.push(block[:, pos : pos + chunk].T)
    summary = live.close()
    summary.update(started_at=file_start_time(path, live.seconds), started_at_from=FILE_START_FROM)
    return Analysis(events + live.last_events, summary)
