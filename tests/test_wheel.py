"""A built wheel carries the shipped model and works outside the repository."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest
import soundfile as sf

from emostream.audio import load_audio

from .conftest import ROOT

MODEL_FILES = (
    "emostream/checkpoints/emostream-resnet50/model.safetensors",
    "emostream/checkpoints/emostream-resnet50/model.json",
)


def _setuptools_builds_here() -> bool:
    """Whether this interpreter's setuptools meets pyproject's build requirement (PEP 639 license: >= 77)."""
    try:
        import setuptools
    except ImportError:
        return False
    return int(setuptools.__version__.split(".")[0]) >= 77


def _build_wheel(source, out) -> subprocess.CompletedProcess:
    """``pip wheel`` of ``source``: with this interpreter's setuptools when it is new enough (offline),
    else in pip's isolated build environment (which fetches setuptools from the package index)."""
    isolation = ["--no-build-isolation"] if _setuptools_builds_here() else []
    return subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "--quiet", str(source), "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def wheel(shipped_checkpoint, tmp_path_factory):
    """The wheel, built from a copy of the sources (the build leaves build/ and egg-info beside them)."""
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "emostream", source / "emostream", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "checkpoints", source / "checkpoints", ignore=shutil.ignore_patterns("evaluation"))
    out = tmp_path_factory.mktemp("wheel")
    done = _build_wheel(source, out)
    if done.returncode != 0:
        reason = (done.stderr.strip().splitlines() or ["?"])[-1]
        if _setuptools_builds_here():
            pytest.fail(f"pip wheel failed: {done.stderr[-2000:]}")
        pytest.skip(f"cannot build the wheel here (setuptools < 77 and no package index?): {reason}")
    (path,) = out.glob("emostream-*.whl")
    return path


def test_the_wheel_carries_the_shipped_model(wheel, shipped_checkpoint):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert set(MODEL_FILES) <= names
        assert z.getinfo(MODEL_FILES[0]).file_size == (shipped_checkpoint / "model.safetensors").stat().st_size
        assert "emostream/web/index.html" in names
        assert {
            "emostream/vad_models/silero_vad_16k_sequence.onnx",
            "emostream/vad_models/silero_vad_8k_sequence.onnx",
        } <= names
        assert not any("/evaluation/" in n for n in names)
        meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [line for line in z.read(meta).decode().splitlines() if line.startswith("Requires-Dist: torch")]
        assert requires and not any("==" in line for line in requires)


def test_the_installed_wheel_finds_its_model_outside_the_repository(wheel, tmp_path):
    """Installed alone (``--target``, no dependencies: torch and the rest come from this interpreter)
    and run from elsewhere: the API and ``emostream classify`` use the packaged model."""
    target = tmp_path / "site"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-index",
            "--target",
            str(target),
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    clip = tmp_path / "clip.wav"  # real speech: classify labels only what its speech gate hears as speech
    sf.write(clip, load_audio(ROOT / "examples" / "call_mono.flac")[0, 16000 * 2 : 16000 * 5], 16000, subtype="PCM_16")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("EMOSTREAM_CHECKPOINT", "PYTHONPATH")}
    env["PYTHONPATH"] = str(target)
    code = (
        "import json, emostream, emostream.model_files as m; "
        "r = emostream.classify(%r, model=emostream.load_model(device='cpu')); "
        "print(json.dumps({'file': emostream.__file__, 'checkpoint': str(m.default_checkpoint()), 'result': r}))"
        % str(clip)
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["file"].startswith(str(target))
    assert report["checkpoint"] == str(target / "emostream" / "checkpoints" / "emostream-resnet50")
    done = subprocess.run(
        [sys.executable, "-m", "emostream", "classify", str(clip), "--json", "--device", "cpu"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == report["result"]
