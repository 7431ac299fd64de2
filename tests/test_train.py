"""Training pipeline: config loading, datasets, folds, metrics, tiny end-to-end fit and resume."""

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from emostream.model import CLASSES, Predictor, load_checkpoint
from train.config import ConfigError, load_config
from train.cv import cross_validate
from train.data import DataError, build_cache, canonical_label, config_clips, load_dataset, make_folds
from train.evaluate import predict_logits
from train.fit import FitOptions, fit
from train.metrics import classification_metrics, expected_calibration_error, fit_temperature, softmax

from .conftest import ROOT, SHARED_DATA, TEST_BACKBONE, fit_whole_and_resumed, requires_shared, speechlike

RECIPE = ROOT / "train" / "configs" / "recipe.yaml"
CONFIGS = ROOT / "train" / "configs"


# --- config ------------------------------------------------------------------------------------------


def test_seed_recipe_loads_as_is_with_pretrained_weights(tmp_path):
    cfg = load_config(RECIPE, pretrained_path=str(tmp_path / "w.pth"))
    assert (cfg.batch_size, cfg.learning_rate, cfg.epochs, cfg.optimizer, cfg.schedule, cfg.loss) == (
        32,
        1e-3,
        5,
        "AdamW",
        "Cosine",
        "BCE",
    )
    assert (cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.f_min) == (2048, 512, 128, 50)
    assert cfg.f_max == 8000 and any("Nyquist" in n for n in cfg.notes)
    assert cfg.group_by == "audio" and any("leaks" not in n and "overstate" in n for n in cfg.notes)
    assert cfg.folds == 4 and cfg.drop_last and cfg.gradient_clip == 0 and cfg.warmup_epochs == 0


def test_seed_recipe_pretrained_without_weights_is_a_clear_error():
    with pytest.raises(ConfigError, match="--pretrained PATH"):
        load_config(RECIPE)
    assert load_config(RECIPE, pretrained=False).pretrained is False


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "recipe.yaml"))
def test_project_configs_load(name):
    cfg = load_config(CONFIGS / name)
    assert cfg.group_by == {"recipe_file_folds.yaml": "audio", "loco.yaml": "corpus"}.get(name, "speaker")
    assert not cfg.pretrained and cfg.seed == 42
    assert set(cfg.exclude_speakers) == set((ROOT / "examples" / "reserved_speakers.txt").read_text().split())


def test_utterance_norm_config_reaches_the_model():
    from train.fit import build_model

    cfg = load_config(CONFIGS / "utterance_norm.yaml")
    assert cfg.normalize == "utterance" and cfg.epochs == 5
    assert build_model(cfg).frontend.config.normalize == "utterance"


@pytest.mark.parametrize(
    "patch,message",
    [
        ({"training": {"warp_speed": 1}}, "training.warp_speed"),
        ({"training": {"optimizer": "Lion"}}, "training.optimizer"),
        ({"audio": {"sample_rate": 8000}}, "audio.sample_rate"),
        ({"logging": {"logger": "Neptune"}}, "logging.logger"),
        ({"dataset": {"test_dataframe": "x.pq"}}, "dataset.test_dataframe"),
        ({"emostream": {"augment": {"wobble": 1}}}, "emostream.augment.wobble"),
        ({"bogus": 1}, "bogus"),
        ({"emostream": {"normalize": "global"}}, "emostream.normalize"),
        ({"emostream": {"augment": {"vtlp_probability": 1.5}}}, "emostream.augment.vtlp_probability"),
        ({"emostream": {"augment": {"telephone_probability": -0.1}}}, "emostream.augment.telephone_probability"),
        ({"emostream": {"augment": {"vtlp_range": [1.1, 0.9]}}}, "emostream.augment.vtlp_range"),
        ({"emostream": {"ema_decay": 1.0}}, "emostream.ema_decay"),
        ({"emostream": {"ema_decay": "slow"}}, "emostream.ema_decay"),
        ({"emostream": {"drop_path": 1.0}}, "emostream.drop_path"),
        ({"emostream": {"drop_path": "some"}}, "emostream.drop_path"),
        ({"emostream": {"inference_positions": 0}}, "emostream.inference_positions"),
        ({"emostream": {"inference_positions": 2.5}}, "emostream.inference_positions"),
        ({"emostream": {"training_seed": -1}}, "emostream.training_seed"),
        ({"emostream": {"training_seed": "lucky"}}, "emostream.training_seed"),
        ({"emostream": {"augment": {"speed_factors": [0.9, 1.0]}}}, "emostream.augment.speed_factors"),
        ({"emostream": {"augment": {"speed_factors": [0.9, 0.9]}}}, "emostream.augment.speed_factors"),
        ({"emostream": {"augment": {"speed_factors": [3.0]}}}, "emostream.augment.speed_factors"),
        ({"emostream": {"augment": {"speed_probability": 0.5}}}, "emostream.augment.speed_probability"),
        ({"emostream": {"augment": {"phone_probability": 0.5}}}, "emostream.augment.phone_probability"),
        ({"emostream": {"augment": {"phone_copies": -1}}}, "emostream.augment.phone_copies"),
        (
            {"emostream": {"augment": {"speed_factors": [0.9, 1.1]}, "distill": {"speaker_centre": "heads"}}},
            "emostream.distill.speaker_centre",
        ),
    ],
)
def test_unsupported_keys_are_rejected_by_name(tmp_path, patch, message):
    import yaml

    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"base": str(RECIPE), "architecture": {"pretrained": False}, **patch}))
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path)


# --- datasets ----------------------------------------------------------------------------------------


def write_clip(path: Path, seconds: float, seed: int, sr: int = 16000) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, speechlike(seconds, sr=sr, f0=100 + 20 * (seed % 7), seed=seed), sr)


def test_label_spellings():
    assert canonical_label("Suprised") == "Surprised" and canonical_label("anger") == "Angry"
    with pytest.raises(DataError):
        canonical_label("bored")


def test_folder_tree_layout(tmp_path):
    for k, cls in enumerate(["Angry", "Suprised", "Neutral"]):
        write_clip(tmp_path / "Emotions" / cls / f"10{k}1_IEO_{cls[:3].upper()}_HI.wav", 1.0, k)
    clips = load_dataset(tmp_path)
    assert sorted(c.label for c in clips) == ["Angry", "Neutral", "Surprised"]
    assert clips[0].speaker.startswith("crema_")


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_hydrogen_torch_dataframe(tmp_path, fmt):
    import pandas as pd

    write_clip(tmp_path / "audio" / "a.wav", 1.0, 0, sr=22050)
    write_clip(tmp_path / "audio" / "b.wav", 1.0, 1)
    df = pd.DataFrame({"audio": ["a.wav", "b.wav"], "class": ["Happy", "Sad"]})
    table = tmp_path / f"train.{fmt}"
    df.to_csv(table, index=False) if fmt == "csv" else df.to_parquet(table)
    clips = load_dataset(table, data_folder=tmp_path / "audio")
    assert [c.label for c in clips] == ["Happy", "Sad"]
    cache = build_cache(clips, tmp_path / "cache")
    assert len(cache) == 2 and len(cache.clip(0)) == 16000  # resampled from 22.05 kHz
    with pytest.raises(DataError, match="missing column"):
        load_dataset(table, audio_column="file")


@requires_shared()
def test_shared_manifest_and_speaker_folds_never_share_a_speaker():
    clips = load_dataset(SHARED_DATA)
    assert len(clips) == 1782 and {c.corpus for c in clips} == {"ravdess", "emodb", "emovo"}
    folds = make_folds(clips, 4, "speaker", 42)
    speakers = [{c.speaker for c, f in zip(clips, folds) if f == k} for k in range(4)]
    for a in range(4):
        for b in range(a + 1, 4):
            assert not speakers[a] & speakers[b]
    # stratified: every fold holds every class
    for k in range(4):
        assert {c.label for c, f in zip(clips, folds) if f == k} == set(CLASSES)
    by_file = make_folds(clips, 4, "audio", 42)
    leaked = [{c.speaker for c, f in zip(clips, by_file) if f == k} for k in range(2)]
    assert leaked[0] & leaked[1]  # the recipe's per-file grouping puts the same voices on both sides


# --- metrics -----------------------------------------------------------------------------------------


def test_metrics_match_hand_computed_values():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.full((6, 7), 0.01)
    pred = [0, 1, 1, 1, 2, 0]
    for i, p in enumerate(pred):
        probs[i, p] = 0.94
    m = classification_metrics(probs / probs.sum(1, keepdims=True), y)
    # recalls: class0 1/2, class1 2/2, class2 1/2 -> UA = 2/3; accuracy 4/6
    assert m["ua"] == pytest.approx(2 / 3) and m["accuracy"] == pytest.approx(4 / 6)
    # F1: c0 P=1/2 R=1/2 -> .5; c1 P=2/3 R=1 -> .8; c2 P=1 R=.5 -> 2/3
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["per_class_recall"] == {"Angry": 0.5, "Disgusted": 1.0, "Fearful": 0.5}
    assert m["confusion"][0][:3] == [1, 1, 0]


def test_ece_and_temperature():
    probs = np.array([[0.9, 0.1] + [0] * 5, [0.6, 0.4] + [0] * 5])
    # bin of 0.9: correct (acc 1) gap .1; bin of 0.6: wrong (acc 0) gap .6 -> (0.1 + 0.6) / 2
    assert expected_calibration_error(probs, np.array([0, 1])) == pytest.approx(0.35)
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=2.0, size=(4000, 7))
    p = softmax(logits)
    y = np.array([rng.choice(7, p=row) for row in p])  # labels drawn from softmax(logits): T = 1 is calibrated
    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.15)
    assert fit_temperature(logits * 3, y) == pytest.approx(3.0, rel=0.15)  # over-confident logits need T ~ 3
    assert np.allclose(softmax(logits).sum(1), 1)


# --- tiny end-to-end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    import pandas as pd

    root = tmp_path_factory.mktemp("tiny")
    rows = []
    for spk in range(4):
        for k, label in enumerate(["Angry", "Sad"]):
            for rep in range(2):
                name = f"s{spk}_{label}_{rep}.wav"
                write_clip(root / name, 1.5 + rep * 5.5, seed=spk * 10 + k * 3 + rep)
                rows.append({"path": name, "label": label, "speaker": f"spk{spk}", "corpus": "tiny"})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    clips = load_dataset(root)
    cache = build_cache(clips, root / "cache")
    # every training feature at once: augmented.yaml's augmentations + SpecAugment, the shipped
    # model's utterance normalisation, the floor-noise augmentation, VTLP, stochastic depth and the
    # weight average
    cfg = load_config(CONFIGS / "augmented.yaml")
    cfg = replace(
        cfg,
        backbone=TEST_BACKBONE,
        epochs=2,
        batch_size=4,
        exclude_speakers=(),
        normalize="utterance",
        ema_decay=0.9,
        drop_path=0.1,
        augment=replace(
            cfg.augment, floor_noise_dbfs=(-80.0, -50.0), floor_noise_probability=0.5, vtlp_probability=0.5
        ),
    )
    return root, clips, cache, cfg


def test_tiny_fit_checkpoint_loads_in_emostream_with_same_logits(tiny, tmp_path, capsys):
    root, clips, cache, cfg = tiny
    folds = make_folds(clips, 2, "speaker", 0)
    train_idx, val_idx = np.where(folds == 1)[0], np.where(folds == 0)[0]
    res = fit(cfg, clips, cache, train_idx, val_idx, tmp_path / "run", FitOptions(show_progress=False))
    assert len(res.history) == 2 and "ua" in res.history[-1]
    assert (tmp_path / "run" / "curves.png").exists()
    assert {"ema_ua", "ema_roc_auc"} <= set(res.history[-1])
    # the saved weights (the weight average), loaded the way `emostream` loads them, give the
    # training-time logits of those weights
    state = torch.load(tmp_path / "run" / "state.pt", weights_only=False)
    from train.fit import build_model

    model = build_model(cfg)
    model.load_state_dict(state["ema"])
    train_logits = predict_logits(model.eval(), [cache.clip(i) for i in val_idx], torch.device("cpu"), False)
    predictor = Predictor.from_checkpoint(res.checkpoint, device="cpu", mixed_precision=False)
    from emostream.stream import fixed_chunks

    served = np.stack([predictor.logits(fixed_chunks(cache.clip(i))).mean(0).numpy() for i in val_idx])
    assert np.abs(served - train_logits).max() < 0.05 * max(1.0, np.abs(train_logits).max())
    from emostream.cli import main

    assert (
        main(["classify", clips[val_idx[0]].path, "--json", "--checkpoint", str(res.checkpoint), "--vad", "off"]) == 0
    )  # synthetic clips: no voice for the speech gate
    assert json.loads(capsys.readouterr().out)["label"] in CLASSES
    # `python -m train evaluate` scores every clip as classify does by default (mean logit over 5
    # placements, calibrated softmax); its report says so and its UA is that of those logits
    from train.__main__ import main as train_main

    assert (
        train_main(
            [
                "evaluate",
                "--checkpoint",
                str(res.checkpoint),
                "--data",
                str(root),
                "--cache",
                str(root / "cache"),
                "--out",
                str(tmp_path / "eval"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    capsys.readouterr()
    ev = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert ev["positions"] == 5 and "5 placements" in (tmp_path / "eval" / "evaluation.md").read_text()
    placed = predict_logits(
        load_checkpoint(res.checkpoint, "cpu"),
        [cache.clip(i) for i in range(len(clips))],
        torch.device("cpu"),
        False,
        positions=5,
    )
    y = np.array([CLASSES.index(c.label) for c in clips])
    assert ev["metrics"]["overall"]["ua"] == pytest.approx(
        classification_metrics(softmax(placed, ev["temperature"]), y)["ua"], abs=1e-6
    )
    # --speakers: only the clips of the voices listed (the held-out rule's protocol)
    (tmp_path / "voices.txt").write_text("spk1\nspk3\n")
    assert (
        train_main(
            [
                "evaluate",
                "--checkpoint",
                str(res.checkpoint),
                "--data",
                str(root),
                "--speakers",
                str(tmp_path / "voices.txt"),
                "--cache",
                str(root / "cache"),
                "--out",
                str(tmp_path / "ev2"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    ev2 = json.loads((tmp_path / "ev2" / "evaluation.json").read_text())
    assert ev2["speakers"] == ["spk1", "spk3"] and ev2["clips"] == 8 and ev["clips"] == 16
    (tmp_path / "voices.txt").write_text("nobody\n")
    assert (
        train_main(
            [
                "evaluate",
                "--checkpoint",
                str(res.checkpoint),
                "--data",
                str(root),
                "--speakers",
                str(tmp_path / "voices.txt"),
                "--out",
                str(tmp_path / "ev3"),
            ]
        )
        == 2
    )
    assert "no clips of the speakers" in capsys.readouterr().err
    # --channels: one report per channel copy and one table; full band is the plain evaluation
    assert (
        train_main(
            [
                "evaluate",
                "--checkpoint",
                str(res.checkpoint),
                "--data",
                str(root),
                "--cache",
                str(root / "cache"),
                "--out",
                str(tmp_path / "ch"),
                "--device",
                "cpu",
                "--channels",
                "full,g712,mulaw,g711_alaw",
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "G.712 telephone" in table and "8 kHz μ-law only" in table and "| g711_alaw |" in table
    by_channel = {
        c: json.loads((tmp_path / "ch" / c / "evaluation.json").read_text())["metrics"]["overall"]
        for c in ("full", "g712", "mulaw", "g711_alaw")
    }
    assert by_channel["full"]["ua"] == pytest.approx(ev["metrics"]["overall"]["ua"], abs=1e-9)
    assert by_channel["g712"]["roc_auc"] != by_channel["full"]["roc_auc"]  # another copy of the audio
    with pytest.raises(SystemExit):
        train_main(["evaluate", "--checkpoint", str(res.checkpoint), "--data", str(root), "--channels", "gsm"])
    assert "unknown channel 'gsm'" in capsys.readouterr().err


def test_resume_reproduces_uninterrupted_run(tiny, tmp_path):
    root, clips, cache, cfg = tiny
    idx = np.arange(len(clips))
    fit(cfg, clips, cache, idx, None, tmp_path / "full", FitOptions(show_progress=False))
    part = fit(cfg, clips, cache, idx, None, tmp_path / "part", FitOptions(show_progress=False, stop_after=1))
    assert part.stopped and not (tmp_path / "part" / "checkpoint").exists()
    state = torch.load(tmp_path / "part" / "state.pt", weights_only=False)
    assert state["epoch"] == 1
    fit(cfg, clips, cache, idx, None, tmp_path / "part", FitOptions(resume=True, show_progress=False))
    a = torch.load(tmp_path / "full" / "state.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "state.pt", weights_only=False)
    assert b["epoch"] == 2
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
        assert torch.equal(a["ema"][k], b["ema"][k]), k


def test_prefetched_keeps_order_hands_on_errors_and_stops_with_the_consumer():
    import threading
    from contextlib import closing

    from train.batches import prefetched

    for depth in (0, 1, 3):
        assert list(prefetched(iter(range(20)), depth)) == list(range(20))

    def failing():
        yield 1
        yield 2
        raise ValueError("bad clip 3")

    got = []
    with pytest.raises(ValueError, match="bad clip 3"):
        for item in prefetched(failing(), 2):
            got.append(item)
    assert got == [1, 2]  # everything before the failure arrives, in order
    produced = []

    def counting():
        for i in range(1000):
            produced.append(i)
            yield i

    with closing(prefetched(counting(), 2)) as items:
        assert [next(items) for _ in range(3)] == [0, 1, 2]
    assert len(produced) <= 3 + 2 + 1  # the producer stopped at most depth + 1 items ahead
    assert not any(t.name == "batch-prefetch" for t in threading.enumerate())


def test_prefetching_batches_leaves_the_run_unchanged(tiny, tmp_path):
    """Batches prepared on a background thread are the serial loop's batches: same weights, bit for bit."""
    root, clips, cache, cfg = tiny
    cfg = replace(cfg, epochs=1)
    idx = np.arange(len(clips))
    fit(cfg, clips, cache, idx, None, tmp_path / "serial", FitOptions(show_progress=False, prefetch=0))
    fit(cfg, clips, cache, idx, None, tmp_path / "ahead", FitOptions(show_progress=False, prefetch=2))
    a, b = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("serial", "ahead"))
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_training_seed_changes_the_student_only(tiny, tmp_path):
    """``emostream.training_seed`` reseeds the student's training (weights differ) while ``seed`` keeps
    the folds; setting it to ``seed`` is the same run as leaving it out."""
    root, clips, cache, cfg = tiny
    cfg = replace(cfg, epochs=1)
    idx = np.arange(len(clips))
    runs = {}
    for name, seed in (("default", None), ("same", cfg.seed), ("other", cfg.seed + 1)):
        fit(replace(cfg, training_seed=seed), clips, cache, idx, None, tmp_path / name, FitOptions(show_progress=False))
        runs[name] = torch.load(tmp_path / name / "state.pt", weights_only=False)["model"]
    assert all(torch.equal(runs["default"][k], runs["same"][k]) for k in runs["default"])
    assert not all(torch.equal(runs["default"][k], runs["other"][k]) for k in runs["default"])
    import yaml

    path = tmp_path / "reseeded.yaml"
    path.write_text(
        yaml.safe_dump({"base": str(CONFIGS / "distill_embed_40ep.yaml"), "emostream": {"training_seed": 7}})
    )
    loaded = load_config(path)
    assert (loaded.seed, loaded.training_seed, loaded.student_seed) == (42, 7, 7)


def test_update_ema_moves_floats_and_copies_counts():
    from train.fit import ema_decay_at, update_ema

    model, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(2.0)
    model.num_batches_tracked.fill_(7)
    update_ema(ema, model, 0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 1.5))  # 1 + 0.25 * (3 - 1)
    assert torch.allclose(ema.running_mean, torch.full((3,), 0.5))  # 0 + 0.25 * (2 - 0)
    assert int(ema.num_batches_tracked) == 7
    assert ema_decay_at(0.998, 0) == pytest.approx(0.1) and ema_decay_at(0.998, 10**6) == 0.998


def test_weight_average_leaves_the_training_trajectory_unchanged(tiny, tmp_path):
    """With ``ema_decay`` the raw weights train exactly as without it (their logits are kept as
    ``val_logits_raw.npy``), while the saved model and ``val_logits.npy`` are the average's."""
    root, clips, cache, cfg = tiny
    folds = make_folds(clips, 2, "speaker", 0)
    train_idx, val_idx = np.where(folds == 1)[0], np.where(folds == 0)[0]
    on = fit(cfg, clips, cache, train_idx, val_idx, tmp_path / "on", FitOptions(show_progress=False))
    off = fit(
        replace(cfg, ema_decay=0.0), clips, cache, train_idx, val_idx, tmp_path / "off", FitOptions(show_progress=False)
    )
    raw_keys = ("train_loss", "ua", "roc_auc", "val_loss")
    assert [[h[k] for k in raw_keys] for h in on.history] == [[h[k] for k in raw_keys] for h in off.history]
    assert "ema_ua" not in off.history[-1] and not (tmp_path / "off" / "val_logits_raw.npy").exists()
    np.testing.assert_array_equal(np.load(tmp_path / "on" / "val_logits_raw.npy"), off.val_logits)
    np.testing.assert_array_equal(np.load(tmp_path / "on" / "val_telephone_logits_raw.npy"), off.val_telephone_logits)
    np.testing.assert_array_equal(np.load(tmp_path / "on" / "val_logits.npy"), on.val_logits)
    assert np.abs(on.val_logits - off.val_logits).max() > 1e-4  # the average is another model
    with pytest.raises(ConfigError, match="without emostream.ema_decay"):
        fit(cfg, clips, cache, train_idx, val_idx, tmp_path / "off", FitOptions(resume=True, show_progress=False))


def test_cv_report_and_cli(tiny, tmp_path):
    root, clips, cache, cfg = tiny
    cfg = replace(cfg, epochs=1, folds=2)
    folds = make_folds(clips, 2, "speaker", 0)
    report = cross_validate(cfg, clips, cache, folds, tmp_path / "cv", show_progress=False)
    assert report["protocol"].startswith("2-fold CV grouped by speaker")
    assert set(report["summary"]["overall"]) >= {"ua", "macro_f1", "accuracy", "roc_auc", "ece"}
    assert (tmp_path / "cv" / "cv_report.md").exists() and (tmp_path / "cv" / "confusion.png").exists()
    # resume reuses finished folds
    again = cross_validate(cfg, clips, cache, folds, tmp_path / "cv", resume=True, show_progress=False)
    assert again["pooled"]["overall"]["ua"] == report["pooled"]["overall"]["ua"]


def test_cv_split_across_runs_reports_like_one_run(tiny, tmp_path):
    """Folds trained in separate runs into one directory (``fit --fold K``) give, reported together
    (``cv --folds 0,1 --resume``), the report of one uninterrupted CV; a fold the config lacks is a
    clear error."""
    from train.config import ConfigError

    root, clips, cache, cfg = tiny
    cfg = replace(cfg, epochs=1, folds=2)
    folds = make_folds(clips, 2, "speaker", 0)
    full = cross_validate(cfg, clips, cache, folds, tmp_path / "full", show_progress=False)
    second = cross_validate(cfg, clips, cache, folds, tmp_path / "split", only_folds=[1], show_progress=False)
    assert len(second["folds"]) == 1 and second["pooled"]["overall"]["n"] == int((folds == 1).sum())
    cross_validate(cfg, clips, cache, folds, tmp_path / "split", only_folds=[0], resume=True, show_progress=False)
    both = cross_validate(
        cfg, clips, cache, folds, tmp_path / "split", only_folds=[1, 0], resume=True, show_progress=False
    )
    assert both["pooled"] == full["pooled"] and both["temperatures"] == full["temperatures"]
    with pytest.raises(ConfigError, match="fold 2: this config has folds 0-1"):
        cross_validate(cfg, clips, cache, folds, tmp_path / "split", only_folds=[0, 2], show_progress=False)


def test_ensemble_reports_the_mean_probabilities_of_kept_folds(tiny, tmp_path, capsys):
    """``python -m train ensemble`` averages finished runs' kept fold logits (as probabilities) and
    reports them like a CV, without training; runs that lack a fold or another split are named."""
    from train.__main__ import main as train_main

    root, clips, cache, _ = tiny
    config = CONFIGS / "augmented.yaml"
    cfg = load_config(config, data=str(root))
    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    y = np.array([CLASSES.index(c.label) for c in clips])
    rng = np.random.default_rng(0)
    runs = [tmp_path / "a", tmp_path / "b"]
    for run in runs:
        for k in (0, 1):
            (run / f"fold{k}").mkdir(parents=True)
            for name in ("val_logits.npy", "val_telephone_logits.npy"):
                np.save(
                    run / f"fold{k}" / name, rng.normal(0, 2, ((folds == k).sum(), len(CLASSES))).astype(np.float32)
                )

    def ensemble(folds_arg="0,1", out=tmp_path / "ens"):
        return [
            "ensemble",
            "--config",
            str(config),
            "--data",
            str(root),
            "--cache",
            str(root / "cache"),
            "--folds",
            folds_arg,
            "--runs",
            *map(str, runs),
            "--out",
            str(out),
        ]

    args = ensemble()
    assert train_main(args) == 0
    assert "Cross-validation report" in capsys.readouterr().out
    assert not (tmp_path / "ens" / "fold0" / "checkpoint").exists()  # nothing trained
    report = json.loads((tmp_path / "ens" / "cv_report.json").read_text())
    idx = np.concatenate([np.where(folds == k)[0] for k in (0, 1)])
    mean = np.concatenate(
        [np.mean([softmax(np.load(r / f"fold{k}" / "val_logits.npy")) for r in runs], axis=0) for k in (0, 1)]
    )
    assert np.allclose(
        np.exp(np.load(tmp_path / "ens" / "fold0" / "val_logits.npy")), mean[: (folds == 0).sum()], atol=1e-5
    )
    assert report["pooled"]["overall"]["ua"] == pytest.approx(classification_metrics(mean, y[idx])["ua"])
    # a fold one run lacks, logits of another split, or --out among the runs: one clear error each
    assert train_main(ensemble("0,2", tmp_path / "e2")) == 2
    assert "fold2/val_logits.npy: missing" in capsys.readouterr().err
    np.save(runs[1] / "fold1" / "val_logits.npy", np.zeros((1, len(CLASSES)), np.float32))
    assert train_main(args) == 2
    assert "runs must share the config's folds" in capsys.readouterr().err
    assert train_main(ensemble(out=runs[0])) == 2
    assert "would overwrite" in capsys.readouterr().err


def test_cv_reevaluate_rescores_saved_fold_models(tiny, tmp_path):
    """``cv --resume --reevaluate`` predicts finished folds again from their saved checkpoints under
    the config's inference settings: with the same settings it gives the training-time logits (up to
    the checkpoint's fp16 weights), with ``inference_positions`` the averaged windows' logits."""
    from emostream.stream import placed_windows

    root, clips, cache, cfg = tiny
    cfg = replace(cfg, epochs=1, folds=2)
    folds = make_folds(clips, 2, "speaker", 0)
    first = cross_validate(cfg, clips, cache, folds, tmp_path / "cv", show_progress=False)
    stored = np.load(tmp_path / "cv" / "fold0" / "val_logits.npy")
    same = cross_validate(cfg, clips, cache, folds, tmp_path / "cv", resume=True, reevaluate=True, show_progress=False)
    again = np.load(tmp_path / "cv" / "fold0" / "val_logits.npy")
    assert np.abs(again - stored).max() < 0.05 * max(1.0, np.abs(stored).max())
    assert same["pooled"]["overall"]["n"] == first["pooled"]["overall"]["n"]
    placed = cross_validate(
        replace(cfg, inference_positions=3),
        clips,
        cache,
        folds,
        tmp_path / "cv",
        resume=True,
        reevaluate=True,
        show_progress=False,
    )
    rescored = np.load(tmp_path / "cv" / "fold0" / "val_logits.npy")
    assert np.abs(rescored - again).max() > 1e-4
    # it is the mean over the clip's placed windows, from the saved model
    from emostream.model import load_checkpoint

    model = load_checkpoint(tmp_path / "cv" / "fold0" / "checkpoint", "cpu")
    i = int(np.where(folds == 0)[0][0])
    windows = placed_windows(cache.clip(i), 3)
    with torch.inference_mode():
        expected = model(torch.from_numpy(windows)).float().mean(0).numpy()
    np.testing.assert_allclose(rescored[0], expected, atol=1e-4)
    assert "mean of 3 placements" in placed["protocol"] and "placements" not in same["protocol"]
    # the channel grid: each fold's saved model scored on more channel copies, cached per fold
    grid = cross_validate(
        replace(cfg, inference_positions=3),
        clips,
        cache,
        folds,
        tmp_path / "cv",
        resume=True,
        show_progress=False,
        channels=("g712", "mulaw", "g711_alaw"),
    )
    assert set(grid["channels"]) == {"mulaw", "g711_alaw"} and "G.712" in grid["telephone_channel"]
    assert (tmp_path / "cv" / "fold1" / "val_g711_alaw_logits.npy").exists()
    md = (tmp_path / "cv" / "cv_report.md").read_text()
    assert "(G.712 telephone)" in md and "| 8 kHz μ-law only (no band-pass) |" in md and "| g711_alaw |" in md
    assert grid["channels"]["mulaw"]["overall"]["roc_auc"] != grid["pooled_telephone"]["overall"]["roc_auc"]
    np.testing.assert_allclose(
        predict_logits(model, [cache.clip(i)], torch.device("cpu"), False, positions=3)[0], expected, atol=1e-4
    )
    # logits alone cannot be rescored
    shutil.rmtree(tmp_path / "cv" / "fold1" / "checkpoint")
    with pytest.raises(ConfigError, match="no saved model"):
        cross_validate(cfg, clips, cache, folds, tmp_path / "cv", resume=True, reevaluate=True, show_progress=False)


def test_calibrate_stores_window_and_clip_temperatures(tiny, tmp_path, capsys):
    """``python -m train calibrate`` writes a 1-placement CV's temperature as the window temperature and
    a several-placement CV's as the clip temperature; scoring with placements (classify, evaluate)
    then uses the clip one, single windows and the recipe's fixed chunks the window one. A report
    scored the other way round is refused by name, the weights are untouched."""
    from emostream.model import Predictor, clip_probabilities, scoring_temperature
    from emostream.stream import placed_windows
    from train.__main__ import main as train_main

    root, clips, cache, cfg = tiny
    cfg = replace(cfg, epochs=1, folds=2)
    folds = make_folds(clips, 2, "speaker", 0)
    window = cross_validate(cfg, clips, cache, folds, tmp_path / "cv", show_progress=False)
    shutil.copy(tmp_path / "cv" / "cv_report.json", tmp_path / "window.json")
    clip = cross_validate(
        replace(cfg, inference_positions=3),
        clips,
        cache,
        folds,
        tmp_path / "cv",
        resume=True,
        reevaluate=True,
        show_progress=False,
    )
    shutil.copy(tmp_path / "cv" / "cv_report.json", tmp_path / "clip.json")
    ckpt = tmp_path / "cv" / "fold0" / "checkpoint"
    weights = (ckpt / "model.safetensors").read_bytes()
    assert Predictor.from_checkpoint(ckpt, device="cpu").clip_temperature is None  # none fitted yet
    args = ["calibrate", "--checkpoint", str(ckpt), "--cv-report", str(tmp_path / "window.json")]
    assert train_main(args + ["--clip-cv-report", str(tmp_path / "clip.json")]) == 0
    capsys.readouterr()
    p = Predictor.from_checkpoint(ckpt, device="cpu", mixed_precision=False)
    assert p.temperature == pytest.approx(window["temperature"]) and p.clip_temperature == pytest.approx(
        clip["temperature"]
    )
    assert (ckpt / "model.safetensors").read_bytes() == weights
    meta = json.loads((ckpt / "model.json").read_text())["cv"]
    assert "3 placements" in meta["clip_protocol"] and meta["clip_temperature"] == p.clip_temperature
    assert meta["experiment"] == meta["clip_experiment"] == cfg.experiment_name  # which CV each figure is from
    assert scoring_temperature(1.1, 0.9, 1) == 1.1 and scoring_temperature(1.1, 0.9, 5) == 0.9
    assert scoring_temperature(1.1, None, 5) == 1.1
    # classify's scoring: the softmax of the mean logit at the clip temperature for placements
    audio = cache.clip(0)
    mean = p.logits(placed_windows(audio, 3)).mean(0)
    np.testing.assert_allclose(
        clip_probabilities(p, placed_windows(audio, 3), 3),
        torch.softmax(mean / p.clip_temperature, -1).numpy(),
        atol=1e-6,
    )
    # evaluate uses the same rule and reports the temperature it used
    from train.evaluate import evaluate_checkpoint

    evaluate_checkpoint(ckpt, clips, cache, tmp_path / "ev", device="cpu", positions=3)
    assert json.loads((tmp_path / "ev" / "evaluation.json").read_text())["temperature"] == pytest.approx(
        p.clip_temperature
    )
    # swapped reports, a missing report or checkpoint: one line, exit 2
    assert train_main(["calibrate", "--checkpoint", str(ckpt), "--cv-report", str(tmp_path / "clip.json")]) == 2
    assert "scored with 3 placements" in capsys.readouterr().err
    assert train_main(args + ["--clip-cv-report", str(tmp_path / "window.json")]) == 2
    assert "scored with one placement" in capsys.readouterr().err
    assert train_main(["calibrate", "--checkpoint", str(tmp_path), "--cv-report", str(tmp_path / "window.json")]) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert train_main(["calibrate", "--checkpoint", str(ckpt), "--cv-report", str(tmp_path / "nope.json")]) == 2
    assert "no CV report" in capsys.readouterr().err
    for bad in ("[1, 2]", '{"temperature": 1.1}'):
        (tmp_path / "bad.json").write_text(bad)
        assert train_main(["calibrate", "--checkpoint", str(ckpt), "--cv-report", str(tmp_path / "bad.json")]) == 2
        assert "not a cv_report.json" in capsys.readouterr().err
    # fit checks its reports before decoding any audio
    assert (
        train_main(
            [
                "fit",
                "--config",
                str(CONFIGS / "augmented.yaml"),
                "--data",
                str(root),
                "--cache",
                str(tmp_path / "cache"),
                "--cv-report",
                str(tmp_path / "window.json"),
            ]
        )
        == 2
    )
    assert "go with --all" in capsys.readouterr().err
    assert (
        train_main(
            [
                "fit",
                "--config",
                str(CONFIGS / "augmented.yaml"),
                "--data",
                str(root),
                "--all",
                "--cache",
                str(tmp_path / "cache"),
                "--cv-report",
                str(tmp_path / "clip.json"),
            ]
        )
        == 2
    )
    assert "scored with 3 placements" in capsys.readouterr().err and not (tmp_path / "cache").exists()
    # without a clip report the clip temperature is cleared: what is stored is what was asked for
    assert train_main(args) == 0
    assert Predictor.from_checkpoint(ckpt, device="cpu").clip_temperature is None


def test_train_cli_errors(tmp_path, capsys):
    from train.__main__ import main

    assert main(["fit", "--config", str(tmp_path / "none.yaml")]) == 2
    assert "config not found" in capsys.readouterr().err
    assert main(["fit", "--config", str(RECIPE)]) == 2
    assert "--pretrained PATH" in capsys.readouterr().err
    assert main(["cv", "--config", str(RECIPE), "--reevaluate"]) == 2
    assert "--reevaluate" in capsys.readouterr().err


def test_floor_noise_covers_padding_and_is_off_by_default():
    from train.batches import add_floor_noise
    from train.config import Augment

    waves = np.zeros((4, 1000), dtype=np.float32)
    cfg = load_config(CONFIGS / "speaker_cv.yaml")
    assert add_floor_noise(waves.copy(), cfg, np.random.default_rng(0)).max() == 0
    cfg = replace(cfg, augment=Augment(floor_noise_dbfs=(-60.0, -60.0), floor_noise_probability=1.0))
    out = add_floor_noise(waves.copy(), cfg, np.random.default_rng(0))
    rms = np.sqrt((out**2).mean(axis=1))
    assert np.allclose(20 * np.log10(rms), -60.0, atol=0.5)


def test_turn_windows_join_clips_of_one_speaker_and_emotion(tiny):
    """concat augmentation: partners share speaker and label, never the clip itself; a turn window
    is the clip, a pause, then partner audio, filling the window; targets stay the clip's label."""
    from train.batches import make_batch, partner_clips, turn_audio
    from train.config import Augment

    root, clips, cache, cfg = tiny
    idx = np.arange(len(clips))
    partners = partner_clips(clips, idx)
    for i, others in partners.items():
        assert i not in others and len(others) == 1
        assert all(clips[j].speaker == clips[i].speaker and clips[j].label == clips[i].label for j in others)
    short = next(i for i in idx if len(cache.clip(i)) < 16000 * 2)  # a 1.5 s clip; its partner is 7 s
    cfg = replace(cfg, augment=Augment(concat_probability=1.0, concat_gap_seconds=(0.5, 0.5)))
    turn = turn_audio(cache, int(short), partners[int(short)], cfg, np.random.default_rng(0))
    n = len(cache.clip(short))
    assert np.array_equal(turn[:n], cache.clip(short)) and not turn[n : n + 8000].any()
    assert np.array_equal(turn[n + 8000 :], cache.clip(int(partners[int(short)][0])))
    labels = np.array([CLASSES.index(c.label) for c in clips])
    x, y, *_ = make_batch(cache, np.array([short]), labels, cfg, np.random.default_rng(1), partners=partners)
    assert x.shape == (1, 96000) and (x[0].abs() > 0).float().mean() > 0.5  # mostly speech, not padding
    assert y[0].argmax() == labels[short]
    # the layout of a turn says which clip audio sits where in its window (the frame targets' map)
    from train.batches import crop_layout, turn_pieces, window_segments

    turn, layout = turn_pieces(cache, int(short), partners[int(short)], cfg, np.random.default_rng(0))
    assert np.array_equal(turn, turn_audio(cache, int(short), partners[int(short)], cfg, np.random.default_rng(0)))
    for seed in range(5):
        window, start, _, offset = crop_layout(turn, np.random.default_rng(seed), random_offset=True)
        segs = window_segments(layout, start, offset)
        assert segs
        if start == 0:  # the window opens with the whole first clip
            assert segs[0] == (int(short), 0, offset, len(cache.clip(short)))
        for clip, clip_start, at, n in segs:
            assert np.array_equal(window[at : at + n], cache.clip(clip)[clip_start : clip_start + n])
        covered = np.zeros(len(window), bool)
        for _, _, at, n in segs:
            covered[at : at + n] = True
        assert not window[~covered].any()  # everything else in the window is the pauses


def test_vtlp_factors_off_by_default_and_in_range_when_on():
    from train.batches import vtlp_factors

    cfg = load_config(CONFIGS / "distill_embed_40ep.yaml")
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    assert vtlp_factors(cfg, 32, gen) is None
    assert torch.equal(gen.get_state(), state)  # no random numbers drawn: other configs train as before
    cfg = load_config(CONFIGS / "distill_vtlp.yaml")
    assert cfg.augment.vtlp_probability == 0.5 and cfg.augment.vtlp_range == (0.9, 1.1)
    f = vtlp_factors(cfg, 4000, torch.Generator().manual_seed(1))
    assert f.shape == (4000,) and 0.45 < float((f == 1).float().mean()) < 0.55
    warped = f[f != 1]
    assert float(warped.min()) >= 0.9 and float(warped.max()) <= 1.1 and float(warped.std()) > 0.05
    again = vtlp_factors(cfg, 4000, torch.Generator().manual_seed(1))
    assert torch.equal(f, again)  # seeded per epoch like SpecAugment: resuming stays exact


# --- speed-perturbed copies ----------------------------------------------------------------------------


def test_speed_perturb_scales_tempo_and_pitch():
    from train.data import speed_perturb

    t = np.arange(16000) / 16000
    tone = np.sin(2 * np.pi * 200 * t).astype(np.float32)
    for factor in (0.9, 1.1):
        out = speed_perturb(tone, factor)
        assert abs(len(out) - len(tone) / factor) <= 1
        spectrum = np.abs(np.fft.rfft(out * np.hanning(len(out))))
        peak_hz = spectrum.argmax() * 16000 / len(out)
        assert abs(peak_hz - 200 * factor) < 3


def test_speed_copies_follow_the_originals_and_training_draws_them(tiny, tmp_path):
    from train.batches import copy_partners, partner_clips, substitute_copies
    from train.data import build_speed_copies, speed_perturb

    root, clips, cache, cfg = tiny
    n = len(clips)
    sc = build_speed_copies(clips, cache, (0.9, 1.1), tmp_path / "cache")
    assert len(sc.clips) == len(sc.cache) == 3 * n and sc.clips[:n] == clips
    assert sc.copies.shape == (n, 2) and sorted(sc.copies.ravel()) == list(range(n, 3 * n))
    for i in range(n):
        assert np.array_equal(sc.cache.clip(i), cache.clip(i))
        for j, f in enumerate((0.9, 1.1)):
            c = int(sc.copies[i, j])
            assert sc.clips[c].label == clips[i].label and sc.clips[c].speaker == clips[i].speaker
            assert np.abs(sc.cache.clip(c) - speed_perturb(cache.clip(i), f)).max() < 1e-3  # int16 storage
    again = build_speed_copies(clips, cache, (0.9, 1.1), tmp_path / "cache")  # computed once, then read
    assert len(list((tmp_path / "cache").glob("speed-*.offsets.npy"))) == 1
    assert np.array_equal(again.cache.samples, sc.cache.samples)
    idx = np.arange(n)
    rng = np.random.default_rng(0)
    assert np.array_equal(substitute_copies(idx, sc.copies, 0.0, rng), idx)
    drawn = substitute_copies(np.tile(idx, 50), sc.copies, 0.5, np.random.default_rng(1))
    is_copy = drawn >= n
    assert 0.4 < is_copy.mean() < 0.6 and set(drawn[~is_copy]) == set(idx)
    origin = np.concatenate([idx, idx, idx])
    assert np.array_equal(origin[drawn], np.tile(idx, 50))  # a copy stands in for its own clip only
    assert set(drawn[is_copy]) == set(range(n, 3 * n))  # both factors are used
    # a copy's turn continues with its partners' copies at the same speed
    partners = copy_partners(partner_clips(clips, idx), sc.copies)
    for i in idx:
        for j in range(2):
            assert list(partners[int(sc.copies[i, j])]) == list(sc.copies[partners[int(i)], j])
    # in training: at probability 1 every window is a copy; the run is reproducible and resumable
    cfg = replace(cfg, epochs=2, augment=replace(cfg.augment, speed_factors=(0.9, 1.1), speed_probability=1.0))
    with pytest.raises(ConfigError, match="speed_probability"):
        fit(cfg, clips, cache, idx, None, tmp_path / "none", FitOptions(show_progress=False))
    fit_whole_and_resumed(cfg, sc.clips, sc.cache, idx, tmp_path / "full", tmp_path / "part", copies=sc.copies)
    a, b = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("full", "part"))
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    plain = replace(cfg, augment=replace(cfg.augment, speed_factors=(), speed_probability=0.0))
    fit(plain, clips, cache, idx, None, tmp_path / "plain", FitOptions(show_progress=False))
    c = torch.load(tmp_path / "plain" / "state.pt", weights_only=False)
    assert [h["train_loss"] for h in a["history"]] != [h["train_loss"] for h in c["history"]]


def test_phone_copies_are_random_lines_labelled_by_their_clean_source(tiny, tmp_path):
    from emostream.channel import rms
    from train.batches import substitute_copies
    from train.data import build_phone_copies, build_speed_copies, with_phone_copies
    from train.distill import fold_teacher
    from train.teacher import TeacherFeatures

    root, clips, cache, cfg = tiny
    n = len(clips)
    pc = build_phone_copies(clips, cache, 2, 42, tmp_path / "cache")
    assert len(pc.clips) == len(pc.cache) == 3 * n and pc.clips[:n] == clips and pc.copies.shape == (n, 2)
    for i in range(n):
        for j in range(2):
            c = int(pc.copies[i, j])
            assert pc.clips[c].label == clips[i].label and pc.clips[c].speaker == clips[i].speaker
            assert pc.cache.clip_length(c) == cache.clip_length(i)  # same length: the teacher's spans hold
            x, y = cache.clip(i), pc.cache.clip(c)  # what a line does is tests/test_channel.py's
            assert rms(y / rms(y) - x / rms(x)) > 0.1
        assert not np.array_equal(pc.cache.clip(int(pc.copies[i, 0])), pc.cache.clip(int(pc.copies[i, 1])))
    again = build_phone_copies(clips, cache, 2, 42, tmp_path / "cache")  # seeded, computed once, then read
    assert len(list((tmp_path / "cache").glob("phone-*.offsets.npy"))) == 1
    assert np.array_equal(again.cache.samples, pc.cache.samples)
    other = build_phone_copies(clips, cache, 2, 43, tmp_path / "cache")
    assert rms(other.copies_cache.samples.astype(np.float32) - pc.copies_cache.samples.astype(np.float32)) > 1
    # with speed copies: every original and every speed copy gets its own lines
    sc = build_speed_copies(clips, cache, (0.9, 1.1), tmp_path / "cache")
    both = with_phone_copies(clips, cache, sc, 2, 42, tmp_path / "cache")
    assert np.array_equal(both.copies, sc.copies) and both.phone.shape == (3 * n, 2) and len(both.clips) == 9 * n
    for s in (0, int(sc.copies[0, 1])):
        assert both.cache.clip_length(int(both.phone[s, 0])) == sc.cache.clip_length(s)
        assert both.clips[int(both.phone[s, 1])].speaker == sc.clips[s].speaker
    # drawn independently of speed: a window is a line with phone_probability, whatever its speed
    idx = np.tile(np.arange(n), 200)
    rng = np.random.default_rng(0)
    drawn = substitute_copies(substitute_copies(idx, both.copies, 0.5, rng), both.phone, 0.5, rng)
    line = drawn >= 3 * n
    assert 0.45 < line.mean() < 0.55
    source = np.arange(len(both.clips))  # the clip a window's audio comes from, through a line or not
    source[both.phone.ravel()] = np.repeat(np.arange(3 * n), 2)
    speed_of_line = source[drawn[line]] >= n
    assert 0.4 < speed_of_line.mean() < 0.6  # lines of speed copies and of originals alike
    origin = np.concatenate([np.arange(n), np.arange(n), np.arange(n)])
    assert np.array_equal(origin[np.where(drawn >= 3 * n, source[drawn], drawn)], idx)
    # a line's teacher features and targets are its clean source's
    frng = np.random.default_rng(0)
    lengths = frng.integers(2, 6, 3 * n)
    feats = TeacherFeatures(
        frng.standard_normal((int(lengths.sum()), 3)).astype(np.float16), np.concatenate([[0], np.cumsum(lengths)])
    )
    extended = feats.extended(feats.repeated(np.tile(np.arange(3 * n), 2)))
    for s in range(3 * n):
        for j in range(2):
            assert np.array_equal(extended.clip(int(both.phone[s, j])), feats.clip(s))
    train_idx = np.arange(n // 2)
    teacher = fold_teacher(
        replace(cfg, distill=replace(cfg.distill, inner_folds=2)),
        both.clips,
        extended,
        train_idx,
        both.copies,
        both.phone,
    )
    for i in train_idx:
        for s in (i, int(both.copies[i, 0])):
            assert teacher.head_of[int(both.phone[s, 1])] == teacher.head_of[i] >= 0
    # in training: at probability 1 every window is a line; runs differ from plain ones
    cfg = replace(cfg, epochs=1, augment=replace(cfg.augment, phone_copies=2, phone_probability=1.0))
    with pytest.raises(ConfigError, match="phone_probability"):
        fit(cfg, clips, cache, np.arange(n), None, tmp_path / "none", FitOptions(show_progress=False))
    fit(
        cfg,
        pc.clips,
        pc.cache,
        np.arange(n),
        None,
        tmp_path / "phone",
        FitOptions(show_progress=False),
        phone=pc.copies,
    )
    plain = replace(cfg, augment=replace(cfg.augment, phone_copies=0, phone_probability=0.0))
    fit(plain, clips, cache, np.arange(n), None, tmp_path / "plain", FitOptions(show_progress=False))
    a, b = (torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("phone", "plain"))
    assert a["history"][0]["train_loss"] != b["history"][0]["train_loss"]


def test_anchor_term_keeps_the_start_model_and_resumes_exactly(tiny, tmp_path):
    """``emostream.distill.anchor_weight``: T² KL to the frozen start model over the full-band rows; it
    needs --pretrained, changes the run, and a resumed run equals an uninterrupted one (the anchor is
    the start model, not the weights a resume restores)."""
    from train.losses import anchor_loss

    root, clips, cache, cfg = tiny
    torch.manual_seed(0)
    logits, other = torch.randn(4, 7), torch.randn(2, 7)
    keep = torch.tensor([True, False, True, False])
    assert anchor_loss(cfg, logits, logits[keep], keep).item() == pytest.approx(0.0, abs=1e-6)
    assert anchor_loss(cfg, logits, other, keep).item() > 0
    moved = logits.clone()
    moved[~keep] += 5.0  # rows outside the mask (phone lines) do not count
    assert torch.equal(anchor_loss(cfg, moved, other, keep), anchor_loss(cfg, logits, other, keep))
    assert anchor_loss(cfg, logits, other[:0], torch.zeros(4, dtype=torch.bool)).item() == 0.0
    idx = np.arange(len(clips))
    quiet = FitOptions(show_progress=False)
    start = fit(replace(cfg, epochs=1), clips, cache, idx, None, tmp_path / "start", quiet).checkpoint
    anchored = replace(cfg, distill=replace(cfg.distill, anchor_weight=1.0))
    with pytest.raises(ConfigError, match="--pretrained"):
        fit(anchored, clips, cache, idx, None, tmp_path / "none", quiet)
    fine = replace(quiet, pretrained_path=str(start))
    fit(anchored, clips, cache, idx, None, tmp_path / "whole", fine)
    fit(anchored, clips, cache, idx, None, tmp_path / "halves", replace(fine, stop_after=1))
    fit(anchored, clips, cache, idx, None, tmp_path / "halves", replace(fine, resume=True))
    fit(cfg, clips, cache, idx, None, tmp_path / "free", fine)
    whole, halves, free = (
        torch.load(tmp_path / d / "state.pt", weights_only=False) for d in ("whole", "halves", "free")
    )
    assert [h["train_loss"] for h in whole["history"]] == [h["train_loss"] for h in halves["history"]]
    for k in whole["model"]:
        assert torch.equal(whole["model"][k], halves["model"][k]), k
    assert whole["history"][-1]["train_loss"] != free["history"][-1]["train_loss"]


def test_table_paths_fall_back_to_the_tables_folder_when_the_data_folder_is_missing(tmp_path, caplog):
    """The recipe names its own data_folder (data/anon/...); a table passed with --data whose paths are
    relative to itself still loads, with a note, while an existing data_folder keeps precedence."""
    import pandas as pd

    write_clip(tmp_path / "t" / "a.wav", 1.0, 0)
    write_clip(tmp_path / "audio" / "a.wav", 1.0, 1)
    pd.DataFrame({"path": ["a.wav"], "label": ["Sad"]}).to_csv(tmp_path / "t" / "m.csv", index=False)
    with caplog.at_level("WARNING"):
        clips = load_dataset(tmp_path / "t" / "m.csv", data_folder="data/anon/audio_emotion_detection/Emotions/")
    assert clips[0].path == str(tmp_path / "t" / "a.wav") and "data/anon" in caplog.text
    assert load_dataset(tmp_path / "t" / "m.csv", data_folder=tmp_path / "audio")[0].path == str(
        tmp_path / "audio" / "a.wav"
    )
    (tmp_path / "c.yaml").write_text(f"base: {RECIPE}\narchitecture:\n  pretrained: false\n")
    cfg = load_config(tmp_path / "c.yaml", data=str(tmp_path / "t" / "m.csv"))
    assert cfg.data_folder and [c.path for c in config_clips(cfg)] == [str(tmp_path / "t" / "a.wav")]


def test_segment_agreement_over_speech_time():
    from emostream.timeline import make_event
    from train.metrics import segment_agreement

    def onehot(label: str) -> np.ndarray:
        p = np.full(len(CLASSES), 0.1 / (len(CLASSES) - 1))
        p[CLASSES.index(label)] = 0.9
        return p

    segs = [
        {"channel": "a", "t_start": 0.0, "t_end": 4.0, "label": "Angry"},
        {"channel": "a", "t_start": 6.0, "t_end": 10.0, "label": "Sad"},
    ]
    events = [
        make_event("s", "a", 0, 6, onehot("Angry")),  # 4 s speech, all agree
        make_event("s", "a", 4, 10, onehot("Angry")),  # 4 s speech, none agree
        make_event("s", "a", 4, 6, None),  # silence: not scored
    ]
    r = segment_agreement(events, segs)
    assert r["overall"]["agreement"] == pytest.approx(0.5) and r["overall"]["seconds"] == 8.0


def test_soup_is_the_weight_mean_of_its_checkpoints(tmp_path):
    """train soup: the uniform mean of two fine-tunes' weights (BatchNorm statistics included),
    named in model.json; a different model or a single checkpoint is refused."""
    from emostream.model import CheckpointError, EmotionNet, ModelConfig, save_checkpoint
    from train.__main__ import main as train_main

    nets = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = EmotionNet(ModelConfig(backbone="resnet18")).eval()
        for name, buf in net.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_()
        save_checkpoint(net, tmp_path / f"ck{seed}", {"training": {"seed": seed}})
        nets.append(load_checkpoint(tmp_path / f"ck{seed}"))  # as stored: fp16
    assert (
        train_main(
            ["soup", "--checkpoints", str(tmp_path / "ck0"), str(tmp_path / "ck1"), "--out", str(tmp_path / "soup")]
        )
        == 0
    )
    soup = load_checkpoint(tmp_path / "soup")
    a, b, s = (m.state_dict() for m in (*nets, soup))
    checked = 0
    for key, value in s.items():
        if value.is_floating_point() and not key.startswith("frontend."):
            torch.testing.assert_close(value, (a[key] + b[key]) / 2, atol=2e-3, rtol=2e-3)  # stored in fp16
            checked += 1
    assert checked > 50 and not torch.equal(a["backbone.fc.weight"], s["backbone.fc.weight"])
    meta = json.loads((tmp_path / "soup" / "model.json").read_text())
    assert [Path(i["checkpoint"]).name for i in meta["soup"]["of"]] == ["ck0", "ck1"]
    assert meta["training"] == {"seed": 0} and meta["model"]["backbone"] == "resnet18"
    save_checkpoint(EmotionNet(ModelConfig(backbone="resnet34")), tmp_path / "other")
    from train.soup import soup as make_soup

    with pytest.raises(CheckpointError, match="not the same model"):
        make_soup([tmp_path / "ck0", tmp_path / "other"], tmp_path / "bad")
    with pytest.raises(CheckpointError, match="at least two"):
        make_soup([tmp_path / "ck0"], tmp_path / "bad")
