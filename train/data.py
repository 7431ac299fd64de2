"""Labelled datasets (manifest, Hydrogen Torch dataframe, folder-per-class), decode cache, folds."""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from emostream.audio import SAMPLE_RATE, AudioError, float32_to_int16, load_mono, resample
from emostream.model import CLASSES

log = logging.getLogger("train")

LABEL_ALIASES = {
    "angry": "Angry",
    "anger": "Angry",
    "ang": "Angry",
    "disgusted": "Disgusted",
    "disgust": "Disgusted",
    "dis": "Disgusted",
    "fearful": "Fearful",
    "fear": "Fearful",
    "fea": "Fearful",
    "happy": "Happy",
    "happiness": "Happy",
    "joy": "Happy",
    "hap": "Happy",
    "neutral": "Neutral",
    "neu": "Neutral",
    "sad": "Sad",
    "sadness": "Sad",
    "surprised": "Surprised",
    "surprise": "Surprised",
    "suprised": "Surprised",
    "sur": "Surprised",
}


class DataError(ValueError):
    """A dataset that cannot be loaded (message names the file or column)."""


def canonical_label(label: str) -> str:
    """Map a label spelling (incl. the seed's ``Suprised``) to one of :data:`CLASSES`."""
    key = str(label).strip().lower()
    if key not in LABEL_ALIASES:
        raise DataError(f"unknown label {label!r} (expected one of {', '.join(CLASSES)})")
    return LABEL_ALIASES[key]


@dataclass(frozen=True)
class Clip:
    path: str  # absolute path
    label: str
    speaker: str  # falls back to the file path when unknown
    corpus: str = ""


def _speaker_from_name(path: Path) -> str | None:
    # CREMA-D (1001_DFA_ANG_XX), RAVDESS (03-01-05-01-02-01-12), SAVEE (DC_a01), TESS (OAF_back_angry)
    name = path.stem
    if m := re.match(r"^(\d{4})_", name):
        return f"crema_{m.group(1)}"
    if m := re.match(r"^\d\d-\d\d-\d\d-\d\d-\d\d-\d\d-(\d\d)$", name):
        return f"ravdess_{m.group(1)}"
    if m := re.match(r"^(DC|JE|JK|KL)_", name):
        return f"savee_{m.group(1)}"
    if m := re.match(r"^(OAF|YAF)_", name, re.IGNORECASE):
        return f"tess_{m.group(1).upper()}"
    return None


def load_dataset(
    source: str | Path, data_folder: str | Path | None = None, audio_column: str = "audio", label_column: str = "class"
) -> list[Clip]:
    """Load clips from a manifest CSV / folder with ``manifest.csv``, a Hydrogen Torch dataframe
    (parquet or CSV with ``audio``/``class`` columns) or a folder-per-class tree."""
    source = Path(source)
    if not source.exists():
        raise DataError(f"dataset not found: {source}")
    if source.is_dir():
        if (source / "manifest.csv").exists():
            return _load_table(source / "manifest.csv", source, "path", "label")
        return _load_tree(source)
    base = source.parent
    if data_folder and Path(data_folder).is_dir():
        base = Path(data_folder)
    elif data_folder:  # e.g. the recipe's own folder, with another table passed by --data
        log.warning(
            "note: data folder %s not found: the paths in %s are read relative to %s",
            data_folder,
            source,
            source.parent,
        )
    import pandas as pd

    head = pd.read_parquet(source) if source.suffix == ".parquet" or source.suffix == ".pq" else pd.read_csv(source)
    if "path" in head.columns and "label" in head.columns:
        return _load_table(source, base, "path", "label", frame=head)
    return _load_table(source, base, audio_column, label_column, frame=head)


def _load_table(table: Path, base: Path, path_col: str, label_col: str, frame=None) -> list[Clip]:
    import pandas as pd

    if frame is None:
        frame = pd.read_csv(table)
    for col in (path_col, label_col):
        if col not in frame.columns:
            raise DataError(f"{table}: missing column {col!r} (columns: {', '.join(map(str, frame.columns))})")
    clips = []
    for row in frame.to_dict("records"):
        path = Path(str(row[path_col]))
        path = path if path.is_absolute() else base / path
        speaker = row.get("speaker")
        speaker = (
            str(speaker) if speaker is not None and str(speaker) != "nan" else (_speaker_from_name(path) or str(path))
        )
        clips.append(Clip(str(path), canonical_label(row[label_col]), speaker, str(row.get("corpus", "") or "")))
    if not clips:
        raise DataError(f"{table}: no rows")
    return clips


def _load_tree(root: Path) -> list[Clip]:
    if (root / "Emotions").is_dir():
        root = root / "Emotions"
    clips = []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        label = canonical_label(class_dir.name)
        for path in sorted(class_dir.rglob("*")):
            if path.suffix.lower() in (".wav", ".flac", ".ogg", ".mp3"):
                clips.append(Clip(str(path), label, _speaker_from_name(path) or str(path), ""))
    if not clips:
        raise DataError(f"{root}: no class folders with audio (expected <Class>/*.wav)")
    return clips


# --- decode cache --------------------------------------------------------------------------------


@dataclass
class AudioCache:
    """All clips decoded once to 16 kHz mono int16, concatenated in one (memmapped) array."""

    samples: np.ndarray  # int16, all clips back to back
    offsets: np.ndarray  # int64, len = clips + 1

    def clip(self, i: int) -> np.ndarray:
        """Float32 samples of clip ``i``."""
        return self.samples[self.offsets[i] : self.offsets[i + 1]].astype(np.float32) / 32768.0

    def clip_length(self, i: int) -> int:
        """Samples in clip ``i`` (without decoding it)."""
        return int(self.offsets[i + 1] - self.offsets[i])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def digest(self):
        """A sha1 object fed with the clip layout and a sample of the audio (~100k samples): the part of
        every derived cache's key (teacher features, speed copies) that says which audio it came from."""
        digest = hashlib.sha1(np.asarray(self.offsets).tobytes())
        digest.update(np.asarray(self.samples[:: max(1, len(self.samples) // 100_000)]).tobytes())
        return digest

    def extended(self, more: "AudioCache") -> "AudioCache":
        """These clips followed by ``more``'s (e.g. :class:`SpeedCopies`), in memory."""
        return AudioCache(
            np.concatenate([np.asarray(self.samples), np.asarray(more.samples)]),
            np.concatenate([self.offsets, self.offsets[-1] + more.offsets[1:]]).astype(np.int64),
        )


def build_cache(clips: list[Clip], cache_dir: str | Path, max_seconds: float = 600.0) -> AudioCache:
    """Decode every clip (resampled to 16 kHz, mono, capped at ``max_seconds``) once; reuse later."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key_src = json.dumps([(c.path, Path(c.path).stat().st_mtime_ns if Path(c.path).exists() else 0) for c in clips])
    key = hashlib.sha1(f"{SAMPLE_RATE}:{max_seconds}:{key_src}".encode()).hexdigest()[:16]
    data_path, index_path = cache_dir / f"audio-{key}.npy", cache_dir / f"audio-{key}.offsets.npy"
    if data_path.exists() and index_path.exists():
        return AudioCache(np.load(data_path, mmap_mode="r"), np.load(index_path))
    limit = int(max_seconds * SAMPLE_RATE)
    pieces, offsets = [], [0]
    for clip in clips:
        try:
            audio = load_mono(clip.path)[:limit]
        except AudioError as exc:
            raise DataError(str(exc)) from None
        pieces.append(float32_to_int16(audio))
        offsets.append(offsets[-1] + len(audio))
    tmp = data_path.with_suffix(".tmp.npy")
    np.save(tmp, np.concatenate(pieces) if pieces else np.zeros(0, np.int16))
    np.save(index_path, np.asarray(offsets, dtype=np.int64))
    tmp.rename(data_path)
    return AudioCache(np.load(data_path, mmap_mode="r"), np.asarray(offsets, dtype=np.int64))


# --- speed-perturbed copies ------------------------------------------------------------------------


def speed_perturb(x: np.ndarray, factor: float) -> np.ndarray:
    """``x`` played ``factor`` times faster (Kaldi's speed perturbation): tempo, pitch and formants all
    scale by ``factor``, the length by ``1 / factor``; a voice the recordings do not hold."""
    return resample(x, int(round(SAMPLE_RATE * factor)), SAMPLE_RATE)


@dataclass
class SpeedCopies:
    """Every clip again at each speed factor. ``clips`` and ``cache`` hold the originals (indices
    ``0 .. n-1``, as given) followed by the copies, factor by factor; ``copies[i, j]`` is the index of
    original ``i``'s copy at ``factors[j]``. A copy keeps its clip's label and speaker (so folds and
    teacher heads treat it as that speaker's clip); ``copies_cache`` holds the copies alone."""

    factors: tuple[float, ...]
    clips: list[Clip]
    cache: AudioCache
    copies: np.ndarray  # int64 (n, len(factors))
    copies_cache: AudioCache


def build_speed_copies(
    clips: list[Clip], cache: AudioCache, factors: tuple[float, ...], cache_dir: str | Path
) -> SpeedCopies:
    """:class:`SpeedCopies` of ``clips`` (decoded in ``cache``), the copies computed once and cached
    beside the decode cache (keyed by the audio and the factors)."""
    copies_cache = cached_copies(
        cache,
        "speed",
        repr(tuple(float(f) for f in factors)),
        [lambda x, f=f: speed_perturb(x, f) for f in factors],
        cache_dir,
        f"at factors {', '.join(f'{f:g}' for f in factors)}",
    )
    n = len(clips)
    extended = clips + [replace(c, path=f"{c.path}#speed{f:g}") for f in factors for c in clips]
    copies = n + np.arange(n * len(factors), dtype=np.int64).reshape(len(factors), n).T
    return SpeedCopies(tuple(factors), extended, cache.extended(copies_cache), copies, copies_cache)


@dataclass
class PhoneCopies:
    """Every source clip (the originals, and their speed copies when there are any) again through
    ``count`` random phone lines (:class:`emostream.channel.PhoneChannel`, drawn from ``seed`` and the
    source's index). ``clips`` and ``cache`` hold the sources followed by the copies; ``copies[s, j]``
    is source ``s``'s ``j``-th line. A copy has its source's length, label and speaker."""

    count: int
    seed: int
    clips: list[Clip]
    cache: AudioCache
    copies: np.ndarray  # int64 (sources, count)
    copies_cache: AudioCache


def build_phone_copies(
    clips: list[Clip], cache: AudioCache, count: int, seed: int, cache_dir: str | Path
) -> PhoneCopies:
    """:class:`PhoneCopies` of ``clips`` (decoded in ``cache``), computed once and cached (keyed by the
    audio, ``count``, ``seed`` and the channel's configuration). Babble comes from 8 clips of other
    speakers."""
    from emostream.channel import PhoneChannel, PhoneChannelConfig

    channel = PhoneChannel(PhoneChannelConfig())
    speakers = np.array([c.speaker for c in clips])

    def line(j: int):
        def apply(x: np.ndarray, i: int) -> np.ndarray:
            rng = np.random.default_rng([seed, j, i])
            others = np.flatnonzero(speakers != speakers[i])
            sources = [cache.clip(int(k)) for k in rng.choice(others, size=min(8, len(others)), replace=False)]
            return channel.apply(x, rng, babble_sources=sources)[0]

        return apply

    copies_cache = cached_copies(
        cache,
        "phone",
        f"{count}:{seed}:{channel.config}:{channel.codecs}",
        [line(j) for j in range(count)],
        cache_dir,
        f"through {count} random phone lines",
        with_index=True,
    )
    n = len(clips)
    extended = clips + [replace(c, path=f"{c.path}#phone{j}") for j in range(count) for c in clips]
    copies = n + np.arange(n * count, dtype=np.int64).reshape(count, n).T
    return PhoneCopies(count, seed, extended, cache.extended(copies_cache), copies, copies_cache)


@dataclass
class CopySet:
    """The clips training draws windows from: originals, their speed copies, then phone lines of
    both. ``copies[i]`` names original ``i``'s speed copies (None without any); ``phone[s]`` names
    source ``s``'s phone lines (an original or a speed copy; None without any), as
    :func:`train.fit.fit` takes them."""

    clips: list[Clip]
    cache: AudioCache
    copies: np.ndarray | None
    phone: np.ndarray | None = None
    phone_cache: AudioCache | None = None  # the lines alone, in ``phone``'s order (for their own teacher targets)


def with_phone_copies(
    clips: list[Clip], cache: AudioCache, speed: SpeedCopies | None, count: int, seed: int, cache_dir: str | Path
) -> CopySet:
    """:class:`CopySet` of ``clips`` with ``count`` phone lines of every original and speed copy."""
    sources, source_cache = (speed.clips, speed.cache) if speed is not None else (clips, cache)
    phone = build_phone_copies(sources, source_cache, count, seed, cache_dir)
    return CopySet(
        phone.clips, phone.cache, speed.copies if speed is not None else None, phone.copies, phone.copies_cache
    )


def cached_copies(
    cache: AudioCache, kind: str, key: str, transforms: list, cache_dir: str | Path, what: str, with_index: bool = False
) -> AudioCache:
    """Every clip of ``cache`` through each of ``transforms`` in turn (``transform(x)``, or
    ``transform(x, i)`` ``with_index``), stored once as ``<kind>-<hash>.npy`` beside the decode cache."""
    cache_dir = Path(cache_dir)
    digest = cache.digest()
    digest.update(key.encode())
    stem = f"{kind}-{digest.hexdigest()[:16]}"
    data_path, index_path = cache_dir / f"{stem}.npy", cache_dir / f"{stem}.offsets.npy"
    if not (data_path.exists() and index_path.exists()):
        cache_dir.mkdir(parents=True, exist_ok=True)
        pieces, offsets = [], [0]
        for transform in transforms:
            for i in range(len(cache)):
                copy = transform(cache.clip(i), i) if with_index else transform(cache.clip(i))
                pieces.append(float32_to_int16(copy))
                offsets.append(offsets[-1] + len(copy))
        log.info("%s copies: %d clips %s", kind, len(pieces), what)
        tmp = data_path.with_suffix(".tmp.npy")
        np.save(tmp, np.concatenate(pieces))
        np.save(index_path, np.asarray(offsets, dtype=np.int64))
        tmp.replace(data_path)
    return AudioCache(np.load(data_path, mmap_mode="r"), np.load(index_path))


# --- folds ---------------------------------------------------------------------------------------


def config_clips(cfg) -> list[Clip]:
    """The clips a config's folds are made from: its dataset (``cfg.data``) minus the speakers it
    reserves (``exclude_speakers``), subsampled by ``data_sample`` with its seed. ``cfg`` is a
    :class:`train.config.TrainConfig`."""
    clips = load_dataset(cfg.data, cfg.data_folder, cfg.audio_column, cfg.label_column)
    if cfg.exclude_speakers:
        before = len(clips)
        clips = [c for c in clips if c.speaker not in set(cfg.exclude_speakers)]
        log.info("excluded %d clips of reserved speakers %s", before - len(clips), ", ".join(cfg.exclude_speakers))
    if cfg.data_sample < 1:
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.choice(len(clips), max(1, int(len(clips) * cfg.data_sample)), replace=False))
        clips = [clips[i] for i in keep]
    return clips


def held_out_corpora(clips: list[Clip]) -> list[str]:
    """The corpora of leave-one-corpus-out folds, in fold order (fold ``k`` holds out the ``k``-th)."""
    corpora = sorted({c.corpus for c in clips})
    if "" in corpora:
        raise DataError(
            "leave-one-corpus-out needs a corpus for every clip (a manifest with a corpus column); "
            f"{sum(not c.corpus for c in clips)} clips have none"
        )
    if len(corpora) < 2:
        raise DataError(
            f"leave-one-corpus-out needs at least 2 corpora, the data has {len(corpora)}: "
            f"{', '.join(corpora)} (combine prepared folders: python -m train prepare combine)"
        )
    return corpora


def fold_config(cfg, clips: list[Clip]):
    """``cfg`` with as many folds as the data has corpora when it groups folds by corpus (one held-out
    corpus per fold), else unchanged. ``cfg`` is a :class:`train.config.TrainConfig`."""
    if cfg.group_by != "corpus":
        return cfg
    n = len(held_out_corpora(clips))
    if n != cfg.folds:
        log.info("leave-one-corpus-out: %d folds, one per corpus (config folds %d ignored)", n, cfg.folds)
    return replace(cfg, folds=n)


def make_folds(clips: list[Clip], n_folds: int = 4, group_by: str = "speaker", seed: int = 42) -> np.ndarray:
    """Fold index per clip. ``speaker``: grouped by speaker and stratified by label
    (scikit-learn StratifiedGroupKFold); ``corpus``: leave-one-corpus-out, fold ``k`` holds the ``k``-th
    corpus of :func:`held_out_corpora` (``n_folds`` must equal their number: :func:`fold_config`);
    ``audio``: the recipe's per-file grouping (leaks speakers)."""
    from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

    labels = np.array([CLASSES.index(c.label) for c in clips])
    folds = np.full(len(clips), -1, dtype=np.int64)
    if group_by == "corpus":
        corpora = held_out_corpora(clips)
        if n_folds != len(corpora):
            raise DataError(
                f"leave-one-corpus-out: {len(corpora)} corpora ({', '.join(corpora)}) make "
                f"{len(corpora)} folds, not {n_folds}"
            )
        return np.array([corpora.index(c.corpus) for c in clips], dtype=np.int64)
    if group_by == "speaker":
        groups = np.array([c.speaker for c in clips])
        if len(set(groups)) < n_folds:
            raise DataError(f"only {len(set(groups))} speakers: cannot make {n_folds} speaker-grouped folds")
        splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(clips)), labels, groups)
    else:
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=seed)
        splits = splitter.split(np.zeros(len(clips)), labels)
    for k, (_, val_idx) in enumerate(splits):
        folds[val_idx] = k
    return folds
