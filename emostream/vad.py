"""Speech gating: which windows hold enough speech to be classified.

A window is classified when at least ``min_speech_seconds`` of its newest ``recent_seconds`` are
speech, according to one of two frame detectors (32 ms frames, 512 samples at 16 kHz):

- ``silero``: the Silero VAD neural voice activity detector (MIT licence; its network, built into
  ``emostream/vad_models/`` by :mod:`emostream.vad_export`, runs offline on CPU through
  onnxruntime). It is streaming and stateful: each channel's audio goes through it once, in order,
  whatever the hop, one ONNX call per block of frames. Frame speech probability >= ``threshold``
  (0.5) is speech. A call whose audio arrives at 8 kHz or less (a phone line) is gated by Silero's
  8 kHz network on the window's samples taken at 8 kHz (every other sample of the 16 kHz window,
  which holds nothing above 4 kHz): the network made for that band, at about two thirds of the
  cost (``bench/silero_graphs.py``). Other rates use the 16 kHz network. Frames are 32 ms either way.
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

import threading
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE
from .stream import Window, frame_levels_db

VAD_KINDS = ("silero", "energy", "off")
FRAME = 512  # samples per detector frame at 16 kHz (32 ms)
SILERO_RATES = {16000: (512, 64), 8000: (256, 32)}  # Silero's networks: samples per frame, context samples
NARROWBAND_RATE = 8000  # calls at this rate or less are gated by the 8 kHz network
VAD_MODELS = Path(__file__).resolve().parent / "vad_models"  # one ONNX call per block of frames, LSTM state in/out
HISTORY_FRAMES = 256  # frame probabilities kept per channel (8 s, more than one window)


def silero_graph_name(rate: int) -> str:
    """File name of the Silero sequence graph for ``rate`` (see :mod:`emostream.vad_export`)."""
    return f"silero_vad_{rate // 1000}k_sequence.onnx"


def silero_rate(source_rate: int | None) -> int:
    """The Silero network that gates a call whose audio arrives at ``source_rate`` (None: 16 kHz)."""
    return NARROWBAND_RATE if source_rate is not None and source_rate <= NARROWBAND_RATE else SAMPLE_RATE


def silero_rows(frames: np.ndarray, context: np.ndarray) -> np.ndarray:
    """The sequence graph's input for ``frames`` ``(n, frame)``: each frame prefixed with the last
    ``len(context)`` samples of the frame before it (``context`` for the first)."""
    width = len(context)
    contexts = np.empty((len(frames), width), np.float32)
    contexts[0] = context
    contexts[1:] = frames[:-1, -width:]
    return np.concatenate([contexts, frames], axis=1)


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


def silero_model_path(rate: int = SAMPLE_RATE) -> Path:
    """The Silero sequence graph for ``rate`` shipped with emostream."""
    path = VAD_MODELS / silero_graph_name(rate)
    if not path.is_file():
        raise VadUnavailable(
            f"--vad silero: the speech gate's model {path.name} is missing from this install "
            "(reinstall emostream, or use --vad energy)"
        )
    return path


_sessions: dict[int, object] = {}
_session_lock = threading.Lock()


def silero_session(rate: int = SAMPLE_RATE):
    """One shared single-threaded onnxruntime session of the Silero network for ``rate``
    (thread-safe to run)."""
    with _session_lock:
        if rate not in _sessions:
            path = silero_model_path(rate)
            try:
                import onnxruntime as ort
            except ImportError:
                raise VadUnavailable("--vad silero needs onnxruntime: pip install onnxruntime") from None
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            _sessions[rate] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return _sessions[rate]


class SileroStream:
    """Streaming Silero VAD for one channel at ``rate`` (16000 or 8000): feed samples in order,
    read per-frame probabilities.

    Frame ``f`` covers absolute samples ``[F f, F (f + 1))`` (F = 512 at 16 kHz, 256 at 8 kHz: 32 ms);
    the LSTM state and the context samples carry across calls, so feeding audio in any pieces gives
    the same probabilities as one pass over the whole channel.
    """

    def __init__(self, session=None, history: int = HISTORY_FRAMES, rate: int = SAMPLE_RATE):
        if rate not in SILERO_RATES:
            raise ValueError(f"Silero VAD runs at {' or '.join(map(str, SILERO_RATES))} Hz, not {rate}")
        self.rate = rate
        self.frame, context = SILERO_RATES[rate]
        self.session = session or silero_session(rate)
        self.history = history  # frame probabilities kept
        self.h = np.zeros((1, 1, 128), np.float32)
        self.c = np.zeros((1, 1, 128), np.float32)
        self.context = np.zeros(context, np.float32)
        self.pending = np.zeros(0, np.float32)  # samples after the last whole frame
        self.next_frame = 0  # index of the first frame not yet computed
        self.probs = np.zeros(0, np.float32)  # probabilities of frames [first_frame, next_frame)
        self.first_frame = 0

    @property
    def position(self) -> int:
        """Absolute sample index up to which audio has been fed."""
        return self.next_frame * self.frame + len(self.pending)

    def reset_to(self, sample: int) -> None:
        """Restart at ``sample`` (a gap in the audio): fresh state; audio is then fed from the first
        frame boundary at or after ``sample`` (:attr:`position`)."""
        self.__init__(self.session, self.history, self.rate)
        self.next_frame = self.first_frame = -(-sample // self.frame)

    def feed(self, samples: np.ndarray) -> None:
        """Append audio that starts at :attr:`position`."""
        x = np.asarray(samples, dtype=np.float32).reshape(-1)
        x = np.concatenate([self.pending, x]) if len(self.pending) else x
        frame = self.frame
        n = len(x) // frame
        self.pending = x[n * frame :].copy()
        if n == 0:
            return
        frames = x[: n * frame].reshape(n, frame)
        rows = silero_rows(frames, self.context)
        self.context = frames[-1, -len(self.context) :].copy()
        p, self.h, self.c = self.session.run(["speech_probs", "hn", "cn"], {"input": rows, "h": self.h, "c": self.c})
        self.probs = np.concatenate([self.probs, np.asarray(p, np.float32).reshape(-1)])[-self.history :]
        self.next_frame += n
        self.first_frame = self.next_frame - len(self.probs)

    def frames(self, start: int, end: int) -> np.ndarray:
        """Probabilities of the computed frames that lie inside samples ``[start, end)``."""
        lo = max(-(-start // self.frame), self.first_frame)
        hi = min(end // self.frame, self.next_frame)
        if hi <= lo:
            return np.zeros(0, np.float32)
        return self.probs[lo - self.first_frame : hi - self.first_frame]


class SpeechGate:
    """Per stream: decides for each window whether it is classified (see the module docstring)."""

    def __init__(self, config: VadConfig = VadConfig(), sample_rate: int = SAMPLE_RATE, source_rate: int | None = None):
        self.config = config
        self.sample_rate = sample_rate  # of the windows
        self.silero_rate = silero_rate(source_rate)  # of the network: 8 kHz for a call that arrived at 8 kHz
        self._step = max(1, sample_rate // self.silero_rate)  # the network reads every step-th window sample
        self.silero: dict[str, SileroStream] = {}
        if config.kind == "silero":
            silero_session(self.silero_rate)  # fail early (missing model) rather than at the first window

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
        # Silero, on the clock of its network: every ``step``-th sample of the window
        step = self._step
        skip = -window.start % step
        samples = window.samples[skip : window.end - window.start : step]
        start, end = (window.start + skip) // step, (window.start + skip) // step + len(samples)
        vad = self.silero.get(window.channel)
        if vad is None:
            vad = self.silero[window.channel] = SileroStream(rate=self.silero_rate)
            vad.reset_to(start)
        if end > vad.position:
            if start > vad.position:  # a gap (hop longer than the window): start afresh
                vad.reset_to(start)
            vad.feed(samples[vad.position - start :])
            if window.final and vad.pending.size:  # end of stream: the last partial frame, zero-padded
                vad.feed(np.zeros(vad.frame - len(vad.pending), np.float32))
        frames = vad.frames(-(-lo // step), end + (vad.frame if window.final else 0))
        return float((frames >= cfg.threshold).sum() * frame_seconds)

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
