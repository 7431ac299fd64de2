"""The network as training runs it: the product's front end and backbone
(:class:`emostream.model.EmotionNet`) with the training-only steps between and after them: vocal
tract length perturbation (per-item warped mel filterbanks), SpecAugment on the log-mel batch, and
the pooled embedding and last feature map that the distillation losses need."""

from __future__ import annotations

import torch

from emostream.model import EmotionNet

# Vocal tract length perturbation: frequencies below this fraction of Nyquist (times min(1, 1/alpha))
# scale by alpha, the rest map linearly onto the band up to Nyquist, so that no energy leaves the
# spectrum and no band is left empty (Kaldi's VTLN warp).
VTLP_CUTOFF = 0.85


def training_forward(
    model: EmotionNet,
    waveform: torch.Tensor,
    spec_augment=None,
    warp: torch.Tensor | None = None,
    return_embedding: bool = False,
    return_feature_map: bool = False,
):
    """Logits for waveforms as :meth:`EmotionNet.forward` computes them, with ``warp`` (one VTLP
    factor per item, 1 = unchanged: :func:`vtlp_filterbanks`) and ``spec_augment`` (a transform of
    the log-mel batch). With ``return_embedding`` also the pooled backbone features ``(B, C)``, with
    ``return_feature_map`` also the last feature map ``(B, C, F, T)``, after the logits in that order."""
    banks = None if warp is None else vtlp_filterbanks(model.frontend.mel.mel_scale.fb, warp.float())
    spec = model.frontend(waveform, filterbanks=banks)
    if spec_augment is not None:
        spec = spec_augment(spec)
    if not (return_embedding or return_feature_map):
        return model.classify_spectrogram(spec)
    feature_map = model.backbone.forward_features(model.backbone_input(spec))
    embedding = model.backbone.forward_head(feature_map, pre_logits=True)
    out = (model.backbone.get_classifier()(embedding).float(),)
    if return_embedding:
        out += (embedding.float(),)
    if return_feature_map:
        out += (feature_map,)
    return out


def vtlp_filterbanks(fb: torch.Tensor, alpha: torch.Tensor, cutoff: float = VTLP_CUTOFF) -> torch.Tensor:
    """Mel filterbanks ``(B, freqs, mels)`` that warp the spectrum's frequency axis by ``alpha``
    ``(B,)`` before the mel bands are taken (vocal tract length perturbation, Jaitly & Hinton 2013):
    the energy of linear bin ``g`` goes to the mel bands at frequency ``w(g)``, with ``w(g) = alpha g``
    below ``cutoff * Nyquist * min(1, 1 / alpha)`` and linear from there to Nyquist. ``alpha > 1``
    raises formants and pitch (a shorter vocal tract), ``alpha < 1`` lowers them; ``alpha = 1`` gives
    ``fb`` itself. Works in bin units on ``fb`` ``(freqs, mels)``, interpolating between its rows."""
    top = fb.shape[0] - 1
    g = torch.arange(fb.shape[0], dtype=fb.dtype, device=fb.device)[None, :]  # (1, freqs)
    a = alpha.to(fb.device, fb.dtype)[:, None]  # (B, 1)
    knee = cutoff * top * torch.clamp(1.0 / a, max=1.0)
    upper = a * knee + (top - a * knee) * (g - knee) / (top - knee)
    pos = torch.where(g <= knee, a * g, upper).clamp(0, top)  # (B, freqs)
    lo = pos.floor().long().clamp(max=top - 1)
    frac = (pos - lo.to(fb.dtype)).unsqueeze(-1)
    return fb[lo] * (1 - frac) + fb[lo + 1] * frac
