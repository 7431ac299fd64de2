"""The text of cross-validation reports: summary rows, the leave-one-corpus-out table and the
Markdown of ``cv_report.md``."""

from __future__ import annotations

import numpy as np

from .evaluate import CHANNEL_NAMES
from .metrics import markdown_table

SUMMARY_METRICS = ("ua", "macro_f1", "accuracy", "roc_auc")


def summary_rows(summary: dict, metrics: tuple[str, ...] = SUMMARY_METRICS, suffix: str = "") -> list[str]:
    """Markdown rows ``| group | mean ± std | ...`` of a :func:`summarize_folds` result."""
    return [
        f"| {group}{suffix} | " + " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in metrics) + " |"
        for group, m in summary.items()
    ]


def summary_lines(summary: dict) -> str:
    """The summary table of a report (UA, macro-F1, accuracy, ROC AUC per set), as Markdown."""
    lines = ["| set | UA | macro-F1 | accuracy | ROC AUC |", "|---|---|---|---|---|", *summary_rows(summary)]
    return "\n".join(lines) + "\n"


def held_out_table(
    folds: np.ndarray, corpora: list[str], fold_ids: list[int], per_fold: list[dict], per_fold_tel: list[dict]
) -> list[dict]:
    """Leave-one-corpus-out rows: per fold, the corpus it holds out, its clips and classes, and the
    fold's metrics there (full band and telephone). A corpus lacking classes is scored over the classes
    it has (UA, macro-F1 and ROC AUC average over those)."""
    rows = []
    for k, m, t in zip(fold_ids, per_fold, per_fold_tel):
        held = sorted({corpora[i] for i in np.where(folds == k)[0]})
        o, ot = m["overall"], t["overall"]
        rows.append(
            {
                "fold": int(k),
                "corpus": "+".join(held),
                "n": o["n"],
                "classes": list(o["per_class_recall"]),
                **{key: o[key] for key in SUMMARY_METRICS},
                "telephone": {key: ot[key] for key in SUMMARY_METRICS},
            }
        )
    return rows


def held_out_markdown(rows: list[dict]) -> str:
    """The leave-one-corpus-out table of a CV report, with the mean over held-out corpora."""
    lines = [
        "Leave-one-corpus-out: each fold trains without one corpus and scores it (classes it lacks "
        "are left out of its UA, macro-F1 and ROC AUC):",
        "",
        "| held-out corpus | n | classes | UA | macro-F1 | accuracy | ROC AUC | UA (telephone) | ROC AUC (telephone) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['n']} | {len(r['classes'])} | {r['ua']:.3f} | {r['macro_f1']:.3f} | "
            f"{r['accuracy']:.3f} | {r['roc_auc']:.3f} | {r['telephone']['ua']:.3f} | "
            f"{r['telephone']['roc_auc']:.3f} |"
        )
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in SUMMARY_METRICS}
    tel = {k: float(np.nanmean([r["telephone"][k] for r in rows])) for k in ("ua", "roc_auc")}
    lines.append(
        f"| mean of {len(rows)} | | | {mean['ua']:.3f} | {mean['macro_f1']:.3f} | {mean['accuracy']:.3f} | "
        f"{mean['roc_auc']:.3f} | {tel['ua']:.3f} | {tel['roc_auc']:.3f} |"
    )
    return "\n".join(lines) + "\n"


def cv_markdown(report: dict) -> str:
    lines = [
        "# Cross-validation report",
        "",
        f"Protocol: {report['protocol']}.",
        "",
        "Mean ± std over folds (temperature-calibrated probabilities):",
        "",
        "| set | UA | macro-F1 | accuracy | ROC AUC | ECE |",
        "|---|---|---|---|---|---|",
    ]
    # reports before 2026-12-06 called the 8 kHz μ-law round trip (no band-pass) "telephone"
    telephone = " (G.712 telephone)" if "telephone_channel" in report else " (8 kHz μ-law only)"
    for suffix, summary in (("", report["summary"]), (telephone, report["summary_telephone"])):
        lines += summary_rows(summary, SUMMARY_METRICS + ("ece",), suffix)
    rows = [
        ("full", report["pooled"]),
        ("g712" if "telephone_channel" in report else "mulaw", report["pooled_telephone"]),
        *report.get("channels", {}).items(),
    ]
    lines += [
        "",
        "By channel, pooled out-of-fold (codec rows: the G.712 band, then the codec):",
        "",
        "| channel | UA | macro-F1 | accuracy | ROC AUC | Neutral recall |",
        "|---|---|---|---|---|---|",
    ]
    for name, pooled in rows:
        o = pooled["overall"]
        lines.append(
            f"| {CHANNEL_NAMES.get(name, name)} | {o['ua']:.3f} | {o['macro_f1']:.3f} | {o['accuracy']:.3f} | "
            f"{o['roc_auc']:.3f} | {o['per_class_recall'].get('Neutral', float('nan')):.2f} |"
        )
    lines += [
        "",
        markdown_table(report["pooled"], "Pooled out-of-fold predictions"),
        markdown_table(report["pooled_telephone"], "Pooled out-of-fold predictions," + telephone),
        "Temperatures per fold (cross-fitted on the other folds): "
        f"{', '.join(f'{t:.2f}' for t in report['temperatures'])}; "
        f"shipped temperature (all out-of-fold logits): {report['temperature']:.2f}. "
        f"Training time, all folds: {report.get('train_seconds', 0) / 60:.1f} min.",
        "",
    ]
    if "held_out_corpora" in report:
        lines += [held_out_markdown(report["held_out_corpora"])]
    if "teacher_summary" in report:
        lines += [
            "Distillation teacher on the same folds (fitted on each fold's training speakers only):",
            "",
            summary_lines(report["teacher_summary"]),
        ]
    return "\n".join(lines)
