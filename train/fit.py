"""Training one model: the model and optimizer of a config, the learning-rate schedule, the weight
average, and the training loop (:func:`fit`, resumable after every epoch)."""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from emostream.audio import WINDOW_SAMPLES
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

from .batches import (
    PREFETCH_BATCHES,
    Batch,
    SpecAugment,
    copy_partners,
    make_batch,
    partner_clips,
    prefetched,
    substitute_copies,
    vtlp_factors,
)
from .config import ConfigError, TrainConfig
from .data import AudioCache, Clip
from .evaluate import predict_validation, save_validation_logits, telephone_copies
from .forward import training_forward
from .losses import FrameProjector, anchor_loss, embedding_loss, frame_embedding_loss, loss_fn
from .metrics import classification_metrics, plot_curves, softmax

log = logging.getLogger("train")
STATE_FILE = "state.pt"


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


EPOCH_METRICS = ("ua", "roc_auc", "macro_f1", "accuracy")  # validation figures logged per epoch


@dataclass
class FitResult:
    history: list[dict]
    checkpoint: Path
    val_logits: np.ndarray | None = None
    val_telephone_logits: np.ndarray | None = None
    stopped: bool = False  # True when ``stop_after`` ended the run early (resumable, no checkpoint yet)


@dataclass(frozen=True)
class FitOptions:
    """How :func:`fit` runs one training: where it starts, where it runs, what it shows and writes
    beside the weights, and when it stops.

    ``resume`` continues from ``state.pt`` in the output folder (saved after every epoch);
    ``pretrained_path`` holds the weights to start from (:func:`build_model`); ``metadata`` goes into
    the checkpoint's ``model.json`` beside the training record; ``device`` as
    :func:`emostream.model.select_device`; ``telephone_eval`` also scores the validation clips through
    the G.712 telephone channel; ``stop_after`` ends the run once that many epochs are finished,
    leaving the same resumable state as an interruption (used to split long runs and to test that
    resuming is exact); ``prefetch`` batches are prepared ahead on a thread (:func:`prefetched`; 0:
    serially): the same batches in the same order, so the run is identical either way."""

    resume: bool = False
    pretrained_path: str | None = None
    metadata: dict | None = None
    device: str | None = None
    show_progress: bool = True
    telephone_eval: bool = True
    stop_after: int | None = None
    prefetch: int = PREFETCH_BATCHES


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


def _restore(state_path: Path, dev: torch.device, model, opt, ema, projector, frame_projector) -> tuple[list, int, int]:
    """Load a run's ``state.pt`` into its model, optimizer, weight average and projections; returns
    its history, the epochs finished and the optimizer steps taken."""
    state = torch.load(state_path, map_location=dev, weights_only=False)
    model.load_state_dict(state["model"])
    if projector is not None:
        projector.load_state_dict(state["projector"])
    if frame_projector is not None:
        frame_projector.load_state_dict(state["frame_projector"])
    if ema is not None:
        if state.get("ema") is None:
            raise ConfigError(f"{state_path} was trained without emostream.ema_decay: resume it with its own config")
        ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    return state["history"], state["epoch"], state["opt_step"]


def _save_state(
    state_path: Path,
    cfg: TrainConfig,
    model,
    opt,
    ema,
    projector,
    frame_projector,
    history: list[dict],
    epochs: int,
    opt_step: int,
) -> None:
    """Write the resumable state after ``epochs`` finished epochs (through a temporary file)."""
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "history": history,
            "ema": ema.state_dict() if ema is not None else None,
            "epoch": epochs,
            "opt_step": opt_step,
            "config": cfg.to_dict(),
            "projector": projector.state_dict() if projector is not None else None,
            "frame_projector": frame_projector.state_dict() if frame_projector is not None else None,
        },
        state_path.with_suffix(".tmp"),
    )
    state_path.with_suffix(".tmp").replace(state_path)


def _batch_loss(
    cfg: TrainConfig,
    model: EmotionNet,
    batch: Batch,
    n: int,
    dev: torch.device,
    gen: torch.Generator,
    spec_aug: SpecAugment,
    projector,
    frame_projector,
    anchor=None,
    full_band: np.ndarray | None = None,
) -> torch.Tensor:
    """The training loss of one batch of ``n`` windows (before gradient accumulation's scaling);
    with an ``anchor`` model, its term on the windows marked in ``full_band``."""
    x, y = batch.waves.to(dev), batch.targets.to(dev)
    warp = vtlp_factors(cfg, n, gen)
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
        loss = loss + cfg.distill.embed_weight * embedding_loss(projected, batch.teacher_embedding.to(dev))
    if frame_projector is not None:
        loss = loss + cfg.distill.frame_weight * frame_embedding_loss(
            frames_projected, batch.teacher_frames.to(dev), batch.teacher_frame_mask.to(dev)
        )
    if anchor is not None:
        keep = torch.from_numpy(np.ones(n, bool) if full_band is None else full_band).to(dev)
        with torch.no_grad(), autocast_for(dev, cfg.mixed_precision_training):
            anchor_logits = anchor(x[keep]).float() if bool(keep.any()) else None
        if anchor_logits is not None:
            loss = loss + cfg.distill.anchor_weight * anchor_loss(cfg, logits.float(), anchor_logits, keep)
    return loss


def _optimizer_step(cfg: TrainConfig, opt, scaler, base_lrs: list[float], factor: float) -> None:
    """One optimizer step at ``factor`` of the base learning rates, gradients clipped as the recipe says."""
    for g, base in zip(opt.param_groups, base_lrs):
        g["lr"] = base * factor
    if scaler:
        scaler.unscale_(opt)
    if cfg.gradient_clip > 0:
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.gradient_clip)
    (scaler.step(opt), scaler.update()) if scaler else opt.step()
    opt.zero_grad(set_to_none=True)


def _validation_record(
    cfg: TrainConfig, model: EmotionNet, ema, val_clips: list[np.ndarray], yv: np.ndarray, dev: torch.device
) -> dict:
    """An epoch's validation figures (:data:`EPOCH_METRICS`, the loss; the weight average's too)."""
    vl = predict_validation(cfg, model, val_clips, dev)
    m = classification_metrics(softmax(vl), yv)
    record = {k: m[k] for k in EPOCH_METRICS}
    record["val_loss"] = float(
        F.binary_cross_entropy_with_logits(torch.from_numpy(vl), torch.eye(len(CLASSES))[yv]).item()
    )
    if ema is not None:
        el = predict_validation(cfg, ema, val_clips, dev)
        me = classification_metrics(softmax(el), yv)
        record.update({f"ema_{k}": me[k] for k in EPOCH_METRICS})
    return record


def fit(
    cfg: TrainConfig,
    clips: list[Clip],
    cache: AudioCache,
    train_idx: np.ndarray,
    val_idx: np.ndarray | None,
    out_dir: Path,
    options: FitOptions = FitOptions(),
    *,
    teacher=None,
    copies: np.ndarray | None = None,
    phone: np.ndarray | None = None,
) -> FitResult:
    """Train one model; saves ``state.pt`` after every epoch (resumable) and the final checkpoint.

    ``options`` (:class:`FitOptions`) say how the run goes; the keywords say what it trains on.
    ``teacher`` (a :class:`train.teacher.FoldTeacher` fitted on ``train_idx`` only) adds the
    distillation term. ``copies`` (:attr:`train.data.SpeedCopies.copies`; ``clips`` and ``cache`` then
    hold the copies after the originals) lets ``augment.speed_probability`` of the training windows
    come from a copy; ``phone`` (:attr:`train.data.CopySet.phone`: the phone lines of every original
    and speed copy, held after them in ``clips`` and ``cache``) then puts ``augment.phone_probability``
    of the windows, whatever their speed, through a random line.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    dev = select_device(options.device)
    precision = precision_name(dev, cfg.mixed_precision_training)
    if cfg.mixed_precision_training and precision == "fp32":
        log.info(
            "note: mixed precision off: this CPU has no fast bf16 kernels (oneDNN), where bf16 autocast "
            "is slower than fp32; training in fp32 + channels_last"
        )
    torch.manual_seed(cfg.student_seed)
    model = build_model(cfg, options.pretrained_path).to(dev)
    if dev.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    opt = make_optimizer(cfg, model)
    # anchor: the starting weights, frozen (taken before a resume restores the trained ones)
    anchor = None
    if cfg.distill.anchor_weight:
        if not options.pretrained_path:
            raise ConfigError("emostream.distill.anchor_weight needs --pretrained: the model the run keeps close to")
        anchor = copy.deepcopy(model).eval().requires_grad_(False)
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
    if options.resume and state_path.exists():
        history, start_epoch, opt_step = _restore(state_path, dev, model, opt, ema, projector, frame_projector)
        log.info("resumed from %s at epoch %d", state_path, start_epoch)
    elif options.resume:
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
    phone_ids = np.unique(phone) if phone is not None else np.zeros(0, np.int64)  # clips that are phone lines

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

    progress = _progress() if options.show_progress else None
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
            with closing(prefetched(epoch_batches(order, rng), options.prefetch)) as batches:
                for step, (idx, batch) in enumerate(batches):
                    loss = _batch_loss(
                        cfg,
                        model,
                        batch,
                        len(idx),
                        dev,
                        gen,
                        spec_aug,
                        projector,
                        frame_projector,
                        anchor,
                        ~np.isin(idx, phone_ids),
                    )
                    loss = loss / cfg.grad_accumulation
                    (scaler.scale(loss) if scaler else loss).backward()
                    losses.append(float(loss.detach()) * cfg.grad_accumulation)
                    if (step + 1) % cfg.grad_accumulation == 0:
                        factor = lr_factor(cfg, opt_step, total_steps, opt_steps_per_epoch)
                        _optimizer_step(cfg, opt, scaler, base_lrs, factor)
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
                record.update(_validation_record(cfg, model, ema, val_clips, labels[val_idx], dev))
            history.append(record)
            if progress:
                progress.update(
                    task,
                    info=" ".join(f"{k} {v:.3f}" for k, v in record.items() if k in ("train_loss", "ua", "roc_auc")),
                )
            log.info("epoch %s", json.dumps(record))
            _save_state(state_path, cfg, model, opt, ema, projector, frame_projector, history, epoch + 1, opt_step)
            stop_after = options.stop_after
            if stop_after is not None and epoch + 1 >= stop_after and epoch + 1 < cfg.epochs:
                log.info("stopping after epoch %d as asked; resume with --resume", epoch + 1)
                return FitResult(history=history, checkpoint=out_dir / "checkpoint", stopped=True)
    finally:
        if progress:
            progress.stop()

    result = FitResult(history=history, checkpoint=out_dir / "checkpoint")
    final = ema if ema is not None else model  # the weights saved, streamed and reported
    if val_clips is not None:
        tel = telephone_copies(val_clips) if options.telephone_eval else None
        # with a weight average, the raw weights' logits are kept too (``*_raw.npy``), for comparison
        for net, suffix in [(final, "")] + ([(model, "_raw")] if ema is not None else []):
            vl, vt = save_validation_logits(cfg, net, val_clips, tel, dev, out_dir, suffix)
            if net is final:
                result.val_logits, result.val_telephone_logits = vl, vt
    meta = {"training": {"config": cfg.to_dict(), "history": history, "train_clips": int(len(train_idx))}}
    meta.update(options.metadata or {})
    model_cpu = final.to("cpu").to(memory_format=torch.contiguous_format)
    save_checkpoint(model_cpu, result.checkpoint, meta)
    plot_curves(history, out_dir / "curves.png")
    return result
