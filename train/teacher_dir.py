"""The teacher's model directory (faster-whisper / CTranslate2 layout) and its error.

Its own module because both :mod:`train.teacher` (the cached frame outputs) and
:mod:`train.whisper_layers` (the encoder's hidden states) check the directory they read.
"""

from __future__ import annotations

import json
from pathlib import Path

REQUIRED_FILES = ("model.bin", "config.json")


class TeacherError(ValueError):
    """A teacher directory that cannot be used (message names the path)."""


def check_teacher_dir(path: str | Path) -> Path:
    """The teacher directory, checked for the CTranslate2 Whisper layout (clear error naming it)."""
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"teacher not found: {path} (expected a faster-whisper model directory)")
    missing = [f for f in REQUIRED_FILES if not (path / f).is_file()]
    if missing:
        raise TeacherError(f"teacher {path} is not a CTranslate2 Whisper model: missing {', '.join(missing)}")
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TeacherError(f"teacher {path}: config.json is not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise TeacherError(f"teacher {path}: config.json is not a JSON object")
    return path
