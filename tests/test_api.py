"""The Python API (emostream.load_model, analyze, classify, Stream) gives what the CLI gives."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

import emostream
from emostream.audio import float32_to_int16, load_audio, resample
from emostream.model import CheckpointError

from .conftest import EXAMPLES, ROOT

ALERT = "Neutral>=0.3 for 3s"


@pytest.fixture(scope="module")
def model(shipped_checkpoint):
    return emostream.load_model(device="cpu")


@pytest.fixture(scope="module")
def mono_analysis(model):
    return emostream.analyze(EXAMPLES / "call_mono.flac", model=model, alerts=[ALERT])


def test_import_emostream_loads_neither_numpy_nor_torch():
    code = (
        "import sys, emostream; assert emostream.CLASSES[0] == 'Angry'; "
        "print(sorted(m for m in ('numpy', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert set(emostream.__all__) >= {"load_model", "analyze", "classify", "Stream", "CLASSES"}


def test_analyze_writes_exactly_what_replay_fast_writes(mono_analysis, tmp_path):
    out = tmp_path / "replay.jsonl"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "emostream",
            "replay",
            str(EXAMPLES / "call_mono.flac"),
            "--fast",
            "--no-dashboard",
            "--events",
            str(out),
            "--device",
            "cpu",
            "--alert",
            ALERT,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    replayed = [json.loads(line) for line in out.read_text().splitlines()]
    assert mono_analysis.lines == replayed
    kinds = [line.get("type", "event") for line in replayed]
    assert kinds[-1] == "summary" and kinds.count("event") > 50 and "alert" in kinds


def test_analysis_as_a_table(mono_analysis):
    pd = pytest.importorskip("pandas")
    table = mono_analysis.to_pandas()
    windows = [e for e in mono_analysis.events if e.get("type", "event") == "event"]
    assert isinstance(table, pd.DataFrame) and len(table) == len(windows)
    assert list(table.columns[-7:]) == list(emostream.CLASSES)
    spoken = table[table.speech]
    assert np.allclose(spoken[list(emostream.CLASSES)].sum(axis=1), 1, atol=2e-3)
    assert table.loc[~table.speech, "Angry"].isna().all()


def test_stream_gives_the_same_events_whatever_the_pieces(model):
    """Two channels of 8 kHz int16, as a bridge delivers them: one push, or random-size pieces."""
    audio = load_audio(EXAMPLES / "call_stereo.flac")[:, : 16000 * 20]
    pcm = float32_to_int16(resample(audio, 16000, 8000)).T  # (frames, 2)

    def run(pieces):
        stream = emostream.Stream(model, channels=("agent", "customer"), sample_rate=8000, stream="call")
        events = []
        for piece in pieces:
            events += stream.push(piece)
        summary = dict(stream.close())
        started = summary.pop("started_at")  # the wall clock when the stream was made: differs run to run
        assert started.endswith("Z") and summary["started_at_from"] == "stream start"
        return events + stream.last_events, summary

    whole = run([pcm])
    rng = np.random.default_rng(7)
    cuts = np.sort(rng.choice(np.arange(1, len(pcm)), size=40, replace=False))
    pieces = np.split(pcm, cuts)
    assert min(map(len, pieces)) >= 1 and max(map(len, pieces)) < len(pcm)
    assert run(pieces) == whole
    events, summary = whole
    assert {e["channel"] for e in events} == {"agent", "customer"} and summary["duration"] == pytest.approx(20, abs=0.1)
    assert summary["model"]["name"] == "emostream-resnet50" and len(summary["model"]["sha256"]) == 12
    assert sum(e["speech"] for e in events) > 10


def test_stream_refuses_the_wrong_channel_count(model):
    stream = emostream.Stream(model, channels=("agent", "customer"))
    with pytest.raises(ValueError, match="frames, 2"):
        stream.push(np.zeros(1600, np.float32))


def test_classify_equals_the_cli_json(model, tmp_path, capsys):
    """The API's dict is the CLI's --json line: for speech (a piece of an example call) and for a
    clip the speech gate finds no speech in (no label, exit 2)."""
    from emostream.cli import main

    from .conftest import speechlike

    speech = tmp_path / "speech.wav"
    sf.write(speech, load_audio(EXAMPLES / "call_mono.flac")[0, 16000 * 2 : 16000 * 6], 16000, subtype="PCM_16")
    assert main(["classify", str(speech), "--json", "--device", "cpu"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert emostream.classify(speech, model=model) == printed
    assert printed["speech"] and set(printed["probabilities"]) == set(emostream.CLASSES) and printed["duration"] == 4.0
    tone = tmp_path / "tone.wav"
    sf.write(tone, speechlike(3.5, seed=3), 16000, subtype="PCM_16")
    assert main(["classify", str(tone), "--json", "--device", "cpu"]) == 2
    printed = json.loads(capsys.readouterr().out)
    assert emostream.classify(tone, model=model) == printed and printed["speech"] is False and printed["label"] is None


def test_load_model_names_a_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint at .*nowhere"):
        emostream.load_model(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="ONNX file"):
        emostream.load_model(backend="onnx")
