import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from emostream.cli import main
from emostream.model import CLASSES
from emostream.timeline import read_events

from .conftest import ROOT, speechlike


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "emostream", *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_classify_json_shape(shipped_checkpoint, wav_file, stereo_file, capsys):
    assert main(["classify", str(wav_file), str(stereo_file), "--json", "--device", "cpu", "--vad", "energy"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for line, path in zip(lines, (wav_file, stereo_file)):
        rec = json.loads(line)
        assert rec["path"] == str(path)
        assert rec["label"] in CLASSES
        assert list(rec["probabilities"]) == list(CLASSES)
        assert abs(sum(rec["probabilities"].values()) - 1) < 1e-3
        assert rec["label"] == max(rec["probabilities"], key=rec["probabilities"].get)


def test_classify_positions_average_the_placed_windows(shipped_checkpoint, tmp_path, capsys):
    """``--positions P`` scores the clip by the calibrated softmax of its mean logit over the clip's P
    placements in the window, as evaluation does; 1 is the recipe's single padded chunk, and the
    default is the cross-validated 5 placements (run 25)."""
    from emostream.model import Predictor
    from emostream.stream import CLIP_POSITIONS, fixed_chunks, placed_windows

    path = tmp_path / "short.wav"
    audio = speechlike(2.5)
    sf.write(path, audio, 16000, subtype="FLOAT")
    predictor = Predictor.from_checkpoint(device="cpu")
    assert CLIP_POSITIONS == 5
    # the shipped checkpoint carries both CV-fitted temperatures (model card: 1.28 for single windows,
    # 1.12 for the mean of 5 placements), so a wrong choice moves the probabilities
    assert predictor.temperature == pytest.approx(1.28, abs=0.005)
    assert predictor.clip_temperature == pytest.approx(1.12, abs=0.005)
    for positions, windows in (
        (1, fixed_chunks(audio)),
        (4, placed_windows(audio, 4)),
        (None, placed_windows(audio, 5)),
    ):
        args = ["classify", str(path), "--json", "--device", "cpu", "--backend", "torch", "--vad", "energy"] + (
            ["--positions", str(positions)] if positions else []
        )
        assert main(args) == 0
        rec = json.loads(capsys.readouterr().out)
        mean_logit = predictor.logits(windows).numpy().mean(axis=0)
        t = predictor.temperature if positions == 1 else predictor.clip_temperature  # placements: the clip one
        expected = torch.softmax(torch.from_numpy(mean_logit) / t, dim=-1).numpy()
        if positions != 1:  # the mean logit, not the mean probability (they differ for a real model)
            assert np.abs(expected - predictor.predict(windows).mean(axis=0)).max() > 1e-4
        np.testing.assert_allclose([rec["probabilities"][c] for c in CLASSES], expected, atol=2e-3)
    assert len(placed_windows(audio, 4)) == 4
    assert main(["classify", str(path), "--positions", "0"]) == 2
    assert "--positions" in capsys.readouterr().err


def _quiet_files(tmp_path):
    """Files a user may hand to classify that hold no speech: 10 s of zeros, 0.2 s, -70 dBFS noise."""
    rng = np.random.default_rng(0)
    files = {
        "zeros.wav": np.zeros(10 * 16000, np.float32),
        "short.wav": speechlike(0.2),
        "noise.wav": (10 ** (-70 / 20) * np.sqrt(2) * rng.standard_normal(10 * 16000)).astype(np.float32),
    }
    for name, x in files.items():
        sf.write(tmp_path / name, x, 16000, subtype="FLOAT")
    return [tmp_path / name for name in files]


def test_classify_labels_no_silence(shipped_checkpoint, tmp_path):
    """Issue #42 item 1: silence, a 0.2 s file and -70 dBFS noise get "speech": false and no label
    (the streaming speech gate decides), with a note each and exit 2; speech is still labelled."""
    quiet = _quiet_files(tmp_path)
    r = run_cli("classify", *map(str, quiet), str(ROOT / "examples" / "call_mono.flac"), "--json")
    assert r.returncode == 2, r.stderr
    records = [json.loads(line) for line in r.stdout.splitlines()]
    assert [rec["speech"] for rec in records] == [False, False, False, True]
    for rec in records[:3]:
        assert rec["label"] is None and rec["probabilities"] is None and rec["confidence"] is None
        assert f"{rec['path']}: no speech" in r.stderr
    assert records[3]["label"] in CLASSES and records[3]["speech_seconds"] > 5
    assert "Traceback" not in r.stderr
    plain = run_cli("classify", str(quiet[0]))  # plain output: no label either
    assert plain.returncode == 2 and plain.stdout.split("\t")[1:] == ["-", "-\n"]


def test_classify_scores_the_whole_file(tmp_path):
    """Issue #42 item 2: a file longer than 600 s is read to its end; the windows cut while it is
    decoded block by block are exactly placed_windows of the whole file (no 600 s cap)."""
    from emostream.audio import audio_info, load_mono, stream_audio
    from emostream.stream import placed_windows
    from emostream.whole_file import cut_windows

    path = tmp_path / "long.flac"
    rng = np.random.default_rng(1)
    sf.write(path, (0.05 * rng.standard_normal(8000 * 650)).astype(np.float32), 8000)  # 650 s, 8 kHz
    n = audio_info(path).frames_at()
    assert n == 650 * 16000
    for positions in (1, 5):
        seen = []
        blocks = (b[0] for b in stream_audio(path, mono=True, block_seconds=7))
        got = np.concatenate(list(cut_windows(blocks, n, positions, seen.append)))
        whole = load_mono(path)
        expected = placed_windows(whole, positions, max_seconds=700)
        assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-5
        assert sum(len(b) for b in seen) == n
    assert np.abs(got[-1] - whole[-len(got[-1]) :]).max() < 1e-5  # the last window ends at the file's end
    assert len(got) > len(placed_windows(whole, 5))  # the old 600 s cap scored fewer windows


def test_classify_hints_at_a_timeline_for_long_recordings(shipped_checkpoint, tmp_path):
    """Issue #42 item 2: one label for a whole long recording: classify says so and names replay/batch."""
    path = tmp_path / "call.wav"
    sf.write(path, speechlike(130.0), 16000)
    r = run_cli("classify", str(path), "--json", "--vad", "energy", "--positions", "1")
    assert r.returncode == 0, r.stderr
    rec = json.loads(r.stdout)
    assert rec["duration"] == 130.0 and rec["speech"]
    assert "replay --fast" in r.stderr and "batch" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_model_info_names_the_precision_that_runs(predictor, monkeypatch):
    """``/metrics``' build info says what the model computes in on this machine (mixed precision is
    bf16 only on a CPU with fast bf16 kernels), beside the weights' identity."""
    from types import SimpleNamespace

    import emostream.model
    from emostream.cli.common import command_model_info as _model_info

    args = SimpleNamespace(checkpoint=None, onnx=None)
    for fast, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(emostream.model, "cpu_has_fast_bf16", lambda fast=fast: fast)
        info = _model_info(predictor, args)
        assert info["precision"] == expected and info["backend"] == "torch" and len(info["sha256"]) == 12
        assert float(info["temperature"]) == pytest.approx(predictor.temperature, rel=1e-5)


def test_classify_plain_output(shipped_checkpoint, wav_file, capsys):
    assert main(["classify", str(wav_file), "--vad", "energy"]) == 0  # tones: sound, not a voice
    path, label, conf = capsys.readouterr().out.strip().split("\t")
    assert path == str(wav_file) and label in CLASSES and 0 < float(conf) <= 1


def test_replay_events_stereo(shipped_checkpoint, stereo_file, tmp_path, capsys):
    out = tmp_path / "e.jsonl"
    rc = main(
        [
            "replay",
            str(stereo_file),
            "--fast",
            "--no-dashboard",
            "--events",
            str(out),
            "--channel-names",
            "agent,customer",
            "--stream",
            "call-1",
            "--vad",
            "energy",
        ]
    )  # tones, not voices
    assert rc == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    events, summary = lines[:-1], lines[-1]
    assert summary["type"] == "summary" and set(summary["channels"]) == {"agent", "customer"}
    # 7.3 s of audio, hop 1 s: windows end at 1..7 s plus a final one at 7.3 s, per channel
    for ch in ("agent", "customer"):
        evs = [e for e in events if e["channel"] == ch]
        assert [e["t_end"] for e in evs] == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 7.3]
        assert [e["t_start"] for e in evs] == [0.0] * 6 + [1.0, 1.3]
        assert all(e["stream"] == "call-1" and e["speech"] and e["label"] in CLASSES for e in evs)
    assert len(capsys.readouterr().out.strip().splitlines()) >= 16


def test_replay_half_second_hop_and_realtime_pacing(shipped_checkpoint, tmp_path):
    path = tmp_path / "short.wav"
    sf.write(path, speechlike(2.0), 16000)
    out = tmp_path / "e.jsonl"
    import time

    t0 = time.monotonic()
    assert main(["replay", str(path), "--speed", "2", "--hop", "0.5", "--no-dashboard", "--events", str(out)]) == 0
    assert time.monotonic() - t0 >= 0.9  # 2 s of audio at double speed
    assert [e["t_end"] for e in read_events(out)] == [1.0, 1.5, 2.0]


def test_replay_silence_is_not_classified(shipped_checkpoint, tmp_path):
    path = tmp_path / "gap.wav"
    x = np.concatenate([speechlike(2.0), np.full(9 * 16000, 1e-4, np.float32)])
    sf.write(path, x, 16000)
    out = tmp_path / "e.jsonl"
    assert main(["replay", str(path), "--fast", "--no-dashboard", "--events", str(out), "--vad", "energy"]) == 0
    events = read_events(out)
    assert events[0]["speech"] and not events[-1]["speech"] and events[-1]["label"] is None


@pytest.mark.parametrize(
    "args,message",
    [
        (["replay", "missing.wav"], "no such file"),
        (["replay", "examples"], "directory"),
        (["replay", "{bad}", "--hop", "0"], "must be > 0"),
        (["replay", "{bad}", "--hop", "abc"], "not a number"),
        (["replay", "{wav}", "--smooth", "2"], "--smooth"),
        (["replay", "{wav}", "--min-seconds", "7"], "min-seconds"),
        (["replay", "{wav}", "--channel-names", "a,b"], "--channel-names"),
        (["replay", "{wav}", "--channel-names", "a,a"], "distinct non-empty names"),
        (["batch", "{wav}", "--channel-names", "a,"], "distinct non-empty names"),
        (["send", "{wav}", "ws://127.0.0.1:9", "--channel-names", " ,b"], "distinct non-empty names"),
        (["replay", "{bad}"], "cannot read audio"),
        (["replay", "{empty}"], "empty"),
        (["replay", "{wav}", "--checkpoint", "/nonexistent/ck"], "no checkpoint"),
        (["replay", "{wav}", "--events", "/nonexistent/dir/e.jsonl"], "does not exist"),
        (["classify", "{bad}"], "cannot read audio"),
        (["classify", "{wav}", "--checkpoint", "/nonexistent/ck"], "no checkpoint"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_errors_are_one_line_exit_2(args, message, tmp_path, wav_file, capsys):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(b"RIFF nonsense")
    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 1)), 16000)
    args = [a.format(bad=bad, wav=wav_file, empty=empty) for a in args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and message in err and "Traceback" not in err


def test_error_in_subprocess_has_no_traceback(tmp_path):
    r = run_cli("classify", str(tmp_path / "nope.flac"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("emostream: error:") and "Traceback" not in r.stderr


def test_console_entry_keeps_mains_exit_codes_and_output(tmp_path):
    """``python -m emostream`` (and the console script) leaves through ``cli.run``: main's exit code,
    argparse's, and every line written before the plain process exit."""
    ok = run_cli("--version")
    assert ok.returncode == 0 and ok.stdout.startswith("emostream ")
    usage = run_cli("nonsense")
    assert usage.returncode == 2 and "invalid choice" in usage.stderr
    out = tmp_path / "x.html"
    report = run_cli("report", str(tmp_path / "missing.jsonl"), "--out", str(out))
    assert report.returncode == 2 and report.stderr.count("\n") == 1


def test_console_script_entry_point_is_run():
    from pathlib import Path

    import tomllib

    from emostream.cli import run

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"]["emostream"] == "emostream.cli:run" and callable(run)


def test_silent_file_is_an_error(tmp_path, capsys):
    path = tmp_path / "zeros.wav"
    sf.write(path, np.zeros(16000), 16000)
    assert main(["replay", str(path), "--fast", "--no-dashboard"]) == 2
    assert "silent" in capsys.readouterr().err


def test_replay_bundled_stereo_example_matches_ground_truth_format(shipped_checkpoint, tmp_path):
    """The acceptance command on the bundled stereo call: one event per hop per channel, exact
    window times, and labels that agree with the ground truth better than chance."""
    import csv

    from emostream.audio import load_audio
    from train.metrics import segment_agreement as agreement

    wav = ROOT / "examples" / "call_stereo.flac"
    out = tmp_path / "e.jsonl"
    assert (
        main(
            ["replay", str(wav), "--fast", "--no-dashboard", "--events", str(out), "--channel-names", "agent,customer"]
        )
        == 0
    )
    seconds = load_audio(wav).shape[1] / 16000
    ends = [float(t) for t in range(1, int(seconds) + 1)] + [seconds]  # exact sample times
    events = read_events(out)
    for ch in ("agent", "customer"):
        evs = [e for e in events if e["channel"] == ch]
        assert [e["t_end"] for e in evs] == pytest.approx(ends, abs=1e-6)
        assert [e["t_start"] for e in evs] == pytest.approx([max(0.0, t - 6) for t in ends], abs=1e-6)
    with open(ROOT / "examples" / "call_stereo.segments.csv", newline="") as f:
        segments = list(csv.DictReader(f))
    score = agreement(events, segments)
    assert set(score) == {"agent", "customer", "overall"}
    assert score["overall"]["agreement"] > 1 / 7


COMMANDS = ("replay", "classify", "batch", "report", "export", "serve", "send", "watch", "mic")


@pytest.mark.parametrize("command", COMMANDS)
def test_help_ends_with_examples(command):
    """#42 item 10: each command's --help ends with 2-3 examples of that command."""
    r = run_cli(command, "--help")
    assert r.returncode == 0
    tail = r.stdout.rstrip().split("\nexamples:\n")
    assert len(tail) == 2, r.stdout[-300:]
    examples = tail[1].splitlines()
    assert 2 <= len(examples) <= 3 and all(
        e.startswith(f"  emostream {command} ") or "emostream" in e for e in examples
    )
    assert any(e.startswith(f"  emostream {command} ") for e in examples)


def test_send_and_mic_options_say_what_they_are(tmp_path):
    """#42 item 10: send's file and --protocol have help; mic's sound card is --input-device and
    --device is the model's device as everywhere; a mono file sent as pcm hints at --channel-names."""
    from emostream.cli import build_parser

    sd = run_cli("send", "--help").stdout
    assert "the recorded call to stream" in sd and "the bridge to act as" in sd
    args = build_parser().parse_args(["mic", "--input-device", "USB", "--device", "cpu"])
    assert (args.input_device, args.device) == ("USB", "cpu")
    assert build_parser().parse_args(["mic", "--model-device", "cpu"]).device == "cpu"  # the old name still works
    bad = run_cli("mic", "--device", "USB Headset", "--seconds", "1")
    assert bad.returncode == 2 and "--input-device" in bad.stderr and "Traceback" not in bad.stderr
    from .live_util import ServerThread

    mono = tmp_path / "mono.wav"
    sf.write(mono, speechlike(1.0), 16000)
    with ServerThread(port=0, analyse="customer") as srv:  # serve's default: the customer only
        r = run_cli("send", str(mono), srv.url, "--fast")
    assert r.returncode == 1 and "no customer channel" in r.stderr, r.stderr
    assert r.stderr.strip().endswith("add --channel-names customer") and len(r.stderr.strip().splitlines()) == 1
