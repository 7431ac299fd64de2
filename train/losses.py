"""The training losses: the recipe's loss on the labels with the distillation term, the embedding and
frame regressions to the teacher, and the projection the frame regression trains through."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .config import TrainConfig


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


def anchor_loss(
    cfg: TrainConfig, logits: torch.Tensor, anchor_logits: torch.Tensor, keep: torch.Tensor
) -> torch.Tensor:
    """``T² KL(anchor || student)`` over the rows ``keep`` (a boolean mask) of the batch, at the
    distillation temperature; zero when no row is kept."""
    if not bool(keep.any()):
        return logits.sum() * 0.0
    t = cfg.distill.temperature
    return (
        F.kl_div(
            F.log_softmax(logits[keep] / t, dim=-1),
            F.log_softmax(anchor_logits / t, dim=-1),
            reduction="batchmean",
            log_target=True,
        )
        * t
        * t
    )


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
