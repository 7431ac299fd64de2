"""The pack a lent GPU machine trains from (train/pack.py) and train/gpu_fit.sh, run here on the CPU."""

import hashlib
import os
import subprocess
import sys

import pytest

from train.config import load_config
from train.data import config_clips, load_dataset
from train.pack import PackError, check_pack, write_pack

from .conftest import ROOT, TEST_BACKBONE
from .test_teacher import CONFIGS, write_tiny_set
from .test_whisper_layers import _teacher_dir


def _config(tmp_path, teacher, layers="[1]", epochs=1):
    """The adopted recipe (distillation from an encoder block, speed-perturbed copies) at toy size."""
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(
        f"base: {CONFIGS / 'distill_layer3_speed.yaml'}\nexperiment_name: tiny_pack\n"
        f"architecture:\n  backbone: {TEST_BACKBONE}\n"
        f"training:\n  epochs: {epochs}\n  batch_size: 4\n"
        f"emostream:\n  exclude_speakers: [spk3]\n"
        f"  distill:\n    teacher: {teacher}\n    layers: {layers}\n    inner_folds: 2\n"
    )
    return cfg


@pytest.fixture
def tiny_pack_inputs(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_tiny_set(data)
    teacher = _teacher_dir(tmp_path / "teacher", layers=2, frames=500)
    return data, teacher, _config(tmp_path, teacher)


def test_pack_holds_the_configs_clips_byte_for_byte_and_the_cut_teacher(tiny_pack_inputs, tmp_path):
    data, teacher, cfg_path = tiny_pack_inputs
    cfg = load_config(cfg_path, data=str(data))
    info = write_pack(cfg, tmp_path / "pack", part_mb=0.1)  # parts of 100 kB: the clips spill into several
    first = tmp_path / "pack" / "part-1"
    assert info["clips"] == 6 and info["speakers"] == 3  # spk3 is reserved by the config: left out
    assert info["teacher"] == "teacher-blocks1" and info["layers"] == [1]
    assert len(info["files"]) > 1 and sum(info["files"].values()) == 6
    assert all(mb <= 0.1 + 0.01 for mb in info["megabytes"].values())
    packed = load_dataset(first)  # the folder: paths relative to its manifest, other parts via ../part-K
    original = config_clips(cfg)
    assert [(c.label, c.speaker, c.corpus) for c in packed] == [(c.label, c.speaker, c.corpus) for c in original]
    digest = lambda p: hashlib.sha256(open(p, "rb").read()).hexdigest()  # noqa: E731
    assert [digest(c.path) for c in packed] == [digest(c.path) for c in original]
    from train.whisper_layers import load_encoder_layers

    assert load_encoder_layers(first / "teacher-blocks1").n_layers == 1
    assert check_pack(first)["clips"] == 6
    # a part that has not arrived (a machine gone cold between calls) is named
    last = sorted(info["files"])[-1]
    (tmp_path / "pack" / last).rename(tmp_path / "elsewhere")
    with pytest.raises(PackError, match=f"incomplete: {last} \\(0 of {info['files'][last]} files\\)"):
        check_pack(first)
    with pytest.raises(PackError, match="not empty"):
        write_pack(cfg, tmp_path / "pack")


def test_pack_errors_are_one_line_and_exit_2(tiny_pack_inputs, tmp_path, capsys):
    from train.__main__ import main

    data, teacher, cfg_path = tiny_pack_inputs
    # the output-layer teacher (CTranslate2) cannot travel cut
    cfg_path.write_text(cfg_path.read_text().replace("layers: [1]", "layers: []"))
    assert main(["pack", "--config", str(cfg_path), "--data", str(data), "--out", str(tmp_path / "p")]) == 2
    assert "emostream.distill.layers" in capsys.readouterr().err and not (tmp_path / "p").exists()
    # a part too small for the teacher: a clear error, and no half-written pack left behind
    cfg_path.write_text(cfg_path.read_text().replace("layers: []", "layers: [1]"))
    assert (
        main(
            ["pack", "--config", str(cfg_path), "--data", str(data), "--out", str(tmp_path / "s"), "--part-mb", "0.001"]
        )
        == 2
    )
    assert "the teacher alone" in capsys.readouterr().err and not (tmp_path / "s").exists()
    assert (
        main(["pack", "--config", str(cfg_path), "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "q")]) == 2
    )
    assert "dataset not found" in capsys.readouterr().err and not (tmp_path / "q").exists()
    assert (
        subprocess.run(
            [sys.executable, "-m", "train.pack", "check", str(tmp_path)], capture_output=True, text=True, cwd=ROOT
        ).returncode
        == 2
    )


def test_gpu_fit_script_trains_from_a_pack_and_returns_the_checkpoint_in_pieces(tiny_pack_inputs, tmp_path):
    """train/gpu_fit.sh end to end, here on the CPU (--device cpu): pack check, teacher encoding from the cut
    encoder, speed copies, fit --all, and the checkpoint split into pieces that reassemble."""
    from emostream.model import load_checkpoint
    from train.__main__ import main

    data, teacher, cfg_path = tiny_pack_inputs
    assert main(["pack", "--config", str(cfg_path), "--data", str(data), "--out", str(tmp_path / "pack")]) == 0
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OUT=str(tmp_path / "out"),
        RUN=str(tmp_path / "run"),
        CACHE=str(tmp_path / "cache"),
        WHEELS=str(tmp_path / "no-wheels"),
    )  # .whl holds the GPU machine's
    done = subprocess.run(
        ["bash", "train/gpu_fit.sh", str(tmp_path / "pack" / "part-1"), str(cfg_path), "--device", "cpu"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "out"
    pieces = sorted(out.glob("model.safetensors.part-*"))
    assert pieces and all(p.stat().st_size <= 15_000_000 for p in pieces) and len(list(out.iterdir())) <= 8
    (tmp_path / "ck").mkdir()
    (tmp_path / "ck" / "model.safetensors").write_bytes(b"".join(p.read_bytes() for p in pieces))
    (tmp_path / "ck" / "model.json").write_bytes((out / "model.json").read_bytes())
    want = (out / "model.sha256").read_text().split()[0]
    assert hashlib.sha256((tmp_path / "ck" / "model.safetensors").read_bytes()).hexdigest() == want
    load_checkpoint(tmp_path / "ck", "cpu")
    log = (out / "train.log").read_text()
    assert "teacher layers on cpu" in log and "speed copies at 0.9, 1.1" in log
    # a missing part stops the script before any training, naming it
    (tmp_path / "pack" / "part-1" / "audio").rename(tmp_path / "gone")
    done = subprocess.run(
        ["bash", "train/gpu_fit.sh", str(tmp_path / "pack" / "part-1"), str(cfg_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and "part-1 (0 of" in done.stderr
    done = subprocess.run(
        ["bash", "train/gpu_fit.sh", str(tmp_path / "pack" / "part-1"), str(cfg_path)],
        cwd=ROOT,
        env=dict(env, TASK="evaluate"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "TASK must be fit or cv" in done.stderr
