"""Probe: how closely does a distilled student follow its teacher, on its training voices and on new ones?

    python -m train.probes.teacher_gap --config CONFIG --run DIR --folds 1,3

For each fold it scores every clip with the fold's student (``DIR/foldK/checkpoint``, whole clips,
``--positions`` placements; cached as ``DIR/foldK/gap_logits_p<positions>.npy``) and with the fold's teacher as
training saw it: a training clip's target comes from the inner head that never saw its speaker, a
validation clip's from the head fitted on all training speakers (the reported teacher). It prints,
for the training and the validation speakers: both models' UA and ROC AUC, how often their top
classes agree, and KL(teacher || student) of the distributions softened by the distillation
temperature (the quantity the KD loss drives down on the training clips).

A student that follows the teacher on its training voices but not on new ones (agreement and KL far
apart between the two rows) has learnt the teacher's function only where it was shown it: more
voices under the teacher's labels, not more epochs, is what would close the gap (EXPERIMENTS note 36).
The training rows are optimistic for the student, which was fitted on those clips (with their hard
labels too); compare the rows' agreement and KL, not their UA.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from emostream.argtypes import positive as _positive  # the positive-number argument type of emostream's CLI

from .common import probe_data, probe_parser


def gap_metrics(student_logits: np.ndarray, teacher_logits: np.ndarray, labels: np.ndarray, temperature: float) -> dict:
    """Student and teacher figures on one set of clips: ``student_ua``/``student_auc``,
    ``teacher_ua``/``teacher_auc``, ``agreement`` (share of clips with the same top class) and ``kl``
    (mean KL(teacher || student) of the softmaxes at ``temperature``, in nats)."""
    from ..metrics import classification_metrics, softmax

    s, t = (
        classification_metrics(softmax(student_logits), labels),
        classification_metrics(softmax(teacher_logits), labels),
    )
    ps, pt = softmax(student_logits, temperature), softmax(teacher_logits, temperature)
    kl = np.sum(pt * (np.log(np.clip(pt, 1e-12, 1)) - np.log(np.clip(ps, 1e-12, 1))), axis=1)
    return {
        "student_ua": s["ua"],
        "student_auc": s["roc_auc"],
        "teacher_ua": t["ua"],
        "teacher_auc": t["roc_auc"],
        "agreement": float(np.mean(student_logits.argmax(1) == teacher_logits.argmax(1))),
        "kl": float(kl.mean()),
    }


def teacher_targets(teacher, train_idx: np.ndarray, val_idx: np.ndarray, n: int) -> np.ndarray:
    """Whole-clip teacher logits ``(n, classes)``: training clips from their out-of-speaker inner head
    (the targets training used), validation clips from the all-training-speakers head."""
    out = np.zeros((n, teacher.head.coef.shape[0]))
    whole = np.full(len(train_idx), 2**40)  # a span longer than any clip: its every frame
    out[train_idx] = teacher.logits(train_idx, np.zeros(len(train_idx), int), whole)
    out[val_idx] = teacher.clip_logits(val_idx)
    return out


def main(argv: list[str] | None = None) -> int:
    p = probe_parser("python -m train.probes.teacher_gap", __doc__.split("\n\n")[0])
    p.add_argument(
        "--positions",
        type=_positive(int),
        default=1,
        help="placements per clip for the student (1: the recipe's chunks)",
    )
    args = p.parse_args(argv)

    import torch

    from emostream.model import load_checkpoint

    from ..config import load_config
    from ..distill import fold_teacher
    from ..evaluate import predict_logits
    from ..teacher import build_teacher_cache

    cfg = load_config(args.config)
    if not cfg.distill.teacher:
        print(f"error: {args.config}: no emostream.distill.teacher to compare with", file=sys.stderr)
        return 2
    clips, cache, folds, labels = probe_data(cfg, args.cache)
    features = build_teacher_cache(
        cache, cfg.distill.teacher, args.cache, threads=cfg.threads or 0, layers=cfg.distill.layers
    )
    print(
        "| fold | speakers | student UA | student AUC | teacher UA | teacher AUC | top-class agreement | "
        f"KL(teacher ‖ student), T {cfg.distill.temperature:g} |\n|---|---|---|---|---|---|---|---|"
    )
    for k in args.folds:
        fold_dir = Path(args.run) / f"fold{k}"
        if not (fold_dir / "checkpoint").exists():
            print(f"error: {fold_dir / 'checkpoint'}: no such checkpoint", file=sys.stderr)
            return 2
        cached = fold_dir / f"gap_logits_p{args.positions}.npy"
        if cached.exists():
            student = np.load(cached)
        else:
            model = load_checkpoint(fold_dir / "checkpoint", "cpu")
            student = predict_logits(
                model,
                [cache.clip(i) for i in range(len(clips))],
                torch.device("cpu"),
                cfg.mixed_precision_inference,
                positions=args.positions,
            )
            np.save(cached, student)
        train_idx, val_idx = np.where(folds != k)[0], np.where(folds == k)[0]
        teacher = teacher_targets(fold_teacher(cfg, clips, features, train_idx), train_idx, val_idx, len(clips))
        for name, idx in (("training", train_idx), ("validation", val_idx)):
            m = gap_metrics(student[idx], teacher[idx], labels[idx], cfg.distill.temperature)
            print(
                f"| {k} | {name} | {m['student_ua']:.3f} | {m['student_auc']:.3f} | {m['teacher_ua']:.3f} | "
                f"{m['teacher_auc']:.3f} | {m['agreement']:.3f} | {m['kl']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
