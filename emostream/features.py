"""The mel front end shared by training, inference, export and benchmarks."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torchaudio
from torch import nn

from .audio import SAMPLE_RATE, WINDOW_SAMPLES

NORMALIZATIONS = ("none", "utterance", "utterance_bins")
UTTERANCE_FLOOR_DB = 80.0


@dataclass(frozen=True)
class FeatureConfig:
    """Mel spectrogram parameters (the Hydrogen Torch recipe, f_max clamped to Nyquist)."""

    sample_rate: int = SAMPLE_RATE
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    f_min: float = 50.0
    f_max: float = SAMPLE_RATE / 2
    top_db: float | None = None
    # "none" (the recipe) or "utterance": per window, floor at ``UTTERANCE_FLOOR_DB`` below its peak,
    # then zero mean / unit variance, which makes the model blind to recording level;
    # "utterance_bins": the same, but each mel band gets its own mean over the window's frames
    # (cepstral-mean-style: removes the window's long-term spectral shape, i.e. much of the
    # speaker's and the line's colouring)
    normalize: str = "none"

    def __post_init__(self):
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {self.normalize!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    def frames(self, samples: int = WINDOW_SAMPLES) -> int:
        """Number of spectrogram frames for ``samples`` (centered STFT)."""
        return samples // self.hop_length + 1


class MelFrontEnd(nn.Module):
    """Waveform ``(batch, samples)`` → log-mel ``(batch, 1, n_mels, frames)`` in dB."""

    def __init__(self, config: FeatureConfig = FeatureConfig()):
        super().__init__()
        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            hop_length=config.hop_length,
            n_mels=config.n_mels,
            f_min=config.f_min,
            f_max=config.f_max,
            power=2.0,
        )
        self.to_db = torchaudio.transforms.AmplitudeToDB(stype="power", top_db=config.top_db)

    def forward(self, waveform: torch.Tensor, filterbanks: torch.Tensor | None = None) -> torch.Tensor:
        """Log-mel spectrograms ``(batch, 1, mels, frames)``. ``filterbanks`` ``(batch, freqs, mels)``:
        per-item mel filterbanks in place of the fixed one (training's vocal tract length
        perturbation, :func:`train.forward.vtlp_filterbanks`)."""
        # The STFT runs in float32 even under autocast: bf16/fp16 power spectra lose the quiet bins.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            if filterbanks is None:
                power = self.mel(waveform.float())
            else:
                spec = self.mel.spectrogram(waveform.float())  # (B, freqs, frames)
                power = torch.einsum("bft,bfm->bmt", spec, filterbanks.float())
            spec = self.to_db(power)
            if self.config.normalize == "utterance":
                spec = normalize_utterance(spec)
            elif self.config.normalize == "utterance_bins":
                spec = normalize_utterance(spec, per_band=True)
        return spec.unsqueeze(1)


def normalize_utterance(spec: torch.Tensor, per_band: bool = False) -> torch.Tensor:
    """Per item of a ``(batch, mels, frames)`` dB spectrogram: floor at 80 dB below its own peak, then
    zero mean (per mel band over the frames with ``per_band``) and unit variance. Each item is
    normalised alone (no batch statistics)."""
    peak = spec.amax(dim=(-2, -1), keepdim=True)
    spec = torch.maximum(spec, peak - UTTERANCE_FLOOR_DB)
    mean = spec.mean(dim=-1, keepdim=True) if per_band else spec.mean(dim=(-2, -1), keepdim=True)
    std = spec.std(dim=(-2, -1), keepdim=True)
    return (spec - mean) / (std + 1e-5)


class MatmulSpectrogram(nn.Module):
    """The power spectrogram ``(batch, n_fft // 2 + 1, frames)`` that :class:`MelFrontEnd`'s
    ``torchaudio.transforms.Spectrogram`` computes (centred, reflect-padded, periodic Hann window,
    power 2), made of matrix products only: a two-stage Cooley-Tukey DFT (``n_fft = N1 * N2``), about
    75 M multiply-adds a 6 s window. The ONNX export swaps it in for the STFT, whose ONNX Runtime
    kernel is several times slower than these products (issue #43); torch keeps its own FFT."""

    def __init__(self, n_fft: int, hop_length: int):
        super().__init__()
        if n_fft % hop_length:
            raise ValueError(f"n_fft {n_fft} must be a multiple of hop_length {hop_length}")
        n1 = 1 << (n_fft.bit_length() // 2)  # 2048 = 64 x 32
        if n_fft % n1:
            raise ValueError(f"n_fft {n_fft} must be a power of two")
        n2, self.n_fft, self.hop = n_fft // n1, n_fft, hop_length
        self.n_freqs = n_fft // 2 + 1
        k2_count = -(-self.n_freqs // n1)  # output bins k = k1 + n1 * k2 up to n_fft / 2
        i1 = torch.arange(n1, dtype=torch.float64)
        i2 = torch.arange(n2, dtype=torch.float64)
        stage1 = -2 * torch.pi * torch.outer(i1, i1) / n1  # (k1, n1)
        twiddle = -2 * torch.pi * torch.outer(i1, i2) / n_fft  # (k1, n2)
        stage2 = -2 * torch.pi * torch.outer(i2, torch.arange(k2_count, dtype=torch.float64)) / n2  # (n2, k2)
        for name, angle in (("stage1", stage1), ("twiddle", twiddle), ("stage2", stage2)):
            self.register_buffer(name + "_re", torch.cos(angle).float(), persistent=False)
            self.register_buffer(name + "_im", torch.sin(angle).float(), persistent=False)
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.n1, self.n2 = n1, n2

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        pad = self.n_fft // 2
        x = torch.nn.functional.pad(waveform[:, None], (pad, pad), mode="reflect")[:, 0]
        frames_count = 1 + waveform.shape[-1] // self.hop
        per_frame = self.n_fft // self.hop
        blocks = x[:, : (frames_count + per_frame - 1) * self.hop].reshape(x.shape[0], -1, self.hop)
        frames = torch.cat([blocks[:, i : i + frames_count] for i in range(per_frame)], dim=-1) * self.window
        x = frames.reshape(frames.shape[0], frames_count, self.n1, self.n2)  # sample n = n2_size * i1 + i2
        a_re, a_im = self.stage1_re @ x, self.stage1_im @ x  # DFT over i1: (batch, frames, k1, i2)
        b_re = a_re * self.twiddle_re - a_im * self.twiddle_im
        b_im = a_re * self.twiddle_im + a_im * self.twiddle_re
        re = b_re @ self.stage2_re - b_im @ self.stage2_im  # DFT over i2: (batch, frames, k1, k2)
        im = b_re @ self.stage2_im + b_im @ self.stage2_re
        power = (re * re + im * im).transpose(-1, -2).reshape(frames.shape[0], frames_count, -1)
        return power[..., : self.n_freqs].transpose(1, 2)
