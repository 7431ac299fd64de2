import numpy as np
import pytest
import soundfile as sf

from emostream import audio
from emostream.audio import (
    ALAW_TO_INT16,
    MULAW_TO_INT16,
    AudioError,
    alaw_decode,
    alaw_encode,
    float32_to_int16,
    int16_to_float32,
    mulaw_decode,
    mulaw_encode,
)


def test_constants():
    assert audio.SAMPLE_RATE == 16000
    assert audio.WINDOW_SAMPLES == audio.WINDOW_SECONDS * audio.SAMPLE_RATE == 96000


# ITU-T G.711 reference values, checked against CPython 3.11 audioop.ulaw2lin / alaw2lin over all 256 codes
@pytest.mark.parametrize(
    "code,value",
    [
        (0x00, -32124),
        (0x7F, 0),
        (0xFF, 0),
        (0x80, 32124),
        (0x0F, -16764),
        (0x70, -120),
        (0xF0, 120),
        (0x7E, -8),
        (0xFE, 8),
    ],
)
def test_mulaw_reference_values(code, value):
    assert mulaw_decode(bytes([code]))[0] == value


@pytest.mark.parametrize(
    "code,value",
    [(0x55, -8), (0xD5, 8), (0x2A, -32256), (0xAA, 32256), (0x00, -5504), (0x80, 5504), (0x54, -24), (0x45, -264)],
)
def test_alaw_reference_values(code, value):
    assert alaw_decode(bytes([code]))[0] == value


def test_g711_tables_are_odd_and_monotonic_by_magnitude():
    for table in (MULAW_TO_INT16, ALAW_TO_INT16):
        assert table.dtype == np.int16 and len(table) == 256
        assert sorted(set(np.abs(table.astype(int)))) == sorted(set(np.abs(table.astype(int))))
        assert (table > 0).sum() in (127, 128) and (table < 0).sum() in (127, 128)


def test_g711_roundtrip_is_identity_on_codes():
    codes = np.arange(256, dtype=np.uint8)
    pcm_mu = mulaw_decode(codes)
    assert np.array_equal(mulaw_decode(mulaw_encode(pcm_mu)), pcm_mu)
    pcm_a = alaw_decode(codes)
    assert np.array_equal(alaw_encode(pcm_a), codes)


def test_mulaw_quantisation_error_is_small_relative():
    x = (np.sin(np.linspace(0, 50, 8000)) * 20000).astype(np.int16)
    y = mulaw_decode(mulaw_encode(x)).astype(float)
    snr = 10 * np.log10(np.sum(x.astype(float) ** 2) / np.sum((x - y) ** 2))
    assert snr > 30  # G.711 gives ~38 dB SNR on a loud sine


def test_int16_float_roundtrip():
    pcm = np.array([-32768, -1, 0, 1, 32767], dtype=np.int16)
    f = int16_to_float32(pcm.tobytes())
    assert f.dtype == np.float32 and f[0] == -1.0 and f[2] == 0.0
    assert np.array_equal(float32_to_int16(f), pcm)
    assert float32_to_int16(np.array([2.0, -2.0]))[0] == 32767  # clipped


def test_resample_against_reference_sine():
    sr_in, f = 8000, 440.0
    t = np.arange(sr_in) / sr_in
    x = np.sin(2 * np.pi * f * t).astype(np.float32)
    y = audio.resample(x, sr_in, 16000)
    assert y.shape == (16000,)
    ref = np.sin(2 * np.pi * f * np.arange(16000) / 16000)
    assert np.max(np.abs(y[200:-200] - ref[200:-200])) < 0.02
    assert audio.resample(x, 16000, 16000) is not None


def test_read_audio_keeps_channels(tmp_path):
    path = tmp_path / "st.wav"
    data = np.stack([np.full(800, 0.5), np.full(800, -0.25)], axis=1)
    sf.write(path, data, 8000, subtype="PCM_16")
    samples, rate = audio.read_audio(path)
    assert rate == 8000 and samples.shape == (2, 800)
    assert np.allclose(samples[0], 0.5, atol=1e-4) and np.allclose(samples[1], -0.25, atol=1e-4)
    assert audio.load_audio(path).shape == (2, 1600)


@pytest.mark.parametrize("fmt", ["flac", "ogg"])
def test_read_compressed_formats(tmp_path, fmt):
    path = tmp_path / f"x.{fmt}"
    sf.write(path, np.zeros((1600, 1)) + 0.1, 16000)
    assert audio.read_audio(path)[0].shape[0] == 1


def test_read_errors(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        audio.read_audio(tmp_path / "missing.wav")
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"not audio at all")
    with pytest.raises(AudioError, match="cannot read audio"):
        audio.read_audio(bad)
    corrupt = tmp_path / "corrupt.mp3"  # libsndfile calls this "File does not exist ..."
    corrupt.write_bytes(b"\xff\xfb\x90\x00" + bytes(range(256)) * 8)
    with pytest.raises(AudioError, match="not a valid audio file") as info:
        audio.read_audio(corrupt)
    assert "does not exist" not in str(info.value) and "\n" not in str(info.value)
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1)), 16000)
    with pytest.raises(AudioError, match="empty"):
        audio.read_audio(empty)


def test_telephone_channel_removes_high_band():
    t = np.arange(16000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 300 * t) + 0.3 * np.sin(2 * np.pi * 6000 * t)).astype(np.float32)
    y = audio.telephone_channel(x)
    spec = np.abs(np.fft.rfft(y))
    assert spec[6000] < 0.01 * spec[300]


@pytest.mark.parametrize(
    "rate,channels,fmt,subtype",
    [(44100, 2, "WAV", "PCM_16"), (8000, 1, "FLAC", "PCM_16"), (48000, 1, "OGG", "OPUS"), (16000, 1, "WAV", "FLOAT")],
)
def test_stream_audio_equals_load_audio(tmp_path, rate, channels, fmt, subtype):
    """#42 item 8: decoding block by block (bounded memory) gives what decoding the whole file gives."""
    from emostream.audio import audio_info, is_silent, load_audio, stream_audio

    from .conftest import speechlike

    x = np.stack([speechlike(9.3, rate, f0=120 + 40 * c, seed=c) for c in range(channels)], axis=1)
    path = tmp_path / f"a.{'ogg' if fmt == 'OGG' else fmt.lower()}"
    with sf.SoundFile(path, "w", rate, channels, format=fmt, subtype=subtype) as f:
        for i in range(0, len(x), rate):
            f.write(x[i : i + rate])
    whole = load_audio(path)
    blocks = list(stream_audio(path, block_seconds=2.0))
    assert len(blocks) > 3 and all(b.shape[0] == channels for b in blocks)
    np.testing.assert_allclose(np.concatenate(blocks, axis=1), whole, atol=1e-5)
    mono = np.concatenate([b[0] for b in stream_audio(path, mono=True, block_seconds=2.0)])
    np.testing.assert_allclose(mono, whole.mean(axis=0), atol=1e-5)
    assert audio_info(path).frames_at() == whole.shape[1] and not is_silent(path)
    sf.write(tmp_path / "z.wav", np.zeros(4000), 16000)
    assert is_silent(tmp_path / "z.wav")


def test_channel_names_default_given_and_refused():
    assert audio.channel_names(None, 1) == ("ch0",)
    assert audio.channel_names(None, 2) == ("ch0", "ch1")
    assert audio.channel_names(None, 2, stereo=audio.STEREO_NAMES) == ("agent", "customer")
    assert audio.channel_names(None, 3, stereo=audio.STEREO_NAMES) == ("ch0", "ch1", "ch2")
    assert audio.channel_names([" agent", "customer "], 2) == ("agent", "customer")
    for names, n in ((["a"], 2), (["a", "a"], 2), (["a", ""], 2), (["a", "b"], 1)):
        with pytest.raises(ValueError, match=f"need {n} distinct channel names"):
            audio.channel_names(names, n)
