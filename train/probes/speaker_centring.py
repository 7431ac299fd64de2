"""Probe: would a per-speaker running mean help the student? (EXPERIMENTS.md, next step 5, note 32)

A live call could keep, per channel, the mean of the model's pooled embedding over the windows heard
so far, and classify each window's embedding *minus* that mean with a head fitted on speaker-centred
training embeddings. This probe measures that on finished CV folds, without training a network:

    python -m train.probes.speaker_centring --config CONFIG --run DIR --folds 1,3

For each fold it embeds every clip with the fold's checkpoint (``DIR/foldK/checkpoint``; pooled
penultimate features, mean over 5 placements; cached as ``DIR/foldK/embeddings.npz``), then scores
the validation speakers with:

- the checkpoint's own head, and a logistic-regression head on the raw embeddings (the control);
- a head fitted on training embeddings centred by each training speaker's mean, applied to each
  validation clip centred by the mean of ``n`` *other* clips of its speaker (the call's earlier
  speech), drawn at random (balanced emotions: the best case) or with a share of them in the clip's
  own emotion (a caller who stays angry: the case a contact centre cares about).

Training embeddings come from a network that was fitted on those clips, so both heads see
optimistic training features; compare the centred heads with the raw-embedding head, not with
published figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .common import probe_data, probe_parser

CONTEXT_SIZES = (3, 8, 20)
SAME_EMOTION_SHARES = (1.0, 0.5)
REPEATS = 5


def context_indices(
    i: int,
    candidates: np.ndarray,
    speakers: np.ndarray,
    labels: np.ndarray,
    n: int,
    share: float | None,
    rng: np.random.Generator,
) -> np.ndarray:
    """``n`` clips of clip ``i``'s speaker among ``candidates``, never ``i`` itself: drawn at random
    without replacement (``share`` None; fewer when the speaker has fewer), or with ``round(n * share)``
    of them (as many as exist) in clip ``i``'s emotion and the rest drawn from all of the speaker's
    other clips, with replacement."""
    own = candidates[(speakers[candidates] == speakers[i]) & (candidates != i)]
    if share is None:
        return rng.choice(own, min(n, len(own)), replace=False)
    same = own[labels[own] == labels[i]]
    m = min(int(round(n * share)), len(same))
    rest = rng.choice(own, n - m, replace=True) if n > m else np.array([], dtype=own.dtype)
    return np.concatenate([rng.choice(same, m, replace=False), rest]).astype(own.dtype)


def centre_by_speaker(x: np.ndarray, speakers: np.ndarray) -> np.ndarray:
    """``x`` ``(N, C)`` with each speaker's mean row subtracted from that speaker's rows."""
    out = x.copy()
    for s in np.unique(speakers):
        mask = speakers == s
        out[mask] -= x[mask].mean(0)
    return out


def embed_clips(checkpoint: Path, waves: list[np.ndarray], positions: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Pooled penultimate embeddings ``(N, C)`` and logits ``(N, 7)`` of each clip, averaged over
    ``positions`` placements in the window (as ``emostream classify`` scores a clip)."""
    import torch

    from emostream.model import autocast_for, load_checkpoint
    from emostream.stream import placed_windows

    from ..forward import training_forward

    model = load_checkpoint(checkpoint, "cpu").eval()
    device = torch.device("cpu")
    embeddings, logits = [], []
    with torch.inference_mode():
        for x in waves:
            windows = torch.from_numpy(placed_windows(x, positions))
            with autocast_for(device, True):
                lg, emb = training_forward(model, windows, return_embedding=True)
            embeddings.append(emb.float().mean(0).numpy())
            logits.append(lg.float().mean(0).numpy())
    return np.stack(embeddings), np.stack(logits)


def probe_fold(
    emb: np.ndarray,
    logits: np.ndarray,
    labels: np.ndarray,
    speakers: np.ndarray,
    train_idx: np.ndarray,
    val_idx: np.ndarray,
    c: float = 0.02,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """UA and macro ROC AUC of each scoring of ``val_idx`` (see the module docstring)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from ..metrics import classification_metrics, softmax

    def score(p: np.ndarray) -> tuple[float, float]:
        m = classification_metrics(p, labels[val_idx])
        return round(float(m["ua"]), 4), round(float(m["roc_auc"]), 4)

    def head(x: np.ndarray):
        scaler = StandardScaler().fit(x)
        clf = LogisticRegression(C=c, max_iter=3000).fit(scaler.transform(x), labels[train_idx])
        return lambda z: clf.predict_proba(scaler.transform(z))

    out = {
        "own head": score(softmax(logits[val_idx])),
        "raw embedding, linear head": score(head(emb[train_idx])(emb[val_idx])),
    }
    centred_head = head(centre_by_speaker(emb[train_idx], speakers[train_idx]))
    out["centred by all of the speaker's clips"] = score(
        centred_head(centre_by_speaker(emb[val_idx], speakers[val_idx]))
    )
    rng = np.random.default_rng(seed)
    scenarios = [(n, None) for n in CONTEXT_SIZES] + [(n, s) for n in CONTEXT_SIZES[1:] for s in SAME_EMOTION_SHARES]
    for n, share in scenarios:
        runs, same = [], []
        for _ in range(REPEATS):
            contexts = [context_indices(i, val_idx, speakers, labels, n, share, rng) for i in val_idx]
            z = np.stack([emb[i] - emb[ctx].mean(0) for i, ctx in zip(val_idx, contexts)])
            runs.append(score(centred_head(z)))
            same += [np.mean(labels[ctx] == labels[i]) for i, ctx in zip(val_idx, contexts)]
        what = "random" if share is None else f"{share:.0%} asked in the clip's emotion"
        out[f"centred by {n} other clips, {what} ({np.mean(same):.0%} got)"] = tuple(
            round(float(v), 4) for v in np.mean(runs, axis=0)
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = probe_parser("python -m train.probes.speaker_centring", __doc__.splitlines()[0])
    p.add_argument("--c", type=float, default=0.02, help="inverse L2 strength of the linear heads")
    args = p.parse_args(argv)

    from ..config import load_config

    clips, cache, folds, labels = probe_data(load_config(args.config), args.cache)
    speakers = np.array([c.speaker for c in clips])
    print("| fold | scoring | UA | ROC AUC |\n|---|---|---|---|")
    for k in args.folds:
        fold_dir = Path(args.run) / f"fold{k}"
        cached = fold_dir / "embeddings.npz"
        if cached.exists():
            data = np.load(cached)
            emb, logits = data["emb"], data["logits"]
        else:
            if not (fold_dir / "checkpoint").exists():
                print(f"error: {fold_dir / 'checkpoint'}: no such checkpoint", file=sys.stderr)
                return 2
            emb, logits = embed_clips(fold_dir / "checkpoint", [cache.clip(i) for i in range(len(clips))])
            np.savez(cached, emb=emb, logits=logits)
        res = probe_fold(emb, logits, labels, speakers, np.where(folds != k)[0], np.where(folds == k)[0], args.c)
        for name, (ua, auc) in res.items():
            print(f"| {k} | {name} | {ua:.3f} | {auc:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
