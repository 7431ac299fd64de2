"""The speaker-centring probe (train/probes/speaker_centring.py): context sampling and the scorings."""

import numpy as np

from train.probes.speaker_centring import context_indices, probe_fold


def synthetic(n_speakers=8, per_class=6, classes=7, dim=16, seed=0):
    """Embeddings = a large speaker offset + a small emotion direction + noise."""
    rng = np.random.default_rng(seed)
    directions = rng.normal(0, 1, (classes, dim))
    emb, labels, speakers = [], [], []
    for s in range(n_speakers):
        offset = rng.normal(0, 4, dim)
        for c in range(classes):
            for _ in range(per_class):
                emb.append(offset + directions[c] + rng.normal(0, 0.5, dim))
                labels.append(c)
                speakers.append(f"s{s}")
    return np.array(emb), np.array(labels), np.array(speakers)


def test_context_is_the_same_speakers_other_clips():
    emb, labels, speakers = synthetic()
    rng = np.random.default_rng(1)
    candidates = np.arange(len(labels))
    for i in (0, 50, 300):
        ctx = context_indices(i, candidates, speakers, labels, 8, None, rng)
        assert len(ctx) == 8 and i not in ctx and set(speakers[ctx]) == {speakers[i]}
        assert len(set(ctx)) == 8  # without replacement
        same = context_indices(i, candidates, speakers, labels, 8, 0.5, rng)
        assert i not in same and set(speakers[same]) == {speakers[i]}
        assert np.sum(labels[same] == labels[i]) >= 4
        # asking for more same-emotion clips than exist takes all there are (5 besides i), the rest at random
        every = context_indices(i, candidates, speakers, labels, 8, 1.0, rng)
        assert np.sum(labels[every] == labels[i]) >= 5 and i not in every


def test_probe_sees_speaker_offsets_and_same_emotion_contexts():
    """With large speaker offsets, centring by random earlier clips beats the raw head; centring by
    clips of the same emotion removes the emotion itself."""
    emb, labels, speakers = synthetic()
    logits = np.zeros((len(labels), 7))
    train_idx = np.where(np.isin(speakers, [f"s{s}" for s in range(5)]))[0]
    val_idx = np.setdiff1d(np.arange(len(labels)), train_idx)
    res = probe_fold(emb, logits, labels, speakers, train_idx, val_idx, c=1.0)
    raw = res["raw embedding, linear head"][0]
    random20 = next(v for k, v in res.items() if k.startswith("centred by 20 other clips, random"))[0]
    same8 = next(v for k, v in res.items() if k.startswith("centred by 8 other clips, 100%"))[0]
    assert abs(res["own head"][0] - 1 / 7) < 1e-3  # constant logits: chance
    assert random20 > raw + 0.1 and res["centred by all of the speaker's clips"][0] > raw + 0.1
    assert same8 < random20 - 0.2
