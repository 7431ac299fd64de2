"""The teacher's probe through telephone channels (train/probes/teacher_channels.py)."""

import numpy as np
import pytest

from emostream.model import CLASSES
from train.config import ConfigError, load_config
from train.teacher import TeacherFeatures

from .test_teacher import CONFIGS, _synthetic


def test_probe_scores_each_channel_with_heads_fitted_on_clean_and_on_clean_plus_channel():
    from train.data import Clip
    from train.probes.teacher_channels import probe_channels, probe_markdown

    clean, labels, speakers = _synthetic(n_speakers=8, per_class=3, dim=16)
    rng = np.random.default_rng(1)
    lost = TeacherFeatures(rng.normal(size=clean.frames.shape).astype(np.float16), clean.offsets)  # no emotion left
    clips = [Clip(f"c{i}.wav", CLASSES[y], s, "tiny") for i, (y, s) in enumerate(zip(labels, speakers))]
    cfg = load_config(CONFIGS / "distill_layer3.yaml")
    folds = np.array([int(s[1:]) % 4 for s in speakers])
    rows = probe_channels(cfg, clips, clean, {"lost": lost}, folds)
    got = {(r.fitted_on, r.scored_on): r for r in rows}
    assert set(got) == {("full", "full"), ("full", "lost"), ("full + lost", "full"), ("full + lost", "lost")}
    assert got["full", "full"].ua > 0.9 and got["full", "full"].roc_auc > 0.95
    assert got["full", "lost"].ua < 0.4 and 0 <= got["full", "lost"].neutral_recall <= 1
    table = probe_markdown(rows, "protocol")
    assert "| full + lost | lost |" in table and table.count("\n| full") == 4


def test_channel_copies_are_g712_and_computed_once(tmp_path):
    from train.data import AudioCache
    from train.probes.teacher_channels import channel_copies

    rng = np.random.default_rng(0)
    clips = [rng.normal(size=n).astype(np.float32) * 0.1 for n in (16000, 24000)]
    samples = np.concatenate([(x * 32767).astype(np.int16) for x in clips])
    cache = AudioCache(samples, np.array([0, 16000, 40000]))
    copies = channel_copies(cache, "g712", tmp_path)
    assert [copies.clip_length(i) for i in range(2)] == [16000, 24000]
    spectrum = np.abs(np.fft.rfft(copies.clip(1))) ** 2
    freqs = np.fft.rfftfreq(24000, 1 / 16000)
    assert spectrum[freqs > 4500].sum() < 1e-3 * spectrum[(freqs > 500) & (freqs < 3000)].sum()
    stored = sorted(tmp_path.glob("channel-g712-*.npy"))
    assert len(stored) == 2  # the copies and their offsets
    again = channel_copies(cache, "g712", tmp_path)
    assert np.array_equal(np.asarray(again.samples), np.asarray(copies.samples))
    assert sorted(tmp_path.glob("channel-g712-*.npy")) == stored


def test_phone_targets_key_is_checked(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {CONFIGS / 'distill_layer3_phone.yaml'}\nemostream:\n  distill:\n    phone_targets: line\n")
    with pytest.raises(ConfigError, match="phone_targets: 'line' is not supported"):
        load_config(cfg)
    assert load_config(CONFIGS / "distill_layer3_phone_copy.yaml").distill.phone_targets == "copy"
    assert load_config(CONFIGS / "distill_layer3_phone.yaml").distill.phone_targets == "source"
