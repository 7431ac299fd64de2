"""Training loop (fit), fixed-chunk evaluation, k-fold CV and reports."""

from __future__ import annotations

import copy
import json
import logging
import math
import queue
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, TypeVar

import numpy as np
import torch
import torch.nn.functional as F

from emostream.audio import SAMPLE_RATE, WINDOW_SAMPLES, float32_to_int16, telephone_channel
from emostream.features import FeatureConfig
from emostream.model import (
    CLASSES,
    EmotionNet,
    ModelConfig,
    autocast_for,
    load_pretrained_backbone,
    precision_name,
    save_checkpoint,
    select_device,
)
from emostream.stream import placed_windows

from .config import ConfigError, TrainConfig
from .data import AudioCache, Clip
from .forward import training_forward
from .metrics import (
    classification_metrics,
    fit_temperature,
    grouped_metrics,
    markdown_table,
    plot_confusion,
    plot_curves,
    softmax,
    write_json,
)

log = logging.getLogger("train")
STATE_FILE = "state.pt"
PREFETCH_BATCHES = 2  # batches prepared ahead on a background thread while the model trains on one
T = TypeVar("T")


def build_model(cfg: TrainConfig, pretrained_path: str | None = None) -> EmotionNet:
    """The streaming model for a config (the same class `emostream` loads)."""
    features = FeatureConfig(
        n_fft=cfg.n_fft,
        hop_length=cfg.hop_length,
        n_mels=cfg.n_mels,
        f_min=cfg.f_min,
        f_max=cfg.f_max,
        normalize=cfg.normalize,
    )
    model = EmotionNet(
        ModelConfig(backbone=cfg.backbone, dropout=cfg.dropout, drop_path=cfg.drop_path, pool=cfg.pool), features
    )
    if pretrained_path:
        load_pretrained_backbone(model, pretrained_path)
        log.info("loaded pretrained backbone from %s", pretrained_path)
    return model


# --- batches ---------------------------------------------------------------------------------------


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


def loss_fn(
    cfg: TrainConfig, logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """The recipe's loss on the labels; with teacher logits, ``(1 - alpha)`` of it plus ``alpha``
    times the temperature-scaled KL divergence to the teacher (Hinton et al., scaled by T²)."""
    if cfg.loss == "BCE":
        hard = F.binary_cross_entropy_with_logits(logits, targets)
    else:
        hard = torch.sum(-targets * F.log_softmax(logits, dim=-1), dim=-1).mean()
    if teacher_logits is None:
        return hard
    t, a = cfg.distill.temperature, cfg.distill.alpha
    kd = (
        F.kl_div(
            F.log_softmax(logits / t, dim=-1),
            F.log_softmax(teacher_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )
    return (1 - a) * hard + a * kd


def embedding_loss(projected: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance between the projected student features and the teacher's embedding."""
    return (1 - F.cosine_similarity(projected.float(), target.float(), dim=-1)).mean()


def frame_embedding_loss(projected: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cosine distance over the masked time cells: ``projected`` and ``target`` are
    ``(B, cells, D)``, ``mask`` ``(B, cells)``; zero when no cell holds audio."""
    dist = 1 - F.cosine_similarity(projected.float(), target.float(), dim=-1)
    m = mask.float()
    return (dist * m).sum() / m.sum().clamp(min=1.0)


class FrameProjector(torch.nn.Module):
    """Training only: the student's last feature map ``(B, C, F, T)``, averaged over frequency,
    through a 1x1 projection to the teacher's width, as ``(B, T, D)``."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.proj = torch.nn.Conv1d(channels, dim, kernel_size=1)

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return self.proj(feature_map.float().mean(dim=2)).transpose(1, 2)


def time_cells(model: EmotionNet, device: torch.device) -> int:
    """Time cells of the model's last feature map for one window (eval mode: no statistics move)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        _, fmap = training_forward(model, torch.zeros(1, WINDOW_SAMPLES, device=device), return_feature_map=True)
    model.train(was_training)
    return int(fmap.shape[-1])


def make_optimizer(cfg: TrainConfig, model: EmotionNet) -> torch.optim.Optimizer:
    diff = [
        p
        for n, p in model.named_parameters()
        if any(n.startswith(f"backbone.{layer}") for layer in cfg.differential_learning_rate_layers)
    ]
    diff_ids = {id(p) for p in diff}
    rest = [p for p in model.parameters() if id(p) not in diff_ids]
    groups = [{"params": rest, "lr": cfg.learning_rate}]
    if diff:
        groups.append({"params": diff, "lr": cfg.differential_learning_rate})
    if cfg.optimizer == "AdamW":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "Adam":
        return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, momentum=0.9, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, total: int, steps_per_epoch: int) -> float:
    """Warmup then cosine / linear / constant, per optimizer step."""
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    if cfg.schedule == "Cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "Linear":
        return 1 - progress
    return 1.0


def ema_decay_at(decay: float, step: int) -> float:
    """The weight average's decay after ``step`` optimizer steps: ``decay``, warmed up as
    ``(1 + step) / (10 + step)`` so that the first steps do not keep the random initialisation."""
    return min(decay, (1 + step) / (10 + step))


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """One step of the exponential moving average of ``model``'s weights into ``ema`` (a copy of it):
    floating-point parameters and buffers (batch-norm statistics) move ``1 - decay`` of the way to the
    model's, integer buffers (batch counts) are copied."""
    for e, p in zip(ema.state_dict().values(), model.state_dict().values()):
        if e.dtype.is_floating_point:
            e.lerp_(p, 1.0 - decay)
        else:
            e.copy_(p)


# --- evaluation ------------------------------------------------------------------------------------


@torch.inference_mode()
def predict_logits(
    model: EmotionNet,
    clips: list[np.ndarray],
    device: torch.device,
    mixed_precision: bool,
    batch_size: int = 32,
    max_seconds: float = 600.0,
    positions: int = 1,
) -> np.ndarray:
    """Clip-level logits: per-window logits averaged over each clip's windows, the recipe's fixed 6 s
    chunks (``positions`` 1) or ``positions`` placements of the clip (:func:`placed_windows`)."""
    model.eval()
    windows, owner = [], []
    for i, x in enumerate(clips):
        w = placed_windows(x, positions, max_seconds)
        windows.append(w)
        owner += [i] * len(w)
    windows_arr = np.concatenate(windows)
    out = []
    for s in range(0, len(windows_arr), batch_size):
        xb = torch.from_numpy(windows_arr[s : s + batch_size]).to(device)
        with autocast_for(device, mixed_precision):
            out.append(model(xb).float().cpu().numpy())
    logits = np.concatenate(out)
    owner_arr = np.asarray(owner)
    return np.stack([logits[owner_arr == i].mean(axis=0) for i in range(len(clips))])


def clip_scoring(positions: int) -> str:
    """How :func:`predict_logits` scores a clip with ``positions``, in words for reports."""
    if positions == 1:
        return "each clip scored by the recipe's fixed 6 s chunks"
    return f"each clip scored as the mean of {positions} placements in the window"


def predict_validation(
    cfg: TrainConfig, model: EmotionNet, clips: list[np.ndarray], device: torch.device
) -> np.ndarray:
    """:func:`predict_logits` with the config's inference settings (precision, length cap, positions)."""
    return predict_logits(
        model,
        clips,
        device,
        cfg.mixed_precision_inference,
        max_seconds=cfg.max_inference_chunk_seconds,
        positions=cfg.inference_positions,
    )


def telephone_copies(clips: list[np.ndarray], channel: str = "g712") -> list[np.ndarray]:
    """The clips through a telephone channel, each at its own length: ``g712`` (the reference:
    300-3400 Hz band-pass at 8 kHz, G.711 μ-law; :func:`emostream.channel.g712_telephone`), ``mulaw``
    (8 kHz μ-law only, no band-pass: the pre-2026-12-06 "telephone") or a codec of
    :data:`emostream.channel.CODECS` after the G.712 band (a row of the codec grid)."""
    from emostream.channel import CODECS, codec_channel, g712_telephone

    if channel == "g712":
        return [g712_telephone(x) for x in clips]
    if channel == "mulaw":
        return [telephone_channel(x)[: len(x)] for x in clips]
    if channel in CODECS:
        return [codec_channel(x, channel) for x in clips]
    raise ValueError(f"unknown telephone channel {channel!r}: g712, mulaw or one of {', '.join(CODECS)}")


def save_validation_logits(
    cfg: TrainConfig,
    model: EmotionNet,
    val_clips: list[np.ndarray],
    telephone_clips: list[np.ndarray] | None,
    device: torch.device,
    out_dir: Path,
    suffix: str = "",
) -> tuple[np.ndarray, np.ndarray | None]:
    """Validation logits (and, given ``telephone_clips``, the telephone copy's) under ``cfg``'s
    inference settings, saved as ``val_logits{suffix}.npy`` / ``val_telephone_logits{suffix}.npy``."""
    vl = predict_validation(cfg, model, val_clips, device)
    np.save(out_dir / f"val_logits{suffix}.npy", vl)
    vt = None
    if telephone_clips is not None:
        vt = predict_validation(cfg, model, telephone_clips, device)
        np.save(out_dir / f"val_telephone_logits{suffix}.npy", vt)
    return vl, vt


# --- fit -------------------------------------------------------------------------------------------

EPOCH_METRICS = ("ua", "roc_auc", "macro_f1", "accuracy")  # validation figures logged per epoch


@dataclass
class FitResult:
    history: list[dict]
    checkpoint: Path
    val_logits: np.ndarray | None = None
    val_telephone_logits: np.ndarray | None = None
    stopped: bool = False  # True when ``stop_after`` ended the run early (resumable, no checkpoint yet)


def _progress():
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )


def fit(
    cfg: TrainConfig,
    clips: list[Clip],
    cache: AudioCache,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    out_dir: Path,
    resume: bool = False,
    pretrained_path: str | None = None,
    metadata: dict | None = None,
    device: str | None = None,
    show_progress: bool = True,
    telephone_eval: bool = True,
    stop_after: int | None = None,
    teacher=None,
    copies: np.ndarray | None = None,
    prefetch: int = PREFETCH_BATCHES,
    phone: np.ndarray | None = None,
) -> FitResult:
    """Train one model; saves ``state.pt`` after every epoch (resumable) and the final checkpoint.

    ``stop_after`` ends this run once that many epochs are finished, leaving the same resumable state
    as an interruption (used to split long runs and to test that resuming is exact). ``teacher``
    (a :class:`train.teacher.FoldTeacher` fitted on ``train_idx`` only) adds the distillation term.
    ``copies`` (:attr:`train.data.SpeedCopies.copies`; ``clips`` and ``cache`` then hold the copies
    after the originals) lets ``augment.speed_probability`` of the training windows come from a copy;
    ``phone`` (:attr:`train.data.CopySet.phone`: the phone lines of every original and speed copy,
    held after them in ``clips`` and ``cache``) then puts ``augment.phone_probability`` of the
    windows, whatever their speed, through a random line.
    ``prefetch`` batches are prepared ahead on a thread (:func:`prefetched`; 0: serially): the same
    batches in the same order, so the run is identical either way.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = select_device(device)
    precision = precision_name(dev, cfg.mixed_precision_training)
    if cfg.mixed_precision_training and precision == "fp32":
        log.info(
            "note: mixed precision off: this CPU has no fast bf16 kernels (oneDNN), where bf16 autocast "
            "is slower than fp32; training in fp32 + channels_last"
        )
    torch.manual_seed(cfg.student_seed)
    model = build_model(cfg, pretrained_path).to(dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    # weight average: a shadow copy, updated after each optimizer step; it changes nothing in training
    ema = copy.deepcopy(model).requires_grad_(False) if cfg.ema_decay else None
    # embedding regression: a linear map from the student's pooled features to the teacher's space,
    # used in training only (not part of the checkpoint)
    projector = None
    if teacher is not None and cfg.distill.embed_weight:
        projector = torch.nn.Linear(model.backbone.num_features, teacher.embedding_dim).to(dev)
        opt.add_param_group({"params": list(projector.parameters()), "lr": cfg.learning_rate})
    # frame regression: a 1x1 map from each time cell of the student's feature map to the teacher's
    # frames pooled over that cell (training only, like the projection above)
    frame_projector, frame_cells = None, 0
    if teacher is not None and cfg.distill.frame_weight:
        frame_cells = time_cells(model, dev)
        frame_projector = FrameProjector(model.backbone.num_features, teacher.embedding_dim).to(dev)
        opt.add_param_group({"params": list(frame_projector.parameters()), "lr": cfg.learning_rate})
    labels = np.array([CLASSES.index(c.label) for c in clips])
    steps_per_epoch = len(train_idx) // cfg.batch_size if cfg.drop_last else math.ceil(len(train_idx) / cfg.batch_size)
    if steps_per_epoch == 0:
        steps_per_epoch, drop_last = 1, False
    else:
        drop_last = cfg.drop_last
    opt_steps_per_epoch = max(1, steps_per_epoch // cfg.grad_accumulation)
    total_steps = opt_steps_per_epoch * cfg.epochs
    base_lrs = [g["lr"] for g in opt.param_groups]
    scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and cfg.mixed_precision_training else None

    history: list[dict] = []
    start_epoch, opt_step = 0, 0
    state_path = out_dir / STATE_FILE
    if resume and state_path.exists():
        state = torch.load(state_path, map_location=dev, weights_only=False)
        model.load_state_dict(state["model"])
        if projector is not None:
            projector.load_state_dict(state["projector"])
        if frame_projector is not None:
            frame_projector.load_state_dict(state["frame_projector"])
        if ema is not None:
            if state.get("ema") is None:
                raise ConfigError(
                    f"{state_path} was trained without emostream.ema_decay: resume it with its own config"
                )
            ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        history, start_epoch, opt_step = state["history"], state["epoch"], state["opt_step"]
        log.info("resumed from %s at epoch %d", state_path, start_epoch)
    elif resume:
        log.info("nothing to resume in %s: starting fresh", out_dir)

    val_clips = [cache.clip(i) for i in val_idx] if val_idx is not None and len(val_idx) else None
    partners = partner_clips(clips, train_idx) if cfg.augment.concat_probability else None
    speed = cfg.augment.speed_probability if copies is not None else 0.0
    if cfg.augment.speed_probability and copies is None:
        raise ConfigError("emostream.augment.speed_probability: no speed copies were built for this run")
    line = cfg.augment.phone_probability if phone is not None else 0.0
    if cfg.augment.phone_probability and phone is None:
        raise ConfigError("emostream.augment.phone_probability: no phone copies were built for this run")
    if speed and partners is not None:
        partners = copy_partners(partners, copies)
    if line and partners is not None:
        partners = copy_partners(partners, phone)

    def epoch_batches(order: np.ndarray, rng: np.random.Generator) -> Iterator[tuple[np.ndarray, Batch]]:
        """One epoch's batches in ``order``, drawing crops and augmentation from ``rng``."""
        for step in range(steps_per_epoch):
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if drop_last and len(idx) < cfg.batch_size:
                return
            if speed:
                idx = substitute_copies(idx, copies, speed, rng)
            if line:
                idx = substitute_copies(idx, phone, line, rng)
            yield (
                idx,
                make_batch(cache, idx, labels, cfg, rng, teacher=teacher, partners=partners, frame_cells=frame_cells),
            )

    progress = _progress() if show_progress else None
    if progress:
        progress.start()
    try:
        for epoch in range(start_epoch, cfg.epochs):
            t0 = time.time()
            model.train()
            rng = np.random.default_rng([cfg.student_seed, epoch])
            gen = torch.Generator().manual_seed(cfg.student_seed * 1000 + epoch)
            # the global stream (stochastic depth, dropout) restarts each epoch too, so resume is exact
            torch.manual_seed(int(np.random.SeedSequence([cfg.student_seed, epoch, 1]).generate_state(1)[0]))
            spec_aug = SpecAugment(cfg, gen)
            order = rng.permutation(train_idx)
            losses = []
            task = (
                progress.add_task(f"epoch {epoch + 1}/{cfg.epochs}", total=steps_per_epoch, info="")
                if progress
                else None
            )
            with closing(prefetched(epoch_batches(order, rng), prefetch)) as batches:
                for step, (idx, batch) in enumerate(batches):
                    x, y = batch.waves.to(dev), batch.targets.to(dev)
                    warp = vtlp_factors(cfg, len(idx), gen)
                    warp = warp.to(dev) if warp is not None else None
                    soft = batch.teacher_logits.to(dev) if batch.teacher_logits is not None else None
                    with autocast_for(dev, cfg.mixed_precision_training):
                        if projector is not None or frame_projector is not None:
                            logits, features, fmap = training_forward(
                                model, x, spec_aug, warp, return_embedding=True, return_feature_map=True
                            )
                        else:
                            logits = training_forward(model, x, spec_aug, warp)
                        projected = projector(features) if projector is not None else None
                        frames_projected = frame_projector(fmap) if frame_projector is not None else None
                    loss = loss_fn(cfg, logits.float(), y, soft)
                    if projector is not None:
                        loss = loss + cfg.distill.embed_weight * embedding_loss(
                            projected, batch.teacher_embedding.to(dev)
                        )
                    if frame_projector is not None:
                        loss = loss + cfg.distill.frame_weight * frame_embedding_loss(
                            frames_projected, batch.teacher_frames.to(dev), batch.teacher_frame_mask.to(dev)
                        )
                    loss = loss / cfg.grad_accumulation
                    (scaler.scale(loss) if scaler else loss).backward()
                    losses.append(float(loss.detach()) * cfg.grad_accumulation)
                    if (step + 1) % cfg.grad_accumulation == 0:
                        factor = lr_factor(cfg, opt_step, total_steps, opt_steps_per_epoch)
                        for g, base in zip(opt.param_groups, base_lrs):
                            g["lr"] = base * factor
                        if scaler:
                            scaler.unscale_(opt)
                        if cfg.gradient_clip > 0:
                            torch.nn.utils.clip_grad_norm_(
                                [p for g in opt.param_groups for p in g["params"]], cfg.gradient_clip
                            )
                        (scaler.step(opt), scaler.update()) if scaler else opt.step()
                        opt.zero_grad(set_to_none=True)
                        opt_step += 1
                        if ema is not None:
                            update_ema(ema, model, ema_decay_at(cfg.ema_decay, opt_step))
                    if progress:
                        progress.update(task, advance=1, info=f"loss {np.mean(losses):.4f}")
            record = {
                "epoch": epoch + 1,
                "train_loss": float(np.mean(losses)),
                "precision": precision,
                "seconds": time.time() - t0,
                "samples_per_second": len(losses) * cfg.batch_size / (time.time() - t0),
            }
            if val_clips is not None and ((epoch + 1) % cfg.evaluation_epochs == 0 or epoch + 1 == cfg.epochs):
                vl = predict_validation(cfg, model, val_clips, dev)
                yv = labels[val_idx]
                m = classification_metrics(softmax(vl), yv)
                record.update(
                    {k: m[k] for k in EPOCH_METRICS},
                    val_loss=float(
                        F.binary_cross_entropy_with_logits(torch.from_numpy(vl), torch.eye(len(CLASSES))[yv]).item()
                    ),
                )
                if ema is not None:
                    el = predict_validation(cfg, ema, val_clips, dev)
                    me = classification_metrics(softmax(el), yv)
                    record.update({f"ema_{k}": me[k] for k in EPOCH_METRICS})
            history.append(record)
            if progress:
                progress.update(
                    task,
                    info=" ".join(f"{k} {v:.3f}" for k, v in record.items() if k in ("train_loss", "ua", "roc_auc")),
                )
            log.info("epoch %s", json.dumps(record))
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "history": history,
                    "ema": ema.state_dict() if ema is not None else None,
                    "epoch": epoch + 1,
                    "opt_step": opt_step,
                    "config": cfg.to_dict(),
                    "projector": projector.state_dict() if projector is not None else None,
                    "frame_projector": frame_projector.state_dict() if frame_projector is not None else None,
                },
                state_path.with_suffix(".tmp"),
            )
            state_path.with_suffix(".tmp").replace(state_path)
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
                log.info("stopping after epoch %d as asked; resume with --resume", epoch + 1)
                return FitResult(history=history, checkpoint=out_dir / "checkpoint", stopped=True)
    finally:
        if progress:
            progress.stop()

    result = FitResult(history=history, checkpoint=out_dir / "checkpoint")
    final = ema if ema is not None else model  # the weights saved, streamed and reported
    if val_clips is not None:
        tel = telephone_copies(val_clips) if telephone_eval else None
        # with a weight average, the raw weights' logits are kept too (``*_raw.npy``), for comparison
        for net, suffix in [(final, "")] + ([(model, "_raw")] if ema is not None else []):
            vl, vt = save_validation_logits(cfg, net, val_clips, tel, dev, out_dir, suffix)
            if net is final:
                result.val_logits, result.val_telephone_logits = vl, vt
    meta = {"training": {"config": cfg.to_dict(), "history": history, "train_clips": int(len(train_idx))}}
    meta.update(metadata or {})
    model_cpu = final.to("cpu").to(memory_format=torch.contiguous_format)
    save_checkpoint(model_cpu, result.checkpoint, meta)
    plot_curves(history, out_dir / "curves.png")
    return result


def evaluate_checkpoint(
    checkpoint: str | Path,
    clips: list[Clip],
    cache: AudioCache,
    out_dir: Path,
    device: str | None = None,
    mixed_precision: bool = False,
    positions: int = 1,
) -> dict:
    """Metrics report (JSON + Markdown + confusion PNG) of a checkpoint on a labelled set; ``positions``
    as in :func:`predict_logits`."""
    from emostream.model import load_checkpoint, scoring_temperature

    dev = select_device(device)
    model = load_checkpoint(checkpoint, dev)
    logits = predict_logits(
        model, [cache.clip(i) for i in range(len(clips))], dev, mixed_precision, positions=positions
    )
    temperature = scoring_temperature(model.model_config.temperature, model.model_config.clip_temperature, positions)
    y = np.array([CLASSES.index(c.label) for c in clips])
    report = grouped_metrics(softmax(logits, temperature), y, [c.corpus for c in clips])
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(
        out_dir / "evaluation.json",
        {
            "checkpoint": str(checkpoint),
            "temperature": temperature,
            "positions": positions,
            "clips": len(clips),
            "speakers": sorted({c.speaker for c in clips}),
            "metrics": report,
        },
    )
    (out_dir / "evaluation.md").write_text(
        markdown_table(report, f"Evaluation of {checkpoint} ({clip_scoring(positions)})")
    )
    plot_confusion(report["overall"]["confusion"], out_dir / "confusion.png", "evaluation")
    return report


def evaluate_channels(
    checkpoint: str | Path,
    clips: list[Clip],
    cache: AudioCache,
    channels: list[str],
    out_dir: Path,
    device: str | None = None,
    positions: int = 1,
) -> str:
    """:func:`evaluate_checkpoint` on each channel copy of the clips (``full``: as they are; else a
    :func:`telephone_copies` channel), reports under ``out_dir/<channel>``; returns a Markdown table
    (UA, macro-F1, accuracy, macro ROC AUC, Neutral recall per channel), also ``out_dir/channels.md``."""
    rows = []
    originals = [cache.clip(i) for i in range(len(clips))]
    for channel in channels:
        if channel == "full":
            copy = cache
        else:
            pieces = [float32_to_int16(x) for x in telephone_copies(originals, channel)]
            copy = AudioCache(np.concatenate(pieces), cache.offsets)
        log.info("evaluating the %s copy", channel)
        overall = evaluate_checkpoint(checkpoint, clips, copy, out_dir / channel, device=device, positions=positions)[
            "overall"
        ]
        neutral = overall["per_class_recall"].get("Neutral", float("nan"))
        rows.append(
            f"| {CHANNEL_NAMES.get(channel, channel)} | {overall['ua']:.3f} | {overall['macro_f1']:.3f} | "
            f"{overall['accuracy']:.3f} | {overall['roc_auc']:.3f} | {neutral:.2f} |"
        )
    table = (
        "\n".join(
            [
                f"Evaluation of {checkpoint} by channel ({len(clips)} clips, {clip_scoring(positions)})",
                "",
                "| channel | UA | macro-F1 | accuracy | macro ROC AUC | Neutral recall |",
                "|---|---|---|---|---|---|",
                *rows,
            ]
        )
        + "\n"
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "channels.md").write_text(table)
    return table


CHANNEL_NAMES = {
    "full": "full band, 16 kHz",
    "g712": "G.712 telephone (300-3400 Hz, 8 kHz, G.711 μ-law)",
    "mulaw": "8 kHz μ-law only (no band-pass)",
}


def channel_logits(
    cfg: TrainConfig, fold_dir: Path, val_clips: list[np.ndarray], channel: str, device: str | None = None
) -> np.ndarray:
    """A finished fold's validation logits on the ``channel`` copy of its clips (:func:`telephone_copies`),
    from its saved checkpoint; cached as ``val_<channel>_logits.npy`` in the fold's folder."""
    from emostream.model import load_checkpoint

    path = fold_dir / f"val_{channel}_logits.npy"
    if path.exists():
        return np.load(path)
    if not (fold_dir / "checkpoint" / "model.safetensors").exists():
        raise ConfigError(f"{fold_dir / 'checkpoint'}: no saved model to score the {channel} channel with")
    dev = select_device(device)
    log.info("%s: scoring the %s copy of %d validation clips", fold_dir.name, channel, len(val_clips))
    logits = predict_validation(
        cfg, load_checkpoint(fold_dir / "checkpoint", dev), telephone_copies(val_clips, channel), dev
    )
    np.save(path, logits)
    return logits


def reevaluate_fold(
    cfg: TrainConfig, fold_dir: Path, val_clips: list[np.ndarray], device: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Validation and telephone-channel logits of a finished fold's saved checkpoint under ``cfg``'s
    inference settings; written over the fold's ``val_logits.npy`` and ``val_telephone_logits.npy``."""
    from emostream.model import load_checkpoint

    if not (fold_dir / "checkpoint" / "model.safetensors").exists():
        raise ConfigError(
            f"{fold_dir / 'checkpoint'}: no saved model to evaluate again (logits alone cannot be rescored)"
        )
    dev = select_device(device)
    model = load_checkpoint(fold_dir / "checkpoint", dev)
    return save_validation_logits(cfg, model, val_clips, telephone_copies(val_clips), dev, fold_dir)


def fold_teacher(
    cfg: TrainConfig,
    clips: list[Clip],
    features,
    train_idx: np.ndarray,
    copies: np.ndarray | None = None,
    phone: np.ndarray | None = None,
):
    """The distillation teacher of one training set: heads fitted on ``train_idx``'s speakers only.
    With speed ``copies`` (``clips`` and ``features`` then include them), the heads are fitted on the
    original clips alone and a copy's targets come from its original's head, on the copy's own features.
    With ``phone`` lines of those clips, a line's targets come from its source's head, on the line's
    features (``emostream.distill.phone_targets``: its clean source's features, or its own). With its
    own, the heads are fitted on the original clips and their lines together: through G.712 such a
    head scores 0.689 UA out of fold against 0.595 for one fitted on clean clips alone, and 0.734
    against 0.720 full band (``train teacher --channels g712``, EXPERIMENTS note 40)."""
    from .teacher import FoldTeacher

    labels = np.array([CLASSES.index(c.label) for c in clips])
    fit_idx = train_idx
    if phone is not None and cfg.distill.phone_targets == "copy":
        fit_idx = np.concatenate([train_idx, phone[train_idx].ravel()])
    teacher = FoldTeacher(
        features,
        labels,
        [c.speaker for c in clips],
        fit_idx,
        len(CLASSES),
        inner_folds=cfg.distill.inner_folds,
        c=cfg.distill.head_c,
        seed=cfg.seed,
        speaker_centre=cfg.distill.speaker_centre,
    )
    sources = train_idx
    if copies is not None:
        teacher.head_of[copies[train_idx]] = teacher.head_of[train_idx, None]
        sources = np.concatenate([train_idx, copies[train_idx].ravel()])
    if phone is not None:
        teacher.head_of[phone[sources]] = teacher.head_of[sources, None]
    return teacher


def teacher_cv(cfg: TrainConfig, clips: list[Clip], features, folds: np.ndarray, out_dir: Path) -> dict:
    """The teacher alone (Whisper encoder + logistic regression), cross-validated on the same
    speaker-grouped folds as the student: the upper reference for distillation."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = np.array([CLASSES.index(c.label) for c in clips])
    corpora = [c.corpus for c in clips]
    per_fold, oof = [], np.zeros((len(clips), len(CLASSES)))
    for k in range(cfg.folds):
        train_idx, val_idx = np.where(folds != k)[0], np.where(folds == k)[0]
        teacher = fold_teacher(cfg, clips, features, train_idx)
        oof[val_idx] = softmax(teacher.clip_logits(val_idx))
        per_fold.append(_teacher_metrics(teacher, val_idx, labels, corpora))
    from .metrics import summarize_folds

    report = {
        "protocol": f"{cfg.folds}-fold CV grouped by {cfg.group_by}; teacher: Whisper base encoder "
        f"(frozen) + logistic regression (C={cfg.distill.head_c})"
        + (f", encoder hidden states {', '.join(map(str, cfg.distill.layers))} (mean)" if cfg.distill.layers else "")
        + (
            ", features centred per speaker (a held-out speaker's mean from its own audio)"
            if cfg.distill.speaker_centre != "none"
            else ""
        ),
        "teacher": cfg.distill.teacher,
        "summary": summarize_folds(per_fold),
        "pooled": grouped_metrics(oof, labels, corpora),
        "folds": per_fold,
    }
    write_json(out_dir / "teacher_report.json", report)
    (out_dir / "teacher_report.md").write_text(
        markdown_table(report["pooled"], "Teacher, pooled out-of-fold") + "\n" + _summary_lines(report["summary"])
    )
    return report


def nested_teacher_choice(cfg: TrainConfig, clips: list[Clip], choices: dict, folds: np.ndarray) -> list[dict]:
    """Which teacher features a fold would pick from its training speakers alone (nested CV).

    ``choices`` maps a name to its :class:`train.teacher.TeacherFeatures`. For each outer fold, every
    choice's head (logistic regression on whole-clip pooled features, as
    :func:`teacher_cv` reports) is cross-validated over inner speaker-grouped folds of the fold's
    training clips; the choice with the best mean inner UA is then scored on the fold's validation
    speakers. Returns one dict per fold: ``chosen``, ``inner_ua`` (per choice) and the chosen
    teacher's validation ``ua`` / ``roc_auc``, so the selection never sees a validation label."""
    from .data import make_folds
    from .teacher import fit_head

    labels = np.array([CLASSES.index(c.label) for c in clips])
    pooled = {name: f.pooled() for name, f in choices.items()}

    def score(name: str, fit_rows: np.ndarray, eval_rows: np.ndarray) -> dict:
        head = fit_head(pooled[name][fit_rows], labels[fit_rows], len(CLASSES), cfg.distill.head_c, cfg.seed)
        return classification_metrics(softmax(head.logits(pooled[name][eval_rows])), labels[eval_rows])

    out = []
    for k in range(cfg.folds):
        train_idx, val_idx = np.where(folds != k)[0], np.where(folds == k)[0]
        n_inner = min(cfg.folds, len({clips[i].speaker for i in train_idx}))
        inner = make_folds(
            [clips[i] for i in train_idx], n_inner, "speaker" if cfg.group_by == "corpus" else cfg.group_by, cfg.seed
        )
        inner_ua = {
            name: float(
                np.mean([score(name, train_idx[inner != j], train_idx[inner == j])["ua"] for j in range(n_inner)])
            )
            for name in choices
        }
        chosen = max(inner_ua, key=inner_ua.get)
        m = score(chosen, train_idx, val_idx)
        out.append({"fold": k, "chosen": chosen, "inner_ua": inner_ua, "ua": m["ua"], "roc_auc": m["roc_auc"]})
    return out


SUMMARY_METRICS = ("ua", "macro_f1", "accuracy", "roc_auc")


def summary_rows(summary: dict, metrics: tuple[str, ...] = SUMMARY_METRICS, suffix: str = "") -> list[str]:
    """Markdown rows ``| group | mean ± std | ...`` of a :func:`summarize_folds` result."""
    return [
        f"| {group}{suffix} | " + " | ".join(f"{m[k]['mean']:.3f} ± {m[k]['std']:.3f}" for k in metrics) + " |"
        for group, m in summary.items()
    ]


def _summary_lines(summary: dict) -> str:
    lines = ["| set | UA | macro-F1 | accuracy | ROC AUC |", "|---|---|---|---|---|", *summary_rows(summary)]
    return "\n".join(lines) + "\n"


def _teacher_metrics(teacher, val_idx: np.ndarray, labels: np.ndarray, corpora: list[str]) -> dict:
    """A fold teacher's metrics on its validation clips (whole-clip pooling)."""
    return grouped_metrics(softmax(teacher.clip_logits(val_idx)), labels[val_idx], [corpora[i] for i in val_idx])


def check_fold_ids(fold_ids: list[int], n_folds: int) -> None:
    """A ConfigError naming any fold outside ``0 .. n_folds - 1``, or an empty list."""
    bad = [k for k in fold_ids if not 0 <= k < n_folds]
    if bad or not fold_ids:
        raise ConfigError(f"fold {', '.join(map(str, bad)) or '(none)'}: this config has folds 0-{n_folds - 1}")


def cross_validate(
    cfg: TrainConfig,
    clips: list[Clip],
    cache: AudioCache,
    folds: np.ndarray,
    out_dir: Path,
    resume: bool = False,
    pretrained_path: str | None = None,
    only_folds: list[int] | None = None,
    device: str | None = None,
    show_progress: bool = True,
    teacher_features=None,
    reevaluate: bool = False,
    speed_copies=None,
    channels: tuple[str, ...] = (),
) -> dict:
    """Train every fold (skipping finished ones on resume), then write the aggregate report.

    The report scores every fold full band and through the G.712 telephone channel; ``channels``
    (:func:`telephone_copies` names: ``mulaw``, codecs) add rows scored from each fold's saved
    checkpoint (cached as ``val_<channel>_logits.npy``), the codec grid.

    ``speed_copies`` (:class:`train.data.SpeedCopies` of ``clips``; ``teacher_features`` then cover
    the copies too) lets training draw windows from speed-perturbed copies of the training clips;
    folds, validation and the report hold the original clips only.

    ``reevaluate`` (with ``resume``) predicts a finished fold's validation clips again from its saved
    checkpoint with this config's inference settings (e.g. ``inference_positions``) instead of reusing
    its stored logits, which it overwrites: the same models, scored another way.

    ``only_folds`` restricts training and report to those folds (``fit --fold K``, ``cv --folds 1,3``):
    a long CV can be split across sessions or machines into one ``out_dir``, then reported over the
    folds finished there (``--resume`` reuses them).

    With ``teacher_features`` (distillation), each fold's teacher is fitted on that fold's training
    speakers only, and its own validation figures go into the report beside the student's.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    channels = tuple(c for c in channels if c not in ("full", "g712"))  # those two are always scored
    labels = np.array([CLASSES.index(c.label) for c in clips])
    corpora = [c.corpus for c in clips]
    oof = np.zeros((len(clips), len(CLASSES)))
    oof_tel = np.zeros_like(oof)
    raw_logits = np.zeros_like(oof)
    run_folds = sorted(set(only_folds)) if only_folds is not None else list(range(cfg.folds))
    check_fold_ids(run_folds, cfg.folds)
    fold_data, train_seconds, teacher_folds = [], 0.0, []
    for k in run_folds:
        fold_dir = out_dir / f"fold{k}"
        train_idx, val_idx = np.where(folds != k)[0], np.where(folds == k)[0]
        speakers_train = {clips[i].speaker for i in train_idx}
        assert not speakers_train & {clips[i].speaker for i in val_idx} or cfg.group_by == "audio"
        fit_clips, fit_cache, copies = (
            (speed_copies.clips, speed_copies.cache, speed_copies.copies)
            if speed_copies is not None
            else (clips, cache, None)
        )
        phone = getattr(speed_copies, "phone", None)
        teacher = (
            fold_teacher(cfg, fit_clips, teacher_features, train_idx, copies, phone)
            if teacher_features is not None
            else None
        )
        if teacher is not None:
            teacher_folds.append(_teacher_metrics(teacher, val_idx, labels, corpora))
        done = fold_dir / "done.json"
        if resume and done.exists() and (fold_dir / "val_logits.npy").exists():
            if reevaluate:
                log.info(
                    "fold %d already finished: predicting its validation clips again (positions %d)",
                    k,
                    cfg.inference_positions,
                )
                vl, vt = reevaluate_fold(cfg, fold_dir, [cache.clip(i) for i in val_idx], device)
            else:
                log.info("fold %d already finished: reusing", k)
                vl = np.load(fold_dir / "val_logits.npy")
                vt = np.load(fold_dir / "val_telephone_logits.npy")
            history = json.loads(done.read_text()).get("history", [])
        else:
            log.info("fold %d: %d train / %d validation clips", k, len(train_idx), len(val_idx))
            res = fit(
                cfg,
                fit_clips,
                fit_cache,
                train_idx,
                val_idx,
                fold_dir,
                resume=resume,
                pretrained_path=pretrained_path,
                metadata={"fold": k},
                device=device,
                show_progress=show_progress,
                teacher=teacher,
                copies=copies,
                phone=phone,
            )
            vl, vt, history = res.val_logits, res.val_telephone_logits, res.history
            write_json(done, {"fold": k, "history": history})
        train_seconds += sum(h.get("seconds", 0.0) for h in history)
        raw_logits[val_idx] = vl
        extra = {c: channel_logits(cfg, fold_dir, [cache.clip(i) for i in val_idx], c, device) for c in channels}
        fold_data.append((k, val_idx, vl, vt, extra))

    # Temperatures are cross-fitted: fold k's is fitted on the other folds' validation logits, so the
    # calibration (ECE) reported for fold k is measured on data its temperature never saw.
    evaluated = np.isin(folds, run_folds)
    per_fold, per_fold_tel, temps = [], [], []
    oof_channels = {c: np.zeros_like(oof) for c in channels}
    for k, val_idx, vl, vt, extra in fold_data:
        others = evaluated & (folds != k)
        if not cfg.calibrate:
            t = 1.0
        elif others.any():
            t = fit_temperature(raw_logits[others], labels[others])
        else:
            t = fit_temperature(vl, labels[val_idx])
        temps.append(t)
        oof[val_idx], oof_tel[val_idx] = softmax(vl, t), softmax(vt, t)
        m = grouped_metrics(softmax(vl, t), labels[val_idx], [corpora[i] for i in val_idx])
        m["overall"]["ece_uncalibrated"] = classification_metrics(softmax(vl), labels[val_idx])["ece"]
        per_fold.append(m)
        per_fold_tel.append(grouped_metrics(softmax(vt, t), labels[val_idx], [corpora[i] for i in val_idx]))
        for c, logits in extra.items():
            oof_channels[c][val_idx] = softmax(logits, t)
    from .metrics import summarize_folds

    temperature = fit_temperature(raw_logits[evaluated], labels[evaluated]) if cfg.calibrate else 1.0
    evaluated_corpora = [c for c, e in zip(corpora, evaluated) if e]
    report = {
        "protocol": _protocol(cfg)
        + (f"; {clip_scoring(cfg.inference_positions)}" if cfg.inference_positions > 1 else ""),
        "config": cfg.to_dict(),
        "temperatures": temps,
        "temperature": float(temperature),  # fitted on all out-of-fold logits: the shipped model's
        "train_seconds": round(train_seconds, 1),
        "summary": summarize_folds(per_fold),
        "summary_telephone": summarize_folds(per_fold_tel),
        "pooled": grouped_metrics(oof[evaluated], labels[evaluated], evaluated_corpora),
        "pooled_telephone": grouped_metrics(oof_tel[evaluated], labels[evaluated], evaluated_corpora),
        "telephone_channel": CHANNEL_NAMES["g712"],
        "folds": per_fold,
    }
    if channels:
        report["channels"] = {
            c: grouped_metrics(oof_channels[c][evaluated], labels[evaluated], evaluated_corpora) for c in channels
        }
    if teacher_folds:
        report["teacher_summary"] = summarize_folds(teacher_folds)
    if cfg.group_by == "corpus":
        report["held_out_corpora"] = held_out_table(folds, corpora, [d[0] for d in fold_data], per_fold, per_fold_tel)
    write_json(out_dir / "cv_report.json", report)
    (out_dir / "cv_report.md").write_text(cv_markdown(report))
    plot_confusion(report["pooled"]["overall"]["confusion"], out_dir / "confusion.png", report["protocol"])
    return report


def _protocol(cfg: TrainConfig) -> str:
    """The CV report's protocol line (without the clip-scoring note)."""
    if cfg.group_by == "corpus":
        return f"leave-one-corpus-out CV ({cfg.folds} folds, each holds out one whole corpus)"
    return f"{cfg.folds}-fold CV grouped by {cfg.group_by}" + (" (LEAKS SPEAKERS)" if cfg.group_by == "audio" else "")


def held_out_table(
    folds: np.ndarray, corpora: list[str], fold_ids: list[int], per_fold: list[dict], per_fold_tel: list[dict]
) -> list[dict]:
    """Leave-one-corpus-out rows: per fold, the corpus it holds out, its clips and classes, and the
    fold's metrics there (full band and telephone). A corpus lacking classes is scored over the classes
    it has (UA, macro-F1 and ROC AUC average over those)."""
    rows = []
    for k, m, t in zip(fold_ids, per_fold, per_fold_tel):
        held = sorted({corpora[i] for i in np.where(folds == k)[0]})
        o, ot = m["overall"], t["overall"]
        rows.append(
            {
                "fold": int(k),
                "corpus": "+".join(held),
                "n": o["n"],
                "classes": list(o["per_class_recall"]),
                **{key: o[key] for key in SUMMARY_METRICS},
                "telephone": {key: ot[key] for key in SUMMARY_METRICS},
            }
        )
    return rows


def held_out_markdown(rows: list[dict]) -> str:
    """The leave-one-corpus-out table of a CV report, with the mean over held-out corpora."""
    lines = [
        "Leave-one-corpus-out: each fold trains without one corpus and scores it (classes it lacks "
        "are left out of its UA, macro-F1 and ROC AUC):",
        "",
        "| held-out corpus | n | classes | UA | macro-F1 | accuracy | ROC AUC | UA (telephone) | ROC AUC (telephone) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['corpus']} | {r['n']} | {len(r['classes'])} | {r['ua']:.3f} | {r['macro_f1']:.3f} | "
            f"{r['accuracy']:.3f} | {r['roc_auc']:.3f} | {r['telephone']['ua']:.3f} | "
            f"{r['telephone']['roc_auc']:.3f} |"
        )
    mean = {k: float(np.nanmean([r[k] for r in rows])) for k in SUMMARY_METRICS}
    tel = {k: float(np.nanmean([r["telephone"][k] for r in rows])) for k in ("ua", "roc_auc")}
    lines.append(
        f"| mean of {len(rows)} | | | {mean['ua']:.3f} | {mean['macro_f1']:.3f} | {mean['accuracy']:.3f} | "
        f"{mean['roc_auc']:.3f} | {tel['ua']:.3f} | {tel['roc_auc']:.3f} |"
    )
    return "\n".join(lines) + "\n"


def average_fold_logits(run_dirs: list[Path], folds: np.ndarray, fold_ids: list[int], out_dir: Path) -> None:
    """Write the ensemble of finished CV runs into ``out_dir`` as finished folds: for each fold in
    ``fold_ids``, the log of the mean of the runs' softmax probabilities (clean and telephone copies),
    so that ``cross_validate(..., resume=True)`` reports it like any run, without training.

    The runs must share the folds (the same config seed, data and exclusions); a run that lacks a
    fold, or whose logits do not count that fold's validation clips, is a ConfigError naming it."""
    out_dir = Path(out_dir)
    if any(Path(r).resolve() == out_dir.resolve() for r in run_dirs):
        raise ConfigError(f"--out {out_dir} is one of the runs: the ensemble would overwrite its folds")
    check_fold_ids(fold_ids, int(folds.max()) + 1)
    for k in fold_ids:
        n = int(np.sum(folds == k))
        averaged = {}
        for name in ("val_logits.npy", "val_telephone_logits.npy"):
            probs = []
            for run in run_dirs:
                path = Path(run) / f"fold{k}" / name
                if not path.exists():
                    raise ConfigError(f"{path}: missing (is fold {k} of {run} finished?)")
                logits = np.load(path)
                if logits.shape != (n, len(CLASSES)):
                    raise ConfigError(
                        f"{path}: logits of shape {logits.shape}, fold {k} has {n} validation clips "
                        "(runs must share the config's folds)"
                    )
                probs.append(softmax(logits))
            averaged[name] = np.log(np.clip(np.mean(probs, axis=0), 1e-12, None))
        fold_dir = out_dir / f"fold{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        for name, logits in averaged.items():
            np.save(fold_dir / name, logits.astype(np.float32))
        write_json(fold_dir / "done.json", {"fold": k, "history": [], "ensemble_of": [str(r) for r in run_dirs]})


def cv_markdown(report: dict) -> str:
    lines = [
        "# Cross-validation report",
        "",
        f"Protocol: {report['protocol']}.",
        "",
        "Mean ± std over folds (temperature-calibrated probabilities):",
        "",
        "| set | UA | macro-F1 | accuracy | ROC AUC | ECE |",
        "|---|---|---|---|---|---|",
    ]
    # reports before 2026-12-06 called the 8 kHz μ-law round trip (no band-pass) "telephone"
    telephone = " (G.712 telephone)" if "telephone_channel" in report else " (8 kHz μ-law only)"
    for suffix, summary in (("", report["summary"]), (telephone, report["summary_telephone"])):
        lines += summary_rows(summary, SUMMARY_METRICS + ("ece",), suffix)
    rows = [
        ("full", report["pooled"]),
        ("g712" if "telephone_channel" in report else "mulaw", report["pooled_telephone"]),
        *report.get("channels", {}).items(),
    ]
    lines += [
        "",
        "By channel, pooled out-of-fold (codec rows: the G.712 band, then the codec):",
        "",
        "| channel | UA | macro-F1 | accuracy | ROC AUC | Neutral recall |",
        "|---|---|---|---|---|---|",
    ]
    for name, pooled in rows:
        o = pooled["overall"]
        lines.append(
            f"| {CHANNEL_NAMES.get(name, name)} | {o['ua']:.3f} | {o['macro_f1']:.3f} | {o['accuracy']:.3f} | "
            f"{o['roc_auc']:.3f} | {o['per_class_recall'].get('Neutral', float('nan')):.2f} |"
        )
    lines += [
        "",
        markdown_table(report["pooled"], "Pooled out-of-fold predictions"),
        markdown_table(report["pooled_telephone"], "Pooled out-of-fold predictions," + telephone),
        "Temperatures per fold (cross-fitted on the other folds): "
        f"{', '.join(f'{t:.2f}' for t in report['temperatures'])}; "
        f"shipped temperature (all out-of-fold logits): {report['temperature']:.2f}. "
        f"Training time, all folds: {report.get('train_seconds', 0) / 60:.1f} min.",
        "",
    ]
    if "held_out_corpora" in report:
        lines += [held_out_markdown(report["held_out_corpora"])]
    if "teacher_summary" in report:
        lines += [
            "Distillation teacher on the same folds (fitted on each fold's training speakers only):",
            "",
            _summary_lines(report["teacher_summary"]),
        ]
    return "\n".join(lines)
