"""Training batches: crops of a clip (or of a turn of several clips) into the 6 s window, the waveform
augmentations drawn per clip and per window, copies substituted for clips, the batch with its teacher
targets, batches prepared ahead on a thread, and the augmentations drawn per batch at the model
(SpecAugment, VTLP factors)."""

from __future__ import annotations

import queue
import threading
from typing import Iterable, Iterator, NamedTuple, TypeVar

import numpy as np
import torch

from emostream.audio import SAMPLE_RATE, WINDOW_SAMPLES, telephone_channel
from emostream.model import CLASSES

from .config import TrainConfig
from .data import AudioCache, Clip
from .metrics import softmax

PREFETCH_BATCHES = 2  # batches prepared ahead on a background thread while the model trains on one
T = TypeVar("T")


def crop_layout(x: np.ndarray, rng: np.random.Generator, random_offset: bool) -> tuple[np.ndarray, int, int, int]:
    """A random 6 s crop of a long clip, or a short clip zero-padded to 6 s (at a random offset
    when ``random_offset``, else at the end as the recipe pads), with the span of the clip it holds
    (``start``, ``length`` in samples: what a teacher pools over) and where in the window that span
    begins (``offset``)."""
    out = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
    if len(x) >= WINDOW_SAMPLES:
        start = int(rng.integers(0, len(x) - WINDOW_SAMPLES + 1))
        out[:] = x[start : start + WINDOW_SAMPLES]
        return out, start, WINDOW_SAMPLES, 0
    offset = int(rng.integers(0, WINDOW_SAMPLES - len(x) + 1)) if random_offset else 0
    out[offset : offset + len(x)] = x
    return out, 0, len(x), offset


def crop_span(x: np.ndarray, rng: np.random.Generator, random_offset: bool) -> tuple[np.ndarray, int, int]:
    """:func:`crop_layout` without the offset: the window and the clip span it holds."""
    return crop_layout(x, rng, random_offset)[:3]


def crop_or_pad(x: np.ndarray, rng: np.random.Generator, random_offset: bool) -> np.ndarray:
    """The 6 s training window of a clip (see :func:`crop_span`)."""
    return crop_span(x, rng, random_offset)[0]


def augment_wave(x: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Waveform augmentations of one clip (before cropping)."""
    a = cfg.augment
    if a.telephone_probability and rng.random() < a.telephone_probability:
        x = telephone_channel(x)[: len(x)]
    if a.gain_db:
        x = x * np.float32(10 ** (rng.uniform(-a.gain_db, a.gain_db) / 20))
    if a.noise_snr_db and rng.random() < a.noise_probability:
        rms = float(np.sqrt(np.mean(x**2) + 1e-12))
        snr = rng.uniform(*a.noise_snr_db)
        x = x + rng.standard_normal(len(x)).astype(np.float32) * np.float32(rms / 10 ** (snr / 20))
    return np.clip(x, -1.0, 1.0).astype(np.float32)


def add_floor_noise(waves: np.ndarray, cfg: TrainConfig, rng: np.random.Generator) -> np.ndarray:
    """Room-noise floor over whole windows (padding included): streaming windows are padded by the
    line's noise, training clips by digital zeros. Level in dBFS RMS drawn per window."""
    a = cfg.augment
    if not a.floor_noise_dbfs or not a.floor_noise_probability:
        return waves
    for row in waves:
        if rng.random() < a.floor_noise_probability:
            level = np.float32(10 ** (rng.uniform(*a.floor_noise_dbfs) / 20))
            row += rng.standard_normal(len(row)).astype(np.float32) * level
    return np.clip(waves, -1.0, 1.0)


def partner_clips(clips: list[Clip], train_idx: np.ndarray) -> dict[int, np.ndarray]:
    """For each training clip, the other training clips of the same speaker and emotion."""
    groups: dict[tuple[str, str], list[int]] = {}
    for i in train_idx:
        groups.setdefault((clips[i].speaker, clips[i].label), []).append(int(i))
    return {
        int(i): np.array([j for j in groups[(clips[i].speaker, clips[i].label)] if j != i], dtype=np.int64)
        for i in train_idx
    }


def copy_partners(partners: dict[int, np.ndarray], copies: np.ndarray) -> dict[int, np.ndarray]:
    """``partners`` extended to copies: a copy's turn continues with its partners' copies in the same
    column (at the same speed: one voice per turn; for phone copies, the same line number)."""
    out = dict(partners)
    for i, others in partners.items():
        for j in range(copies.shape[1]):
            out[int(copies[i, j])] = copies[others, j]
    return out


def substitute_copies(idx: np.ndarray, copies: np.ndarray, probability: float, rng: np.random.Generator) -> np.ndarray:
    """``idx`` with each clip replaced, with ``probability``, by one of its copies (equally likely):
    speed copies of originals, or phone lines of any source clip."""
    use = rng.random(len(idx)) < probability
    pick = rng.integers(0, copies.shape[1], len(idx))
    return np.where(use, copies[idx, pick], idx)


def turn_audio(
    cache: AudioCache, i: int, partners: np.ndarray, cfg: TrainConfig, rng: np.random.Generator
) -> np.ndarray:
    """Clip ``i`` followed by random partners (same speaker, same emotion) with pauses between them,
    until the window is full: what a streaming window of one turn holds, unlike one padded clip."""
    return turn_pieces(cache, i, partners, cfg, rng)[0]


def turn_pieces(
    cache: AudioCache, i: int, partners: np.ndarray, cfg: TrainConfig, rng: np.random.Generator
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """:func:`turn_audio` and its layout: ``(clip, position in the turn, length)`` per clip."""
    sr = SAMPLE_RATE  # the cache holds 16 kHz audio
    first = cache.clip(i)
    pieces, total, layout = [first], len(first), [(int(i), 0, len(first))]
    for j in rng.permutation(partners)[:3]:
        if total >= WINDOW_SAMPLES:
            break
        gap = np.zeros(int(rng.uniform(*cfg.augment.concat_gap_seconds) * sr), np.float32)
        clip = cache.clip(int(j))
        pieces += [gap, clip]
        layout.append((int(j), total + len(gap), len(clip)))
        total += len(gap) + len(clip)
    return np.concatenate(pieces), layout


Segment = tuple[int, int, int, int]  # (clip, first sample of the clip, first sample in the window, length)


def window_segments(layout: list[tuple[int, int, int]], start: int, offset: int) -> list[Segment]:
    """Which clip audio a window holds: the parts of a turn's ``layout`` (see :func:`turn_pieces`;
    a single clip is a one-piece turn) inside the window that begins at sample ``start`` of the
    turn, or, for a turn shorter than the window, that places the whole turn at ``offset``."""
    out = []
    for clip, pos, length in layout:
        a, b = max(pos, start), min(pos + length, start + WINDOW_SAMPLES)
        if b > a:
            out.append((clip, a - pos, a - start + offset, b - a))
    return out


class Batch(NamedTuple):
    """One training batch: waveforms ``(B, WINDOW_SAMPLES)``, one-hot (or mixed) targets ``(B, 7)``,
    and with a teacher its logits ``(B, 7)`` and, when asked for, its standardised pooled embedding
    ``(B, D)`` and its encoder frames pooled per time cell of the student ``(B, cells, D)`` with the
    mask of the cells that hold enough clip audio ``(B, cells)``."""

    waves: torch.Tensor
    targets: torch.Tensor
    teacher_logits: torch.Tensor | None = None
    teacher_embedding: torch.Tensor | None = None
    teacher_frames: torch.Tensor | None = None
    teacher_frame_mask: torch.Tensor | None = None


def make_batch(
    cache: AudioCache,
    idx: np.ndarray,
    labels: np.ndarray,
    cfg: TrainConfig,
    rng: np.random.Generator,
    teacher=None,
    partners: dict[int, np.ndarray] | None = None,
    frame_cells: int = 0,
) -> Batch:
    """Waveforms, targets and, with a ``teacher`` (:class:`train.teacher.FoldTeacher`), its logits
    (and with ``distill.embed_weight`` its embedding) for exactly the crops taken; with
    ``distill.frame_weight`` and ``frame_cells`` (the student's time cells per window), the
    teacher's frames pooled per cell, over every clip the window holds.

    With ``augment.concat_probability`` and ``partners`` (:func:`partner_clips`), some windows are
    turns of several clips (:func:`turn_audio`); their teacher target is that of the whole first clip."""
    crops, segments = [], []
    for i in idx:
        p = cfg.augment.concat_probability
        if p and partners is not None and len(partners.get(int(i), ())) and rng.random() < p:
            turn, layout = turn_pieces(cache, int(i), partners[int(i)], cfg, rng)
            wave, start, _, offset = crop_layout(augment_wave(turn, cfg, rng), rng, cfg.augment.random_offset)
            crops.append((wave, 0, cache.clip_length(int(i))))
            segments.append(window_segments(layout, start, offset))
        else:
            wave, start, length, offset = crop_layout(
                augment_wave(cache.clip(i), cfg, rng), rng, cfg.augment.random_offset
            )
            crops.append((wave, start, length))
            segments.append(window_segments([(int(i), 0, cache.clip_length(int(i)))], start, offset))
    waves = np.stack([c[0] for c in crops])
    waves = add_floor_noise(waves, cfg, rng)
    targets = np.eye(len(CLASSES), dtype=np.float32)[labels[idx]]
    soft = emb = frames = frame_mask = None
    if teacher is not None:
        starts, lengths = np.array([c[1] for c in crops]), np.array([c[2] for c in crops])
        soft = teacher.logits(idx, starts, lengths).astype(np.float32)
        if cfg.distill.embed_weight:
            emb = teacher.embeddings(idx, starts, lengths)
        if cfg.distill.frame_weight and frame_cells:
            frames, frame_mask = teacher.cell_embeddings(segments, frame_cells)
    if cfg.mix_audio == "Mixup" and rng.random() < cfg.mix_probability:
        lam = np.float32(rng.beta(cfg.mix_concentration, cfg.mix_concentration))
        perm = rng.permutation(len(idx))
        waves = lam * waves + (1 - lam) * waves[perm]
        targets = lam * targets + (1 - lam) * targets[perm]
        if soft is not None:  # mix the teacher's distributions like the labels
            t = cfg.distill.temperature
            p = lam * softmax(soft / t) + (1 - lam) * softmax(soft[perm] / t)
            soft = (np.log(np.clip(p, 1e-8, 1)) * t).astype(np.float32)
        if emb is not None:
            emb = (lam * emb + (1 - lam) * emb[perm]).astype(np.float32)
        if frames is not None:  # a cell empty in one window contributes nothing (zeros) from it
            frames = (lam * frames + (1 - lam) * frames[perm]).astype(np.float32)
            frame_mask = frame_mask | frame_mask[perm]
    if cfg.label_smoothing:
        targets = targets * (1 - cfg.label_smoothing) + cfg.label_smoothing / len(CLASSES)
    tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return Batch(
        torch.from_numpy(waves),
        torch.from_numpy(targets),
        tensor(soft),
        tensor(emb),
        tensor(frames),
        tensor(frame_mask),
    )


_DONE = object()


def prefetched(items: Iterable[T], depth: int = PREFETCH_BATCHES) -> Iterator[T]:
    """``items`` in their order, produced up to ``depth`` ahead on a background thread (``depth`` 0:
    in the caller's thread). The producer is the only user of whatever state ``items`` draws on (a
    batch generator's ``rng``), so the items are the same either way. An exception in the producer
    is raised here, at the item it failed on; closing this iterator stops the producer and waits for
    it, so nothing runs on after the consumer stops (an interrupted epoch, a failed step)."""
    if depth <= 0:
        yield from items
        return
    ready: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                ready.put(entry, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_DONE, None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put((_DONE, exc))

    worker = threading.Thread(target=produce, name="batch-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, exc = ready.get()
            if exc is not None:
                raise exc
            if item is _DONE:
                return
            yield item
    finally:
        stop.set()
        worker.join()


class SpecAugment:
    """Time and frequency masking on a log-mel batch, filled with each example's mean."""

    def __init__(self, cfg: TrainConfig, generator: torch.Generator):
        self.a, self.g = cfg.augment, generator

    def __call__(self, spec: torch.Tensor) -> torch.Tensor:
        a = self.a
        if not (a.spec_time_masks or a.spec_freq_masks):
            return spec
        spec = spec.clone()
        b, _, n_mels, n_frames = spec.shape
        fill = spec.mean(dim=(1, 2, 3))
        for i in range(b):
            for _ in range(a.spec_freq_masks):
                w = int(torch.randint(0, a.spec_freq_width + 1, (1,), generator=self.g))
                f0 = int(torch.randint(0, max(1, n_mels - w), (1,), generator=self.g))
                spec[i, :, f0 : f0 + w, :] = fill[i]
            for _ in range(a.spec_time_masks):
                w = int(torch.randint(0, a.spec_time_width + 1, (1,), generator=self.g))
                t0 = int(torch.randint(0, max(1, n_frames - w), (1,), generator=self.g))
                spec[i, :, :, t0 : t0 + w] = fill[i]
        return spec


def vtlp_factors(cfg: TrainConfig, n: int, generator: torch.Generator) -> torch.Tensor | None:
    """One VTLP factor per window (``augment.vtlp_probability`` of them drawn uniformly from
    ``augment.vtlp_range``, the rest 1), or None when VTLP is off (no random numbers drawn, so
    configs without it train exactly as before). The teacher's target stays that of the clean clip."""
    a = cfg.augment
    if not a.vtlp_probability:
        return None
    lo, hi = a.vtlp_range
    on = torch.rand(n, generator=generator) < a.vtlp_probability
    factor = lo + (hi - lo) * torch.rand(n, generator=generator)
    return torch.where(on, factor, torch.ones(n))
