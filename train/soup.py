"""Weight averaging of fine-tunes that share a start ("model soup", Wortsman et al. 2022).

Models fine-tuned from the same weights stay in one basin, so the mean of their weights is itself a
model, often between (or beyond) them on what each was tuned for. ``python -m train soup`` writes the
uniform mean of several checkpoints (every floating-point tensor, BatchNorm running statistics
included; integer counters from the first) as a new checkpoint whose ``model.json`` is the first
one's plus a ``soup`` entry naming its ingredients.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from emostream.model import CheckpointError, load_checkpoint, save_checkpoint
from emostream.model_files import META_FILE, WEIGHTS_FILE


def soup(checkpoints: list[Path], out: Path) -> Path:
    """The uniform weight mean of ``checkpoints`` (same architecture and features) saved to ``out``."""
    if len(checkpoints) < 2:
        raise CheckpointError("a soup needs at least two checkpoints")
    models = [load_checkpoint(c, device="cpu") for c in checkpoints]
    first = models[0]
    for c, m in zip(checkpoints[1:], models[1:]):
        if m.model_config != first.model_config or m.feature_config != first.feature_config:
            raise CheckpointError(f"{c} is not the same model as {checkpoints[0]} (config or features differ)")
    states = [m.state_dict() for m in models]
    mean = {}
    for key, value in states[0].items():
        if value.is_floating_point():
            mean[key] = torch.stack([s[key].float() for s in states]).mean(0).to(value.dtype)
        else:
            mean[key] = value
    first.load_state_dict(mean)
    meta = json.loads((Path(checkpoints[0]) / META_FILE).read_text())
    for key in ("format", "classes", "audio", "features", "model", "code_version"):
        meta.pop(key, None)  # save_checkpoint writes these itself
    meta["soup"] = {
        "weights": "uniform",
        "of": [
            {"checkpoint": str(c), "sha256": hashlib.sha256((Path(c) / WEIGHTS_FILE).read_bytes()).hexdigest()}
            for c in checkpoints
        ],
    }
    return save_checkpoint(first, out, meta)
