"""k-fold cross-validation: every fold trained (or reused on resume), scored full band and per
channel, calibrated and reported; and ensembles of finished CV runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from emostream.model import CLASSES

from .config import ConfigError, TrainConfig
from .cv_report import cv_markdown, held_out_table
from .data import AudioCache, Clip
from .distill import fold_teacher, teacher_metrics
from .evaluate import CHANNEL_NAMES, channel_logits, clip_scoring, reevaluate_fold
from .fit import FitOptions, fit
from .metrics import classification_metrics, fit_temperature, grouped_metrics, plot_confusion, softmax, write_json

log = logging.getLogger("train")


def check_fold_ids(fold_ids: list[int], n_folds: int) -> None:
    """A ConfigError naming any fold outside ``0 .. n_folds - 1``, or an empty list."""
    bad = [k for k in fold_ids if not 0 <= k < n_folds]
    if bad or not fold_ids:
        raise ConfigError(f"fold {', '.join(map(str, bad)) or '(none)'}: this config has folds 0-{n_folds - 1}")


def cross_validate(
    cfg: TrainConfig,
    clips: list[Clip],
    cache: AudioCache,
    folds: np.ndarray,
    out_dir: Path,
    resume: bool = False,
    pretrained_path: str | None = None,
    only_folds: list[int] | None = None,
    device: str | None = None,
    show_progress: bool = True,
    teacher_features=None,
    reevaluate: bool = False,
    speed_copies=None,
    channels: tuple[str, ...] = (),
) -> dict:
    """Train every fold (skipping finished ones on resume), then write the aggregate report.

    The report scores every fold full band and through the G.712 telephone channel; ``channels``
    (:func:`telephone_copies` names: ``mulaw``, codecs) add rows scored from each fold's saved
    checkpoint (cached as ``val_<channel>_logits.npy``), the codec grid.

    ``speed_copies`` (:class:`train.data.SpeedCopies` of ``clips``; ``teacher_features`` then cover
    the copies too) lets training draw windows from speed-perturbed copies of the training clips;
    folds, validation and the report hold the original clips only.

    ``reevaluate`` (with ``resume``) predicts a finished fold's validation clips again from its saved
    checkpoint with this config's inference settings (e.g. ``inference_positions``) instead of reusing
    its stored logits, which it overwrites: the same models, scored another way.

    ``only_folds`` restricts training and report to those folds (``fit --fold K``, ``cv --folds 1,3``):
    a long CV can be split across sessions or machines into one ``out_dir``, then reported over the
    folds finished there (``--resume`` reuses them).

    With ``teacher_features`` (distillation), each fold's teacher is fitted on that fold's training
    speakers only, and its own validation figures go into the report beside the student's.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    channels = tuple(c for c in channels if c not in ("full", "g712"))  # those two are always scored
    labels = np.array([CLASSES.index(c.label) for c in clips])
    corpora = [c.corpus for c in clips]
    oof = np.zeros((len(clips), len(CLASSES)))
    oof_tel = np.zeros_like(oof)
    raw_logits = np.zeros_like(oof)
    run_folds = sorted(set(only_folds)) if only_folds is not None else list(range(cfg.folds))
    check_fold_ids(run_folds, cfg.folds)
    fold_data, train_seconds, teacher_folds = [], 0.0, []
    for k in run_folds:
        fold_dir = out_dir / f"fold{k}"
        train_idx, val_idx = np.where(folds != k)[0], np.where(folds == k)[0]
        speakers_train = {clips[i].speaker for i in train_idx}
        assert not speakers_train & {clips[i].speaker for i in val_idx} or cfg.group_by == "audio"
        fit_clips, fit_cache, copies = (
            (speed_copies.clips, speed_copies.cache, speed_copies.copies)
            if speed_copies is not None
            else (clips, cache, None)
        )
        phone = getattr(speed_copies, "phone", None)
        teacher = (
            fold_teacher(cfg, fit_clips, teacher_features, train_idx, copies, phone)
            if teacher_features is not None
            else None
        )
        if teacher is not None:
            teacher_folds.append(teacher_metrics(teacher, val_idx, labels, corpora))
        done = fold_dir / "done.json"
        if resume and done.exists() and (fold_dir / "val_logits.npy").exists():
            if reevaluate:
                log.info(
                    "fold %d already finished: predicting its validation clips again (positions %d)",
                    k,
                    cfg.inference_positions,
                )
                vl, vt = reevaluate_fold(cfg, fold_dir, [cache.clip(i) for i in val_idx], device)
            else:
                log.info("fold %d already finished: reusing", k)
                vl = np.load(fold_dir / "val_logits.npy")
                vt = np.load(fold_dir / "val_telephone_logits.npy")
            history = json.loads(done.read_text()).get("history", [])
        else:
            log.info("fold %d: %d train / %d validation clips", k, len(train_idx), len(val_idx))
            options = FitOptions(
                resume=resume,
                pretrained_path=pretrained_path,
                metadata={"fold": k},
                device=device,
                show_progress=show_progress,
            )
            res = fit(
                cfg,
                fit_clips,
                fit_cache,
                train_idx,
                val_idx,
                fold_dir,
                options,
                teacher=teacher,
                copies=copies,
                phone=phone,
            )
            vl, vt, history = res.val_logits, res.val_telephone_logits, res.history
            write_json(done, {"fold": k, "history": history})
        train_seconds += sum(h.get("seconds", 0.0) for h in history)
        raw_logits[val_idx] = vl
        extra = {c: channel_logits(cfg, fold_dir, [cache.clip(i) for i in val_idx], c, device) for c in channels}
        fold_data.append((k, val_idx, vl, vt, extra))

    # Temperatures are cross-fitted: fold k's is fitted on the other folds' validation logits, so the
    # calibration (ECE) reported for fold k is measured on data its temperature never saw.
    evaluated = np.isin(folds, run_folds)
    per_fold, per_fold_tel, temps = [], [], []
    oof_channels = {c: np.zeros_like(oof) for c in channels}
    for k, val_idx, vl, vt, extra in fold_data:
        others = evaluated & (folds != k)
        if not cfg.calibrate:
            t = 1.0
        elif others.any():
            t = fit_temperature(raw_logits[others], labels[others])
        else:
            t = fit_temperature(vl, labels[val_idx])
        temps.append(t)
        oof[val_idx], oof_tel[val_idx] = softmax(vl, t), softmax(vt, t)
        m = grouped_metrics(softmax(vl, t), labels[val_idx], [corpora[i] for i in val_idx])
        m["overall"]["ece_uncalibrated"] = classification_metrics(softmax(vl), labels[val_idx])["ece"]
        per_fold.append(m)
        per_fold_tel.append(grouped_metrics(softmax(vt, t), labels[val_idx], [corpora[i] for i in val_idx]))
        for c, logits in extra.items():
            oof_channels[c][val_idx] = softmax(logits, t)
    from .metrics import summarize_folds

    temperature = fit_temperature(raw_logits[evaluated], labels[evaluated]) if cfg.calibrate else 1.0
    evaluated_corpora = [c for c, e in zip(corpora, evaluated) if e]
    report = {
        "protocol": _protocol(cfg)
        + (f"; {clip_scoring(cfg.inference_positions)}" if cfg.inference_positions > 1 else ""),
        "config": cfg.to_dict(),
        "temperatures": temps,
        "temperature": float(temperature),  # fitted on all out-of-fold logits: the shipped model's
        "train_seconds": round(train_seconds, 1),
        "summary": summarize_folds(per_fold),
        "summary_telephone": summarize_folds(per_fold_tel),
        "pooled": grouped_metrics(oof[evaluated], labels[evaluated], evaluated_corpora),
        "pooled_telephone": grouped_metrics(oof_tel[evaluated], labels[evaluated], evaluated_corpora),
        "telephone_channel": CHANNEL_NAMES["g712"],
        "folds": per_fold,
    }
    if channels:
        report["channels"] = {
            c: grouped_metrics(oof_channels[c][evaluated], labels[evaluated], evaluated_corpora) for c in channels
        }
    if teacher_folds:
        report["teacher_summary"] = summarize_folds(teacher_folds)
    if cfg.group_by == "corpus":
        report["held_out_corpora"] = held_out_table(folds, corpora, [d[0] for d in fold_data], per_fold, per_fold_tel)
    write_json(out_dir / "cv_report.json", report)
    (out_dir / "cv_report.md").write_text(cv_markdown(report))
    plot_confusion(report["pooled"]["overall"]["confusion"], out_dir / "confusion.png", report["protocol"])
    return report


def _protocol(cfg: TrainConfig) -> str:
    """The CV report's protocol line (without the clip-scoring note)."""
    if cfg.group_by == "corpus":
        return f"leave-one-corpus-out CV ({cfg.folds} folds, each holds out one whole corpus)"
    return f"{cfg.folds}-fold CV grouped by {cfg.group_by}" + (" (LEAKS SPEAKERS)" if cfg.group_by == "audio" else "")


def average_fold_logits(run_dirs: list[Path], folds: np.ndarray, fold_ids: list[int], out_dir: Path) -> None:
    """Write the ensemble of finished CV runs into ``out_dir`` as finished folds: for each fold in
    ``fold_ids``, the log of the mean of the runs' softmax probabilities (clean and telephone copies),
    so that ``cross_validate(..., resume=True)`` reports it like any run, without training.

    The runs must share the folds (the same config seed, data and exclusions); a run that lacks a
    fold, or whose logits do not count that fold's validation clips, is a ConfigError naming it."""
    out_dir = Path(out_dir)
    if any(Path(r).resolve() == out_dir.resolve() for r in run_dirs):
        raise ConfigError(f"--out {out_dir} is one of the runs: the ensemble would overwrite its folds")
    check_fold_ids(fold_ids, int(folds.max()) + 1)
    for k in fold_ids:
        n = int(np.sum(folds == k))
        averaged = {}
        for name in ("val_logits.npy", "val_telephone_logits.npy"):
            probs = []
            for run in run_dirs:
                path = Path(run) / f"fold{k}" / name
                if not path.exists():
                    raise ConfigError(f"{path}: missing (is fold {k} of {run} finished?)")
                logits = np.load(path)
                if logits.shape != (n, len(CLASSES)):
                    raise ConfigError(
                        f"{path}: logits of shape {logits.shape}, fold {k} has {n} validation clips "
                        "(runs must share the config's folds)"
                    )
                probs.append(softmax(logits))
            averaged[name] = np.log(np.clip(np.mean(probs, axis=0), 1e-12, None))
        fold_dir = out_dir / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        for name, logits in averaged.items():
            np.save(fold_dir / name, logits.astype(np.float32))
        write_json(fold_dir / "done.json", {"fold": k, "history": [], "ensemble_of": [str(r) for r in run_dirs]})
