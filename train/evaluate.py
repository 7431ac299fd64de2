"""Scoring trained models: clip-level logits of a model, telephone-channel copies of clips, the
validation logits a fit saves, and reports of a checkpoint on a labelled set (per channel too)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from emostream.audio import float32_to_int16, telephone_channel
from emostream.model import CLASSES, EmotionNet, autocast_for, select_device
from emostream.stream import placed_windows

from .config import ConfigError, TrainConfig
from .data import AudioCache, Clip
from .metrics import grouped_metrics, markdown_table, plot_confusion, softmax, write_json

log = logging.getLogger("train")


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
