"""The distillation teacher of each fold (heads fitted on its training speakers only), and the teacher
cross-validated alone on the student's folds (per choice of encoder layers too, nested)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from emostream.model import CLASSES

from .config import TrainConfig
from .cv_report import SUMMARY_METRICS, summary_lines, summary_rows
from .data import Clip
from .metrics import classification_metrics, grouped_metrics, markdown_table, softmax, write_json


def fold_teacher(
    cfg: TrainConfig,
    clips: list[Clip],
    features,
    train_idx: np.ndarray,
    copies: np.ndarray | None = None,
    phone: np.ndarray | None = None,
):
    """The distillation teacher of one training set: heads fitted on ``train_idx``'s speakers only.
    With speed ``copies`` (``clips`` and ``features`` then include them), the heads are fitted on the
    original clips alone and a copy's targets come from its original's head, on the copy's own features.
    With ``phone`` lines of those clips, a line's targets come from its source's head, on the line's
    features (``emostream.distill.phone_targets``: its clean source's features, or its own). With its
    own, the heads are fitted on the original clips and their lines together: through G.712 such a
    head scores 0.689 UA out of fold against 0.595 for one fitted on clean clips alone, and 0.734
    against 0.720 full band (``train teacher --channels g712``, EXPERIMENTS note 40)."""
    from .teacher import FoldTeacher

    labels = np.array([CLASSES.index(c.label) for c in clips])
    fit_idx = train_idx
    if phone is not None and cfg.distill.phone_targets == "copy":
        fit_idx = np.concatenate([train_idx, phone[train_idx].ravel()])
    teacher = FoldTeacher(
        features,
        labels,
        [c.speaker for c in clips],
        fit_idx,
        len(CLASSES),
        inner_folds=cfg.distill.inner_folds,
        c=cfg.distill.head_c,
        seed=cfg.seed,
        speaker_centre=cfg.distill.speaker_centre,
    )
    sources = train_idx
    if copies is not None:
        teacher.head_of[copies[train_idx]] = teacher.head_of[train_idx, None]
        sources = np.concatenate([train_idx, copies[train_idx].ravel()])
    if phone is not None:
        teacher.head_of[phone[sources]] = teacher.head_of[sources, None]
    return teacher


def teacher_cv(cfg: TrainConfig, clips: list[Clip], features, folds: np.ndarray, out_dir: Path) -> dict:
    """The teacher alone (Whisper encoder + logistic regression), cross-validated on the same
    speaker-grouped folds as the student: the upper reference for distillation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.array([CLASSES.index(c.label) for c in clips])
    corpora = [c.corpus for c in clips]
    per_fold, oof = [], np.zeros((len(clips), len(CLASSES)))
    for k in range(cfg.folds):
        train_idx, val_idx = np.where(folds != k)[0], np.where(folds == k)[0]
        teacher = fold_teacher(cfg, clips, features, train_idx)
        oof[val_idx] = softmax(teacher.clip_logits(val_idx))
        per_fold.append(teacher_metrics(teacher, val_idx, labels, corpora))
    from .metrics import summarize_folds

    report = {
        "protocol": f"{cfg.folds}-fold CV grouped by {cfg.group_by}; teacher: Whisper base encoder "
        f"(frozen) + logistic regression (C={cfg.distill.head_c})"
        + (f", encoder hidden states {', '.join(map(str, cfg.distill.layers))} (mean)" if cfg.distill.layers else "")
        + (
            ", features centred per speaker (a held-out speaker's mean from its own audio)"
            if cfg.distill.speaker_centre != "none"
            else ""
        ),
        "teacher": cfg.distill.teacher,
        "summary": summarize_folds(per_fold),
        "pooled": grouped_metrics(oof, labels, corpora),
        "folds": per_fold,
    }
    write_json(out_dir / "teacher_report.json", report)
    (out_dir / "teacher_report.md").write_text(
        markdown_table(report["pooled"], "Teacher, pooled out-of-fold") + "\n" + summary_lines(report["summary"])
    )
    return report


def nested_teacher_choice(cfg: TrainConfig, clips: list[Clip], choices: dict, folds: np.ndarray) -> list[dict]:
    """Which teacher features a fold would pick from its training speakers alone (nested CV).

    ``choices`` maps a name to its :class:`train.teacher.TeacherFeatures`. For each outer fold, every
    choice's head (logistic regression on whole-clip pooled features, as
    :func:`teacher_cv` reports) is cross-validated over inner speaker-grouped folds of the fold's
    training clips; the choice with the best mean inner UA is then scored on the fold's validation
    speakers. Returns one dict per fold: ``chosen``, ``inner_ua`` (per choice) and the chosen
    teacher's validation ``ua`` / ``roc_auc``, so the selection never sees a validation label."""
    from .data import make_folds
    from .teacher import fit_head

    labels = np.array([CLASSES.index(c.label) for c in clips])
    pooled = {name: f.pooled() for name, f in choices.items()}

    def score(name: str, fit_rows: np.ndarray, eval_rows: np.ndarray) -> dict:
        head = fit_head(pooled[name][fit_rows], labels[fit_rows], len(CLASSES), cfg.distill.head_c, cfg.seed)
        return classification_metrics(softmax(head.logits(pooled[name][eval_rows])), labels[eval_rows])

    out = []
    for k in range(cfg.folds):
        train_idx, val_idx = np.where(folds != k)[0], np.where(folds == k)[0]
        n_inner = min(cfg.folds, len({clips[i].speaker for i in train_idx}))
        inner = make_folds(
            [clips[i] for i in train_idx], n_inner, "speaker" if cfg.group_by == "corpus" else cfg.group_by, cfg.seed
        )
        inner_ua = {
            name: float(
                np.mean([score(name, train_idx[inner != j], train_idx[inner == j])["ua"] for j in range(n_inner)])
            )
            for name in choices
        }
        chosen = max(inner_ua, key=inner_ua.get)
        m = score(chosen, train_idx, val_idx)
        out.append({"fold": k, "chosen": chosen, "inner_ua": inner_ua, "ua": m["ua"], "roc_auc": m["roc_auc"]})
    return out


def teacher_metrics(teacher, val_idx: np.ndarray, labels: np.ndarray, corpora: list[str]) -> dict:
    """A fold teacher's metrics on its validation clips (whole-clip pooling)."""
    return grouped_metrics(softmax(teacher.clip_logits(val_idx)), labels[val_idx], [corpora[i] for i in val_idx])


def teacher_layers_report(cfg, clips, cache, choices: list[tuple[int, ...]], cache_dir: str, out: Path) -> str:
    """The teacher cross-validated on each choice of encoder hidden states (``teacher --layers``):
    one ``teacher_report`` per choice under ``out/layers_<L>`` and a table ``out/teacher_layers.md``."""
    from .data import make_folds
    from .metrics import summarize_folds
    from .teacher import build_teacher_cache

    nested_metrics = ("ua", "roc_auc")

    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    rows, results, built = [], {}, {}
    for layers in choices:
        name = "-".join(map(str, layers))
        features = built[name] = build_teacher_cache(
            cache, cfg.distill.teacher, cache_dir, threads=cfg.threads or 0, layers=layers
        )
        report = teacher_cv(
            replace(cfg, distill=replace(cfg.distill, layers=layers)), clips, features, folds, out / f"layers_{name}"
        )
        s = report["summary"]["overall"]
        results[name] = {k: s[k] for k in SUMMARY_METRICS}
        (row,) = summary_rows({", ".join(map(str, layers)): s})
        rows.append(row + " " + " / ".join(f"{f['overall']['ua']:.3f}" for f in report["folds"]) + " |")
    table = (
        "| hidden states (mean) | UA | macro-F1 | accuracy | ROC AUC | UA per fold |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n"
    )
    nested = ""
    if len(built) > 1 and cfg.distill.speaker_centre == "none":
        picks = nested_teacher_choice(cfg, clips, built, folds)
        results["nested"] = picks
        nested = (
            f"\nChosen inside each fold's training speakers ({cfg.folds} inner folds grouped by "
            f"{cfg.group_by}, best mean inner UA), then scored on the fold's validation speakers:\n\n"
            "| fold | chosen | inner UA of each choice | UA | ROC AUC |\n|---|---|---|---|---|\n"
            + "".join(
                f"| {p['fold']} | {p['chosen'].replace('-', ', ')} | "
                + ", ".join(f"{n}: {u:.3f}" for n, u in p["inner_ua"].items())
                + f" | {p['ua']:.3f} | {p['roc_auc']:.3f} |\n"
                for p in picks
            )
            + summary_rows(
                {"nested CV | |": summarize_folds([{"all": p} for p in picks], nested_metrics)["all"]}, nested_metrics
            )[0]
            + "\n"
        )
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_layers.md").write_text(
        f"Teacher alone per choice of Whisper encoder hidden states ({cfg.folds}-fold CV grouped by "
        f"{cfg.group_by}, logistic regression C={cfg.distill.head_c}; 0 = after the stem, the last = the "
        "encoder's output)\n\n" + table + nested
    )
    (out / "teacher_layers.json").write_text(json.dumps(results, indent=1))
    return table + nested
