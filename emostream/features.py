"""The mel front end shared by training, inference, export and benchmarks."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
import torchaudio

from .audio import SAMPLE_RATE, WINDOW_SAMPLES


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

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # The STFT runs in float32 even under autocast: bf16/fp16 power spectra lose the quiet bins.
        with torch.autocast(device_type=waveform.device.type, enabled=False):
            spec = self.to_db(self.mel(waveform.float()))
        return spec.unsqueeze(1)
