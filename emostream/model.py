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
from .model_files import META_FILE, WEIGHTS_FILE, default_checkpoint

NUM_CLASSES = len(CLASSES)
DEFAULT_CHECKPOINT = default_checkpoint()  # resolved at import; code that loads the model calls default_checkpoint()


class CheckpointError(ValueError):
    """A checkpoint that is missing or does not match this code."""


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

    def forward(self, waveform: torch.Tensor, spec_augment=None, return_embedding: bool = False,
                return_feature_map: bool = False, warp: torch.Tensor | None = None):
        """Logits for waveforms; ``spec_augment`` (training only) transforms the log-mel batch and
        ``warp`` (training only) gives each item a VTLP factor (:func:`emostream.features.vtlp_filterbanks`).
        Training only: with ``return_embedding`` also the pooled backbone features ``(B, C)``, with
        ``return_feature_map`` also the last feature map ``(B, C, F, T)``, after the logits in that
        order."""
        spec = self.frontend(waveform, warp=warp)
        if spec_augment is not None:
            spec = spec_augment(spec)
        if spec.device.type == "cpu":
            spec = spec.contiguous(memory_format=torch.channels_last)
        if not (return_embedding or return_feature_map):
            return self.backbone(spec).float()
        feature_map = self.backbone.forward_features(spec)
        embedding = self.backbone.forward_head(feature_map, pre_logits=True)
        out = (self.backbone.get_classifier()(embedding).float(),)
        if return_embedding:
            out += (embedding.float(),)
        if return_feature_map:
            out += (feature_map,)
        return out


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
    """Load a local timm-format ResNet state_dict: conv1 summed to one channel, head dropped."""
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    if "conv1.weight" in state and state["conv1.weight"].shape[1] != 1:
        state["conv1.weight"] = state["conv1.weight"].sum(dim=1, keepdim=True)
    missing, unexpected = model.backbone.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise CheckpointError(f"pretrained weights do not fit {model.model_config.backbone}: "
                              f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    return missing


# --- checkpoints ---------------------------------------------------------------------------

def save_checkpoint(model: EmotionNet, directory: str | Path, metadata: dict[str, Any] | None = None,
                    half: bool = True) -> Path:
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
    from safetensors.torch import load_file

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
    state = {k: v.float() for k, v in load_file(str(weights)).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("frontend.")]
    if missing or unexpected:
        raise CheckpointError(f"checkpoint weights do not match the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.metadata = meta
    model.eval()
    return model.to(select_device(device) if not isinstance(device, torch.device) else device)


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(checkpoint: str | Path | None = None, onnx: str | Path | None = None) -> dict[str, str]:
    """``{"name", "sha256"}`` of the weights that run: the checkpoint folder's name (or the ONNX
    file's stem) and the first 12 hex digits of the weights file's SHA-256 (hashed once per file)."""
    weights = Path(onnx) if onnx else (Path(checkpoint) if checkpoint else DEFAULT_CHECKPOINT) / "model.safetensors"
    stat = weights.stat()
    return {"name": weights.stem if onnx else weights.parent.name,
            "sha256": _sha256(str(weights.resolve()), stat.st_size, stat.st_mtime_ns)[:12]}


@dataclass
class Predictor:
    """One batched entry point used by every source: windows in, class probabilities out."""

    model: EmotionNet
    device: torch.device = field(default_factory=select_device)
    mixed_precision: bool = True

    @classmethod
    def from_checkpoint(cls, directory: str | Path = DEFAULT_CHECKPOINT, device: str | None = None,
                        mixed_precision: bool = True) -> "Predictor":
        dev = select_device(device)
        model = load_checkpoint(directory, dev)
        if dev.type == "cpu":
            model = model.to(memory_format=torch.channels_last)
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


def scoring_temperature(temperature: float, clip_temperature: float | None, positions: int) -> float:
    """The calibrated softmax temperature for a clip scored as the mean logit of ``positions``
    placements: the clip temperature (fitted on cross-validated multi-placement logits) when
    ``positions`` > 1 and the checkpoint has one, else the single-window temperature (which is also
    the one for the recipe's fixed chunks, ``positions`` 1)."""
    return clip_temperature if positions > 1 and clip_temperature else temperature


def clip_probabilities(predictor: Any, windows: np.ndarray, positions: int = 1) -> np.ndarray:
    """One clip's class probabilities ``(7,)`` from its windows (``positions`` placements, or the
    fixed chunks when 1): the calibrated softmax of the mean window logit. This is how ``python -m
    train evaluate`` and cross-validation score a clip, so ``emostream classify`` reports the
    decision those figures describe. Works with any predictor that has ``logits``, ``temperature``
    and ``clip_temperature`` (torch or ONNX). ``windows`` may also be an iterable of window batches
    (a long file scored as it is decoded)."""
    batches = [windows] if isinstance(windows, (np.ndarray, torch.Tensor)) else windows
    total, count = None, 0
    for batch in batches:
        logits = torch.as_tensor(predictor.logits(batch)).float()
        total = logits.sum(dim=0) if total is None else total + logits.sum(dim=0)
        count += len(logits)
    mean = total / count
    t = scoring_temperature(predictor.temperature, predictor.clip_temperature, positions)
    return torch.softmax(mean / t, dim=-1).cpu().numpy()
