"""The student-teacher gap probe (train/probes/teacher_gap.py): its figures and the teacher's targets."""

import numpy as np
import pytest

from emostream.model import CLASSES
from train.probes.teacher_gap import gap_metrics, main, teacher_targets
from train.teacher import FoldTeacher

from .test_teacher import _synthetic


def test_gap_metrics_agreement_and_kl():
    rng = np.random.default_rng(0)
    labels = np.arange(70) % 7
    teacher = rng.normal(size=(70, 7)) + 4 * np.eye(7)[labels]
    same = gap_metrics(teacher, teacher, labels, 2.0)
    assert same["agreement"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-9)
    assert same["student_ua"] == same["teacher_ua"] > 0.9
    # a student that ignores the input: uniform output, top classes agree only by chance
    flat = gap_metrics(np.zeros((70, 7)) + rng.normal(0, 1e-3, (70, 7)), teacher, labels, 2.0)
    assert flat["agreement"] < 0.4 and flat["student_ua"] < 0.4 and flat["teacher_ua"] == same["teacher_ua"]
    p = np.exp(teacher / 2) / np.exp(teacher / 2).sum(1, keepdims=True)
    assert flat["kl"] == pytest.approx(np.mean(np.sum(p * np.log(p * 7), 1)), rel=1e-2)  # KL to uniform
    # a softer temperature brings the two distributions closer
    assert (
        gap_metrics(np.zeros((70, 7)), teacher, labels, 8.0)["kl"]
        < gap_metrics(np.zeros((70, 7)), teacher, labels, 2.0)["kl"]
    )


def test_teacher_targets_are_the_training_targets_and_the_reported_teacher():
    feats, labels, speakers = _synthetic()
    val = np.array([i for i, s in enumerate(speakers) if s in ("s0", "s1")])
    train = np.array([i for i, s in enumerate(speakers) if s not in ("s0", "s1")])
    teacher = FoldTeacher(feats, labels, speakers, train, len(CLASSES))
    out = teacher_targets(teacher, train, val, len(labels))
    for i in train[:5]:
        assert np.allclose(out[i], teacher.inner_heads[teacher.head_of[i]].logits(feats.pool(int(i))))
    assert np.allclose(out[val], teacher.clip_logits(val))


def test_cli_needs_a_teacher_and_a_checkpoint(tmp_path, capsys):
    from .test_teacher import CONFIGS

    assert main(["--config", str(CONFIGS / "augmented.yaml"), "--run", str(tmp_path)]) == 2
    assert "no emostream.distill.teacher" in capsys.readouterr().err


def test_cli_rejects_a_placement_count_below_one(tmp_path, capsys):
    from .test_teacher import CONFIGS

    with pytest.raises(SystemExit) as exit_:
        main(["--config", str(CONFIGS / "distill_layer3.yaml"), "--run", str(tmp_path), "--positions", "0"])
    assert exit_.value.code == 2 and "--positions" in capsys.readouterr().err
