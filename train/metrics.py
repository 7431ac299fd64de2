"""Classification metrics (scikit-learn), calibration and report writing (JSON, Markdown, PNG)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from emostream.model import CLASSES
from emostream.scoring import softmax as scoring_softmax


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def classification_metrics(probs: np.ndarray, y: np.ndarray) -> dict:
    """UA (mean recall over classes present), macro-F1, accuracy, macro ROC AUC (one-vs-rest over
    classes present), per-class recall, ECE and the confusion matrix."""
    from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score, roc_auc_score

    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y)
    pred = probs.argmax(axis=1)
    present = sorted(set(y.tolist()))
    recalls = recall_score(y, pred, labels=present, average=None, zero_division=0)
    onehot = np.eye(len(CLASSES))[y]
    aucs = [roc_auc_score(onehot[:, c], probs[:, c]) for c in present if 0 < onehot[:, c].sum() < len(y)]
    return {
        "n": int(len(y)),
        "ua": float(np.mean(recalls)),
        "macro_f1": float(f1_score(y, pred, labels=present, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(y, pred)),
        "roc_auc": float(np.mean(aucs)) if aucs else float("nan"),
        "ece": expected_calibration_error(probs, y),
        "per_class_recall": {CLASSES[c]: float(r) for c, r in zip(present, recalls)},
        "confusion": confusion_matrix(y, pred, labels=list(range(len(CLASSES)))).tolist(),
    }


def grouped_metrics(probs: np.ndarray, y: np.ndarray, groups: list[str]) -> dict:
    """Overall metrics plus one entry per group value (e.g. corpus)."""
    out = {"overall": classification_metrics(probs, y)}
    groups_arr = np.asarray(groups)
    for g in sorted(set(groups)):
        if g:
            mask = groups_arr == g
            out[g] = classification_metrics(probs[mask], y[mask])
    return out


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Softmax temperature minimising validation NLL (grid + golden-section refine)."""
    logits = np.asarray(logits, dtype=np.float64)

    def nll(t: float) -> float:
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(y)), y].mean())

    grid = np.exp(np.linspace(np.log(0.05), np.log(20), 80))
    best = float(grid[np.argmin([nll(t) for t in grid])])
    lo, hi = best / 1.2, best * 1.2
    for _ in range(40):
        m1, m2 = lo + (hi - lo) / 3, hi - (hi - lo) / 3
        if nll(m1) < nll(m2):
            hi = m2
        else:
            lo = m1
    return float((lo + hi) / 2)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row softmax of ``logits / temperature`` in float64 (:func:`emostream.scoring.softmax`)."""
    return scoring_softmax(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


def summarize_folds(per_fold: list[dict], keys=("ua", "macro_f1", "accuracy", "roc_auc", "ece")) -> dict:
    """Mean ± std over folds for each metric of each group present in every fold."""
    groups = set(per_fold[0])
    for f in per_fold[1:]:
        groups &= set(f)
    out = {}
    for g in sorted(groups):
        out[g] = {}
        for k in keys:
            vals = np.array([f[g][k] for f in per_fold], dtype=float)
            out[g][k] = {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals))}
    return out


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def markdown_table(metrics: dict, title: str) -> str:
    """Markdown table: one row per group (overall, corpora) with UA, F1, accuracy, AUC, ECE."""
    lines = [
        f"### {title}",
        "",
        "| set | n | UA | macro-F1 | accuracy | ROC AUC | ECE |",
        "|---|---|---|---|---|---|---|",
    ]
    for group, m in metrics.items():
        lines.append(
            f"| {group} | {m['n']} | {m['ua']:.3f} | {m['macro_f1']:.3f} | {m['accuracy']:.3f} | "
            f"{m['roc_auc']:.3f} | {m['ece']:.3f} |"
        )
    overall = metrics.get("overall")
    if overall:
        lines += [
            "",
            "Per-class recall (overall): " + ", ".join(f"{k} {v:.2f}" for k, v in overall["per_class_recall"].items()),
        ]
    return "\n".join(lines) + "\n"


def plot_confusion(confusion: list[list[int]], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(confusion, dtype=float)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(
                j,
                i,
                int(cm[i, j]),
                ha="center",
                va="center",
                fontsize=8,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_curves(history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["train_loss"] for h in history], label="train loss")
    if any("val_loss" in h for h in history):
        a.plot(
            [h["epoch"] for h in history if "val_loss" in h],
            [h["val_loss"] for h in history if "val_loss" in h],
            label="val loss",
        )
    a.set_xlabel("epoch")
    a.legend()
    for key in ("ua", "roc_auc"):
        pts = [(h["epoch"], h[key]) for h in history if key in h]
        if pts:
            b.plot(*zip(*pts), label=key)
    b.set_xlabel("epoch")
    b.set_ylim(0, 1)
    if b.get_legend_handles_labels()[0]:
        b.legend()
    else:
        b.text(0.5, 0.5, "no validation set", ha="center", va="center", transform=b.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def segment_agreement(events: Iterable[dict], segments: list[dict]) -> dict:
    """Agreement of a timeline's window labels with ground-truth segments, over speech time (the
    example calls' score in the shipping rule, ``bench/agreement.py``).

    Each classified window is compared with the ground truth it covers: of the speech time inside
    ``[t_start, t_end)``, the share whose segment label equals the window's label counts as agreeing.
    Windows weigh by their speech time; returns agreement and scored seconds per channel and overall.
    """
    per_channel: dict[str, list[float]] = {}
    for e in events:
        if not e.get("speech") or e.get("label") is None:
            continue
        acc = per_channel.setdefault(e["channel"], [0.0, 0.0])
        for s in segments:
            if s["channel"] != e["channel"]:
                continue
            overlap = min(e["t_end"], float(s["t_end"])) - max(e["t_start"], float(s["t_start"]))
            if overlap > 0:
                acc[1] += overlap
                if s["label"] == e["label"]:
                    acc[0] += overlap
    out = {
        ch: {"agreement": (a / t if t else float("nan")), "seconds": round(t, 3)} for ch, (a, t) in per_channel.items()
    }
    total_a = sum(a for a, _ in per_channel.values())
    total_t = sum(t for _, t in per_channel.values())
    out["overall"] = {"agreement": total_a / total_t if total_t else float("nan"), "seconds": round(total_t, 3)}
    return out
