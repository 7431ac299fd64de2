"""ResNet50 emotion classifier: mel front end + timm backbone, checkpoint I/O and batched predict."""

from __future__ import annotations

import json
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from . import CLASSES, __version__
from .audio import SAMPLE_RATE, WINDOW_SECONDS
from .features import FeatureConfig, MelFrontEnd
from .model_files import META_FILE, WEIGHTS_FILE, CheckpointError, default_checkpoint, model_identity  # noqa: F401 (re-exported)
from .scoring import clip_probabilities, scoring_temperature  # noqa: F401 (re-exported)

NUM_CLASSES = len(CLASSES)
DEFAULT_CHECKPOINT = default_checkpoint()  # resolved at import; code that loads the model calls default_checkpoint()


@dataclass(frozen=True)
class ModelConfig:
    """Backbone choice; the recipe's ``architecture`` section."""

    backbone: str = "resnet50"
    dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the residual blocks (training only: identity in eval mode)
    pool: str = "avg"
    temperature: float = 1.0  # softmax temperature from calibration (1.0 = none), fitted on single windows
    # temperature for a clip's mean logit over several placements (classify's default scoring), which is
    # less extreme than one window's: fitted on such CV logits; None: use ``temperature``
    clip_temperature: float | None = None


class EmotionNet(nn.Module):
    """Waveform windows ``(batch, samples)`` → class logits ``(batch, 7)``."""

    def __init__(self, model_config: ModelConfig = ModelConfig(), feature_config: FeatureConfig = FeatureConfig()):
        super().__init__()
        import timm

        self.model_config = model_config
        self.feature_config = feature_config
        self.frontend = MelFrontEnd(feature_config)
        self.backbone = timm.create_model(
            model_config.backbone,
            pretrained=False,
            in_chans=1,
            num_classes=NUM_CLASSES,
            global_pool=model_config.pool,
            drop_rate=model_config.dropout,
            drop_path_rate=model_config.drop_path,
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, 7)`` for waveform windows ``(batch, samples)``: the front end, then
        :meth:`classify_spectrogram` (training adds its augmentations between the two:
        :func:`train.forward.training_forward`)."""
        return self.classify_spectrogram(self.frontend(waveform))

    def backbone_input(self, spec: torch.Tensor) -> torch.Tensor:
        """Front-end output as the backbone takes it (channels_last on a CPU: oneDNN's fast layout)."""
        return spec.contiguous(memory_format=torch.channels_last) if spec.device.type == "cpu" else spec

    def classify_spectrogram(self, spec: torch.Tensor) -> torch.Tensor:
        """Logits (float32) for log-mel spectrograms ``(batch, 1, mels, frames)``."""
        return self.backbone(self.backbone_input(spec)).float()


def select_device(requested: str | None = None) -> torch.device:
    """``cuda`` when present, otherwise ``cpu``; ``requested`` overrides."""
    if requested and requested != "auto":
        return torch.device(requested)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@lru_cache(maxsize=None)
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX) and oneDNN has bf16 kernels for
    it. Without them bf16 autocast is slower than fp32: on an AVX2-only CPU (AMD EPYC before Zen 4)
    it falls back to reference kernels, measured here 6.6x slower in ResNet50 inference and 17x in
    training (BENCHMARKS.md); AVX-512 without BF16 (Skylake, Cascade Lake) only emulates bf16, so it
    counts as without too (not measured here)."""
    try:
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return bool(native and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch build without these checks or oneDNN: fp32 is safe
        return False


def mixed_precision_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype mixed precision autocasts to on ``device``: fp16 on CUDA, bf16 on a CPU with fast
    bf16 kernels, and None (stay fp32) where autocast would be slower than fp32."""
    if device.type == "cuda":
        return torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return None


def precision_name(device: torch.device, mixed_precision: bool = True) -> str:
    """What a model runs in on ``device``: "fp16", "bf16" or "fp32"."""
    dtype = mixed_precision_dtype(device) if mixed_precision else None
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")


def autocast_for(device: torch.device, enabled: bool = True):
    """Mixed-precision autocast on ``device`` to :func:`mixed_precision_dtype`; a no-op context when
    disabled or where mixed precision would be slower than fp32."""
    dtype = mixed_precision_dtype(device) if enabled else None
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def load_pretrained_backbone(model: EmotionNet, path: str | Path) -> list[str]:
    """Start ``model`` from local weights: a timm-format ResNet state_dict (conv1 summed to one
    channel, head dropped) or an emostream checkpoint directory (every weight, head included; its
    features and backbone must be the model's: fine-tuning a trained model)."""
    if Path(path).is_dir():
        return _load_emostream_weights(model, Path(path))
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" in state and state["conv1.weight"].shape[1] != 1:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise CheckpointError(
            f"pretrained weights do not fit {model.model_config.backbone}: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    return missing


def _load_emostream_weights(model: EmotionNet, directory: Path) -> list[str]:
    source = load_checkpoint(directory, "cpu")
    if source.feature_config != model.feature_config or source.model_config.backbone != model.model_config.backbone:
        raise CheckpointError(
            f"{directory} was trained with other features or backbone ({source.model_config.backbone}, "
            f"{source.feature_config}) than this config's ({model.model_config.backbone}, {model.feature_config})"
        )
    model.load_state_dict(source.state_dict())
    return []


# --- checkpoints ---------------------------------------------------------------------------


def save_checkpoint(
    model: EmotionNet, directory: str | Path, metadata: dict[str, Any] | None = None, half: bool = True
) -> Path:
    """Write ``model.safetensors`` (fp16 by default) and ``model.json`` metadata into ``directory``."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("frontend."):
            continue  # the mel filterbank is derived from the config, never stored
        value = value.detach().cpu()
        if half and value.is_floating_point():
            value = value.half()
        state[key] = value.contiguous()
    save_file(state, str(directory / WEIGHTS_FILE))
    meta = {
        "format": "emostream-checkpoint/1",
        "classes": list(CLASSES),
        "audio": {"sample_rate": SAMPLE_RATE, "window_seconds": WINDOW_SECONDS},
        "features": model.feature_config.to_dict(),
        "model": model.model_config.__dict__,
        "code_version": __version__,
    }
    meta.update(metadata or {})
    (directory / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=False) + "\n")
    return directory


def load_checkpoint(directory: str | Path, device: torch.device | str | None = None) -> EmotionNet:
    """Load a checkpoint directory written by :func:`save_checkpoint` (weights in fp32)."""
    from safetensors import safe_open

    directory = Path(directory)
    weights, meta_path = directory / WEIGHTS_FILE, directory / META_FILE
    if not weights.exists() or not meta_path.exists():
        raise CheckpointError(f"no checkpoint at {directory} (expected {WEIGHTS_FILE} and {META_FILE})")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"checkpoint metadata {meta_path} is not JSON: {exc}") from None
    if tuple(meta.get("classes", ())) != CLASSES:
        raise CheckpointError(f"checkpoint classes {meta.get('classes')} differ from {list(CLASSES)}")
    if meta.get("audio", {}).get("sample_rate") != SAMPLE_RATE:
        raise CheckpointError("checkpoint sample rate differs from 16 kHz")
    features = FeatureConfig(**meta["features"])
    model_cfg = ModelConfig(**meta["model"])
    model = EmotionNet(model_cfg, features)
    # tensor by tensor into the model's own (fp32) storage: no second copy of the weights in memory
    # (a 2-hour call's peak memory is mostly the model's; issue #42)
    own = model.state_dict(keep_vars=True)
    with safe_open(str(weights), framework="pt") as f:
        names = set(f.keys())
        missing = [k for k in own if k not in names and not k.startswith("frontend.")]
        unexpected = [k for k in names if k not in own]
        if missing or unexpected:
            raise CheckpointError(
                f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        with torch.no_grad():
            for k in names:
                value = f.get_tensor(k)
                if value.shape != own[k].shape:
                    raise CheckpointError(
                        f"checkpoint weights do not match the model: {k} is "
                        f"{tuple(value.shape)}, the model's {tuple(own[k].shape)}"
                    )
                own[k].copy_(value)
    model.metadata = meta
    model.eval()
    return model.to(select_device(device) if not isinstance(device, torch.device) else device)


def cast_autocast_weights(module: torch.nn.Module, dtype: torch.dtype) -> int:
    """Store the weights of ``module``'s convolutions and linear layers in ``dtype``, as autocast to
    ``dtype`` casts them on every call: the same outputs under autocast, bit for bit, with half the
    weight memory and no per-call copies (~100 MB less for ResNet50 in bf16; issue #42). Batch norms
    keep fp32. Returns how many layers were cast. Inference only: the model then needs autocast."""
    n = 0
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                m.weight.data = m.weight.data.to(dtype)
                if m.bias is not None:
                    m.bias.data = m.bias.data.to(dtype)
                n += 1
    return n


@dataclass
class Predictor:
    """One batched entry point used by every source: windows in, class probabilities out."""

    model: EmotionNet
    device: torch.device = field(default_factory=select_device)
    mixed_precision: bool = True

    @classmethod
    def from_checkpoint(
        cls, directory: str | Path = DEFAULT_CHECKPOINT, device: str | None = None, mixed_precision: bool = True
    ) -> "Predictor":
        dev = select_device(device)
        model = load_checkpoint(directory, dev)
        if dev.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
            if precision_name(dev, mixed_precision) == "bf16":
                cast_autocast_weights(model.backbone, torch.bfloat16)
        return cls(model=model, device=dev, mixed_precision=mixed_precision)

    @property
    def temperature(self) -> float:
        return float(self.model.model_config.temperature)

    @property
    def clip_temperature(self) -> float | None:
        return self.model.model_config.clip_temperature

    @property
    def precision(self) -> str:
        """What the model runs in here: "fp16" (CUDA), "bf16" (a CPU with fast bf16) or "fp32"."""
        return precision_name(self.device, self.mixed_precision)

    @torch.inference_mode()
    def logits(self, windows: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Logits ``(batch, 7)`` for float32 windows ``(batch, samples)``."""
        x = torch.as_tensor(np.asarray(windows, dtype=np.float32) if not torch.is_tensor(windows) else windows)
        if x.ndim == 1:
            x = x[None]
        x = x.to(self.device, non_blocking=True)
        with autocast_for(self.device, self.mixed_precision):
            return self.model(x).float()

    def predict(self, windows: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class probabilities ``(batch, 7)`` (softmax of calibrated logits), rows sum to 1."""
        logits = self.logits(windows)
        return torch.softmax(logits / self.temperature, dim=-1).cpu().numpy()
