"""Shared fixtures: paths, the shipped checkpoint, small generated audio."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data" / "emotion-speech"
EXAMPLES = ROOT / "examples"
# The backbone of the tests that train: a small timm ResNet (the shipped ResNet50's family: the same
# stages, head and layer names) at about a quarter of its cost. What those tests check (resume,
# averaging, copies, checkpoints loading in emostream) does not depend on the depth; the shipped
# ResNet50 itself is loaded and run by the inference tests.
TEST_BACKBONE = "resnet10t"
# The int8 model a CPU runs by default (emostream.int8) is built at first use into $EMOSTREAM_CACHE: one
# cache for the whole session (subprocesses inherit it), so it is built once, never in the user's ~/.cache.
TEST_CACHE = Path(tempfile.mkdtemp(prefix="emostream-test-cache-"))
os.environ["EMOSTREAM_CACHE"] = str(TEST_CACHE)


def pytest_unconfigure(config) -> None:
    shutil.rmtree(TEST_CACHE, ignore_errors=True)


def speechlike(seconds: float, sr: int = 16000, f0: float = 150.0, seed: int = 0) -> np.ndarray:
    """A voiced, amplitude-modulated harmonic signal: cheap stand-in for speech in tests."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    pitch = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    phase = 2 * np.pi * np.cumsum(pitch) / sr
    x = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 4 * t))
    return (0.1 * x * envelope + 0.002 * rng.standard_normal(len(t))).astype(np.float32)


@pytest.fixture(scope="session")
def shipped_checkpoint() -> Path:
    from emostream.model import DEFAULT_CHECKPOINT

    if not (DEFAULT_CHECKPOINT / "model.safetensors").exists():
        pytest.skip(f"no shipped checkpoint at {DEFAULT_CHECKPOINT}")
    return DEFAULT_CHECKPOINT


@pytest.fixture(scope="session")
def predictor(shipped_checkpoint):
    from emostream.model import Predictor

    return Predictor.from_checkpoint(shipped_checkpoint, device="cpu")


@pytest.fixture(scope="session")
def onnx_file(shipped_checkpoint, tmp_path_factory) -> Path:
    """The shipped checkpoint exported to ONNX once per test session, through the CLI."""
    pytest.importorskip("onnxscript", reason="ONNX export needs onnxscript")
    from emostream.cli import main

    path = tmp_path_factory.mktemp("onnx") / "emostream.onnx"
    assert main(["export", "--onnx", str(path)]) == 0
    return path


@pytest.fixture(scope="session")
def int8_file(onnx_file, tmp_path_factory) -> Path:
    """``onnx_file`` with its convolutions quantised to int8 (``emostream export --int8``'s step),
    calibrated on 8 windows of the example calls (a real export draws 256 from a speech corpus)."""
    import numpy as np

    from emostream.audio import WINDOW_SAMPLES, load_mono
    from emostream.onnx_model import quantize_int8

    calls = [load_mono(EXAMPLES / name) for name in ("call_mono.flac", "call_telephone.flac")]
    starts = range(5 * 16000, 45 * 16000, 10 * 16000)
    windows = np.stack([x[s : s + WINDOW_SAMPLES] for x in calls for s in starts]).astype(np.float32)
    return quantize_int8(onnx_file, tmp_path_factory.mktemp("int8") / "emostream-int8.onnx", windows, batch=4)


@pytest.fixture
def wav_file(tmp_path) -> Path:
    path = tmp_path / "speech.wav"
    sf.write(path, speechlike(8.5), 16000, subtype="PCM_16")
    return path


@pytest.fixture
def stereo_file(tmp_path) -> Path:
    path = tmp_path / "stereo.flac"
    left, right = speechlike(7.3, seed=1), speechlike(7.3, f0=220, seed=2)
    sf.write(path, np.stack([left, right], axis=1), 16000)
    return path


def requires_shared():
    return pytest.mark.skipif(
        not (SHARED_DATA / "manifest.csv").exists(), reason=f"shared data not found at {SHARED_DATA}"
    )


def fit_whole_and_resumed(cfg, clips, cache, train_idx, whole: Path, halves: Path, **fit_kwargs) -> None:
    """Train ``cfg`` once straight through into ``whole`` and once stopped after epoch 1 and resumed
    into ``halves`` (``fit_kwargs``: teacher, copies, ...): resuming must reproduce the uninterrupted run."""
    from train.fit import FitOptions, fit

    fit(cfg, clips, cache, train_idx, None, whole, FitOptions(show_progress=False), **fit_kwargs)
    fit(cfg, clips, cache, train_idx, None, halves, FitOptions(show_progress=False, stop_after=1), **fit_kwargs)
    fit(cfg, clips, cache, train_idx, None, halves, FitOptions(show_progress=False, resume=True), **fit_kwargs)
