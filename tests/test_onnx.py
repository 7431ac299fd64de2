"""ONNX export of the whole pipeline and the ONNX Runtime backend: parity with torch, CLI, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf

from emostream.audio import SAMPLE_RATE, WINDOW_SAMPLES, load_audio
from emostream.cli import main
from emostream.model import CheckpointError, Predictor
from emostream.onnx_model import OnnxPredictor, parity_windows
from emostream.stream import StreamWindower
from emostream.timeline import read_events

from .conftest import EXAMPLES

pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript")


@pytest.fixture(scope="module")
def torch_fp32(shipped_checkpoint):
    return Predictor.from_checkpoint(shipped_checkpoint, device="cpu", mixed_precision=False)


def real_windows() -> np.ndarray:
    """Streaming windows of the example calls: the first (2 s, zero-padded), full ones with speech
    of both voices, one across a turn change, and one of the telephone call."""
    stereo = load_audio(EXAMPLES / "call_stereo.flac")
    w = StreamWindower("s", ("agent", "customer"))
    windows = w.push_frames(stereo[:, : 40 * SAMPLE_RATE])
    picked = [x.samples for x in windows if x.t_end in (2.0, 12.0, 17.0, 33.0)]
    tel = load_audio(EXAMPLES / "call_telephone.flac")[0]
    picked.append(tel[20 * SAMPLE_RATE : 20 * SAMPLE_RATE + WINDOW_SAMPLES])
    return np.stack(picked).astype(np.float32)


def test_logits_match_torch(onnx_file, torch_fp32, capsys):
    onnx = OnnxPredictor.from_file(onnx_file)
    x = np.concatenate([real_windows(), parity_windows()])
    ref = torch_fp32.logits(x).numpy()
    got = onnx.logits(x)
    assert got.shape == ref.shape == (len(x), 7)
    # float32 rounding only: logits are of order 1-10, differences 1e-5 to 4e-4 (largest where zero
    # padding meets the utterance normalisation's floor)
    assert np.abs(got - ref).max() < 1e-3
    np.testing.assert_allclose(onnx.predict(x), torch_fp32.predict(x), atol=1e-4)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert onnx.temperature == pytest.approx(torch_fp32.temperature)
    assert onnx.clip_temperature == pytest.approx(torch_fp32.clip_temperature)


def test_batch_dimension_is_dynamic(onnx_file):
    onnx = OnnxPredictor.from_file(onnx_file)
    x = real_windows()
    one_by_one = np.concatenate([onnx.logits(x[i : i + 1]) for i in range(len(x))])
    np.testing.assert_allclose(onnx.logits(x), one_by_one, atol=1e-4)
    assert onnx.predict(x[0]).shape == (1, 7)
    with pytest.raises(ValueError, match="96000"):
        onnx.predict(np.zeros((2, 1000), np.float32))


def test_replay_with_onnx_backend_equals_torch_fp32(onnx_file, tmp_path):
    clip = tmp_path / "call.flac"
    sf.write(clip, load_audio(EXAMPLES / "call_stereo.flac")[:, 8 * SAMPLE_RATE : 20 * SAMPLE_RATE].T, SAMPLE_RATE)
    runs = {}
    for name, extra in (("torch", ["--fp32"]), ("onnx", ["--backend", "onnx", "--onnx", str(onnx_file)])):
        out = tmp_path / f"{name}.jsonl"
        assert (
            main(["replay", str(clip), "--fast", "--no-dashboard", "--events", str(out), "--vad", "off"] + extra) == 0
        )
        runs[name] = read_events(out)
    assert len(runs["torch"]) == len(runs["onnx"]) == 2 * 12
    for a, b in zip(runs["torch"], runs["onnx"]):
        assert (a["channel"], a["t_end"], a["label"]) == (b["channel"], b["t_end"], b["label"])
        assert max(abs(a["probabilities"][k] - b["probabilities"][k]) for k in a["probabilities"]) <= 2e-4


def test_classify_with_onnx_backend(onnx_file, wav_file, capsys):
    assert main(["classify", str(wav_file), "--json", "--onnx", str(onnx_file), "--vad", "energy"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert abs(sum(record["probabilities"].values()) - 1) < 1e-3


NO_TORCH_PROBE = """
import json, sys
from emostream.cli import main
code = main(sys.argv[1:])
print(json.dumps({"rc": code, "imported": [m for m in ("torch", "torchaudio", "timm") if m in sys.modules]}))
"""


@pytest.mark.parametrize("mode", ["classify", "replay", "batch"])
def test_the_onnx_backend_runs_without_torch(mode, onnx_file, tmp_path):
    # the low-memory path for long calls (issue #42): torch alone is ~0.7 GB of a process's memory
    import subprocess
    import sys

    call = tmp_path / "call.flac"
    sf.write(call, load_audio(EXAMPLES / "call_mono.flac")[0, : 20 * SAMPLE_RATE], SAMPLE_RATE)
    argv = {
        "classify": ["classify", str(call), "--json"],
        "replay": ["replay", str(call), "--fast", "--no-dashboard", "--events", str(tmp_path / "r.jsonl")],
        "batch": ["batch", str(call), "--out", str(tmp_path / "out"), "--quiet"],
    }[mode]
    out = subprocess.run(
        [sys.executable, "-c", NO_TORCH_PROBE, *argv, "--onnx", str(onnx_file)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "imported": []}, out.stderr[-500:]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--backend", "onnx"], "needs --onnx"),
        (["--backend", "torch", "--onnx", "{onnx}"], "only used with --backend onnx"),
        (["--onnx", "{onnx}", "--checkpoint", "{ckpt}"], "does not apply"),
        (["--onnx", "{missing}"], "no ONNX model"),
        (["--onnx", "{corrupt}"], "cannot load ONNX model"),
        (["--onnx", "{foreign}"], "not an emostream ONNX export"),
    ],
)
def test_bad_onnx_input_is_one_line_and_exit_2(
    argv, message, onnx_file, shipped_checkpoint, wav_file, tmp_path, capsys
):
    import onnx
    from onnx import TensorProto, helper

    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(onnx_file.read_bytes()[:5000])
    foreign = tmp_path / "foreign.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph), foreign)
    paths = {
        "{onnx}": onnx_file,
        "{ckpt}": shipped_checkpoint,
        "{missing}": tmp_path / "nope.onnx",
        "{corrupt}": corrupt,
        "{foreign}": foreign,
    }
    argv = [str(paths.get(a, a)) for a in argv]
    for command in (["replay", str(wav_file), "--fast", "--no-dashboard"], ["serve", "--port", "0"]):
        assert main(command + argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], err


def test_export_errors(tmp_path, capsys):
    for int8 in ([], ["--int8"]):
        assert main(["export", "--onnx", str(tmp_path / "no" / "dir" / "m.onnx"), *int8]) == 2
        assert "directory for the ONNX file does not exist" in capsys.readouterr().err
        assert main(["export", "--onnx", str(tmp_path / "m.onnx"), "--checkpoint", str(tmp_path / "nock"), *int8]) == 2
        assert "no checkpoint" in capsys.readouterr().err
    assert main(["export", "--onnx", str(tmp_path)]) == 2
    assert "directory" in capsys.readouterr().err
    assert main(["export", "--onnx", str(tmp_path / "m.onnx"), "--checkpoint", str(tmp_path / "nock")]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_predictor_rejects_wrong_metadata(onnx_file, tmp_path):
    import onnx

    model = onnx.load(str(onnx_file))
    for prop in model.metadata_props:
        if prop.key == "emostream.classes":
            prop.value = json.dumps(["Calm", "Angry"])
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    with pytest.raises(CheckpointError, match="other classes"):
        OnnxPredictor.from_file(path)


def test_model_info_of_the_onnx_backend(onnx_file, predictor):
    """``/metrics``' build info for an ONNX model: its file, the ONNX backend in fp32, and the same
    live-window temperature as the checkpoint it was exported from (read from the graph's metadata)."""
    from types import SimpleNamespace

    from emostream.cli.common import command_model_info as _model_info

    info = _model_info(OnnxPredictor.from_file(onnx_file), SimpleNamespace(checkpoint=None, onnx=str(onnx_file)))
    assert (info["backend"], info["precision"], info["name"]) == ("onnx", "fp32", onnx_file.stem)
    assert float(info["temperature"]) == pytest.approx(predictor.temperature, rel=1e-5) and len(info["sha256"]) == 12


def test_int8_export_is_close_to_fp32_and_says_so(onnx_file, int8_file, torch_fp32):
    """Static int8 (issue #43): the convolutions quantised from calibration windows, the front end and
    softmax float; it loads as an emostream model whose precision is int8, keeps the metadata, and on
    real windows gives the fp32 label and probabilities within 0.1 (the accuracy guard on the held-out
    voices and the example calls is bench/precision_guard.py)."""
    import onnx

    ops = {n.op_type for n in onnx.load(str(int8_file)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "STFT"} & ops == {"QuantizeLinear", "DequantizeLinear"}
    assert int8_file.stat().st_size < onnx_file.stat().st_size / 3  # int8 weights
    fp32 = OnnxPredictor.from_file(onnx_file)
    int8 = OnnxPredictor.from_file(int8_file)
    assert (fp32.precision, int8.precision) == ("fp32", "int8")
    assert int8.temperature == pytest.approx(fp32.temperature)
    x = np.concatenate([real_windows(), parity_windows()[:1]])
    ref, got = torch_fp32.predict(x), int8.predict(x)
    assert np.abs(got - ref).max() < 0.1
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.8


def test_int8_export_options(tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    assert main(["export", "--onnx", out, "--int8", "--calibrate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no audio files" in err[0]
