"""Where the model's files are: a checkpoint directory's layout and the shipped model's directory.

Free of torch and numpy, so code that only reads a checkpoint's metadata (reports, the model card),
names its path or identifies its weights need not load the model's code.
"""

from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

WEIGHTS_FILE = "model.safetensors"
META_FILE = "model.json"
SHIPPED_MODEL = "emostream-resnet50"
CHECKPOINT_ENV = "EMOSTREAM_CHECKPOINT"  # a checkpoint directory that replaces the shipped model
# An installed wheel carries the shipped model inside the package (pyproject.toml maps the repository's
# checkpoints/ to emostream/checkpoints/); a source checkout has it at the repository's top level.
PACKAGED_CHECKPOINT = Path(__file__).resolve().parent / "checkpoints" / SHIPPED_MODEL
SOURCE_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / SHIPPED_MODEL


def default_checkpoint() -> Path:
    """The shipped model's directory: ``$EMOSTREAM_CHECKPOINT`` when set, else the copy packaged in
    the wheel, else the source checkout's ``checkpoints/``. Returns the packaged path when none holds
    a model (loading it then fails naming both ways to provide one: :func:`missing_model_message`)."""
    if os.environ.get(CHECKPOINT_ENV):
        return Path(os.environ[CHECKPOINT_ENV])
    for path in (PACKAGED_CHECKPOINT, SOURCE_CHECKPOINT):
        if (path / WEIGHTS_FILE).is_file():
            return path
    return PACKAGED_CHECKPOINT


def missing_model_message(path: Path) -> str:
    """The one-line error when the shipped model is not found: both places it is looked for."""
    return (
        f"no shipped model at {path}: set {CHECKPOINT_ENV} to a checkpoint directory, or install an emostream "
        f"wheel, which carries it as {PACKAGED_CHECKPOINT}"
    )


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not match this code."""


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(checkpoint: str | Path | None = None, onnx: str | Path | None = None) -> dict[str, str]:
    """``{"name", "sha256"}`` of the weights that run: the checkpoint folder's name (or the ONNX
    file's stem) and the first 12 hex digits of the weights file's SHA-256 (hashed once per file)."""
    weights = Path(onnx) if onnx else (Path(checkpoint) if checkpoint else default_checkpoint()) / WEIGHTS_FILE
    stat = weights.stat()
    return {
        "name": weights.stem if onnx else weights.parent.name,
        "sha256": _sha256(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)[:12],
    }
