"""``python -m train prepare CORPUS SRC --out DIR``: an emotional-speech corpus, as found at ``SRC``,
turned into 16 kHz mono 16-bit FLAC files plus a ``manifest.csv`` with the shared manifest's columns
(see train/DATA.md). ``python -m train prepare combine DIR [DIR ...] --out DIR`` joins prepared
folders (and the shared one) into one manifest whose paths are relative to itself, for ``--data``."""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import dataclass
from math import gcd
from pathlib import Path
from typing import Callable

import numpy as np

from emostream.audio import SAMPLE_RATE, AudioError, float32_to_int16, read_audio, resample

from .data import DataError

log = logging.getLogger("train")

MANIFEST_COLUMNS = ("path", "label", "corpus", "language", "speaker", "sex", "original_label", "duration_s", "license")
AUDIO_SUFFIXES = (".wav", ".flac")


class PrepareError(DataError):
    """A corpus folder that cannot be prepared (message names the folder or file)."""


@dataclass(frozen=True)
class Source:
    """One input file of a corpus, as its parser reads it."""

    path: Path
    label: str  # one of emostream.model.CLASSES
    speaker: str  # corpus-prefixed
    sex: str  # "f", "m" or "" (unknown)
    original_label: str


@dataclass(frozen=True)
class Corpus:
    """A corpus layout: ``parse`` reads one audio file's labels from its path relative to SRC, or
    returns None for a file of a dropped class; a name it cannot read is skipped and counted."""

    name: str
    language: str
    license: str
    expected: str  # the layout, for the error when nothing matches
    parse: Callable[[Path, "dict[str, str]"], "Source | None"]
    labels: dict[str, str]  # original label -> class
    dropped: tuple[str, ...] = ()  # original labels with no class (calm): skipped and counted


class _Skip(Exception):
    """A file whose name does not follow the corpus's convention."""


def _tess(rel: Path, meta: dict[str, str]) -> Source | None:
    # OAF_back_angry.wav (the Toronto release; OA_bite_neutral.wav is one misnamed OAF file), also with a
    # mirror's index prefix and number suffix (12trainOAF_back_angry3.wav)
    m = re.search(r"(OAF|OA|YAF)_([a-z]+)_([a-z]+?)\d*$", rel.stem, re.IGNORECASE)
    if not m:
        raise _Skip
    emotion = {"ps": "pleasant surprise"}.get(m.group(3).lower(), m.group(3).lower())
    return _source(TESS, rel, emotion, f"tess_{'OAF' if m.group(1).upper() == 'OA' else m.group(1).upper()}", "f")


def _nemo(rel: Path, meta: dict[str, str]) -> Source | None:
    # samples/SM0_anger_54.wav; speaker sex from data.tsv
    m = re.match(r"^([A-Z]{2}\d)_([a-z]+)_(\d+)$", rel.stem)
    if not m:
        raise _Skip
    sex = {"female": "f", "male": "m"}.get(meta.get(m.group(1), ""), "")
    return _source(NEMO, rel, m.group(2), f"nemo_{m.group(1)}", sex)


def _turevdb(rel: Path, meta: dict[str, str]) -> Source | None:
    # Sound Source/Angry/1157_kz_acik.wav: the folder is the class, the first field the actor
    m = re.match(r"^(\d{4})_[a-z]+_", rel.stem)
    if not m or len(rel.parts) < 2:
        raise _Skip
    return _source(TUREVDB, rel, rel.parts[-2].lower(), f"turevdb_{m.group(1)}", "")


def _urdu(rel: Path, meta: dict[str, str]) -> Source | None:
    # Angry/SM1_F10_A010.wav: S + sex + speaker, file number, emotion letter + number
    m = re.match(r"^S([MF])(\d+)_F\d+_([AHNS])\d+$", rel.stem)
    if not m:
        raise _Skip
    sex, number, letter = m.groups()
    emotion = {"A": "angry", "H": "happy", "N": "neutral", "S": "sad"}[letter]
    return _source(URDU, rel, emotion, f"urdu_S{sex}{number}", sex.lower())


def _source(corpus: Corpus, rel: Path, original: str, speaker: str, sex: str) -> Source | None:
    if original in corpus.dropped:
        return None
    if original not in corpus.labels:
        raise _Skip
    return Source(rel, corpus.labels[original], speaker, sex, original)


TESS = Corpus(
    "tess",
    "en",
    "CC BY-NC-ND 4.0",
    "<any folders>/OAF_<word>_<emotion>.wav and YAF_...",
    _tess,
    {
        "angry": "Angry",
        "disgust": "Disgusted",
        "fear": "Fearful",
        "happy": "Happy",
        "neutral": "Neutral",
        "pleasant surprise": "Surprised",
        "sad": "Sad",
    },
)
NEMO = Corpus(
    "nemo",
    "pl",
    "CC BY-NC-SA 4.0",
    "samples/<speaker>_<emotion>_<n>.wav (and data.tsv)",
    _nemo,
    {
        "anger": "Angry",
        "fear": "Fearful",
        "happiness": "Happy",
        "neutral": "Neutral",
        "sadness": "Sad",
        "surprised": "Surprised",
    },
)
TUREVDB = Corpus(
    "turevdb",
    "tr",
    "CC BY-NC-ND 4.0",
    "Sound Source/<Angry|Calm|Happy|Sad>/<actor>_<xx>_<word>.wav",
    _turevdb,
    {"angry": "Angry", "happy": "Happy", "sad": "Sad"},
    dropped=("calm",),
)
URDU = Corpus(
    "urdu",
    "ur",
    "research use only",
    "<Angry|Happy|Neutral|Sad>/S<M|F><n>_F<n>_<A|H|N|S><n>.wav",
    _urdu,
    {"angry": "Angry", "happy": "Happy", "neutral": "Neutral", "sad": "Sad"},
)
CORPORA = {c.name: c for c in (TESS, NEMO, TUREVDB, URDU)}


def _metadata(corpus: Corpus, src: Path) -> dict[str, str]:
    """Per-speaker facts a corpus keeps beside its audio (nEMO's data.tsv: speaker -> gender)."""
    table = src / "data.tsv"
    if corpus is not NEMO or not table.exists():
        return {}
    with table.open(newline="", encoding="utf-8") as f:
        return {row["speaker_id"].strip(): row["gender"].strip() for row in csv.DictReader(f, delimiter="\t")}


def scan(corpus: Corpus, src: Path) -> tuple[list[Source], dict[str, int]]:
    """The corpus's usable files under ``src`` (sorted) and a count of the files it drops, by reason."""
    if not src.is_dir():
        raise PrepareError(f"{corpus.name}: source folder not found: {src}")
    meta = _metadata(corpus, src)
    sources, dropped = [], {}
    for path in sorted(p for p in src.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file()):
        rel = path.relative_to(src)
        try:
            s = corpus.parse(rel, meta)
        except _Skip:
            dropped["name not recognised"] = dropped.get("name not recognised", 0) + 1
            continue
        if s is None:
            dropped["class dropped"] = dropped.get("class dropped", 0) + 1
        else:
            sources.append(s)
    if not sources:
        raise PrepareError(f"{corpus.name}: no usable audio under {src} (expected {corpus.expected})")
    return sources, dropped


def mono(samples: np.ndarray) -> np.ndarray:
    """``(channels, frames)`` to one channel: the louder (higher RMS) channel, as the shared data's
    README does for two-channel files (their channels are not copies; averaging partly cancels)."""
    if samples.shape[0] == 1:
        return samples[0]
    return samples[int(np.argmax(np.sqrt(np.mean(np.square(samples, dtype=np.float64), axis=1))))]


def to_16k(x: np.ndarray, rate: int) -> np.ndarray:
    """``x`` at ``rate`` resampled to 16 kHz: the project's :func:`emostream.audio.resample` (torchaudio's
    sinc interpolation), except for rates whose ratio to 16 kHz reduces to a large fraction (TESS's
    24,414 Hz: 8,000 / 12,207), where torchaudio builds a kernel of 8,000 x 12,227 taps per call (~10 s
    a clip); those go through scipy's polyphase filter, as the shared corpora were converted."""
    g = gcd(int(rate), SAMPLE_RATE)
    if rate // g <= 1000:
        return resample(x, rate, SAMPLE_RATE)
    from scipy.signal import resample_poly

    return resample_poly(x, SAMPLE_RATE // g, rate // g).astype(np.float32)


def convert(path: Path, out: Path) -> float:
    """Decode ``path`` (soundfile), keep one channel, resample to 16 kHz, write 16-bit FLAC at ``out``;
    the duration in seconds."""
    import soundfile as sf

    try:
        samples, rate = read_audio(path)
    except AudioError as exc:
        raise PrepareError(str(exc)) from None
    audio = to_16k(mono(samples), rate)
    out.parent.mkdir(parents=True, exist_ok=True)
    sf.write(out, float32_to_int16(audio), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return len(audio) / SAMPLE_RATE


def _flac_name(rel: Path) -> Path:
    """The output path of a source file: its path under SRC, spaces replaced, suffix .flac."""
    return Path(*[part.replace(" ", "_") for part in rel.with_suffix(".flac").parts])


def prepare(name: str, src: str | Path, out: str | Path) -> dict:
    """Convert corpus ``name`` at ``src`` into ``out`` (FLAC files + manifest.csv); a summary dict."""
    if name not in CORPORA:
        raise PrepareError(f"unknown corpus {name!r} (known: {', '.join(CORPORA)})")
    corpus, src, out = CORPORA[name], Path(src), Path(out)
    sources, dropped = scan(corpus, src)
    if out.resolve() == src.resolve() or src.resolve() in out.resolve().parents:
        raise PrepareError(f"--out {out} lies inside the source folder {src}: choose a folder outside it")
    rows = []
    for i, s in enumerate(sources):
        rel = _flac_name(s.path)
        duration = convert(src / s.path, out / rel)
        rows.append(
            {
                "path": rel.as_posix(),
                "label": s.label,
                "corpus": corpus.name,
                "language": corpus.language,
                "speaker": s.speaker,
                "sex": s.sex,
                "original_label": s.original_label,
                "duration_s": f"{duration:.3f}",
                "license": corpus.license,
            }
        )
        if (i + 1) % 500 == 0:
            log.info("%s: %d / %d files", corpus.name, i + 1, len(sources))
    write_manifest(out / "manifest.csv", rows)
    return {
        "corpus": corpus.name,
        "clips": len(rows),
        "speakers": len({r["speaker"] for r in rows}),
        "classes": sorted({r["label"] for r in rows}),
        "dropped": dropped,
        "hours": sum(float(r["duration_s"]) for r in rows) / 3600,
    }


def write_manifest(path: Path, rows: list[dict]) -> None:
    """``rows`` as a manifest CSV with exactly :data:`MANIFEST_COLUMNS`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: r[k] for k in MANIFEST_COLUMNS} for r in rows)


def read_manifest(folder: Path) -> list[dict]:
    """The rows of ``folder/manifest.csv``, checked to have the shared manifest's columns."""
    table = folder / "manifest.csv"
    if not table.exists():
        raise PrepareError(f"no manifest.csv in {folder} (prepare the corpus there first)")
    with table.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in MANIFEST_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise PrepareError(f"{table}: missing column(s) {', '.join(missing)}")
        return list(reader)


def combine(folders: list[str | Path], out: str | Path) -> dict:
    """One manifest at ``out/manifest.csv`` over the prepared ``folders`` (e.g. the shared emotion-speech
    folder and /work/data-extra/<corpus>), its paths relative to ``out``; no audio is copied."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, seen, owner = [], set(), {}
    for folder in map(Path, folders):
        for r in read_manifest(folder):
            path = os.path.relpath((folder / r["path"]).resolve(), out.resolve())
            if path in seen:
                raise PrepareError(f"{folder}: {r['path']} is listed twice (is a folder given twice?)")
            if owner.setdefault(r["speaker"], r["corpus"]) != r["corpus"]:
                raise PrepareError(f"speaker {r['speaker']} appears in corpora {owner[r['speaker']]} and {r['corpus']}")
            seen.add(path)
            rows.append({**r, "path": Path(path).as_posix()})
    write_manifest(out / "manifest.csv", rows)
    corpora = sorted({r["corpus"] for r in rows})
    return {
        "corpus": "+".join(corpora),
        "clips": len(rows),
        "speakers": len(owner),
        "corpora": corpora,
        "classes": sorted({r["label"] for r in rows}),
        "dropped": {},
        "hours": sum(float(r["duration_s"]) for r in rows) / 3600,
    }


def summary_line(info: dict, out: str | Path) -> str:
    """What ``prepare`` prints: clips, speakers, hours, classes, dropped files."""
    dropped = ", ".join(f"{n} {why}" for why, n in info["dropped"].items())
    return (
        f"{out}: {info['corpus']}: {info['clips']} clips, {info['speakers']} speakers, {info['hours']:.2f} h; "
        f"classes {', '.join(info['classes'])}" + (f"; skipped {dropped}" if dropped else "")
    )
