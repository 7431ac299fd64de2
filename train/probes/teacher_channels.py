"""The Whisper teacher through telephone channels: is it robust enough to label phone-line copies?

Issue #39 asks for this before a phone line's distillation targets come from the teacher on the line
itself (``emostream.distill.phone_targets: copy``). Per speaker-grouped fold, a logistic-regression
head on whole-clip pooled encoder features is fitted on the training speakers' clean clips (or on
their clean clips and their channel copies together) and scored on the held-out speakers, full band
and through each channel. Training only.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emostream.model import CLASSES

from ..config import TrainConfig
from ..data import AudioCache, Clip, cached_copies
from ..metrics import classification_metrics, softmax
from ..teacher import TeacherFeatures, build_teacher_cache, fit_head


def channel_copies(cache: AudioCache, channel: str, cache_dir: str | Path) -> AudioCache:
    """Every clip of ``cache`` through ``channel`` (a :func:`train.evaluate.telephone_copies` name:
    ``g712``, ``mulaw`` or a codec), at 16 kHz and its own length; computed once and cached."""
    from ..evaluate import telephone_copies

    return cached_copies(
        cache,
        f"channel-{channel}",
        channel,
        [lambda x: telephone_copies([x], channel)[0]],
        cache_dir,
        f"through the {channel} channel",
    )


@dataclass(frozen=True)
class ProbeRow:
    """Out-of-fold figures of one (fitted on, scored on) pair, pooled over the folds."""

    fitted_on: str
    scored_on: str
    ua: float
    roc_auc: float
    neutral_recall: float


def probe_channels(
    cfg: TrainConfig, clips: list[Clip], clean: TeacherFeatures, channels: dict[str, TeacherFeatures], folds: np.ndarray
) -> list[ProbeRow]:
    """The teacher's head fitted on clean training clips (and, per channel, on clean + that channel's
    copies of the same clips), scored out of fold on full band and on every channel."""
    labels = np.array([CLASSES.index(c.label) for c in clips])
    pooled = {"full": clean.pooled(), **{name: f.pooled() for name, f in channels.items()}}
    fits = {"full": ("full",), **{f"full + {name}": ("full", name) for name in channels}}
    rows = []
    for fit_name, fit_on in fits.items():
        oof = {name: np.zeros((len(clips), len(CLASSES))) for name in pooled}
        for k in np.unique(folds):
            train_idx, val_idx = np.flatnonzero(folds != k), np.flatnonzero(folds == k)
            x = np.concatenate([pooled[name][train_idx] for name in fit_on])
            y = np.tile(labels[train_idx], len(fit_on))
            head = fit_head(x, y, len(CLASSES), cfg.distill.head_c, cfg.seed)
            for name, feats in pooled.items():
                oof[name][val_idx] = softmax(head.logits(feats[val_idx]))
        for name, probs in oof.items():
            m = classification_metrics(probs, labels)
            rows.append(
                ProbeRow(
                    fit_name, name, m["ua"], m["roc_auc"], float(m["per_class_recall"].get("Neutral", float("nan")))
                )
            )
    return rows


def probe_markdown(rows: list[ProbeRow], protocol: str) -> str:
    """The probe as a Markdown table."""
    lines = [
        f"## The teacher through telephone channels\n\n{protocol}\n",
        "| head fitted on | scored on | UA | macro ROC AUC | Neutral recall |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {r.fitted_on} | {r.scored_on} | {r.ua:.3f} | {r.roc_auc:.3f} | {r.neutral_recall:.2f} |" for r in rows
    ]
    return "\n".join(lines) + "\n"


def teacher_channel_probe(
    cfg: TrainConfig,
    clips: list[Clip],
    cache: AudioCache,
    clean: TeacherFeatures,
    channels: list[str],
    folds: np.ndarray,
    cache_dir: str | Path,
    out_dir: Path,
) -> str:
    """Encode each channel's copies with the config's teacher (cached), probe, write
    ``teacher_channels.md`` in ``out_dir`` and return it."""
    encoded = {
        name: build_teacher_cache(
            channel_copies(cache, name, cache_dir),
            cfg.distill.teacher,
            cache_dir,
            threads=cfg.threads or 0,
            layers=cfg.distill.layers,
        )
        for name in channels
    }
    rows = probe_channels(cfg, clips, clean, encoded, folds)
    layers = (
        f"encoder hidden states {', '.join(map(str, cfg.distill.layers))} (mean)"
        if cfg.distill.layers
        else "encoder output"
    )
    text = probe_markdown(
        rows,
        f"{cfg.folds}-fold CV grouped by {cfg.group_by}, {len(clips)} clips; Whisper base "
        f"{layers}, whole-clip mean, logistic regression (C={cfg.distill.head_c}); "
        "out-of-fold, pooled over the folds.",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "teacher_channels.md").write_text(text)
    return text
