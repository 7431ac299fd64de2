"""Speech gating: the streaming Silero VAD, the energy rule, the window gate and its CLI option."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from emostream import vad as vad_module
from emostream.analyzer import Analyzer, AnalyzerConfig
from emostream.audio import SAMPLE_RATE, load_audio
from emostream.cli import main
from emostream.stream import StreamConfig, StreamWindower, Window, frame_levels_db
from emostream.vad import FRAME, SILERO_RATES, SileroStream, SpeechGate, VadConfig, VadUnavailable
from emostream.worker import constant_predictor

from .conftest import EXAMPLES


def speech_activity(
    samples: np.ndarray,
    threshold_db: float = -50.0,
    frame: int = 512,
    min_active_seconds: float = 0.1,
    sample_rate: int = SAMPLE_RATE,
) -> bool:
    """The original energy rule, the reference of the energy gate: at least ``min_active_seconds`` of
    32 ms frames above ``threshold_db`` dBFS.

    This only separates near-silence (line hiss, pauses) from sound; it is not a voice detector.
    """
    rms_db = frame_levels_db(samples, frame)
    if len(rms_db) == 0:
        return False
    return bool((rms_db > threshold_db).sum() * frame >= min_active_seconds * sample_rate)


@pytest.fixture(scope="module")
def stereo():
    """The bundled stereo call (agent, customer) and its ground-truth segments."""
    audio = load_audio(EXAMPLES / "call_stereo.flac")
    with open(EXAMPLES / "call_stereo.segments.csv", newline="") as f:
        segments = list(csv.DictReader(f))
    return audio, segments


def one_pass(x: np.ndarray) -> np.ndarray:
    stream = SileroStream(history=len(x))
    stream.feed(x)
    return stream.frames(0, len(x))


def test_streaming_equals_one_pass_for_any_pieces(stereo):
    audio, _ = stereo
    x = audio[1, : 20 * SAMPLE_RATE]
    ref = one_pass(x)
    assert len(ref) == len(x) // FRAME
    stream, pos, rng = SileroStream(history=len(x)), 0, np.random.default_rng(0)
    while pos < len(x):
        n = int(rng.integers(1, 7000))
        stream.feed(x[pos : pos + n])
        pos += n
    np.testing.assert_allclose(stream.frames(0, len(x)), ref, atol=1e-5)
    assert stream.position == len(x)


@pytest.mark.parametrize("rate", sorted(SILERO_RATES))
def test_shipped_graphs_equal_the_silero_package_streamed_frame_by_frame(stereo, rate):
    """emostream/vad_models/ (built by emostream.vad_export) against silero-vad's own TorchScript
    model fed one frame at a time, at 16 kHz and 8 kHz: the same probabilities, the same decisions."""
    torch = pytest.importorskip("torch")
    silero_vad = pytest.importorskip("silero_vad")
    from scipy.signal import resample_poly

    audio, _ = stereo
    x = audio[1, : 20 * SAMPLE_RATE]
    if rate != SAMPLE_RATE:
        x = resample_poly(x, rate, SAMPLE_RATE).astype(np.float32)
    stream = SileroStream(history=len(x), rate=rate)
    stream.feed(x)
    ours = stream.frames(0, len(x))
    model = silero_vad.load_silero_vad()  # TorchScript, both networks, its own streaming state
    frame = SILERO_RATES[rate][0]
    with torch.no_grad():
        ref = np.array(
            [float(model(torch.from_numpy(x[i : i + frame])[None], rate)) for i in range(0, len(ours) * frame, frame)]
        )
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    assert ((ours >= 0.5) == (ref >= 0.5)).all() and 0.1 < (ours >= 0.5).mean() < 0.9


def test_phone_calls_are_gated_by_the_8k_network_on_the_same_frames(stereo):
    """A call that arrived at 8 kHz: its 16 kHz windows are gated by Silero's 8 kHz network on every
    other sample; speech is found where the 16 kHz network finds it (the stereo call through 8 kHz)."""
    from scipy.signal import resample_poly

    from emostream.audio import resample

    audio, _ = stereo
    narrow = np.stack([resample_poly(ch, 1, 2).astype(np.float32) for ch in audio[:, : 60 * SAMPLE_RATE]])
    wide = np.stack([resample(ch, 8000, SAMPLE_RATE) for ch in narrow])  # as the call's resampler gives it
    windows = windows_of(wide)
    phone = SpeechGate(VadConfig.named("silero"), source_rate=8000)
    full = SpeechGate(VadConfig.named("silero"))
    assert phone.silero_rate == 8000 and full.silero_rate == 16000
    a = [phone.speech_seconds(w) for w in windows]
    b = [full.speech_seconds(w) for w in windows]
    assert phone.silero["agent"].rate == 8000 and phone.silero["agent"].position == windows[-1].end // 2
    decisions = np.array([x >= 0.5 for x in a]) == np.array([x >= 0.5 for x in b])
    assert decisions.mean() >= 0.9 and np.corrcoef(a, b)[0, 1] > 0.9
    assert 0.2 < np.mean([x >= 0.5 for x in a]) < 0.9


def test_silero_hears_voices_not_silence_or_noise(stereo):
    audio, segments = stereo
    for ch, name in enumerate(("agent", "customer")):
        p = one_pass(audio[ch]) >= 0.5
        t = (np.arange(len(p)) + 0.5) * FRAME / SAMPLE_RATE
        inside = np.zeros(len(p), bool)
        for s in segments:
            if s["channel"] == name:
                inside |= (t >= float(s["t_start"])) & (t < float(s["t_end"]))
        assert p[inside].mean() > 0.3  # the acted clips hold ~1 s of silence at their edges
        assert p[~inside].mean() < 0.02  # turns of the other party: this channel's line is quiet
    noise = (0.03 * np.random.default_rng(1).standard_normal(5 * SAMPLE_RATE)).astype(np.float32)  # -30 dBFS hiss
    assert (one_pass(noise) >= 0.5).mean() == 0
    assert speech_activity(noise)  # ... which the energy rule takes for sound


def test_the_reference_energy_rule():
    assert not speech_activity(np.zeros(SAMPLE_RATE))
    assert not speech_activity(np.full(SAMPLE_RATE, 1e-4))  # -80 dBFS hiss
    x = np.zeros(SAMPLE_RATE, dtype=np.float32)
    x[:4000] = 0.1 * np.sin(np.arange(4000))
    assert speech_activity(x)


def windows_of(audio: np.ndarray, names=("agent", "customer"), hop: float = 1.0) -> list[Window]:
    w = StreamWindower("call", names, StreamConfig(hop_seconds=hop))
    return w.push_frames(audio) + w.flush()


def test_energy_gate_keeps_the_original_rule(stereo):
    audio, _ = stereo
    windows = windows_of(audio)
    gate = SpeechGate(VadConfig.named("energy"))
    expected = [i for i, w in enumerate(windows) if speech_activity(w.samples[: w.end - w.start])]
    assert gate.select(windows) == expected
    assert SpeechGate(VadConfig.named("off")).select(windows) == list(range(len(windows)))


def test_silero_gate_skips_a_third_of_the_stereo_call_and_keeps_speech(stereo):
    audio, segments = stereo
    windows = windows_of(audio)
    picked = SpeechGate(VadConfig.named("silero")).select(windows)
    assert len(picked) <= 0.7 * len(windows)  # the target: >= 30 % fewer windows classified
    # every window whose newest second lies inside a ground-truth clip's middle is classified
    for i, w in enumerate(windows):
        middle = [
            s
            for s in segments
            if s["channel"] == w.channel
            and float(s["t_start"]) + 1.0 <= w.t_end - 1.0
            and w.t_end <= float(s["t_end"]) - 0.5
        ]
        if middle:
            assert i in picked, (w.channel, w.t_end)


def test_silero_gate_same_for_any_hop_split(stereo):
    """The detector sees each sample once whatever the windows: hop 0.5 s decides the windows it
    shares with hop 1 s (every other one) the same way."""
    audio, _ = stereo
    x = audio[:, : 30 * SAMPLE_RATE]
    one = windows_of(x, hop=1.0)
    half = windows_of(x, hop=0.5)
    gate1, gate2 = SpeechGate(VadConfig.named("silero")), SpeechGate(VadConfig.named("silero"))
    d1 = {(w.channel, w.end): gate1.is_speech(w) for w in one if not w.final}
    d2 = {(w.channel, w.end): gate2.is_speech(w) for w in half if not w.final}
    assert d1 and all(d2[k] == v for k, v in d1.items())


def test_gap_longer_than_a_window_restarts_the_detector(stereo):
    audio, _ = stereo
    x = audio[1]
    gate = SpeechGate(VadConfig.named("silero"))
    n = 6 * SAMPLE_RATE
    for start in (0, 40 * SAMPLE_RATE):  # hop 40 s: the second window starts after a gap
        w = Window("customer", start, start + n, x[start : start + n].copy())
        gate.is_speech(w)
    assert gate.silero["customer"].position >= 40 * SAMPLE_RATE + n - FRAME


def test_analyzer_marks_gated_windows_as_silence(stereo):
    audio, _ = stereo
    calls = []

    def predict(x):
        calls.append(len(x))
        return constant_predictor()(x)

    analyzer = Analyzer(predict, "call", ("agent", "customer"), AnalyzerConfig(vad=VadConfig.named("silero")))
    events = analyzer.process(windows_of(audio))
    speech = [e for e in events if e["speech"]]
    assert sum(calls) == len(speech) < len(events)
    assert all(e["label"] is None and e["probabilities"] is None for e in events if not e["speech"])


def test_config_validation():
    with pytest.raises(ValueError, match="vad must be one of"):
        VadConfig(kind="webrtc")
    with pytest.raises(ValueError, match="threshold"):
        VadConfig(kind="silero", threshold=1.5)
    assert VadConfig.named("energy").threshold == -50.0
    assert VadConfig.named("silero", recent_seconds=1.0).recent_seconds == 1.0


def test_cli_vad_option_errors(monkeypatch, wav_file, capsys):
    assert main(["replay", str(wav_file), "--vad", "webrtc"]) == 2
    assert "--vad" in capsys.readouterr().err
    monkeypatch.setattr(vad_module, "_sessions", {})
    monkeypatch.setattr(vad_module, "VAD_MODELS", wav_file.parent)  # an install without the gate's model
    with pytest.raises(VadUnavailable, match="silero_vad_16k_sequence.onnx is missing"):
        SpeechGate(VadConfig.named("silero"))
    assert main(["replay", str(wav_file), "--fast", "--no-dashboard"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--vad energy" in err[0]
