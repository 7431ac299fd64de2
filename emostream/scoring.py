"""How window logits become a clip's calibrated probabilities: the same for the torch and the ONNX
backends, and free of torch, so a process that runs the ONNX model never imports it."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np


def scoring_temperature(temperature: float, clip_temperature: float | None, positions: int) -> float:
    """The calibrated softmax temperature for a clip scored as the mean logit of ``positions``
    placements: the clip temperature (fitted on cross-validated multi-placement logits) when
    ``positions`` > 1 and the checkpoint has one, else the single-window temperature (which is also
    the one for the recipe's fixed chunks, ``positions`` 1)."""
    return clip_temperature if positions > 1 and clip_temperature else temperature


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    """Numerically stable softmax of an array of logits."""
    shifted = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=axis, keepdims=True)


def _as_numpy(logits: Any) -> np.ndarray:
    if hasattr(logits, "detach"):  # a torch tensor, from the torch backend
        logits = logits.detach().float().cpu().numpy()
    return np.asarray(logits, dtype=np.float32)


def clip_probabilities(predictor: Any, windows: Any, positions: int = 1) -> np.ndarray:
    """One clip's class probabilities ``(7,)`` from its windows (``positions`` placements, or the
    fixed chunks when 1): the calibrated softmax of the mean window logit. This is how ``python -m
    train evaluate`` and cross-validation score a clip, so ``emostream classify`` reports the
    decision those figures describe. Works with any predictor that has ``logits``, ``temperature``
    and ``clip_temperature`` (torch or ONNX). ``windows`` may also be an iterable of window batches
    (a long file scored as it is decoded)."""
    batches: Iterable = [windows] if hasattr(windows, "shape") else windows
    total, count = None, 0
    for batch in batches:
        logits = _as_numpy(predictor.logits(batch))
        total = logits.sum(axis=0) if total is None else total + logits.sum(axis=0)
        count += len(logits)
    if total is None:
        raise ValueError("no windows to score")
    t = scoring_temperature(predictor.temperature, predictor.clip_temperature, positions)
    return softmax(total / count / t).astype(np.float32)
