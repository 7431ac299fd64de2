"""Distillation teacher: directory checks, frame pooling, honest per-fold heads, a tiny KD run."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from emostream.model import CLASSES
from train.batches import crop_layout, crop_span, make_batch, window_segments
from train.config import ConfigError, load_config
from train.fit import time_cells
from train.forward import training_forward
from train.losses import FrameProjector, embedding_loss, frame_embedding_loss, loss_fn
from train.teacher import (
    CELL_MIN_AUDIO,
    ENCODER_FRAME_SAMPLES,
    FoldTeacher,
    TeacherError,
    TeacherFeatures,
    check_teacher_dir,
    clip_frames,
    frame_span,
)

from .conftest import ROOT, TEST_BACKBONE, fit_whole_and_resumed

CONFIGS = ROOT / "train" / "configs"
TEACHER_DIR = ROOT.parent / "shared" / "models" / "faster-whisper-base"


# --- teacher directory ---------------------------------------------------------------------------


def test_missing_teacher_is_a_clear_error_naming_the_path(tmp_path):
    with pytest.raises(TeacherError, match=str(tmp_path / "nope")):
        check_teacher_dir(tmp_path / "nope")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(TeacherError, match="missing model.bin"):
        check_teacher_dir(tmp_path / "half")
    (tmp_path / "half" / "model.bin").write_bytes(b"\0")
    (tmp_path / "half" / "config.json").write_text("{not json")
    with pytest.raises(TeacherError, match="config.json is not valid JSON"):
        check_teacher_dir(tmp_path / "half")


def test_train_cli_reports_a_bad_teacher_in_one_line(tmp_path, capsys):
    from train.__main__ import main

    code = main(
        [
            "teacher",
            "--config",
            str(CONFIGS / "distill.yaml"),
            "--teacher",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: teacher not found") and str(tmp_path / "missing") in err
    assert len(err.strip().splitlines()) == 1


def test_distill_config_keys_are_checked(tmp_path):
    cfg = load_config(CONFIGS / "distill.yaml")
    assert cfg.distill.teacher.endswith("faster-whisper-base") and cfg.distill.alpha == 0.5
    assert load_config(CONFIGS / "utterance_norm.yaml").distill.teacher is None
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"base: {CONFIGS / 'distill.yaml'}\nemostream:\n  distill:\n    alpah: 0.3\n")
    with pytest.raises(ConfigError, match="emostream.distill.alpah"):
        load_config(bad)
    bad.write_text(f"base: {CONFIGS / 'distill.yaml'}\nemostream:\n  distill:\n    alpha: 1.5\n")
    with pytest.raises(ConfigError, match="alpha"):
        load_config(bad)
    bad.write_text(f"base: {CONFIGS / 'distill.yaml'}\nemostream:\n  distill:\n    speaker_centre: true\n")
    with pytest.raises(ConfigError, match="speaker_centre.*supported: none, heads, all"):
        load_config(bad)
    assert load_config(CONFIGS / "distill_centred.yaml").distill.speaker_centre == "all"
    assert load_config(CONFIGS / "distill.yaml").distill.speaker_centre == "none"
    bad.write_text(f"base: {CONFIGS / 'distill.yaml'}\nemostream:\n  distill:\n    embed_weight: -1\n")
    with pytest.raises(ConfigError, match="embed_weight"):
        load_config(bad)
    bad.write_text(f"base: {CONFIGS / 'distill.yaml'}\nemostream:\n  distill:\n    frame_weight: -0.5\n")
    with pytest.raises(ConfigError, match="frame_weight"):
        load_config(bad)
    assert load_config(CONFIGS / "distill_embed.yaml").distill.embed_weight > 0


# --- frames and pooling --------------------------------------------------------------------------


def test_frame_span_covers_exactly_the_crop():
    f = ENCODER_FRAME_SAMPLES
    assert clip_frames(1) == 1 and clip_frames(f) == 1 and clip_frames(f + 1) == 2
    assert frame_span(0, f, 100) == (0, 1)
    assert frame_span(10 * f, 5 * f, 100) == (10, 15)
    assert frame_span(10 * f + 5, 5 * f, 100) == (10, 16)  # partly covered frames count
    assert frame_span(0, 10_000 * f, 100) == (0, 100)  # clipped to the clip
    assert frame_span(99 * f + 300, 1, 100) == (99, 100)  # never empty


def test_pool_averages_only_the_frames_of_the_crop():
    frames = np.arange(20, dtype=np.float16)[:, None].repeat(3, axis=1)  # frame i holds value i
    feats = TeacherFeatures(frames, np.array([0, 8, 20]))
    assert feats.pool(0)[0] == pytest.approx(3.5)  # clip 0 = frames 0..7
    assert feats.pool(1, 2 * ENCODER_FRAME_SAMPLES, 3 * ENCODER_FRAME_SAMPLES)[0] == pytest.approx(11.0)  # 10,11,12


def test_crop_span_reports_what_the_window_holds():
    rng = np.random.default_rng(0)
    long = np.arange(200_000, dtype=np.float32)
    window, start, length = crop_span(long, rng, random_offset=False)
    assert length == len(window) == 96_000 and np.array_equal(window, long[start : start + length])
    short = np.ones(16_000, dtype=np.float32)
    window, start, length = crop_span(short, rng, random_offset=True)
    assert (start, length) == (0, 16_000) and window.sum() == 16_000


def test_window_segments_say_where_each_clip_sits_in_the_window():
    rng = np.random.default_rng(3)
    short = np.arange(1, 16_001, dtype=np.float32)
    window, start, length, offset = crop_layout(short, rng, random_offset=True)
    assert np.array_equal(window[offset : offset + length], short) and not window[:offset].any()
    # a turn: clip 5 (30 000 samples) at 0, clip 7 (70 000) at 40 000; window from sample 20 000
    segs = window_segments([(5, 0, 30_000), (7, 40_000, 70_000)], 20_000, 0)
    assert segs == [(5, 20_000, 0, 10_000), (7, 0, 20_000, 70_000)]
    # a turn shorter than the window is placed whole at the offset
    assert window_segments([(5, 0, 30_000), (7, 40_000, 20_000)], 0, 1_000) == [
        (5, 0, 1_000, 30_000),
        (7, 0, 41_000, 20_000),
    ]


def test_cell_targets_pool_exactly_the_frames_inside_each_cell():
    """Frame value = its index: a cell's target is the mean index of the frames its audio covers,
    standardised with the head's statistics; cells mostly made of padding are masked out."""
    from emostream.audio import WINDOW_SAMPLES

    f = ENCODER_FRAME_SAMPLES
    n_frames = [400, 100]  # clip 0: 8 s, clip 1: 2 s
    frames = np.concatenate([np.arange(n, dtype=np.float16) for n in n_frames])[:, None].repeat(2, axis=1)
    feats = TeacherFeatures(frames.astype(np.float16), np.array([0, 400, 500]))
    teacher = FoldTeacher.__new__(FoldTeacher)
    teacher.features, teacher.target_centre = feats, None
    teacher.target_mean, teacher.target_scale = np.zeros(2), np.ones(2)
    cells = 6
    # a cell is WINDOW_SAMPLES // cells = 16 000 samples = 50 frames
    # window 0: clip 0 from its sample 10 f; window 1: clip 1 (2 s) at window sample 3.5 s
    segs = [[(0, 10 * f, 0, WINDOW_SAMPLES)], [(1, 0, 56_000, 100 * f)]]
    out, mask = teacher.cell_embeddings(segs, cells)
    assert out.shape == (2, cells, 2) and mask[0].all()
    for c in range(cells):
        assert out[0, c, 0] == pytest.approx(10 + 50 * c + 24.5)  # frames 10+50c .. 10+50c+49
    # clip 1 fills window samples 56 000-88 000: cells 3 (half: 56 000-64 000) and 4 (whole), 5 (half)
    assert mask[1].tolist() == [False, False, False, True, True, True]
    assert CELL_MIN_AUDIO == 0.5 and not out[1, :3].any()
    assert out[1, 3, 0] == pytest.approx(np.arange(0, 25).mean())  # its first 0.5 s
    assert out[1, 4, 0] == pytest.approx(np.arange(25, 75).mean())
    # the standardisation of the pooled embedding applies to every cell
    teacher.target_mean, teacher.target_scale = np.full(2, 10.0), np.full(2, 2.0)
    again, _ = teacher.cell_embeddings(segs, cells)
    assert again[0, 0, 0] == pytest.approx((34.5 - 10) / 2)
    # and so does a speaker centre, per clip, before the standardisation
    teacher.target_centre = np.array([[4.0, 4.0], [-6.0, -6.0]])
    centred, _ = teacher.cell_embeddings(segs, cells)
    assert centred[0, 0, 0] == pytest.approx((34.5 - 4 - 10) / 2)
    assert centred[1, 4, 0] == pytest.approx((np.arange(25, 75).mean() + 6 - 10) / 2)


def test_frame_loss_ignores_masked_cells_and_the_projector_keeps_the_cells():
    target = torch.randn(2, 6, 8)
    mask = torch.tensor([[True] * 6, [True, True, False, False, False, False]])
    noisy = target.clone()
    noisy[1, 2:] = -target[1, 2:]  # wrong only where masked
    assert float(frame_embedding_loss(noisy * 2.0, target, mask)) == pytest.approx(0.0, abs=1e-6)
    assert float(frame_embedding_loss(-target, target, mask)) == pytest.approx(2.0, abs=1e-5)
    assert float(frame_embedding_loss(target, target, torch.zeros(2, 6, dtype=torch.bool))) == 0.0
    from emostream.model import EmotionNet, ModelConfig

    torch.manual_seed(0)
    model = EmotionNet(ModelConfig()).train()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    assert time_cells(model, torch.device("cpu")) == 6 and model.training  # 6 s window: ~1 s cells
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no statistics moved
    model.eval()
    with torch.no_grad():
        logits, pooled, fmap = training_forward(
            model, torch.randn(2, 96_000), return_embedding=True, return_feature_map=True
        )
    assert fmap.shape == (2, model.backbone.num_features, 4, 6)
    assert torch.allclose(pooled, fmap.float().mean(dim=(2, 3)), atol=1e-4)
    assert FrameProjector(model.backbone.num_features, 512)(fmap).shape == (2, 6, 512)


# --- honest heads --------------------------------------------------------------------------------


def _synthetic(n_speakers=8, per_class=2, dim=16, seed=0):
    rng = np.random.default_rng(seed)
    rows, labels, speakers, counts = [], [], [], []
    centres = rng.normal(size=(len(CLASSES), dim)) * 2
    for s in range(n_speakers):
        for c in range(len(CLASSES)):
            for _ in range(per_class):
                n = int(rng.integers(5, 15))
                rows.append(centres[c] + rng.normal(size=(n, dim)))
                labels.append(c)
                speakers.append(f"s{s}")
                counts.append(n)
    frames = np.concatenate(rows).astype(np.float16)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return TeacherFeatures(frames, offsets), np.array(labels), speakers


def test_nested_teacher_choice_picks_the_informative_features_without_validation_labels():
    """Each fold picks the teacher features from its training speakers alone: the informative
    choice over noise, and the same pick and inner scores whatever the validation labels are."""
    from train.data import Clip, make_folds
    from train.distill import nested_teacher_choice

    feats, labels, speakers = _synthetic()
    noise = TeacherFeatures(np.random.default_rng(1).normal(size=feats.frames.shape).astype(np.float16), feats.offsets)
    clips = [Clip(f"c{i}.wav", CLASSES[y], s) for i, (y, s) in enumerate(zip(labels, speakers))]
    cfg = load_config(ROOT / "train" / "configs" / "distill.yaml")
    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    picks = nested_teacher_choice(cfg, clips, {"noise": noise, "signal": feats}, folds)
    assert [p["fold"] for p in picks] == list(range(cfg.folds)) and all(p["chosen"] == "signal" for p in picks)
    assert all(p["inner_ua"]["signal"] > p["inner_ua"]["noise"] + 0.3 and p["ua"] > 0.6 for p in picks)
    # relabel fold 0's validation clips: fold 0's choice and inner scores stay, its validation UA drops
    relabelled = [
        replace(c, label=CLASSES[(CLASSES.index(c.label) + 1) % len(CLASSES)]) if f == 0 else c
        for c, f in zip(clips, folds)
    ]
    again = nested_teacher_choice(cfg, relabelled, {"noise": noise, "signal": feats}, folds)
    assert again[0]["chosen"] == "signal" and again[0]["inner_ua"] == picks[0]["inner_ua"]
    assert again[0]["ua"] < 0.2 and again[1]["inner_ua"] != picks[1]["inner_ua"]


@pytest.mark.parametrize("centre", ["none", "heads", "all"])
def test_fold_teacher_never_sees_validation_speakers(centre):
    feats, labels, speakers = _synthetic()
    val = np.array([i for i, s in enumerate(speakers) if s in ("s0", "s1")])
    train = np.array([i for i, s in enumerate(speakers) if s not in ("s0", "s1")])
    a = FoldTeacher(feats, labels, speakers, train, len(CLASSES), speaker_centre=centre)
    # scramble everything the validation speakers hold: the teacher must not change
    frames = np.array(feats.frames, dtype=np.float32)
    for i in val:
        frames[feats.offsets[i] : feats.offsets[i + 1]] = (
            np.random.default_rng(i).normal(size=(1, frames.shape[1])) * 50
        )
    scrambled_labels = labels.copy()
    scrambled_labels[val] = (labels[val] + 3) % len(CLASSES)
    b = FoldTeacher(
        TeacherFeatures(frames.astype(np.float16), feats.offsets),
        scrambled_labels,
        speakers,
        train,
        len(CLASSES),
        speaker_centre=centre,
    )
    assert np.allclose(a.head.coef, b.head.coef) and np.allclose(a.head.intercept, b.head.intercept)
    probe = train[:5]
    assert np.allclose(
        a.logits(probe, np.zeros(5, int), np.full(5, 10**6)), b.logits(probe, np.zeros(5, int), np.full(5, 10**6))
    )
    assert (a.head_of[val] == -1).all() and (a.head_of[train] >= 0).all()
    # and the teacher is a real classifier: well above chance on the held-out speakers
    acc = (a.clip_logits(val).argmax(1) == labels[val]).mean()
    assert acc > 0.6


def test_speaker_centred_teacher_ignores_who_is_speaking():
    """Each speaker's voice shifts all their frames by one vector (a speaker-identity confound):
    the centred teacher's heads and targets do not move when a speaker's shift changes, its
    embedding target is the standardised pool less the speaker mean ("all") or the plain one
    ("heads"), and on held-out speakers with strong shifts it beats the plain teacher."""
    feats, labels, speakers = _synthetic(n_speakers=10, dim=16, seed=1)
    spk = np.array(speakers)
    rng = np.random.default_rng(5)
    frames = np.array(feats.frames, dtype=np.float32)
    shift = {s: rng.normal(size=frames.shape[1]) * 6 for s in np.unique(spk)}
    for i, s in enumerate(speakers):
        frames[feats.offsets[i] : feats.offsets[i + 1]] += shift[s]
    shifted = TeacherFeatures(frames.astype(np.float16), feats.offsets)
    val = np.where(np.isin(spk, ["s0", "s1", "s2"]))[0]
    train = np.where(~np.isin(spk, ["s0", "s1", "s2"]))[0]
    plain = FoldTeacher(shifted, labels, speakers, train, len(CLASSES))
    centred = FoldTeacher(shifted, labels, speakers, train, len(CLASSES), speaker_centre="all")
    heads = FoldTeacher(shifted, labels, speakers, train, len(CLASSES), speaker_centre="heads")
    acc = {
        name: (t.clip_logits(val).argmax(1) == labels[val]).mean()
        for name, t in (("plain", plain), ("centred", centred))
    }
    assert acc["centred"] > acc["plain"] + 0.1 and acc["centred"] > 0.6
    zeros, whole = np.zeros(5, int), np.full(5, 10**6)
    assert np.allclose(heads.logits(train[:5], zeros, whole), centred.logits(train[:5], zeros, whole))
    # the centred target of a clip: its pool less its speaker's mean pool, in the training speakers' units
    i = int(train[0])
    mine = np.array([shifted.pool(j) for j in np.where(spk == spk[i])[0]]).mean(axis=0)
    one = centred.embeddings(np.array([i]), np.array([0]), np.array([10**6]))
    assert np.allclose(one[0], (shifted.pool(i) - mine - centred.target_mean) / centred.target_scale, atol=1e-4)
    assert np.allclose(centred.target_mean, centred.head.mean) and np.allclose(centred.target_scale, centred.head.scale)
    # "heads" keeps the plain embedding target, exactly the uncentred teacher's
    assert np.allclose(heads.embeddings(train[:5], zeros, whole), plain.embeddings(train[:5], zeros, whole))
    assert not np.allclose(
        heads.embeddings(train[:5], zeros, whole), centred.embeddings(train[:5], zeros, whole), atol=0.1
    )
    # moving one training speaker's voice moves nothing the centred teacher gives
    s3 = np.where(spk == "s3")[0]
    moved = frames.copy()
    for j in s3:
        moved[feats.offsets[j] : feats.offsets[j + 1]] += 4.0
    again = FoldTeacher(
        TeacherFeatures(moved.astype(np.float16), feats.offsets),
        labels,
        speakers,
        train,
        len(CLASSES),
        speaker_centre="all",
    )
    assert np.allclose(again.head.coef, centred.head.coef, atol=1e-2)
    zeros, whole = np.zeros(len(s3), int), np.full(len(s3), 10**6)
    assert np.allclose(again.logits(s3, zeros, whole), centred.logits(s3, zeros, whole), atol=2e-2)
    assert np.allclose(again.embeddings(s3, zeros, whole), centred.embeddings(s3, zeros, whole), atol=2e-2)
    assert not np.allclose(
        FoldTeacher(
            TeacherFeatures(moved.astype(np.float16), feats.offsets), labels, speakers, train, len(CLASSES)
        ).logits(s3, zeros, whole),
        plain.logits(s3, zeros, whole),
        atol=2e-2,
    )
    with pytest.raises(ValueError, match="speaker_centre"):
        FoldTeacher(shifted, labels, speakers, train, len(CLASSES), speaker_centre="yes")


def test_training_targets_come_from_a_head_without_the_clips_speaker():
    feats, labels, speakers = _synthetic()
    train = np.arange(len(labels))
    teacher = FoldTeacher(feats, labels, speakers, train, len(CLASSES))
    spk = np.array(speakers)
    for j in range(len(teacher.inner_heads)):
        held = np.where(teacher.head_of == j)[0]
        assert len(set(spk[held]) & set(spk[teacher.head_of != j])) == 0  # whole speakers held out
        # scramble the held-out speakers' audio features: head j (their targets' head) must not move
        frames = np.array(feats.frames, dtype=np.float32)
        for i in held:
            frames[feats.offsets[i] : feats.offsets[i + 1]] *= -3.0
        again = FoldTeacher(
            TeacherFeatures(frames.astype(np.float16), feats.offsets), labels, speakers, train, len(CLASSES)
        )
        assert np.array_equal(again.head_of, teacher.head_of)
        assert np.allclose(again.inner_heads[j].coef, teacher.inner_heads[j].coef)


def test_speed_copies_get_their_originals_heads_on_their_own_features():
    """With speed copies appended, the teacher's heads are those fitted on the original clips alone,
    and a copy's target comes from its original's (out-of-speaker) head applied to the copy's own
    encoding, not the original's."""
    from train.data import Clip
    from train.distill import fold_teacher

    feats, labels, speakers = _synthetic()
    n = len(labels)
    rng = np.random.default_rng(5)
    copy_frames = np.concatenate(
        [feats.clip(i).astype(np.float32) + rng.normal(size=(1, feats.frames.shape[1])) for i in range(n)]
    ).astype(np.float16)
    both = feats.extended(TeacherFeatures(copy_frames, feats.offsets))
    assert len(both.offsets) == 2 * n + 1 and np.array_equal(
        both.clip(n + 3), copy_frames[feats.offsets[3] : feats.offsets[4]]
    )
    clips = [Clip(f"c{i}.wav", CLASSES[y], s) for i, (y, s) in enumerate(zip(labels, speakers))]
    clips_x = clips + [Clip(f"c{i}.wav#speed1.1", c.label, c.speaker) for i, c in enumerate(clips)]
    copies = (n + np.arange(n))[:, None]
    cfg = load_config(CONFIGS / "distill.yaml")
    train = np.array([i for i, s in enumerate(speakers) if s not in ("s0", "s1")])
    plain = fold_teacher(cfg, clips, feats, train)
    teacher = fold_teacher(cfg, clips_x, both, train, copies)
    assert np.allclose(plain.head.coef, teacher.head.coef)  # heads fitted on the originals only
    assert all(np.allclose(a.coef, b.coef) for a, b in zip(plain.inner_heads, teacher.inner_heads))
    assert np.array_equal(teacher.head_of[copies[train, 0]], teacher.head_of[train])
    assert (teacher.head_of[copies[np.setdiff1d(np.arange(n), train), 0]] == -1).all()  # validation copies unused
    i = int(train[0])
    start, length = np.array([0]), np.array([10**6])  # whole clips
    got = teacher.logits(np.array([n + i]), start, length)[0]
    want = teacher.inner_heads[teacher.head_of[i]].logits(both.pool(n + i))
    assert np.allclose(got, want) and not np.allclose(got, teacher.logits(np.array([i]), start, length)[0])


def test_phone_lines_labelled_by_their_own_encoding_join_the_heads_fit():
    """``phone_targets: copy``: the heads are fitted on the training clips and their lines together
    (never on a validation speaker's), and a line's target is its source's head on its own features;
    ``source`` keeps the heads of the clean clips alone."""
    from dataclasses import replace

    from train.data import Clip
    from train.distill import fold_teacher

    feats, labels, speakers = _synthetic()
    n = len(labels)
    rng = np.random.default_rng(6)
    line_frames = np.concatenate(
        [feats.clip(i).astype(np.float32) * 0.5 + rng.normal(size=(1, feats.frames.shape[1])) for i in range(n)]
    ).astype(np.float16)
    both = feats.extended(TeacherFeatures(line_frames, feats.offsets))
    clips = [Clip(f"c{i}.wav", CLASSES[y], s) for i, (y, s) in enumerate(zip(labels, speakers))]
    clips_x = clips + [Clip(f"c{i}.wav#phone0", c.label, c.speaker) for i, c in enumerate(clips)]
    phone = (n + np.arange(n))[:, None]
    cfg = load_config(CONFIGS / "distill_layer3_phone_copy.yaml")
    train = np.array([i for i, s in enumerate(speakers) if s not in ("s0", "s1")])
    plain = fold_teacher(cfg, clips, feats, train)
    source = fold_teacher(
        replace(cfg, distill=replace(cfg.distill, phone_targets="source")), clips_x, both, train, phone=phone
    )
    copy = fold_teacher(cfg, clips_x, both, train, phone=phone)
    assert np.allclose(plain.head.coef, source.head.coef)
    assert not np.allclose(plain.head.coef, copy.head.coef)
    # the same fit as heads on the clips and their lines, and by speaker: a line shares its source's head
    from train.teacher import fit_head

    lines_too = np.concatenate([train, phone[train, 0]])
    x = np.stack([both.pool(int(i)) for i in lines_too])
    want = fit_head(x, labels[np.concatenate([train, train])], len(CLASSES), cfg.distill.head_c, cfg.seed)
    assert np.allclose(copy.head.coef, want.coef)
    assert np.array_equal(copy.head_of[phone[train, 0]], copy.head_of[train]) and (copy.head_of[train] >= 0).all()
    held = np.setdiff1d(np.arange(n), train)
    assert (copy.head_of[held] == -1).all() and (copy.head_of[phone[held, 0]] == -1).all()


def test_mixup_mixes_labels_and_every_teacher_target_with_the_same_pairs():
    """Mixup (recipe augmentation.mix_*): each window is lam * its own + (1 - lam) * a partner's, and
    the labels, the teacher's distribution (at temperature T) and its embedding follow the same pairs."""
    from train.data import AudioCache
    from train.metrics import softmax

    feats, labels, speakers = _synthetic(n_speakers=4, per_class=1)
    n = len(labels)
    lengths = np.diff(feats.offsets) * ENCODER_FRAME_SAMPLES
    rng = np.random.default_rng(3)
    samples = (rng.normal(size=int(lengths.sum())) * 3000).astype(np.int16)
    cache = AudioCache(samples, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64))
    teacher = FoldTeacher(feats, labels, speakers, np.arange(n), len(CLASSES))
    base = load_config(CONFIGS / "distill_embed_40ep.yaml")
    base = replace(base, distill=replace(base.distill, frame_weight=0.0))
    mixed_cfg = replace(base, mix_audio="Mixup", mix_probability=1.0, mix_concentration=0.4)
    idx = np.arange(8)
    plain = make_batch(cache, idx, labels, base, np.random.default_rng(0), teacher=teacher)
    mixed = make_batch(cache, idx, labels, mixed_cfg, np.random.default_rng(0), teacher=teacher)
    w, m = plain.waves.numpy(), mixed.waves.numpy()
    t = base.distill.temperature
    p_plain = softmax(plain.teacher_logits.numpy() / t)
    p_mixed = softmax(mixed.teacher_logits.numpy() / t)
    lams = set()
    for i in range(len(idx)):
        # find the partner j and lam that explain window i
        fits = []
        for j in range(len(idx)):
            d = w[i] - w[j]
            lam = 1.0 if not d.any() else float(np.dot(m[i] - w[j], d) / np.dot(d, d))
            if np.allclose(lam * w[i] + (1 - lam) * w[j], m[i], atol=1e-4):
                fits.append((j, lam))
        assert fits, f"window {i} is not a mix of two plain windows"
        j, lam = fits[0]
        lams.add(round(lam, 4))
        assert np.allclose(
            mixed.targets[i].numpy(), lam * plain.targets[i].numpy() + (1 - lam) * plain.targets[j].numpy(), atol=1e-4
        )
        assert np.allclose(p_mixed[i], lam * p_plain[i] + (1 - lam) * p_plain[j], atol=1e-4)
        assert np.allclose(
            mixed.teacher_embedding[i].numpy(),
            lam * plain.teacher_embedding[i].numpy() + (1 - lam) * plain.teacher_embedding[j].numpy(),
            atol=1e-3,
        )
    assert len(lams) == 1 and 0.0 < lams.pop() < 1.0  # one lam per batch, a real mix
    assert not np.allclose(m, w)


def test_kd_loss_is_the_recipe_loss_at_alpha_zero_and_zero_when_matching_the_teacher():
    cfg = load_config(CONFIGS / "distill.yaml")
    logits = torch.randn(6, 7)
    y = torch.eye(7)[torch.arange(6)]
    plain = loss_fn(replace(cfg, distill=replace(cfg.distill, alpha=0.0)), logits, y, logits.clone())
    assert torch.allclose(plain, loss_fn(cfg, logits, y))
    pure = replace(cfg, distill=replace(cfg.distill, alpha=1.0))
    assert float(loss_fn(pure, logits, y, logits.clone())) == pytest.approx(0.0, abs=1e-6)
    assert float(loss_fn(pure, logits, y, -logits)) > 0.1


def test_embedding_regression_loss_and_the_models_pooled_features():
    target = torch.randn(4, 512)
    assert float(embedding_loss(target * 3.0, target)) == pytest.approx(0.0, abs=1e-6)  # scale-free
    assert float(embedding_loss(-target, target)) == pytest.approx(2.0, abs=1e-5)
    from emostream.model import EmotionNet, ModelConfig

    torch.manual_seed(0)
    model = EmotionNet(ModelConfig()).eval()
    x = torch.randn(2, 16000)
    with torch.no_grad():
        logits, features = training_forward(model, x, return_embedding=True)
        assert torch.allclose(logits, model(x), atol=1e-5) and features.shape == (2, model.backbone.num_features)


# --- tiny distillation run with the real teacher ---------------------------------------------------

requires_teacher = pytest.mark.skipif(
    not (TEACHER_DIR / "model.bin").exists(), reason=f"no Whisper teacher at {TEACHER_DIR}"
)


def write_tiny_set(folder, long_first_speaker: bool = False) -> None:
    """A manifest of 4 speakers x (Angry, Sad) speech-like clips of 1 s (speaker 0's 7 s when
    ``long_first_speaker``: longer than a window)."""
    import pandas as pd
    import soundfile as sf

    from .conftest import speechlike

    rows = []
    for spk in range(4):
        for k, label in enumerate(["Angry", "Sad"]):
            name = f"s{spk}_{label}.wav"
            seconds = 1.0 + 6.0 * (spk == 0 and long_first_speaker)
            sf.write(folder / name, speechlike(seconds, f0=120 + 80 * k, seed=spk * 7 + k), 16000)
            rows.append({"path": name, "label": label, "speaker": f"spk{spk}", "corpus": "tiny"})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)


@requires_teacher
def test_tiny_distillation_run_end_to_end(tmp_path):
    pytest.importorskip("ctranslate2")
    from train.cv import cross_validate
    from train.data import build_cache, load_dataset, make_folds
    from train.teacher import build_teacher_cache

    write_tiny_set(tmp_path, long_first_speaker=True)
    clips = load_dataset(tmp_path)
    cache = build_cache(clips, tmp_path / "cache")
    feats = build_teacher_cache(cache, TEACHER_DIR, tmp_path / "cache")
    assert feats.frames.shape[1] == 512
    assert [feats.offsets[i + 1] - feats.offsets[i] for i in range(len(clips))] == [
        clip_frames(cache.clip_length(i)) for i in range(len(clips))
    ]
    assert build_teacher_cache(cache, TEACHER_DIR, tmp_path / "cache").frames.shape == feats.frames.shape  # reused
    cfg = load_config(CONFIGS / "distill.yaml")
    cfg = replace(
        cfg,
        backbone=TEST_BACKBONE,
        epochs=1,
        batch_size=2,
        folds=2,
        exclude_speakers=(),
        distill=replace(cfg.distill, teacher=str(TEACHER_DIR), inner_folds=2),
    )
    folds = make_folds(clips, 2, "speaker", 0)
    # the batch carries teacher logits for its crops
    from train.distill import fold_teacher

    teacher = fold_teacher(cfg, clips, feats, np.where(folds == 1)[0])
    batch = make_batch(
        cache,
        np.where(folds == 1)[0][:2],
        np.array([CLASSES.index(c.label) for c in clips]),
        cfg,
        np.random.default_rng(0),
        teacher=teacher,
    )
    assert batch.teacher_logits.shape == (2, 7) and torch.isfinite(batch.teacher_logits).all()
    assert batch.teacher_embedding is None  # embed_weight 0: no embedding target
    plain = make_batch(
        cache,
        np.where(folds == 1)[0][:2],
        np.array([CLASSES.index(c.label) for c in clips]),
        cfg,
        np.random.default_rng(0),
    )
    assert plain.teacher_logits is None and torch.equal(plain.waves, batch.waves)  # the teacher draws no random numbers
    # embedding regression: the target is the standardised pooled encoder output of the same crop
    cfg = replace(cfg, distill=replace(cfg.distill, embed_weight=1.0))
    emb = make_batch(
        cache,
        np.where(folds == 1)[0][:2],
        np.array([CLASSES.index(c.label) for c in clips]),
        cfg,
        np.random.default_rng(0),
        teacher=teacher,
    )
    assert torch.equal(emb.waves, batch.waves) and emb.teacher_embedding.shape == (2, feats.frames.shape[1])
    i = int(np.where(folds == 1)[0][0])
    whole = (feats.pool(i) - teacher.head.mean) / teacher.head.scale
    one = teacher.embeddings(np.array([i]), np.array([0]), np.array([cache.clip_length(i)]))
    assert np.allclose(one[0], whole, atol=1e-4)
    # the teacher alone on the same folds (`python -m train teacher`), plain and speaker-centred
    from train.distill import teacher_cv

    plain_report = teacher_cv(cfg, clips, feats, folds, tmp_path / "teacher")
    assert (tmp_path / "teacher" / "teacher_report.md").exists() and "centred" not in plain_report["protocol"]
    assert 0 <= plain_report["summary"]["overall"]["ua"]["mean"] <= 1
    centred_cfg = replace(cfg, distill=replace(cfg.distill, speaker_centre="heads"))
    centred_report = teacher_cv(centred_cfg, clips, feats, folds, tmp_path / "teacher_centred")
    assert "centred per speaker" in centred_report["protocol"] and len(centred_report["folds"]) == 2
    report = cross_validate(cfg, clips, cache, folds, tmp_path / "cv", show_progress=False, teacher_features=feats)
    assert "teacher_summary" in report and 0 <= report["teacher_summary"]["overall"]["ua"]["mean"] <= 1
    assert "Distillation teacher" in (tmp_path / "cv" / "cv_report.md").read_text()
    meta = json.loads((tmp_path / "cv" / "fold0" / "checkpoint" / "model.json").read_text())
    assert meta["training"]["config"]["distill"]["alpha"] == 0.5
    # with the embedding term, resuming (model, optimizer and the training-only projection) is exact

    cfg = replace(cfg, epochs=2)
    train_idx = np.where(folds == 1)[0]
    fit_whole_and_resumed(cfg, clips, cache, train_idx, tmp_path / "full", tmp_path / "part", teacher=teacher)
    a, b = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("full", "part"))
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    assert a["projector"] is not None and all(torch.equal(a["projector"][k], b["projector"][k]) for k in a["projector"])
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    # frame regression: the batch carries per-cell teacher targets for the crops taken, drawing no
    # random numbers, and resuming restores the training-only 1x1 projection exactly
    cfg = replace(cfg, distill=replace(cfg.distill, frame_weight=1.0))
    fb = make_batch(
        cache,
        train_idx[:2],
        np.array([CLASSES.index(c.label) for c in clips]),
        cfg,
        np.random.default_rng(0),
        teacher=teacher,
        frame_cells=6,
    )
    eb = make_batch(
        cache,
        train_idx[:2],
        np.array([CLASSES.index(c.label) for c in clips]),
        cfg,
        np.random.default_rng(0),
        teacher=teacher,
    )
    assert torch.equal(fb.waves, eb.waves) and eb.teacher_frames is None
    assert fb.teacher_frames.shape == (2, 6, feats.frames.shape[1]) and fb.teacher_frame_mask.any()
    assert torch.isfinite(fb.teacher_frames).all() and not fb.teacher_frames[~fb.teacher_frame_mask].any()
    fit_whole_and_resumed(cfg, clips, cache, train_idx, tmp_path / "ffull", tmp_path / "fpart", teacher=teacher)
    a, b = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("ffull", "fpart"))
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    fp = a["frame_projector"]
    assert fp is not None and all(torch.equal(fp[k], b["frame_projector"][k]) for k in fp)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    from safetensors.torch import load_file

    assert set(load_file(tmp_path / "ffull" / "checkpoint" / "model.safetensors")) == set(
        load_file(tmp_path / "full" / "checkpoint" / "model.safetensors")
    )  # no frame projector shipped

    from emostream.model import EmotionNet, ModelConfig

    shipped = set(load_file(tmp_path / "cv" / "fold0" / "checkpoint" / "model.safetensors"))
    net = EmotionNet(ModelConfig(backbone=TEST_BACKBONE))
    backbone = {k for k in net.state_dict() if k.startswith("backbone.")}  # the front end has no weights
    assert shipped == backbone  # the checkpoint is the backbone alone, no projection


def one_epoch_cv(cfg, data, out) -> int:
    """``python -m train cv`` of config ``cfg`` on the clips in ``data`` with the test teacher, one epoch."""
    from train.__main__ import main

    argv = ["cv", "--config", str(cfg), "--data", str(data), "--teacher", str(TEACHER_DIR), "--epochs", "1"]
    return main(argv + ["--cache", str(data / "cache"), "--out", str(out), "--no-progress"])


@requires_teacher
def test_cv_cli_with_speed_copies_encodes_them_and_reports_the_original_clips(tmp_path, capsys):
    pytest.importorskip("ctranslate2")

    write_tiny_set(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base: {CONFIGS / 'distill.yaml'}\ndataset:\n  folds: ['2']\ntraining:\n  batch_size: 2\n"
        f"architecture:\n  backbone: {TEST_BACKBONE}\n"
        "emostream:\n  exclude_speakers: []\n  distill:\n    inner_folds: 2\n"
        "  augment:\n    speed_factors: [0.9, 1.1]\n    speed_probability: 0.5\n"
    )
    out = tmp_path / "out"
    assert one_epoch_cv(cfg, tmp_path, out) == 0
    capsys.readouterr()
    report = json.loads((out / "cv_report.json").read_text())
    assert report["pooled"]["overall"]["n"] == 8  # the original clips only
    assert report["config"]["augment"]["speed_factors"] == [0.9, 1.1]
    assert len(list((tmp_path / "cache").glob("speed-*.offsets.npy"))) == 1
    assert len(list((tmp_path / "cache").glob("teacher-*.offsets.npy"))) == 2  # the originals' and the copies'
    assert "speed copies at 0.9, 1.1" in (out / "train.log").read_text()


@requires_teacher
def test_cv_cli_labels_phone_lines_by_the_teacher_on_the_line_itself(tmp_path, capsys):
    pytest.importorskip("ctranslate2")

    write_tiny_set(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base: {CONFIGS / 'distill.yaml'}\ndataset:\n  folds: ['2']\ntraining:\n  batch_size: 2\n"
        f"architecture:\n  backbone: {TEST_BACKBONE}\n"
        "emostream:\n  exclude_speakers: []\n  distill:\n    inner_folds: 2\n    layers: [1]\n"
        "    phone_targets: copy\n  augment:\n    phone_copies: 1\n    phone_probability: 0.5\n"
    )
    out = tmp_path / "out"
    assert one_epoch_cv(cfg, tmp_path, out) == 0
    capsys.readouterr()
    report = json.loads((out / "cv_report.json").read_text())
    assert report["pooled"]["overall"]["n"] == 8  # the original clips only
    assert report["config"]["distill"]["phone_targets"] == "copy"
    assert len(list((tmp_path / "cache").glob("phone-*.offsets.npy"))) == 1
    # the originals' and the lines' own encodings, each through the encoder cut after block 1
    assert len(list((tmp_path / "cache").glob("teacher-*-B1.npy"))) == 2
    assert len(list((tmp_path / "cache").glob("teacher-*-L1.npy"))) == 2
