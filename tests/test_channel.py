"""The phone channel simulator: each effect does what it must, and a seed gives the same line."""

from __future__ import annotations

import numpy as np
import pytest

from emostream.channel import (
    CODECS,
    G711,
    PACKET_SAMPLES,
    PhoneChannel,
    PhoneChannelConfig,
    add_noise,
    available_codecs,
    babble,
    butter_bandpass,
    codec_channel,
    colored_noise,
    compress,
    g711,
    g712_telephone,
    packet_loss,
    rms,
)

from .conftest import speechlike

SR = 16000


def tone(freq: float, seconds: float = 2.0, sr: int = SR, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def level_db(y: np.ndarray, x: np.ndarray, skip: int = SR // 4) -> float:
    """Output level against input level in dB, past the filters' start-up."""
    return 20 * np.log10(rms(y[skip:]) / rms(x[skip:]))


def band_energy(x: np.ndarray, lo: float, hi: float, sr: int = SR) -> float:
    spectrum = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(len(x), 1 / sr)
    return float(spectrum[(f >= lo) & (f < hi)].sum())


@pytest.mark.parametrize("low,high", [(300.0, 3400.0), (150.0, 3100.0), (400.0, 3600.0)])
def test_bandpass_removes_the_band_below_its_low_edge(low, high):
    x = tone(low / 2, sr=8000)
    assert level_db(butter_bandpass(x, 8000, low, high), x) <= -30  # an octave below: >= 30 dB down
    inside = tone(1000, sr=8000)
    assert abs(level_db(butter_bandpass(inside, 8000, low, high), inside)) < 1.0
    with pytest.raises(ValueError, match="Nyquist"):
        butter_bandpass(x, 8000, 300, 4200)


def test_g712_is_the_telephone_band_at_8khz_with_mulaw():
    rng = np.random.default_rng(0)
    noise = (0.1 * rng.standard_normal(4 * SR)).astype(np.float32)
    y = g712_telephone(noise)
    assert len(y) == len(noise) and y.dtype == np.float32
    # energy below the low edge (and above the high edge) down by >= 30 dB; the passband kept
    assert 10 * np.log10(band_energy(y, 20, 150) / band_energy(noise, 20, 150)) <= -30
    assert 10 * np.log10(band_energy(y, 3900, 8000) / band_energy(noise, 3900, 8000)) <= -30
    assert abs(10 * np.log10(band_energy(y, 600, 3000) / band_energy(noise, 600, 3000))) < 1.0
    for f in (100, 150):
        assert level_db(g712_telephone(tone(f)), tone(f)) <= -30
    assert abs(level_db(g712_telephone(tone(1000)), tone(1000))) < 0.5
    # the μ-law step: G.712 output sits on the 8 kHz μ-law grid before upsampling, so it differs
    # from the band-pass alone by quantisation noise only (about 38-45 dB SNR for a loud tone)
    from emostream.audio import resample

    narrow = butter_bandpass(resample(tone(1000), SR, 8000), 8000, 300, 3400)
    coded = g711(narrow)
    snr = 10 * np.log10(np.sum(narrow**2) / np.sum((coded - narrow) ** 2))
    assert 30 < snr < 50 and not np.array_equal(coded, narrow)


def test_g711_laws_round_trip_with_their_own_quantisation():
    x = tone(440, sr=8000)
    mu, a = g711(x, "mulaw"), g711(x, "alaw")
    for y in (mu, a):
        assert 10 * np.log10(np.sum(x**2) / np.sum((y - x) ** 2)) > 30
    assert not np.array_equal(mu, a)
    with pytest.raises(ValueError, match="law"):
        g711(x, "blaw")


def test_codecs_probed_and_each_codes_the_speech_band():
    names = available_codecs()
    assert set(G711) <= set(names) and set(names) <= set(CODECS)
    pytest.importorskip("av")
    x = 3 * speechlike(2.0, f0=140.0)
    reference = g712_telephone(x)
    snr = {}
    for name in names:
        y = codec_channel(x, name)
        assert len(y) == len(x) and np.isfinite(y).all()
        assert level_db(y, x) > -10, name  # the voice is still there
        snr[name] = aligned_snr(y, reference)
    assert min(snr[n] for n in G711) > 25
    if {"amr_nb_12.2k", "amr_nb_4.75k"} <= set(names):
        assert snr["amr_nb_4.75k"] < snr["amr_nb_12.2k"]  # fewer bits, more distortion
    if {"opus_8k", "opus_16k"} <= set(names):
        assert snr["opus_8k"] < snr["opus_16k"]


def aligned_snr(y: np.ndarray, reference: np.ndarray, max_lag: int = 800) -> float:
    """SNR of ``y`` against ``reference`` after the codec's delay (the lag of best correlation)."""
    n = len(reference) - max_lag
    lag = int(np.argmax([np.dot(y[k : k + n], reference[:n]) for k in range(max_lag)]))
    a, r = y[lag : lag + n], reference[:n]
    gain = np.dot(a, r) / np.dot(a, a)
    return float(10 * np.log10(np.sum(r**2) / (np.sum((r - gain * a) ** 2) + 1e-20)))


def test_packet_loss_conceals_the_lost_share_by_repeating_with_fade():
    rng = np.random.default_rng(3)
    x = np.random.default_rng(4).standard_normal(PACKET_SAMPLES * 5000).astype(np.float32) * 0.1
    y, lost = packet_loss(x, 0.03, rng)
    assert len(y) == len(x) and 0.02 < lost.mean() < 0.04
    frames = y.reshape(-1, PACKET_SAMPLES)
    kept = x.reshape(-1, PACKET_SAMPLES)
    assert np.array_equal(frames[~lost], kept[~lost])
    k = int(np.flatnonzero(lost[1:] & ~lost[:-1])[0]) + 1  # a first loss after a received frame
    np.testing.assert_allclose(frames[k], kept[k - 1] * 0.5, rtol=1e-6)
    same, none = packet_loss(x, 0.0, rng)
    assert np.array_equal(same, x) and not none.any()


def test_noise_at_the_requested_snr_and_colours():
    rng = np.random.default_rng(0)
    x = tone(500, seconds=2)
    for snr in (5.0, 25.0):
        noise = colored_noise(len(x), rng, 1.0)
        y = add_noise(x, noise, snr)
        assert abs(20 * np.log10(rms(x) / rms(y - x)) - snr) < 0.05
    white, pink = colored_noise(2**16, rng, 0.0), colored_noise(2**16, rng, 1.0)
    for n in (white, pink):
        assert abs(rms(n) - 1.0) < 1e-3
    # pink: equal power per octave, so the density at 200 Hz is ~16x (12 dB) that at 3.2 kHz; white: flat
    slope = lambda n: 10 * np.log10((band_energy(n, 150, 250) / 100) / (band_energy(n, 3000, 3400) / 400))  # noqa: E731
    assert abs(slope(pink) - 12.0) < 2.0 and abs(slope(white)) < 1.5


def test_babble_mixes_several_other_talkers():
    rng = np.random.default_rng(1)
    sources = [tone(f, seconds=1.0) for f in (200, 300, 450, 700)]
    b = babble(sources, 3 * SR, rng, talkers=3)
    assert len(b) == 3 * SR and abs(rms(b) - 1.0) < 1e-3
    spectrum = np.abs(np.fft.rfft(b))
    f = np.fft.rfftfreq(len(b), 1 / SR)
    peaks = {int(round(f[i])) for i in np.argsort(spectrum)[-3:]}
    assert len(peaks) == 3 and peaks <= {200, 300, 450, 700}  # three different talkers in the mix


def test_compression_narrows_the_level_difference_between_quiet_and_loud_speech():
    quiet, loud = tone(300, 1.0, amplitude=0.01), tone(300, 1.0, amplitude=0.3)  # ~30 dB apart
    y = compress(np.concatenate([quiet, loud]), SR)
    before = 20 * np.log10(rms(loud) / rms(quiet))
    after = 20 * np.log10(rms(y[SR + SR // 2 :]) / rms(y[SR // 2 : SR]))
    assert before > 29 and after < 12


def test_phone_channel_is_seeded_and_draws_within_its_ranges():
    x = tone(250, seconds=3) + tone(1200, seconds=3)
    sources = [tone(330, seconds=2), tone(510, seconds=2), tone(777, seconds=2)]
    channel = PhoneChannel()
    a, da = channel.apply(x, np.random.default_rng(7), babble_sources=sources)
    b, db = channel.apply(x, np.random.default_rng(7), babble_sources=sources)
    assert np.array_equal(a, b) and da == db and len(a) == len(x) and a.dtype == np.float32
    c, _ = channel.apply(x, np.random.default_rng(8), babble_sources=sources)
    assert not np.array_equal(a, c)
    cfg = channel.config
    codecs, noises = set(), set()
    for seed in range(40):
        y, d = channel.apply(x, np.random.default_rng(seed), babble_sources=sources)
        assert cfg.low_hz[0] <= d.band_hz[0] <= cfg.low_hz[1] and cfg.high_hz[0] <= d.band_hz[1] <= cfg.high_hz[1]
        assert d.order in cfg.orders and d.codec in channel.codecs
        assert cfg.gain_db[0] <= d.gain_db <= cfg.gain_db[1] and np.abs(y).max() <= 1.0 + 1e-6
        if d.snr_db is not None:
            assert cfg.snr_db[0] <= d.snr_db <= cfg.snr_db[1]
        if d.loss_rate:
            assert cfg.loss_rate[0] <= d.loss_rate <= cfg.loss_rate[1]
        codecs.add(d.codec)
        noises.add(d.noise.split("(")[0])
        # whatever the line, the band below its low edge is gone: 60 Hz is far below 150 Hz
    assert len(codecs) >= 4 and {"none", "babble", "colored"} <= noises
    hum = tone(60, seconds=3)
    for seed in range(5):
        y, d = PhoneChannel(
            PhoneChannelConfig(
                noise_probability=0, agc_probability=0, clip_probability=0, loss_probability=0, gain_db=(0.0, 0.0)
            )
        ).apply(hum, np.random.default_rng(seed))
        assert level_db(y, hum) < -30, d
    empty, _ = channel.apply(np.zeros(0, np.float32), np.random.default_rng(0))
    assert len(empty) == 0


def test_phone_channel_clipping_and_config_checks():
    x = tone(700, seconds=1)
    y, d = PhoneChannel(
        PhoneChannelConfig(
            clip_probability=1.0,
            noise_probability=0,
            agc_probability=0,
            loss_probability=0,
            gain_db=(0.0, 0.0),
            codecs=("g711_mulaw",),
            orders=(2,),
            low_hz=(150.0, 150.0),
        )
    ).apply(x, np.random.default_rng(0))
    assert d.clip_level is not None and 0.2 <= d.clip_level <= 0.6
    assert rms(y) < rms(x) * 0.95  # the clipped tone lost level
    with pytest.raises(ValueError, match="probability"):
        PhoneChannelConfig(noise_probability=1.5)
    with pytest.raises(ValueError, match="band edges"):
        PhoneChannelConfig(high_hz=(3100.0, 4100.0))
    with pytest.raises(ValueError, match="codecs"):
        PhoneChannelConfig(codecs=("gsm",))
