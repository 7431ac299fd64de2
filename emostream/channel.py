"""Phone channels: the G.712 telephone reference and a randomised phone line for training.

"Telephone" in every report means :func:`g712_telephone`: resample to 8 kHz, a 6th-order Butterworth
band-pass 300-3400 Hz (ITU-T G.712's passband), G.711 μ-law, back to the input rate. The older
8 kHz μ-law round trip without the band-pass is :func:`emostream.audio.telephone_channel` and is
labelled "8 kHz μ-law only" wherever it is still reported.

:class:`PhoneChannel` draws a random line per call: level, background noise (babble of other talkers
or coloured noise) at 5-25 dB SNR, AGC-like compression, clipping, a band-pass with random edges and
slopes, a narrowband codec (G.711 μ/A-law from the tables in :mod:`emostream.audio`; AMR-NB, Opus,
G.726 and G.722 through PyAV's FFmpeg, where the installed build encodes them) and packet loss with
concealment. Filters come from ``scipy.signal``; every draw comes from the caller's
``numpy.random.Generator``, so a seed gives the same line.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from .audio import (
    SAMPLE_RATE,
    TELEPHONE_RATE,
    alaw_decode,
    alaw_encode,
    float32_to_int16,
    int16_to_float32,
    mulaw_decode,
    mulaw_encode,
    resample,
)

G712_LOW_HZ = 300.0
G712_HIGH_HZ = 3400.0
G712_ORDER = 6  # scipy.signal.butter order (per band edge) of the reference band-pass
PACKET_SECONDS = 0.02  # one RTP packet of telephone audio (20 ms)
PACKET_SAMPLES = int(PACKET_SECONDS * TELEPHONE_RATE)
CONCEALMENT_FADE = 0.5  # each further lost packet repeats the last good one at this gain


@dataclass(frozen=True)
class Codec:
    """A speech codec as FFmpeg (PyAV) runs it: encoder name, container for the round trip, the
    rate it codes at and the bit rate (bits/s; ``None`` for G.711, coded from the tables)."""

    name: str
    encoder: str
    container: str
    rate: int = TELEPHONE_RATE
    bit_rate: int | None = None


CODECS: dict[str, Codec] = {
    c.name: c
    for c in (
        Codec("g711_mulaw", "pcm_mulaw", "wav"),
        Codec("g711_alaw", "pcm_alaw", "wav"),
        Codec("amr_nb_12.2k", "libopencore_amrnb", "amr", bit_rate=12200),
        Codec("amr_nb_4.75k", "libopencore_amrnb", "amr", bit_rate=4750),
        Codec("opus_8k", "libopus", "ogg", bit_rate=8000),
        Codec("opus_16k", "libopus", "ogg", bit_rate=16000),
        Codec("g726_32k", "adpcm_g726", "wav", bit_rate=32000),
        Codec("g726_16k", "adpcm_g726", "wav", bit_rate=16000),
        Codec("g722_64k", "adpcm_g722", "wav", rate=16000, bit_rate=64000),
    )
}
G711 = ("g711_mulaw", "g711_alaw")


@lru_cache(maxsize=None)
def available_codecs() -> tuple[str, ...]:
    """The :data:`CODECS` this installation really encodes and decodes (G.711 always; the others
    when PyAV's FFmpeg has the encoder and a round trip of a short tone works)."""
    names = []
    for name in CODECS:
        if name in G711:
            names.append(name)
            continue
        try:
            codec_roundtrip(np.zeros(TELEPHONE_RATE // 10, np.float32), name)
        except Exception:  # noqa: BLE001 - any failure means "not usable here"
            continue
        names.append(name)
    return tuple(names)


def butter_bandpass(
    samples: np.ndarray, sample_rate: int, low_hz: float, high_hz: float, order: int = G712_ORDER
) -> np.ndarray:
    """``samples`` through a Butterworth band-pass (``scipy.signal.butter(order, ...)``, causal, as a
    line filters), float32."""
    from scipy.signal import butter, sosfilt

    if not 0 < low_hz < high_hz < sample_rate / 2:
        raise ValueError(f"band {low_hz}-{high_hz} Hz does not fit below Nyquist at {sample_rate} Hz")
    sos = butter(order, [low_hz, high_hz], btype="bandpass", fs=sample_rate, output="sos")
    return sosfilt(sos, np.asarray(samples, dtype=np.float64)).astype(np.float32)


def g711(samples: np.ndarray, law: str = "mulaw") -> np.ndarray:
    """A G.711 round trip (μ-law or A-law) of float samples, float32."""
    pcm = float32_to_int16(samples)
    if law == "mulaw":
        return int16_to_float32(mulaw_decode(mulaw_encode(pcm)))
    if law == "alaw":
        return int16_to_float32(alaw_decode(alaw_encode(pcm)))
    raise ValueError(f"unknown G.711 law {law!r}: mulaw or alaw")


def g712_band(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` at 8 kHz through G.712's 300-3400 Hz band-pass (6th-order Butterworth), not coded."""
    narrow = resample(np.asarray(samples, dtype=np.float32), sample_rate, TELEPHONE_RATE)
    return butter_bandpass(narrow, TELEPHONE_RATE, G712_LOW_HZ, G712_HIGH_HZ)


def g712_narrowband(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The G.712 telephone channel as a phone bridge delivers it: 8 kHz samples, band-passed and
    G.711 μ-law coded (:func:`g712_telephone` without the way back to ``sample_rate``)."""
    return g711(g712_band(samples, sample_rate))


def g712_telephone(samples: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """The reference telephone channel ("G.712 telephone"): 8 kHz, 6th-order Butterworth band-pass
    300-3400 Hz, G.711 μ-law, back to ``sample_rate``; the same length as ``samples``."""
    return _fit(resample(g712_narrowband(samples, sample_rate), TELEPHONE_RATE, sample_rate), len(samples))


def codec_channel(samples: np.ndarray, codec: str, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """``samples`` through the G.712 band at 8 kHz and then ``codec`` (a :data:`CODECS` name; G.722
    is wideband, so it codes at 16 kHz after the band-pass): one row of the codec grid."""
    banded = g712_band(samples, sample_rate)
    return _fit(resample(_coded(banded, codec), TELEPHONE_RATE, sample_rate), len(samples))


def _coded(narrow: np.ndarray, codec: str) -> np.ndarray:
    """8 kHz samples through ``codec`` and back to 8 kHz, same length."""
    if codec == "g711_mulaw":
        return g711(narrow, "mulaw")
    if codec == "g711_alaw":
        return g711(narrow, "alaw")
    spec = CODECS[codec]
    x = narrow if spec.rate == TELEPHONE_RATE else resample(narrow, TELEPHONE_RATE, spec.rate)
    y = codec_roundtrip(x, codec)
    if spec.rate != TELEPHONE_RATE:
        y = resample(y, spec.rate, TELEPHONE_RATE)
    return _fit(y, len(narrow))


def codec_roundtrip(samples: np.ndarray, codec: str) -> np.ndarray:
    """Encode ``samples`` (float, at the codec's rate) with FFmpeg through PyAV into the codec's
    container in memory and decode them back: float32 at the codec's rate, the input's length (the
    codec's own delay kept, its padding cut)."""
    import av

    spec = CODECS[codec]
    pcm = float32_to_int16(samples)
    buf = io.BytesIO()
    with av.open(buf, "w", format=spec.container) as out:
        stream = out.add_stream(spec.encoder, rate=spec.rate)
        stream.layout = "mono"
        if spec.bit_rate:
            stream.bit_rate = spec.bit_rate
        step = 960
        for start in range(0, len(pcm), step):
            frame = av.AudioFrame.from_ndarray(pcm[None, start : start + step], format="s16", layout="mono")
            frame.sample_rate, frame.pts = spec.rate, start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    buf.seek(0)
    with av.open(buf) as src:
        stream = src.streams.audio[0]
        pieces = [f.to_ndarray().reshape(-1) for f in src.decode(stream)]
        rate = stream.codec_context.sample_rate
    decoded = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    decoded = int16_to_float32(decoded) if decoded.dtype == np.int16 else decoded.astype(np.float32)
    if rate != spec.rate:  # Opus decodes at 48 kHz
        decoded = resample(decoded, rate, spec.rate)
    return _fit(decoded, len(samples))


def packet_loss(
    samples: np.ndarray, rate: float, rng: np.random.Generator, packet: int = PACKET_SAMPLES
) -> tuple[np.ndarray, np.ndarray]:
    """Lose each ``packet``-sample frame with probability ``rate`` and conceal it by repeating the
    last received frame, fading by :data:`CONCEALMENT_FADE` per further loss (G.711 Appendix I's
    idea, simplified). Returns the signal and the boolean mask of lost frames."""
    x = np.asarray(samples, dtype=np.float32).copy()
    frames = -(-len(x) // packet)
    lost = rng.random(frames) < rate
    last, gain = np.zeros(packet, np.float32), 1.0
    for k in range(frames):
        piece = x[k * packet : (k + 1) * packet]
        if lost[k]:
            gain *= CONCEALMENT_FADE
            piece[:] = last[: len(piece)] * gain
        else:
            last, gain = np.pad(piece, (0, packet - len(piece))).copy(), 1.0
    return x, lost


def rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(x, dtype=np.float64)) + 1e-20))


def add_noise(samples: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``samples`` plus ``noise`` (tiled or cut to length) scaled to ``snr_db`` below the signal's RMS."""
    x = np.asarray(samples, dtype=np.float32)
    n = np.resize(np.asarray(noise, dtype=np.float32), len(x))
    scale = rms(x) / (rms(n) * 10 ** (snr_db / 20))
    return (x + n * np.float32(scale)).astype(np.float32)


def colored_noise(length: int, rng: np.random.Generator, exponent: float = 1.0) -> np.ndarray:
    """Gaussian noise with a 1/f^exponent power spectrum (0 white, 1 pink, 2 brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(length))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    noise = np.fft.irfft(spectrum / f ** (exponent / 2), n=length)
    return (noise / rms(noise)).astype(np.float32)


def babble(sources: list[np.ndarray], length: int, rng: np.random.Generator, talkers: int) -> np.ndarray:
    """Call-centre babble: ``talkers`` random stretches of ``sources`` (other speakers' audio), each
    normalised and summed, unit RMS."""
    out = np.zeros(length, np.float64)
    for k in rng.choice(len(sources), size=min(talkers, len(sources)), replace=False):
        src = np.asarray(sources[k], dtype=np.float32)
        if len(src) == 0:
            continue
        start = int(rng.integers(0, len(src)))
        piece = np.resize(np.roll(src, -start), length)
        out += piece / rms(piece)
    return (out / rms(out)).astype(np.float32)


def compress(
    samples: np.ndarray,
    sample_rate: int,
    target_dbfs: float = -20.0,
    max_gain_db: float = 20.0,
    attack_s: float = 0.01,
    release_s: float = 0.3,
) -> np.ndarray:
    """AGC-like compression: a 10 ms RMS envelope followed with fast attack and slow release, and a
    gain toward ``target_dbfs`` (at most ``max_gain_db`` of boost), applied smoothly."""
    x = np.asarray(samples, dtype=np.float32)
    hop = max(1, int(0.01 * sample_rate))
    frames = -(-len(x) // hop)
    env = np.sqrt(
        np.array([np.mean(np.square(x[k * hop : (k + 1) * hop], dtype=np.float64)) for k in range(frames)]) + 1e-12
    )
    a_up, a_down = np.exp(-0.01 / attack_s), np.exp(-0.01 / release_s)
    smooth, level = np.empty(frames), env[0]
    for k, e in enumerate(env):
        coef = a_up if e > level else a_down
        level = coef * level + (1 - coef) * e
        smooth[k] = level
    gain_db = np.minimum(target_dbfs - 20 * np.log10(smooth + 1e-12), max_gain_db)
    gain = np.repeat(10 ** (gain_db / 20), hop)[: len(x)]
    return (x * gain.astype(np.float32)).astype(np.float32)


def _fit(x: np.ndarray, length: int) -> np.ndarray:
    """``x`` cut or zero-padded to ``length`` samples, float32."""
    x = np.asarray(x, dtype=np.float32)
    return x[:length] if len(x) >= length else np.pad(x, (0, length - len(x)))


@dataclass(frozen=True)
class PhoneChannelConfig:
    """Ranges and probabilities of :class:`PhoneChannel`'s random line (each effect drawn per call)."""

    low_hz: tuple[float, float] = (150.0, 400.0)  # band-pass low edge
    high_hz: tuple[float, float] = (3100.0, 3600.0)  # band-pass high edge
    orders: tuple[int, ...] = (2, 4, 6, 8)  # Butterworth orders (slopes) drawn from
    codecs: tuple[str, ...] = tuple(CODECS)  # drawn equally among those available here
    loss_probability: float = 0.3  # share of lines with packet loss
    loss_rate: tuple[float, float] = (0.01, 0.05)
    noise_probability: float = 0.5
    snr_db: tuple[float, float] = (5.0, 25.0)
    babble_share: float = 0.5  # of noisy lines, babble (when sources given) vs coloured
    babble_talkers: tuple[int, int] = (3, 8)
    gain_db: tuple[float, float] = (-20.0, 6.0)  # level change before the line (then clipped at full scale)
    agc_probability: float = 0.3
    clip_probability: float = 0.1
    clip_level: tuple[float, float] = (0.2, 0.6)  # clipping threshold as a share of the clip's peak

    def __post_init__(self) -> None:
        for name in ("loss_probability", "noise_probability", "babble_share", "agc_probability", "clip_probability"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not (0 < self.low_hz[0] <= self.low_hz[1] < self.high_hz[0] <= self.high_hz[1] < TELEPHONE_RATE / 2):
            raise ValueError(f"band edges {self.low_hz} / {self.high_hz} must rise and stay below 4 kHz")
        unknown = set(self.codecs) - set(CODECS)
        if unknown or not self.codecs:
            raise ValueError(f"codecs must be among {', '.join(CODECS)}, got {list(self.codecs)}")


@dataclass
class ChannelDraw:
    """What one :meth:`PhoneChannel.apply` did (for logs and tests)."""

    gain_db: float = 0.0
    noise: str = "none"
    snr_db: float | None = None
    agc: bool = False
    clip_level: float | None = None
    band_hz: tuple[float, float] = (G712_LOW_HZ, G712_HIGH_HZ)
    order: int = G712_ORDER
    codec: str = "g711_mulaw"
    loss_rate: float = 0.0
    lost_packets: int = 0
    extra: dict = field(default_factory=dict)


class PhoneChannel:
    """A random phone line per call, drawn from a :class:`PhoneChannelConfig`."""

    def __init__(self, config: PhoneChannelConfig = PhoneChannelConfig()):
        self.config = config
        usable = set(available_codecs())
        self.codecs = tuple(c for c in config.codecs if c in usable) or G711

    def apply(
        self,
        samples: np.ndarray,
        rng: np.random.Generator,
        sample_rate: int = SAMPLE_RATE,
        babble_sources: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, ChannelDraw]:
        """``samples`` through one random line; same length and rate. ``babble_sources``: other
        talkers' audio at ``sample_rate`` for babble noise (coloured noise without them)."""
        c, d = self.config, ChannelDraw()
        x = np.asarray(samples, dtype=np.float32)
        if len(x) == 0:
            return x.copy(), d
        d.gain_db = float(rng.uniform(*c.gain_db))
        x = x * np.float32(10 ** (d.gain_db / 20))
        if rng.random() < c.noise_probability:
            d.snr_db = float(rng.uniform(*c.snr_db))
            if babble_sources and rng.random() < c.babble_share:
                d.noise = "babble"
                noise = babble(
                    babble_sources, len(x), rng, int(rng.integers(c.babble_talkers[0], c.babble_talkers[1] + 1))
                )
            else:
                exponent = float(rng.choice([0.0, 1.0, 2.0]))
                d.noise = f"colored({exponent:g})"
                noise = colored_noise(len(x), rng, exponent)
            x = add_noise(x, noise, d.snr_db)
        if rng.random() < c.agc_probability:
            d.agc = True
            x = compress(x, sample_rate, target_dbfs=float(rng.uniform(-26, -16)))
        if rng.random() < c.clip_probability:
            d.clip_level = float(rng.uniform(*c.clip_level))
            peak = float(np.max(np.abs(x))) or 1.0
            x = np.clip(x, -peak * d.clip_level, peak * d.clip_level)
        x = np.clip(x, -1.0, 1.0)
        narrow = resample(x, sample_rate, TELEPHONE_RATE)
        d.band_hz = (float(rng.uniform(*c.low_hz)), float(rng.uniform(*c.high_hz)))
        d.order = int(rng.choice(c.orders))
        narrow = butter_bandpass(narrow, TELEPHONE_RATE, *d.band_hz, order=d.order)
        d.codec = str(rng.choice(self.codecs))
        narrow = _coded(np.clip(narrow, -1.0, 1.0), d.codec)
        if rng.random() < c.loss_probability:
            d.loss_rate = float(rng.uniform(*c.loss_rate))
            narrow, lost = packet_loss(narrow, d.loss_rate, rng)
            d.lost_packets = int(lost.sum())
        return _fit(resample(narrow, TELEPHONE_RATE, sample_rate), len(samples)), d
