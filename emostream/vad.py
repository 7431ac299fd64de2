"""Speech gating: which windows hold enough speech to be classified.

A window is classified when at least ``min_speech_seconds`` of its newest ``recent_seconds`` are
speech, according to one of two frame detectors (32 ms frames, 512 samples at 16 kHz):

- ``silero``: the Silero VAD neural voice activity detector (the ``silero-vad`` package ships the
  model; it runs offline on CPU through onnxruntime). It is streaming and stateful: each channel's
  audio goes through it once, in order, whatever the hop, so its cost is about 1 ms of CPU per
  second of audio per channel. Frame speech probability >= ``threshold`` (0.5) is speech.
- ``energy``: frame level above ``threshold`` dBFS (-50). Cheap, but any sound counts (line noise,
  music, a door), so it only separates near-silence from sound.
- ``off``: every window is classified.

Defaults (``VadConfig.named``): silero needs 0.5 s of speech anywhere in the 6 s window; energy
keeps its original rule (0.1 s of sound anywhere in the window). Looking only at the newest seconds
(``recent_seconds`` 2 or 1) skips more windows but drops the ones just after a turn, whose speech
sits at the start of the window where the model is most accurate: that cost agreement on the
example calls. ``bench/speech_gate.py`` measures the gates on the example calls.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE
from .stream import Window, frame_levels_db

VAD_KINDS = ("silero", "energy", "off")
FRAME = 512  # samples per detector frame (32 ms at 16 kHz)
SILERO_CONTEXT = 64  # samples of the previous frame the Silero model sees
SILERO_MODEL = "silero_vad_16k_sequence.onnx"  # one ONNX call for a block of frames, LSTM state in/out
HISTORY_FRAMES = 256  # frame probabilities kept per channel (8 s, more than one window)


class VadUnavailable(RuntimeError):
    """The requested detector cannot run here (a package is missing)."""


@dataclass(frozen=True)
class VadConfig:
    """Which detector gates windows, and how much speech a window needs."""

    kind: str = "silero"
    threshold: float = 0.5  # silero: speech probability; energy: dBFS
    recent_seconds: float = 6.0  # only the newest S seconds of the window are looked at (6 = all)
    min_speech_seconds: float = 0.5  # speech needed in them

    def __post_init__(self):
        if self.kind not in VAD_KINDS:
            raise ValueError(f"vad must be one of {', '.join(VAD_KINDS)}, got {self.kind!r}")
        if not self.recent_seconds > 0 or self.min_speech_seconds < 0:
            raise ValueError("vad recent seconds must be > 0 and min speech seconds >= 0")
        if self.kind == "silero" and not 0 < self.threshold < 1:
            raise ValueError(f"silero threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def named(cls, kind: str, **overrides) -> "VadConfig":
        """The default configuration of a detector kind, with ``overrides``."""
        base = {
            "silero": cls("silero", 0.5, 6.0, 0.5),
            "energy": cls("energy", -50.0, 6.0, 0.1),
            "off": cls("off", 0.5, 6.0, 0.0),
        }
        if kind not in base:
            raise ValueError(f"vad must be one of {', '.join(VAD_KINDS)}, got {kind!r}")
        return replace(base[kind], **overrides)


def silero_model_path() -> Path:
    """The Silero model file inside the installed ``silero-vad`` package (found without importing
    the package: its ``__init__`` sets torch to one thread for the whole process)."""
    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        raise VadUnavailable("--vad silero needs the silero-vad package: pip install silero-vad (or use --vad energy)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / SILERO_MODEL
    if not path.is_file():
        raise VadUnavailable(f"the installed silero-vad has no {SILERO_MODEL} (need silero-vad >= 6.2)")
    return path


_session = None
_session_lock = threading.Lock()


def silero_session():
    """One shared single-threaded onnxruntime session of the Silero model (thread-safe to run)."""
    global _session
    with _session_lock:
        if _session is None:
            try:
                import onnxruntime as ort
            except ImportError:
                raise VadUnavailable("--vad silero needs onnxruntime: pip install onnxruntime") from None
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            _session = ort.InferenceSession(str(silero_model_path()), options, providers=["CPUExecutionProvider"])
        return _session


class SileroStream:
    """Streaming Silero VAD for one channel: feed samples in order, read per-frame probabilities.

    Frame ``f`` covers absolute samples ``[512 f, 512 (f + 1))``; the LSTM state and the 64-sample
    context carry across calls, so feeding audio in any pieces gives the same probabilities as one
    pass over the whole channel.
    """

    def __init__(self, session=None, history: int = HISTORY_FRAMES):
        self.session = session or silero_session()
        self.history = history  # frame probabilities kept
        self.h = np.zeros((1, 1, 128), np.float32)
        self.c = np.zeros((1, 1, 128), np.float32)
        self.context = np.zeros(SILERO_CONTEXT, np.float32)
        self.pending = np.zeros(0, np.float32)  # samples after the last whole frame
        self.next_frame = 0  # index of the first frame not yet computed
        self.probs = np.zeros(0, np.float32)  # probabilities of frames [first_frame, next_frame)
        self.first_frame = 0

    @property
    def position(self) -> int:
        """Absolute sample index up to which audio has been fed."""
        return self.next_frame * FRAME + len(self.pending)

    def reset_to(self, sample: int) -> None:
        """Restart at ``sample`` (a gap in the audio): fresh state; audio is then fed from the first
        frame boundary at or after ``sample`` (:attr:`position`)."""
        self.__init__(self.session, self.history)
        self.next_frame = self.first_frame = -(-sample // FRAME)

    def feed(self, samples: np.ndarray) -> None:
        """Append audio that starts at :attr:`position`."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        x = np.concatenate([self.pending, x]) if len(self.pending) else x
        n = len(x) // FRAME
        self.pending = x[n * FRAME :].copy()
        if n == 0:
            return
        frames = x[: n * FRAME].reshape(n, FRAME)
        contexts = np.empty((n, SILERO_CONTEXT), np.float32)
        contexts[0] = self.context
        contexts[1:] = frames[:-1, -SILERO_CONTEXT:]
        self.context = frames[-1, -SILERO_CONTEXT:].copy()
        p, self.h, self.c = self.session.run(
            ["speech_probs", "hn", "cn"],
            {"input": np.concatenate([contexts, frames], axis=1), "h": self.h, "c": self.c},
        )
        self.probs = np.concatenate([self.probs, np.asarray(p, np.float32).reshape(-1)])[-self.history :]
        self.next_frame += n
        self.first_frame = self.next_frame - len(self.probs)

    def frames(self, start: int, end: int) -> np.ndarray:
        """Probabilities of the computed frames that lie inside samples ``[start, end)``."""
        lo = max(-(-start // FRAME), self.first_frame)
        hi = min(end // FRAME, self.next_frame)
        if hi <= lo:
            return np.zeros(0, np.float32)
        return self.probs[lo - self.first_frame : hi - self.first_frame]


class SpeechGate:
    """Per stream: decides for each window whether it is classified (see the module docstring)."""

    def __init__(self, config: VadConfig = VadConfig(), sample_rate: int = SAMPLE_RATE):
        self.config = config
        self.sample_rate = sample_rate
        self.silero: dict[str, SileroStream] = {}
        if config.kind == "silero":
            silero_session()  # fail early (missing package) rather than at the first window

    def speech_seconds(self, window: Window) -> float:
        """Seconds of speech in the newest ``recent_seconds`` of ``window``."""
        cfg = self.config
        lo = max(window.start, window.end - int(round(cfg.recent_seconds * self.sample_rate)))
        frame_seconds = FRAME / self.sample_rate
        if cfg.kind == "energy":
            db = frame_levels_db(window.samples[lo - window.start : window.end - window.start], FRAME)
            return float((db > cfg.threshold).sum() * frame_seconds)
        if cfg.kind == "off":
            return float((window.end - lo) / self.sample_rate)
        vad = self.silero.get(window.channel)
        if vad is None:
            vad = self.silero[window.channel] = SileroStream()
            vad.reset_to(window.start)
        if window.end > vad.position:
            if window.start > vad.position:  # a gap (hop longer than the window): start afresh
                vad.reset_to(window.start)
            vad.feed(window.samples[vad.position - window.start : window.end - window.start])
            if window.final and vad.pending.size:  # end of stream: the last partial frame, zero-padded
                vad.feed(np.zeros(FRAME - len(vad.pending), np.float32))
        return float(
            (vad.frames(lo, window.end + (FRAME if window.final else 0)) >= cfg.threshold).sum() * frame_seconds
        )

    def is_speech(self, window: Window) -> bool:
        """Whether ``window`` is classified."""
        if self.config.kind == "off":
            return True
        seconds = self.speech_seconds(window)
        return seconds > 0 and seconds >= self.config.min_speech_seconds

    def select(self, windows: list[Window]) -> list[int]:
        """Indices of the windows to classify (each channel's windows must come in time order)."""
        return [i for i, w in enumerate(windows) if self.is_speech(w)]


class SpeechCounter:
    """Seconds of speech in one channel fed in order, by the gate's detector (``classify``'s test
    of whether a file holds speech at all; the same frames and thresholds as :class:`SpeechGate`)."""

    def __init__(self, config: VadConfig = VadConfig(), sample_rate: int = SAMPLE_RATE):
        self.config = config
        self.sample_rate = sample_rate
        self.frames = 0  # detector frames above the threshold
        self.samples = 0  # samples fed
        self._pending = np.zeros(0, np.float32)
        self._silero = SileroStream() if config.kind == "silero" else None

    def feed(self, samples: np.ndarray) -> None:
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples += len(x)
        if self._silero is not None:  # in pieces the stream's history holds, so no frame is missed
            step = self._silero.history * FRAME
            for pos in range(0, len(x), step):
                before = self._silero.next_frame
                self._silero.feed(x[pos : pos + step])
                new = self._silero.next_frame - before
                if new:
                    self.frames += int((self._silero.probs[-new:] >= self.config.threshold).sum())
        elif self.config.kind == "energy":
            x = np.concatenate([self._pending, x])
            whole = len(x) // FRAME * FRAME
            self.frames += int((frame_levels_db(x[:whole], FRAME) > self.config.threshold).sum())
            self._pending = x[whole:]

    @property
    def seconds(self) -> float:
        """Speech found so far (``off``: all audio)."""
        if self.config.kind == "off":
            return self.samples / self.sample_rate
        return self.frames * FRAME / self.sample_rate

    @property
    def has_speech(self) -> bool:
        """Enough speech for one window of the gate (``min_speech_seconds``, and some)."""
        return self.seconds > 0 and self.seconds >= self.config.min_speech_seconds
