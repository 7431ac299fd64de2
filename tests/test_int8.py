"""The int8 model a CPU runs by default (issue #43): built from the checkpoint's ranges at first use,
cached, close to fp32, and torch where it cannot be had."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from emostream import int8
from emostream.cli import main
from emostream.loading import load_predictor, model_info
from emostream.model import Predictor
from emostream.onnx_model import OnnxPredictor
from emostream.worker import ModelSpec

from .conftest import EXAMPLES
from .test_onnx import NO_TORCH_PROBE, real_windows

pytest.importorskip("onnxscript", reason="the int8 model is exported at first use")


@pytest.fixture(scope="module")
def built(shipped_checkpoint) -> Path:
    """The shipped model's int8 file in the session's cache (built by whichever test needs it first)."""
    return int8.int8_model(shipped_checkpoint)


def copy_checkpoint(source: Path, dest: Path, ranges: dict | None = None) -> Path:
    """A checkpoint directory beside the shipped one: its weights (linked), metadata, and ``ranges``."""
    dest.mkdir()
    (dest / "model.safetensors").symlink_to(source / "model.safetensors")
    shutil.copy(source / "model.json", dest)
    if ranges is not None:
        (dest / int8.RANGES_FILE).write_text(json.dumps(ranges))
    return dest


def shipped_ranges(checkpoint: Path) -> dict:
    return json.loads((checkpoint / int8.RANGES_FILE).read_text())


def test_a_cpu_runs_the_int8_model_close_to_fp32(shipped_checkpoint, built):
    """On a CPU the default is the int8 ONNX model; on real windows of the example calls it gives the
    fp32 label and probabilities within 0.1 (the accuracy guard on held-out voices and the example
    calls' speech windows is bench/precision_guard.py: BENCHMARKS.md)."""
    told = []
    predictor = load_predictor(device="cpu", notify=told.append)
    assert isinstance(predictor, OnnxPredictor) and predictor.precision == "int8"
    assert predictor.path == built == int8.built_model_path(shipped_checkpoint)
    assert told == []  # cached: nothing built
    x = real_windows()
    ref = Predictor.from_checkpoint(shipped_checkpoint, device="cpu", mixed_precision=False).predict(x)
    got = predictor.predict(x)
    assert np.abs(got - ref).max() < 0.1
    assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.8
    info = model_info(predictor)
    assert (info["backend"], info["precision"], info["name"], info["backbone"]) == (
        "onnx",
        "int8",
        "emostream-resnet50",
        "resnet50",
    )
    assert built.name.startswith(f"emostream-resnet50-{info['sha256']}-")  # the checkpoint's weights


def test_the_cache_is_reused_and_a_damaged_file_is_removed(built, tmp_path):
    mtime = built.stat().st_mtime_ns
    told = []
    load_predictor(device="cpu", notify=told.append)
    assert told == [] and built.stat().st_mtime_ns == mtime
    damaged = tmp_path / "damaged.onnx"
    damaged.write_bytes(built.read_bytes()[:4096])
    assert not int8._loads(damaged) and not damaged.exists()  # int8_model would build it again


def test_other_options_run_torch(shipped_checkpoint, built):
    assert isinstance(load_predictor(device="cpu", fp32=True), Predictor)  # --fp32: torch fp32
    assert isinstance(load_predictor(device="cpu", backend="torch"), Predictor)


@pytest.mark.parametrize("mode", ["replay", "batch"])
def test_the_default_runs_without_torch_once_built(mode, built, tmp_path):
    """Once built, the int8 model runs without importing torch (~0.7 GB of a process: issue #42)."""
    import subprocess
    import sys

    import soundfile as sf

    from emostream.audio import SAMPLE_RATE, load_audio

    call = tmp_path / "call.flac"
    sf.write(call, load_audio(EXAMPLES / "call_mono.flac")[0, : 12 * SAMPLE_RATE], SAMPLE_RATE)
    argv = {
        "replay": ["replay", str(call), "--fast", "--no-dashboard", "--events", str(tmp_path / "r.jsonl")],
        "batch": ["batch", str(call), "--out", str(tmp_path / "out"), "--quiet"],
    }[mode]
    out = subprocess.run([sys.executable, "-c", NO_TORCH_PROBE, *argv], capture_output=True, text=True, timeout=300)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"rc": 0, "imported": []}, out.stderr[-500:]
    assert "building the int8 model" not in out.stderr  # the session's cache (conftest) holds it


def test_threads_reach_onnx_runtime(built):
    predictor, device, info = ModelSpec(device="cpu", threads=1).load()
    session = predictor.__self__.session
    assert session.get_session_options().intra_op_num_threads == 1
    assert info["precision"] == "int8" and "onnxruntime" in device


def test_where_int8_cannot_be_had_torch_runs_and_says_why(shipped_checkpoint, tmp_path, monkeypatch):
    told = []
    # a checkpoint without ranges (one trained here) runs torch as before, quietly
    plain = copy_checkpoint(shipped_checkpoint, tmp_path / "plain")
    assert isinstance(load_predictor(plain, device="cpu", notify=told.append), Predictor) and told == []
    # ranges taken for other weights
    ranges = {**shipped_ranges(shipped_checkpoint), "weights_sha256": "000000000000"}
    other = copy_checkpoint(shipped_checkpoint, tmp_path / "other", ranges)
    assert isinstance(load_predictor(other, device="cpu", notify=told.append), Predictor)
    assert len(told) == 1 and "other weights" in told[0] and told[0].startswith("running the torch model")
    # a cache that cannot be written
    monkeypatch.setenv(int8.CACHE_ENV, str(tmp_path / "plain" / "model.json"))  # a file, not a directory
    told.clear()
    assert isinstance(load_predictor(shipped_checkpoint, device="cpu", notify=told.append), Predictor)
    assert len(told) == 1 and "cannot build the int8 model in" in told[0]


def test_ranges_of_another_graph_are_refused(shipped_checkpoint, onnx_file, tmp_path, monkeypatch):
    """Another torch may name the exported graph's tensors differently: ranges that do not name this
    graph's tensors give no int8 model (the build says so), never a half-quantised one."""
    ranges = shipped_ranges(shipped_checkpoint)
    data = ranges["ort_calibration_cache"]["data"]
    ranges["ort_calibration_cache"]["data"] = {f"renamed_{k}": v for k, v in data.items()}
    other = copy_checkpoint(shipped_checkpoint, tmp_path / "ckpt", ranges)
    # the export is the session's (the same checkpoint's weights): only the quantisation runs here
    monkeypatch.setattr("emostream.onnx_model.export_onnx", lambda checkpoint, out: shutil.copy(onnx_file, out))
    with pytest.raises(int8.Int8Unavailable, match="do not name this torch's graph"):
        int8.build_int8(other, tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_export_int8_writes_the_default_model(built, tmp_path, capsys):
    """``emostream export --int8`` without --calibrate writes the model a CPU runs by default (a copy of
    the cached file: the build itself is the ``built`` fixture's)."""
    import onnx

    out = tmp_path / "m.onnx"
    assert main(["export", "--onnx", str(out), "--int8"]) == 0
    assert "int8 from emostream-resnet50's ranges" in capsys.readouterr().out
    assert onnx.load(str(out)).graph == onnx.load(str(built)).graph


def test_export_int8_options(shipped_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "m.onnx")
    plain = copy_checkpoint(shipped_checkpoint, tmp_path / "plain")
    assert main(["export", "--onnx", out, "--int8", "--checkpoint", str(plain)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no int8 calibration ranges" in err[0] and "--calibrate DIR" in err[0]
    assert main(["export", "--onnx", out, "--calibrate", str(tmp_path)]) == 2
    assert "--calibrate DIR is for --int8" in capsys.readouterr().err
    assert main(["export", "--onnx", out, "--save-ranges"]) == 2
    assert "--save-ranges keeps the ranges" in capsys.readouterr().err


def test_ranges_round_trip(shipped_checkpoint, onnx_file, tmp_path):
    """The ranges a calibration takes (``export --int8 --calibrate DIR --save-ranges``) rebuild the same
    int8 graph without audio, and are stored with the weights' identity."""
    import onnx

    from emostream.audio import WINDOW_SAMPLES, load_mono
    from emostream.onnx_model import quantize_int8

    from .conftest import EXAMPLES

    call = load_mono(EXAMPLES / "call_mono.flac")
    windows = np.stack([call[s : s + WINDOW_SAMPLES] for s in range(0, 40 * 16000, 10 * 16000)]).astype(np.float32)
    cache = tmp_path / "ranges.json"
    quantize_int8(onnx_file, tmp_path / "calibrated.onnx", windows, batch=4, ranges=cache)
    quantize_int8(onnx_file, tmp_path / "from-ranges.onnx", ranges=cache)
    graphs = [onnx.load(str(tmp_path / f"{name}.onnx")).graph for name in ("calibrated", "from-ranges")]
    assert graphs[0] == graphs[1]
    ckpt = copy_checkpoint(shipped_checkpoint, tmp_path / "ckpt")
    stored = json.loads(int8.write_ranges(ckpt, cache, len(windows)).read_text())
    assert stored["format"] == int8.RANGES_FORMAT and stored["windows"] == 4
    assert stored["weights_sha256"] == shipped_ranges(shipped_checkpoint)["weights_sha256"]
    assert stored["ort_calibration_cache"] == json.loads(cache.read_text())
    with pytest.raises(ValueError, match="calibration windows or a calibration cache"):
        quantize_int8(onnx_file, tmp_path / "x.onnx")


def test_build_ahead_command(shipped_checkpoint, built, tmp_path, capsys):
    """``python -m emostream.int8 [CHECKPOINT]`` (a container image's build step) prints the cached path."""
    assert int8.main([]) == 0
    assert capsys.readouterr().out.strip() == str(built)
    assert int8.main([str(copy_checkpoint(shipped_checkpoint, tmp_path / "plain"))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no int8 calibration ranges" in err[0]


def test_a_failing_export_is_one_line(shipped_checkpoint, tmp_path, monkeypatch):
    """An exporter that breaks (another torch) gives Int8Unavailable, so torch runs: never a traceback."""

    def broken(checkpoint, out):
        raise RuntimeError("Failed to export the model with torch.export.\nlong trace ...")

    monkeypatch.setattr("emostream.onnx_model.export_onnx", broken)
    with pytest.raises(
        int8.Int8Unavailable, match="^ONNX export failed: Failed to export the model with torch.export.$"
    ):
        int8.build_int8(shipped_checkpoint, tmp_path / "out.onnx")
