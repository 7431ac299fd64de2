"""Whisper-base teacher for knowledge distillation (training only; ``emostream`` never imports it).

Stage 1 caches the frozen Whisper encoder's frame-level outputs for every clip once
(:func:`build_teacher_cache`). Stage 2 fits small logistic-regression heads on mean-pooled frames
(:class:`FoldTeacher`), per cross-validation fold on that fold's training speakers only, and gives the
student soft targets for exactly the frames its random 6 s crop covers.

Deviation from Whisper's own use, measured in ``train/EXPERIMENTS.md``: the encoder reads a
``CONTEXT_SECONDS`` (10 s) zero-padded input instead of 30 s. Every clip but three fits in one
context; the encoder is 12x cheaper that way (caching the shared set takes minutes, not an hour, on
two cores).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emostream.audio import SAMPLE_RATE, WINDOW_SAMPLES

from .config import SPEAKER_CENTRE
from .data import AudioCache
from .teacher_dir import TeacherError, check_teacher_dir

log = logging.getLogger("train")

WHISPER_HOP = 160  # samples per Whisper mel frame (10 ms)
ENCODER_FRAME_SAMPLES = 2 * WHISPER_HOP  # the encoder halves the frame rate: 20 ms per frame
CONTEXT_SECONDS = 10
CONTEXT_SAMPLES = CONTEXT_SECONDS * SAMPLE_RATE
CONTEXT_FRAMES = CONTEXT_SAMPLES // ENCODER_FRAME_SAMPLES  # 500 encoder frames
SHARD_CLIPS = 64
CELL_MIN_AUDIO = 0.5  # a student time cell gets a frame target when clip audio fills at least half of it


def load_encoder(path: str | Path, threads: int = 0):
    """The Whisper model (CTranslate2, int8 on CPU, float16 on CUDA) for ``path``."""
    path = check_teacher_dir(path)
    try:
        import ctranslate2
    except ImportError:
        raise TeacherError(
            "distillation needs the training extra: pip install 'emostream[train]' (ctranslate2, faster-whisper)"
        ) from None
    device = "cuda" if ctranslate2.get_cuda_device_count() > 0 else "cpu"
    try:
        return ctranslate2.models.Whisper(
            str(path), device=device, compute_type="int8" if device == "cpu" else "float16", intra_threads=threads
        )
    except (RuntimeError, ValueError) as exc:
        raise TeacherError(f"teacher {path} could not be loaded: {str(exc).splitlines()[0]}") from None


def clip_frames(n_samples: int) -> int:
    """Encoder frames that cover real audio of a clip of ``n_samples`` (at least one)."""
    return max(1, math.ceil(n_samples / ENCODER_FRAME_SAMPLES))


def frame_span(start: int, length: int, n_frames: int) -> tuple[int, int]:
    """Encoder frames ``[f0, f1)`` covering samples ``[start, start + length)`` of a clip.

    A frame counts when it overlaps the span; the result is clipped to the clip's frames and never
    empty.
    """
    f0 = min(max(0, start // ENCODER_FRAME_SAMPLES), n_frames - 1)
    f1 = min(n_frames, max(f0 + 1, math.ceil((start + length) / ENCODER_FRAME_SAMPLES)))
    return f0, f1


def context_mels(extractor, audio: np.ndarray):
    """Whisper log-mels ``(1, 80, 2 * CONTEXT_FRAMES)`` float32 of each ``CONTEXT_SECONDS`` piece of a
    16 kHz clip (zero-padded), with the number of encoder frames that cover its real audio."""
    for s in range(0, max(1, len(audio)), CONTEXT_SAMPLES):
        seg = np.zeros(CONTEXT_SAMPLES, dtype=np.float32)
        part = audio[s : s + CONTEXT_SAMPLES]
        seg[: len(part)] = part
        mel = extractor(seg, padding=0)[:, : CONTEXT_FRAMES * 2]
        yield np.ascontiguousarray(mel[None], dtype=np.float32), clip_frames(len(part))


def encode_clip(model, extractor, audio: np.ndarray) -> np.ndarray:
    """Frame-level encoder outputs ``(clip_frames, d_model)`` (float16) for one 16 kHz clip."""
    import ctranslate2

    return np.concatenate(
        [
            np.asarray(model.encode(ctranslate2.StorageView.from_array(mel)))[0, :n].astype(np.float16)
            for mel, n in context_mels(extractor, audio)
        ]
    )


@dataclass
class TeacherFeatures:
    """Frame-level encoder outputs of every clip, back to back (float16)."""

    frames: np.ndarray  # (total_frames, d_model)
    offsets: np.ndarray  # int64, len = clips + 1

    def clip(self, i: int) -> np.ndarray:
        return self.frames[self.offsets[i] : self.offsets[i + 1]]

    def span(self, i: int, start: int, length: int) -> np.ndarray:
        """The frames of clip ``i`` covering samples ``[start, start + length)`` (see :func:`frame_span`)."""
        frames = self.clip(i)
        f0, f1 = frame_span(start, length, len(frames))
        return frames[f0:f1]

    def pool(self, i: int, start: int = 0, length: int | None = None) -> np.ndarray:
        """Mean of the frames covering samples ``[start, start + length)`` of clip ``i`` (float32);
        the whole clip when ``length`` is None."""
        frames = self.clip(i) if length is None else self.span(i, start, length)
        return frames.astype(np.float32).mean(axis=0)

    def pooled(self) -> np.ndarray:
        """Whole-clip mean-pooled features ``(clips, d_model)``."""
        return np.stack([self.pool(i) for i in range(len(self.offsets) - 1)])

    def repeated(self, clips: np.ndarray) -> "TeacherFeatures":
        """The features of ``clips`` (indices, repeats allowed) back to back, in memory: the targets of
        copies labelled by their clean original (:class:`train.data.PhoneCopies`)."""
        clips = np.asarray(clips, dtype=np.int64)
        lengths = self.offsets[clips + 1] - self.offsets[clips]
        rows = np.concatenate([np.arange(self.offsets[i], self.offsets[i + 1]) for i in clips]) if len(clips) else []
        return TeacherFeatures(
            np.asarray(self.frames)[rows], np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        )

    def extended(self, more: "TeacherFeatures") -> "TeacherFeatures":
        """These clips' features followed by ``more``'s (e.g. :class:`train.data.SpeedCopies`), in memory."""
        return TeacherFeatures(
            np.concatenate([np.asarray(self.frames), np.asarray(more.frames)]),
            np.concatenate([self.offsets, self.offsets[-1] + more.offsets[1:]]).astype(np.int64),
        )


def _cache_key(cache: AudioCache, teacher_dir: Path, extra: str = "") -> str:
    digest = cache.digest()
    digest.update(
        f"{teacher_dir.resolve()}:{(teacher_dir / 'model.bin').stat().st_size}:{CONTEXT_SECONDS}{extra}".encode()
    )
    return digest.hexdigest()[:16]


def _encode_all(n: int, load_encode, frames_path: Path, index_path: Path, what: str) -> TeacherFeatures:
    """``encode(i)`` for clips ``0..n-1`` once, in resumable shards of ``SHARD_CLIPS``, stored back to
    back at ``frames_path`` (clip offsets at ``index_path``); the stored result when it exists.
    ``load_encode()`` loads the encoder and returns ``encode``; it runs only when a shard is missing."""
    if frames_path.exists() and index_path.exists():
        return TeacherFeatures(np.load(frames_path, mmap_mode="r"), np.load(index_path))
    frames_path.parent.mkdir(parents=True, exist_ok=True)
    shard_dir = frames_path.with_suffix(".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    shards = range(0, n, SHARD_CLIPS)
    encode = None
    for s in shards:
        shard = shard_dir / f"{s:06d}.npz"
        if shard.exists():
            continue
        encode = encode or load_encode()
        outs = [encode(i) for i in range(s, min(n, s + SHARD_CLIPS))]
        tmp = shard.with_suffix(".tmp.npz")
        np.savez(tmp, frames=np.concatenate(outs), counts=np.array([len(o) for o in outs]))
        tmp.replace(shard)
        log.info("%s: %d/%d clips encoded", what, min(n, s + SHARD_CLIPS), n)
    frames, counts = [], []
    for s in shards:
        with np.load(shard_dir / f"{s:06d}.npz") as z:
            frames.append(z["frames"])
            counts.append(z["counts"])
    offsets = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    tmp = frames_path.with_suffix(".tmp.npy")
    np.save(tmp, np.concatenate(frames))
    np.save(index_path, offsets)
    tmp.replace(frames_path)
    for f in shard_dir.glob("*.npz"):
        f.unlink()
    shard_dir.rmdir()
    return TeacherFeatures(np.load(frames_path, mmap_mode="r"), offsets)


def build_teacher_cache(
    cache: AudioCache,
    teacher_dir: str | Path,
    cache_dir: str | Path,
    threads: int = 0,
    show_progress: bool = False,
    layers: tuple[int, ...] = (),
) -> TeacherFeatures:
    """Encode every clip of ``cache`` once (resumable in shards of ``SHARD_CLIPS``), then reuse.

    ``layers`` empty: the encoder's output (CTranslate2, int8 on CPU). Otherwise the mean of the
    given hidden states (0 = after the stem, k = after block k, the last = the output), read with
    :mod:`train.whisper_layers` (float32) and cached once for all layers.
    """
    teacher_dir = check_teacher_dir(teacher_dir)
    cache_dir = Path(cache_dir)
    if layers:
        return _layer_features(cache, teacher_dir, cache_dir, tuple(layers), threads)
    key = _cache_key(cache, teacher_dir)

    def load_encode():
        model, extractor = load_encoder(teacher_dir, threads), whisper_feature_extractor()
        return lambda i: encode_clip(model, extractor, cache.clip(i))

    return _encode_all(
        len(cache),
        load_encode,
        cache_dir / f"teacher-{key}.npy",
        cache_dir / f"teacher-{key}.offsets.npy",
        "teacher cache",
    )


def whisper_feature_extractor():
    """faster-whisper's log-mel ``FeatureExtractor`` (NumPy only).

    Imported on its own when the package's ``__init__`` cannot be (it imports CTranslate2 and PyAV,
    which the layer teacher does not need: a GPU machine may carry faster-whisper's wheel alone)."""
    try:
        from faster_whisper.feature_extractor import FeatureExtractor
    except ImportError as exc:
        import importlib.util

        spec = importlib.util.find_spec("faster_whisper")
        module_file = (
            spec
            and spec.submodule_search_locations
            and Path(list(spec.submodule_search_locations)[0]) / "feature_extractor.py"
        )
        if not module_file or not module_file.is_file():
            raise TeacherError(
                f"distillation needs the training extra: pip install 'emostream[train]' (faster-whisper: {exc})"
            ) from None
        spec = importlib.util.spec_from_file_location("_faster_whisper_feature_extractor", module_file)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        FeatureExtractor = module.FeatureExtractor
    return FeatureExtractor()


def encode_clip_layers(encoder, extractor, audio: np.ndarray) -> np.ndarray:
    """Every hidden state of the encoder, ``(clip_frames, layers + 1, d_model)`` float16, for one
    16 kHz clip, in the same ``CONTEXT_SECONDS`` pieces as :func:`encode_clip`, on the encoder's
    device (in float32 there too: no TF32 convolutions on a GPU)."""
    import torch

    device = next(encoder.parameters()).device
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        return np.concatenate(
            [
                encoder(torch.from_numpy(mel).to(device))[:, 0, :n]
                .transpose(0, 1)
                .float()
                .cpu()
                .numpy()
                .astype(np.float16)
                for mel, n in context_mels(extractor, audio)
            ]
        )


def _layer_features(
    cache: AudioCache, teacher_dir: Path, cache_dir: Path, layers: tuple[int, ...], threads: int
) -> TeacherFeatures:
    """The mean of hidden states ``layers`` per frame (cached), from a cache of hidden states: the
    all-layer one when it exists, else one of states ``0..max(layers)`` only (the encoder cut after the
    last block needed: the same values, fewer blocks to run)."""
    key = _cache_key(cache, teacher_dir, ":layers")
    name = "-".join(str(k) for k in layers)
    frames_path = cache_dir / f"teacher-{key}-L{name}.npy"
    index_path = cache_dir / f"teacher-{key}.offsets.npy"
    if frames_path.exists() and index_path.exists():
        return TeacherFeatures(np.load(frames_path, mmap_mode="r"), np.load(index_path))
    from .whisper_layers import encoder_blocks_needed

    all_states = cache_dir / f"teacher-{key}.npy"
    blocks = None if all_states.exists() or not layers or min(layers) < 0 else max(1, encoder_blocks_needed(layers))
    states_path = all_states if blocks is None else cache_dir / f"teacher-{key}-B{blocks}.npy"

    def load_encode():
        import torch

        from emostream.model import select_device

        from .whisper_layers import load_encoder_layers

        if threads:
            torch.set_num_threads(threads)
        device = select_device()  # as the student: the GPU when present
        encoder, extractor = load_encoder_layers(teacher_dir, blocks).to(device), whisper_feature_extractor()
        log.info("teacher layers on %s%s", device, f" (blocks 0-{encoder.n_layers - 1})" if blocks else "")
        return lambda i: encode_clip_layers(encoder, extractor, cache.clip(i))

    every = _encode_all(len(cache), load_encode, states_path, index_path, "teacher layer cache")
    n_states = every.frames.shape[1]
    bad = [k for k in layers if not 0 <= k < n_states]
    if bad:
        raise TeacherError(f"teacher layer {bad[0]} does not exist: {teacher_dir} has hidden states 0-{n_states - 1}")
    out = np.empty((len(every.frames), every.frames.shape[2]), np.float16)
    for s in range(0, len(out), 65536):  # in blocks: the all-layer cache is several GB
        out[s : s + 65536] = every.frames[s : s + 65536, list(layers)].astype(np.float32).mean(axis=1)
    tmp = frames_path.with_suffix(".tmp.npy")
    np.save(tmp, out)
    tmp.replace(frames_path)
    return TeacherFeatures(np.load(frames_path, mmap_mode="r"), every.offsets)


# --- heads -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeacherHead:
    """Standardise, then a linear layer: logits = ((x - mean) / scale) @ coef.T + intercept."""

    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # (classes, d_model)
    intercept: np.ndarray  # (classes,)

    def logits(self, x: np.ndarray) -> np.ndarray:
        return ((x - self.mean) / self.scale) @ self.coef.T + self.intercept


def fit_head(x: np.ndarray, y: np.ndarray, n_classes: int, c: float = 0.5, seed: int = 0) -> TeacherHead:
    """Multinomial logistic regression on standardised pooled features."""
    from sklearn.linear_model import LogisticRegression

    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-6
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit((x - mean) / scale, y)
    coef = np.zeros((n_classes, x.shape[1]), dtype=np.float64)
    intercept = np.full(n_classes, -1e4)  # a class absent from training is never predicted
    coef[clf.classes_], intercept[clf.classes_] = clf.coef_, clf.intercept_
    return TeacherHead(mean, scale, coef, intercept)


def speaker_centres(features: TeacherFeatures, speakers: list[str]) -> np.ndarray:
    """Per clip, the mean of its speaker's whole-clip pooled features ``(clips, d_model)`` float32."""
    pooled = features.pooled()
    spk = np.asarray(speakers)
    out = np.empty_like(pooled)
    for s in np.unique(spk):
        rows = spk == s
        out[rows] = pooled[rows].mean(axis=0)
    return out


class FoldTeacher:
    """Soft targets for the student's training clips, from heads that never saw the validation speakers.

    Targets for a training clip come from a head fitted without that clip's speaker (``inner_folds``
    speaker-grouped splits of the training speakers), so they show how the teacher generalises to a
    new voice instead of echoing labels it memorised. ``head`` (fitted on all training speakers) is
    the teacher whose validation figures are reported.

    ``speaker_centre`` (one of :data:`SPEAKER_CENTRE`) subtracts each speaker's mean pooled encoder
    output (over that speaker's whole clips: unlabelled audio) from the teacher's features: before
    its heads (``"heads"``: the soft targets), or before the heads and the embedding and frame
    regression targets too (``"all"``). Centred, the teacher sees how a voice departs from its own
    average rather than who is speaking. The student never gets that per-speaker statistic: it
    learns to predict these targets from one window of audio. A held-out speaker's mean (for the
    reported teacher figures) comes from that speaker's audio alone, never from labels.
    """

    def __init__(
        self,
        features: TeacherFeatures,
        labels: np.ndarray,
        speakers: list[str],
        train_idx: np.ndarray,
        n_classes: int,
        inner_folds: int = 4,
        c: float = 0.5,
        seed: int = 0,
        speaker_centre: str = "none",
    ):
        from sklearn.model_selection import StratifiedGroupKFold

        if speaker_centre not in SPEAKER_CENTRE:
            raise ValueError(f"speaker_centre {speaker_centre!r} is not one of {', '.join(SPEAKER_CENTRE)}")
        self.features = features
        centre = speaker_centres(features, speakers) if speaker_centre != "none" else None
        self.head_centre = centre  # subtracted before the heads
        self.target_centre = centre if speaker_centre == "all" else None  # ... and from the regression targets
        raw = np.stack([features.pool(int(i)) for i in train_idx])
        pooled = raw if centre is None else raw - centre[train_idx]
        target = pooled if self.target_centre is not None else raw
        # the regression targets' units: the training speakers' mean and scale (those of the head
        # when both see the same features)
        self.target_mean, self.target_scale = target.mean(axis=0), target.std(axis=0) + 1e-6
        y = labels[train_idx]
        self.head = fit_head(pooled, y, n_classes, c, seed)
        groups = np.array([speakers[i] for i in train_idx])
        self.inner_heads: list[TeacherHead] = []
        self.head_of = np.full(len(labels), -1, dtype=np.int64)
        n_inner = min(inner_folds, len(set(groups)))
        if n_inner >= 2:
            splitter = StratifiedGroupKFold(n_splits=n_inner, shuffle=True, random_state=seed)
            for j, (fit_rows, held_rows) in enumerate(splitter.split(pooled, y, groups)):
                self.inner_heads.append(fit_head(pooled[fit_rows], y[fit_rows], n_classes, c, seed))
                self.head_of[train_idx[held_rows]] = j

    def _head_input(self, i: int, start: int = 0, length: int | None = None) -> np.ndarray:
        """:meth:`TeacherFeatures.pool`, less the clip's speaker mean when the heads are centred."""
        x = self.features.pool(i, start, length)
        return x if self.head_centre is None else x - self.head_centre[i]

    def _target(self, x: np.ndarray, i: int) -> np.ndarray:
        """Pooled encoder output ``x`` of clip ``i`` as a regression target: less the speaker mean
        when the targets are centred, then standardised (float32)."""
        if self.target_centre is not None:
            x = x - self.target_centre[i]
        return self._standardise(x)

    def _standardise(self, x: np.ndarray) -> np.ndarray:
        """Encoder outputs in the regression targets' units: the training speakers' mean and scale (float32)."""
        return ((x - self.target_mean) / self.target_scale).astype(np.float32)

    def logits(self, clip_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """Teacher logits for crops ``[start, start + length)`` of the given clips."""
        out = []
        for i, s, n in zip(clip_ids, starts, lengths):
            x = self._head_input(int(i), int(s), int(n))
            j = self.head_of[int(i)]
            out.append((self.inner_heads[j] if j >= 0 else self.head).logits(x))
        return np.stack(out)

    def embeddings(self, clip_ids: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
        """The teacher's pooled encoder output for the same crops, standardised with the training
        speakers' statistics (the target of the student's embedding regression), float32."""
        return np.stack(
            [
                self._target(self.features.pool(int(i), int(s), int(n)), int(i))
                for i, s, n in zip(clip_ids, starts, lengths)
            ]
        )

    def cell_embeddings(
        self, segments: list[list[tuple[int, int, int, int]]], n_cells: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The teacher's frames pooled per time cell of each window, standardised like
        :meth:`embeddings`: ``(windows, n_cells, D)`` float32 and a ``(windows, n_cells)`` mask.

        ``segments`` lists, per window, the clip audio it holds as ``(clip, first sample of the
        clip, first sample in the window, length)``; the window is cut into ``n_cells`` equal cells.
        A cell is pooled over every frame of every clip part inside it, and masked out (zeros) when
        less than ``CELL_MIN_AUDIO`` of it holds clip audio (padding, pauses between clips).
        """
        out = np.zeros((len(segments), n_cells, self.embedding_dim), np.float32)
        mask = np.zeros((len(segments), n_cells), bool)
        cell = WINDOW_SAMPLES / n_cells
        for b, segs in enumerate(segments):
            for c in range(n_cells):
                lo, hi = c * cell, (c + 1) * cell
                parts, covered = [], 0.0
                for clip, clip_start, at, length in segs:
                    a, e = max(lo, at), min(hi, at + length)
                    if e <= a:
                        continue
                    part = self.features.span(int(clip), int(clip_start + a - at), max(1, int(e - a)))
                    if self.target_centre is not None:
                        part = part.astype(np.float32) - self.target_centre[int(clip)]
                    parts.append(part)
                    covered += e - a
                if covered >= CELL_MIN_AUDIO * cell:
                    pooled = np.concatenate(parts).astype(np.float32).mean(axis=0)
                    out[b, c] = self._standardise(pooled)
                    mask[b, c] = True
        return out, mask

    @property
    def embedding_dim(self) -> int:
        return int(self.target_mean.shape[0])

    def clip_logits(self, clip_ids: np.ndarray) -> np.ndarray:
        """Whole-clip logits of the all-training-speakers head (the reported teacher)."""
        return self.head.logits(np.stack([self._head_input(int(i)) for i in clip_ids]))
