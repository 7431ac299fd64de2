"""The Makefile's install targets (issue #42 item 11), run for real on a copy with a stand-in Python:
``make demo`` installs the core package only, the test extra comes with ``make install-test`` (what
``make test`` runs before pytest), and the venv is reused while pyproject.toml is unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest

from .conftest import ROOT

# A stand-in for python3 and the venv's python/emostream: it logs its arguments and, for
# "-m venv DIR", makes DIR/bin with itself as python and emostream.
FAKE = """#!/bin/sh
echo "$(basename "$0") $*" >> "{log}"
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
  mkdir -p "$3/bin" && cp "$0" "$3/bin/python" && cp "$0" "$3/bin/emostream"
fi
"""


@pytest.fixture
def project(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    log = tmp_path / "calls.log"
    fake = tmp_path / "python3"
    fake.write_text(FAKE.format(log=log))
    fake.chmod(0o755)
    return tmp_path, log


def make(project_dir, *targets):
    run = subprocess.run(
        ["make", "-s", *targets, f"PYTHON={project_dir / 'python3'}"],
        cwd=project_dir,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    return run


def pip_installs(log):
    lines = log.read_text().splitlines() if log.exists() else []
    return [
        line.split(" install --quiet ", 1)[1]
        for line in lines
        if "-m pip install --quiet " in line and "--upgrade pip" not in line
    ]


def test_demo_installs_the_core_package_only_and_reuses_the_venv(project):
    root, log = project
    make(root, "demo")
    assert pip_installs(log) == ["-e ."]  # no [test] extra: no Ray, faster-whisper, Selenium
    assert any(line.startswith("emostream replay examples/call_stereo.flac") for line in log.read_text().splitlines())
    make(root, "demo")
    assert pip_installs(log) == ["-e ."]  # pyproject.toml unchanged: nothing installed again
    make(root, "install-test")  # what make test runs before pytest
    assert pip_installs(log) == ["-e .", "-e .[test]"]
    make(root, "install-test", "demo")
    assert len(pip_installs(log)) == 2
    time.sleep(0.05)
    os.utime(root / "pyproject.toml")  # a dependency changed: both stamps are stale
    make(root, "demo")
    assert pip_installs(log)[2:] == ["-e ."]
    make(root, "install-test")
    assert pip_installs(log)[3:] == ["-e .[test]"]


def test_a_venv_with_the_test_extra_serves_the_demo(project):
    """A venv made by the previous Makefile (the test extra, stamp .venv/.installed) is reused as is."""
    root, log = project
    (root / ".venv" / "bin").mkdir(parents=True)
    for name in ("python", "emostream"):
        shutil.copy(root / "python3", root / ".venv" / "bin" / name)
    time.sleep(0.05)
    (root / ".venv" / ".installed").touch()
    make(root, "demo")
    make(root, "install-test")
    assert pip_installs(log) == []
