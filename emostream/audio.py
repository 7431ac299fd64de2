"""Audio constants, file reading, resampling and telephony codecs.

Everything downstream works on float32 samples in [-1, 1] at ``SAMPLE_RATE``.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

SAMPLE_RATE = 16000
WINDOW_SECONDS = 6
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
TELEPHONE_RATE = 8000

# Every format libsndfile decodes here (classify, replay and batch take the same ones).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff")
DECODE_BLOCK_SECONDS = 30.0  # stream_audio: seconds of the file decoded at a time (bounded memory)


STEREO_NAMES = ("agent", "customer")  # a call centre's stereo recording: agent left, customer right


class AudioError(ValueError):
    """Raised for audio that cannot be read or used (one-line message)."""


def channel_names(
    names: Iterable[str] | None, n_channels: int, stereo: tuple[str, str] | None = None
) -> tuple[str, ...]:
    """The names of a recording's ``n_channels`` channels: ``names`` (stripped) when given, else
    ``stereo`` for a two-channel file when given (batch and send: :data:`STEREO_NAMES`), else ch0,
    ch1, ...; raises ValueError unless there are ``n_channels`` distinct non-empty names."""
    if names is None:
        return tuple(stereo) if stereo and n_channels == 2 else tuple(f"ch{i}" for i in range(n_channels))
    out = tuple(str(n).strip() for n in names)
    if len(out) != n_channels or len(set(out)) != len(out) or not all(out):
        raise ValueError(f"need {n_channels} distinct channel names, got {','.join(out) or 'none'}")
    return out


def read_audio(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file keeping its channels.

    Returns ``(samples, sample_rate)`` with samples float32 shaped ``(channels, frames)``.
    """
    path = Path(path)
    if not path.exists():
        raise AudioError(f"no such file: {path}")
    if path.is_dir():
        raise AudioError(f"is a directory, not an audio file: {path}")
    return _decode(str(path), str(path))


def read_audio_bytes(data: bytes | bytearray | memoryview, name: str) -> tuple[np.ndarray, int]:
    """:func:`read_audio` for a file's contents already in memory; ``name`` goes into the errors."""
    if len(data) == 0:
        raise AudioError(f"audio file is empty: {name}")
    return _decode(io.BytesIO(bytes(data)), name)


def _decode(source, name: str) -> tuple[np.ndarray, int]:
    """libsndfile decode of a path or file object: ``(channels, frames)`` float32 and the rate."""
    import soundfile as sf

    try:
        data, rate = sf.read(source, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises several types; all mean unreadable
        raise AudioError(f"cannot read audio from {name}: {decoder_message(exc)}") from None
    if data.shape[0] == 0:
        raise AudioError(f"audio file is empty: {name}")
    return np.ascontiguousarray(data.T), int(rate)


def decoder_message(exc: Exception) -> str:
    """One line saying why libsndfile could not decode a file that exists.

    libsndfile reports a corrupt MP3 as "File does not exist or is not a regular file (possibly a
    pipe?)", which sends users looking for a missing file; it is said plainly instead.
    """
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    first = re.sub(r"^Error opening (<[^>]*>|'[^']*'): ", "", first)
    if "does not exist or is not a regular file" in first:
        return "not a valid audio file (corrupt data or an unsupported encoding)"
    return first


def resample(samples: np.ndarray, orig_rate: int, new_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Resample along the last axis with torchaudio's band-limited sinc interpolation."""
    if orig_rate == new_rate:
        return np.asarray(samples, dtype=np.float32)
    import torch
    import torchaudio.functional as AF

    tensor = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
    return AF.resample(tensor, orig_rate, new_rate).numpy()


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a file, resample to ``sample_rate``; float32 ``(channels, frames)``."""
    samples, rate = read_audio(path)
    return resample(samples, rate, sample_rate)


def load_mono(path: str | Path, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Read a file as mono (channel mean), resampled; float32 ``(frames,)``."""
    return load_audio(path, sample_rate).mean(axis=0)


@dataclass(frozen=True)
class AudioInfo:
    """What a file's header says: channels, frames and rate (at the file's own rate)."""

    channels: int
    frames: int
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate

    def frames_at(self, rate: int = SAMPLE_RATE) -> int:
        """Frames after resampling to ``rate`` (ceil, as :func:`resample` and :class:`StreamResampler`)."""
        from math import gcd

        g = gcd(rate, self.sample_rate)
        return -(-self.frames * (rate // g) // (self.sample_rate // g))


def _open(source: str | Path | bytes, name: str):
    """A ``soundfile.SoundFile`` on a path or a file's bytes; :class:`AudioError` (one line) otherwise."""
    import soundfile as sf

    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise AudioError(f"audio file is empty: {name}")
        source = io.BytesIO(bytes(source))
    else:
        path = Path(source)
        if not path.exists():
            raise AudioError(f"no such file: {path}")
        if path.is_dir():
            raise AudioError(f"is a directory, not an audio file: {path}")
        source = str(path)
    try:
        return sf.SoundFile(source)
    except Exception as exc:  # soundfile raises several types; all mean unreadable
        raise AudioError(f"cannot read audio from {name}: {decoder_message(exc)}") from None


def audio_info(source: str | Path | bytes, name: str | None = None) -> AudioInfo:
    """:class:`AudioInfo` of a file (path or bytes) without decoding it."""
    with _open(source, name or str(source)) as f:
        return AudioInfo(f.channels, max(0, int(f.frames)), int(f.samplerate))


def stream_audio(
    source: str | Path | bytes,
    name: str | None = None,
    sample_rate: int = SAMPLE_RATE,
    mono: bool = False,
    block_seconds: float = DECODE_BLOCK_SECONDS,
) -> Iterator[np.ndarray]:
    """Decode a file block by block, resampled to ``sample_rate``: float32 ``(channels, n)`` blocks
    (``(1, n)`` with ``mono``, the channel mean) whose concatenation equals :func:`load_audio` (the
    resampling is :class:`StreamResampler`'s), in memory bounded by ``block_seconds`` however long
    the file. :class:`AudioError` when it cannot be read or holds no frames."""
    name = name or str(source)
    with _open(source, name) as f:
        rate, channels = int(f.samplerate), 1 if mono else f.channels
        resamplers = [StreamResampler(rate, sample_rate, block_seconds=block_seconds) for _ in range(channels)]
        block, total = max(1, int(block_seconds * rate)), 0
        while True:
            try:
                data = f.read(block, dtype="float32", always_2d=True)
            except Exception as exc:
                raise AudioError(f"cannot read audio from {name}: {decoder_message(exc)}") from None
            if len(data) == 0:
                break
            total += len(data)
            data = data.mean(axis=1, keepdims=True) if mono else data
            out = [r.push(data[:, c]) for c, r in enumerate(resamplers)]
            if len(out[0]):
                yield np.stack(out)
        if total == 0:
            raise AudioError(f"audio file is empty: {name}")
        tail = [r.flush() for r in resamplers]
        if len(tail[0]):
            yield np.stack(tail)


def is_silent(source: str | Path | bytes, name: str | None = None) -> bool:
    """Whether a file holds only zeros (read block by block at its own rate; stops at the first sound)."""
    with _open(source, name or str(source)) as f:
        for data in f.blocks(blocksize=max(1, int(DECODE_BLOCK_SECONDS * f.samplerate)), dtype="float32"):
            if np.any(data):
                return False
    return True


# --- sample formats -------------------------------------------------------------------------


def int16_to_float32(pcm: np.ndarray | bytes) -> np.ndarray:
    """int16 PCM (array or little-endian bytes) to float32 in [-1, 1)."""
    if isinstance(pcm, (bytes, bytearray, memoryview)):
        pcm = np.frombuffer(pcm, dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def float32_to_int16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] to int16 with clipping and rounding."""
    return np.clip(np.round(np.asarray(samples) * 32768.0), -32768, 32767).astype(np.int16)


# --- G.711 μ-law and A-law (ITU-T G.711 decoding tables, built once with numpy) --------------


def _mulaw_table() -> np.ndarray:
    codes = ~np.arange(256, dtype=np.int32) & 0xFF
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where(sign != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32) ^ 0x55
    sign = codes & 0x80
    exponent = (codes >> 4) & 0x07
    mantissa = codes & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where(sign != 0, magnitude, -magnitude).astype(np.int16)


MULAW_TO_INT16 = _mulaw_table()
ALAW_TO_INT16 = _alaw_table()


def _codes(data: bytes | np.ndarray) -> np.ndarray:
    if isinstance(data, np.ndarray):
        return data.astype(np.uint8, copy=False)
    return np.frombuffer(bytes(data), dtype=np.uint8)


def mulaw_decode(data: bytes | np.ndarray) -> np.ndarray:
    """G.711 μ-law bytes to int16 PCM."""
    return MULAW_TO_INT16[_codes(data)]


def alaw_decode(data: bytes | np.ndarray) -> np.ndarray:
    """G.711 A-law bytes to int16 PCM."""
    return ALAW_TO_INT16[_codes(data)]


def mulaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM to G.711 μ-law codes (uint8): nearest code by the decoding table."""
    order = np.argsort(MULAW_TO_INT16, kind="stable")
    return _nearest_code(np.asarray(pcm, dtype=np.int16), MULAW_TO_INT16, order)


def alaw_encode(pcm: np.ndarray) -> np.ndarray:
    """int16 PCM to G.711 A-law codes (uint8): nearest code by the decoding table."""
    order = np.argsort(ALAW_TO_INT16, kind="stable")
    return _nearest_code(np.asarray(pcm, dtype=np.int16), ALAW_TO_INT16, order)


def _nearest_code(pcm: np.ndarray, table: np.ndarray, order: np.ndarray) -> np.ndarray:
    values = table[order].astype(np.int32)
    x = pcm.astype(np.int32)
    idx = np.clip(np.searchsorted(values, x), 1, len(values) - 1)
    left, right = values[idx - 1], values[idx]
    idx = np.where(np.abs(x - left) <= np.abs(right - x), idx - 1, idx)
    return order[idx].astype(np.uint8)


def telephone_channel(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """8 kHz μ-law only: resample to 8 kHz, μ-law round trip, back to ``sample_rate``. No band-pass, so
    it is *not* a phone line's channel: "telephone" means :func:`emostream.channel.g712_telephone`
    (300-3400 Hz, then μ-law); this is reported as "8 kHz μ-law only" where it still is."""
    narrow = resample(samples, sample_rate, TELEPHONE_RATE)
    coded = mulaw_decode(mulaw_encode(float32_to_int16(narrow)))
    return resample(int16_to_float32(coded), TELEPHONE_RATE, sample_rate)


def sinc_resample_kernel(orig: int, new: int, zero_crossings: int = 6, rolloff: float = 0.99) -> tuple[np.ndarray, int]:
    """The windowed-sinc (Hann) polyphase kernel of ``torchaudio.functional.resample`` for
    gcd-reduced rates: ``(new, 2 * width + orig)`` float32 and ``width``."""
    import math

    base = min(orig, new) * rolloff
    width = math.ceil(zero_crossings * orig / base)
    idx = np.arange(-width, width + orig, dtype=np.float64)[None, :] / orig
    t = (np.arange(0, -new, -1, dtype=np.float64)[:, None] / new + idx) * base
    t = np.clip(t, -zero_crossings, zero_crossings)
    window = np.cos(t * math.pi / zero_crossings / 2) ** 2
    t = t * math.pi
    with np.errstate(invalid="ignore", divide="ignore"):
        kernel = np.where(t == 0, 1.0, np.sin(t) / np.where(t == 0, 1.0, t))
    return (kernel * window * base / orig).astype(np.float32), width


class StreamResampler:
    """Chunk-by-chunk resampling of one channel that matches resampling the whole signal.

    Input is collected until ``block`` samples are pending; each block is resampled together with
    ``context`` samples of history and look-ahead on both sides, and only its own part of the
    output is kept, so block edges leave no clicks. Latency: one block plus the look-ahead.
    """

    def __init__(self, orig_rate: int, new_rate: int = SAMPLE_RATE, block_seconds: float = 0.1, context: int = 256):
        from math import gcd

        if orig_rate <= 0 or new_rate <= 0:
            raise ValueError(f"sample rates must be positive, got {orig_rate} -> {new_rate}")
        self.orig_rate, self.new_rate = int(orig_rate), int(new_rate)
        g = gcd(self.orig_rate, self.new_rate)
        self._up, self._down = self.new_rate // g, self.orig_rate // g
        step = self._down  # blocks and context are whole multiples of this: output stays aligned
        self._context = -(-context // step) * step
        self._block = max(step, -(-int(block_seconds * orig_rate) // step) * step)
        self._pending = np.zeros(self._context, dtype=np.float32)  # history (zeros before the start)
        self._kernel, self._width = sinc_resample_kernel(self._down, self._up)

    def _resample(self, x: np.ndarray) -> np.ndarray:
        """torchaudio's ``resample`` of ``x`` (same kernel), as one numpy matrix product."""
        w, down = self._width, self._down
        padded = np.concatenate([np.zeros(w, np.float32), x, np.zeros(w + down, np.float32)])
        frames = np.lib.stride_tricks.sliding_window_view(padded, self._kernel.shape[1])[::down]
        out = (frames @ self._kernel.T).reshape(-1)
        return out[: -(-self._up * len(x) // down)]

    @property
    def passthrough(self) -> bool:
        return self.orig_rate == self.new_rate

    def push(self, samples: np.ndarray) -> np.ndarray:
        """Add input samples; return the output samples that became final."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        if self.passthrough:
            return samples
        self._pending = np.concatenate([self._pending, samples])
        ready = len(self._pending) - 2 * self._context  # samples with full look-ahead
        if ready < self._block:
            return np.zeros(0, dtype=np.float32)
        n = ready // self._down * self._down
        return self._run(n)

    def input_needed(self, n_out: int) -> int:
        """How many more input samples :meth:`push` must get before at least ``n_out`` more output
        samples are final (and returned). Lets a caller hold small frames and push them at once."""
        if self.passthrough:
            return max(0, n_out)
        if n_out <= 0:
            return 0
        step = self._down
        n_in = -(-n_out * self._down // self._up)  # input samples to process ...
        n_in = max(self._block, -(-n_in // step) * step)  # ... whole steps, at least one block
        return max(0, n_in + 2 * self._context - len(self._pending))  # with look-ahead

    def flush(self) -> np.ndarray:
        """End of stream: the remaining output (the signal is taken as zero after its end)."""
        if self.passthrough:
            return np.zeros(0, dtype=np.float32)
        n = len(self._pending) - self._context
        if n <= 0:
            return np.zeros(0, dtype=np.float32)
        total_out = -(-n * self._up // self._down)  # as torchaudio: ceil
        self._pending = np.concatenate([self._pending, np.zeros(self._context + self._down, np.float32)])
        out = self._run(-(-n // self._down) * self._down)
        return out[:total_out]

    def _run(self, n: int) -> np.ndarray:
        c = self._context
        piece = self._pending[: c + n + c]
        out = self._resample(piece)
        first = c * self._up // self._down
        kept = out[first : first + n * self._up // self._down]
        self._pending = self._pending[n:]  # the last `c` samples of this block become history
        return np.ascontiguousarray(kept, dtype=np.float32)
