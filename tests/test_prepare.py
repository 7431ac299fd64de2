"""Corpus preparation (python -m train prepare) on tiny generated corpora laid out like the real ones,
combined manifests, and leave-one-corpus-out folds and reports."""

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emostream.model import CLASSES
from train.__main__ import main as train_main
from train.config import load_config
from train.data import Clip, DataError, fold_config, load_dataset, make_folds
from train.prepare import CORPORA, MANIFEST_COLUMNS, PrepareError, combine, mono, prepare

from .conftest import ROOT, SHARED_DATA, TEST_BACKBONE, requires_shared, speechlike

CONFIGS = ROOT / "train" / "configs"


def _wav(path: Path, sr: int, seed: int, seconds: float = 0.6, channels: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = speechlike(seconds, sr=sr, seed=seed)
    sf.write(path, x if channels == 1 else np.stack([0.05 * x, x], axis=1), sr, subtype="PCM_16")


# each corpus: files (relative path -> (expected label or None when dropped, expected speaker, sex)),
# the original sample rate
LAYOUTS = {
    "tess": (
        24414,
        {
            "OAF_angry/OAF_back_angry.wav": ("Angry", "tess_OAF", "f"),
            "YAF_pleasant_surprised/YAF_back_ps.wav": ("Surprised", "tess_YAF", "f"),
            "OAF_neutral/OA_bite_neutral.wav": ("Neutral", "tess_OAF", "f"),  # the release's one misnamed file
            "datasets/train/12trainYAF_keen_disgust46.wav": ("Disgusted", "tess_YAF", "f"),  # a mirror's renaming
            "YAF_fear/YAF_dog_fear.wav": ("Fearful", "tess_YAF", "f"),
        },
    ),
    "nemo": (
        24000,
        {
            "samples/SM0_anger_54.wav": ("Angry", "nemo_SM0", "m"),
            "samples/EB0_surprised_2.wav": ("Surprised", "nemo_EB0", "f"),
            "samples/EB0_happiness_3.wav": ("Happy", "nemo_EB0", "f"),
            "samples/SM0_sadness_4.wav": ("Sad", "nemo_SM0", "m"),
        },
    ),
    "turevdb": (
        44100,
        {
            "Sound Source/Angry/1157_kz_acik.wav": ("Angry", "turevdb_1157", ""),
            "Sound Source/Happy/1234_hl_cay.wav": ("Happy", "turevdb_1234", ""),
            "Sound Source/Sad/1234_mt_dil.wav": ("Sad", "turevdb_1234", ""),
            "Sound Source/Calm/1157_sk_okul.wav": (None, "", ""),  # calm has no class: dropped
        },
    ),
    "urdu": (
        44100,
        {
            "Angry/SM1_F10_A010.wav": ("Angry", "urdu_SM1", "m"),
            "Happy/SF2_F1_H01.wav": ("Happy", "urdu_SF2", "f"),
            "Neutral/SM1_F11_N011.wav": ("Neutral", "urdu_SM1", "m"),
            "Sad/SF2_F2_S02.wav": ("Sad", "urdu_SF2", "f"),
        },
    ),
}


def make_corpus(root: Path, name: str) -> Path:
    """A tiny corpus ``name`` under ``root/name`` laid out like the real one."""
    sr, files = LAYOUTS[name]
    src = root / name
    for i, rel in enumerate(files):
        _wav(src / rel, sr, seed=i)
    (src / "README.md").write_text("not audio\n")
    if name == "nemo":
        (src / "data.tsv").write_text(
            "file_id\temotion\traw_text\tnormalized_text\tspeaker_id\tgender\tage\n"
            "SM0_anger_54.wav\tanger\tx\tx\t        SM0\tmale\t30\n"
            "EB0_surprised_2.wav\tsurprised\tx\tx\t        EB0\tfemale\t27\n"
        )
    return src


def read_rows(folder: Path) -> tuple[list[str], list[dict]]:
    with (folder / "manifest.csv").open(newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_prepare_writes_16k_mono_flac_and_the_shared_manifest_columns(name, tmp_path, capsys):
    src = make_corpus(tmp_path / "src", name)
    out = tmp_path / "out" / name
    assert train_main(["prepare", name, str(src), "--out", str(out)]) == 0
    sr, files = LAYOUTS[name]
    kept = {rel: v for rel, v in files.items() if v[0] is not None}
    columns, rows = read_rows(out)
    assert tuple(columns) == MANIFEST_COLUMNS
    assert len(rows) == len(kept)
    by_source = {Path(r["path"]).with_suffix("").as_posix(): r for r in rows}
    for rel, (label, speaker, sex) in kept.items():
        r = by_source[Path(rel.replace(" ", "_")).with_suffix("").as_posix()]
        assert (r["label"], r["speaker"], r["sex"], r["corpus"]) == (label, speaker, sex, name)
        assert r["speaker"].startswith(f"{name}_") and r["license"] == CORPORA[name].license != ""
        assert r["language"] == CORPORA[name].language and r["original_label"]
        info = sf.info(out / r["path"])
        assert (info.format, info.subtype, info.samplerate, info.channels) == ("FLAC", "PCM_16", 16000, 1)
        assert float(r["duration_s"]) == pytest.approx(0.6, abs=0.002) == pytest.approx(info.duration, abs=0.002)
    assert all(r["label"] in CLASSES for r in rows)
    printed = capsys.readouterr().out
    assert f"{len(kept)} clips" in printed and ("skipped 1 class dropped" in printed) == (name == "turevdb")
    # the training loader reads the prepared folder as it reads the shared one
    clips = load_dataset(out)
    assert {c.corpus for c in clips} == {name} and {c.speaker for c in clips} == {v[1] for v in kept.values()}


def test_stereo_keeps_the_louder_channel(tmp_path):
    src = tmp_path / "urdu"
    _wav(src / "Angry" / "SM1_F1_A01.wav", 16000, seed=3, seconds=1.0, channels=2)
    prepare("urdu", src, tmp_path / "out")
    out, _ = sf.read(tmp_path / "out" / "Angry" / "SM1_F1_A01.flac", dtype="float32")
    loud = speechlike(1.0, sr=16000, seed=3)
    assert np.allclose(out, loud, atol=2e-4)  # the right channel, not the mean (which is 0.525 of it)
    assert np.array_equal(mono(np.stack([loud, -2 * loud])), -2 * loud)


def test_unknown_labels_are_skipped_and_counted_not_dropped_as_a_class(tmp_path):
    _wav(tmp_path / "tess" / "OAF_back_angry.wav", 24414, 0)
    _wav(tmp_path / "tess" / "OAF_back_bored.wav", 24414, 1)  # no such TESS emotion
    _wav(tmp_path / "turevdb" / "Sound Source" / "Calm" / "1157_kz_x.wav", 44100, 2)
    _wav(tmp_path / "turevdb" / "Sound Source" / "Sad" / "1157_kz_y.wav", 44100, 3)
    _wav(tmp_path / "turevdb" / "Sound Source" / "Bored" / "1157_kz_z.wav", 44100, 4)
    assert prepare("tess", tmp_path / "tess", tmp_path / "out1")["dropped"] == {"name not recognised": 1}
    assert prepare("turevdb", tmp_path / "turevdb", tmp_path / "out2")["dropped"] == {
        "class dropped": 1,
        "name not recognised": 1,
    }


def test_bad_source_path_is_a_one_line_error(tmp_path, capsys):
    assert train_main(["prepare", "tess", str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tess: source folder not found") and "\n" not in err
    (tmp_path / "empty" / "x").mkdir(parents=True)
    _wav(tmp_path / "empty" / "x" / "not_a_tess_name.wav", 16000, 0)
    assert train_main(["prepare", "tess", str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert "no usable audio" in err and "OAF_<word>_<emotion>.wav" in err and "\n" not in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(SystemExit):  # an unknown corpus is argparse's error
        train_main(["prepare", "nosuch", str(tmp_path), "--out", str(tmp_path / "out")])
    src = make_corpus(tmp_path / "src", "urdu")
    with pytest.raises(PrepareError, match="inside the source folder"):
        prepare("urdu", src, src / "prepared")


def test_combine_writes_one_manifest_with_paths_relative_to_itself(tmp_path):
    for name in ("tess", "urdu"):
        prepare(name, make_corpus(tmp_path / "src", name), tmp_path / "extra" / name)
    out = tmp_path / "elsewhere" / "all"
    assert (
        train_main(
            [
                "prepare",
                "combine",
                str(tmp_path / "extra" / "tess"),
                str(tmp_path / "extra" / "urdu"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    columns, rows = read_rows(out)
    assert tuple(columns) == MANIFEST_COLUMNS and len(rows) == 5 + 4
    assert all(r["path"].startswith("../../extra/") for r in rows)
    clips = load_dataset(out)
    assert all(Path(c.path).exists() for c in clips) and {c.corpus for c in clips} == {"tess", "urdu"}
    with pytest.raises(PrepareError, match="listed twice"):
        combine([tmp_path / "extra" / "tess", tmp_path / "extra" / "tess"], tmp_path / "dup")
    with pytest.raises(PrepareError, match="no manifest.csv"):
        combine([tmp_path / "src" / "tess"], tmp_path / "dup")


# --- leave-one-corpus-out ----------------------------------------------------------------------------


def _clips(corpora: dict[str, int]) -> list[Clip]:
    """Clips of the given corpora, 3 speakers each, ``n`` classes per corpus (the first n)."""
    return [
        Clip(f"/x/{c}/{s}_{label}.flac", label, f"{c}_{s}", c)
        for c, n in corpora.items()
        for s in range(3)
        for label in CLASSES[:n]
    ]


def test_leave_one_corpus_out_folds_hold_out_exactly_one_corpus_each():
    clips = _clips({"ravdess": 7, "emodb": 6, "urdu": 4, "nemo": 6})
    cfg = fold_config(load_config(CONFIGS / "loco.yaml"), clips)
    assert cfg.group_by == "corpus" and cfg.folds == 4
    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    held = [{c.corpus for c, f in zip(clips, folds) if f == k} for k in range(cfg.folds)]
    assert held == [{"emodb"}, {"nemo"}, {"ravdess"}, {"urdu"}]  # one corpus per fold, sorted, all of them
    with pytest.raises(DataError, match="4 corpora .* make 4 folds, not 3"):
        make_folds(clips, 3, "corpus")
    with pytest.raises(DataError, match="at least 2 corpora"):
        fold_config(cfg, _clips({"ravdess": 7}))
    with pytest.raises(DataError, match="corpus for every clip"):
        make_folds(clips + [Clip("/x/y.wav", "Sad", "s", "")], 4, "corpus")
    assert fold_config(replace(cfg, group_by="speaker"), clips).folds == 4  # speaker folds keep the config's count


def test_loco_report_has_a_row_per_held_out_corpus_even_when_it_lacks_classes(tmp_path, capsys):
    """The CV report of loco.yaml (built with `ensemble` from made-up fold logits: no training) has a
    table per held-out corpus; a corpus with 4 of the 7 classes is scored over those 4."""
    import pandas as pd

    root = tmp_path / "data"
    rows = []
    for corpus, n in (("aa", 7), ("bb", 4), ("cc", 6)):
        for s in range(2):
            for label in CLASSES[:n]:
                path = f"{corpus}/{s}_{label}.wav"
                _wav(root / path, 16000, seed=len(rows), seconds=0.3)
                rows.append({"path": path, "label": label, "speaker": f"{corpus}_{s}", "corpus": corpus})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    clips = load_dataset(root)
    folds = make_folds(clips, 3, "corpus")
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    for k in range(3):
        (run / f"fold{k}").mkdir(parents=True)
        for name in ("val_logits.npy", "val_telephone_logits.npy"):
            np.save(run / f"fold{k}" / name, rng.normal(0, 2, ((folds == k).sum(), len(CLASSES))).astype(np.float32))
    assert (
        train_main(
            [
                "ensemble",
                "--config",
                str(CONFIGS / "loco.yaml"),
                "--data",
                str(root),
                "--cache",
                str(tmp_path / "cache"),
                "--folds",
                "0,1,2",
                "--runs",
                str(run),
                "--out",
                str(tmp_path / "loco"),
            ]
        )
        == 0
    )
    report = json.loads((tmp_path / "loco" / "cv_report.json").read_text())
    assert report["protocol"].startswith("leave-one-corpus-out CV (3 folds")
    held = report["held_out_corpora"]
    assert [r["corpus"] for r in held] == ["aa", "bb", "cc"] and [r["n"] for r in held] == [14, 8, 12]
    assert held[1]["classes"] == list(CLASSES[:4])
    for r in held:
        assert all(np.isfinite(r[k]) for k in ("ua", "macro_f1", "accuracy", "roc_auc"))
        assert np.isfinite(r["telephone"]["ua"])
    md = (tmp_path / "loco" / "cv_report.md").read_text()
    assert "| bb | 8 | 4 |" in md and "| mean of 3 |" in md
    assert "Leave-one-corpus-out" in capsys.readouterr().out


@requires_shared()
def test_shared_corpora_and_a_prepared_one_make_four_loco_folds(tmp_path):
    prepare("urdu", make_corpus(tmp_path / "src", "urdu"), tmp_path / "urdu")
    combine([SHARED_DATA, tmp_path / "urdu"], tmp_path / "all")
    clips = load_dataset(tmp_path / "all")
    assert len(clips) == 1782 + 4 and all(Path(c.path).exists() for c in clips[::97])
    cfg = fold_config(load_config(CONFIGS / "loco.yaml", data=str(tmp_path / "all")), clips)
    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    assert cfg.folds == 4
    for k in range(4):
        held = {c.corpus for c, f in zip(clips, folds) if f == k}
        assert len(held) == 1 and not held & {c.corpus for c, f in zip(clips, folds) if f != k}


def test_tiny_leave_one_corpus_out_cv_trains_each_fold_without_its_corpus(tmp_path):
    """A real (tiny, 1-epoch) leave-one-corpus-out CV: each fold's model trains on the other corpora
    only, and the report has one row per held-out corpus."""
    import pandas as pd

    from train.cv import cross_validate
    from train.data import build_cache

    root = tmp_path / "data"
    rows = []
    for corpus in ("aa", "bb"):
        for s in range(2):
            for label in ("Angry", "Sad"):
                path = f"{corpus}/{s}_{label}.wav"
                _wav(root / path, 16000, seed=len(rows), seconds=1.5)
                rows.append({"path": path, "label": label, "speaker": f"{corpus}_{s}", "corpus": corpus})
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    clips = load_dataset(root)
    cfg = load_config(CONFIGS / "augmented.yaml")
    cfg = replace(cfg, backbone=TEST_BACKBONE, epochs=1, batch_size=2, exclude_speakers=(), group_by="corpus")
    cfg = fold_config(cfg, clips)
    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    report = cross_validate(
        cfg, clips, build_cache(clips, tmp_path / "cache"), folds, tmp_path / "cv", show_progress=False
    )
    assert report["protocol"].startswith("leave-one-corpus-out CV (2 folds")
    assert [r["corpus"] for r in report["held_out_corpora"]] == ["aa", "bb"]
    for k, corpus in enumerate(("aa", "bb")):
        trained = json.loads((tmp_path / "cv" / f"fold{k}" / "checkpoint" / "model.json").read_text())
        assert trained["fold"] == k and trained["training"]["train_clips"] == 4  # the other corpus's 4 clips
        assert np.load(tmp_path / "cv" / f"fold{k}" / "val_logits.npy").shape == (4, len(CLASSES))
