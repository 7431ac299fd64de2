"""Hydrogen Torch recipe loading: every key is honoured or rejected by name.

A config file is either a Hydrogen Torch YAML (the seed recipe loads as-is) or one of
``train/configs/*.yaml`` that says ``base: recipe.yaml`` and overrides keys; ``emostream:``
holds the settings that go beyond the recipe (documented in each config).
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from emostream.audio import SAMPLE_RATE, WINDOW_SECONDS
from emostream.features import NORMALIZATIONS

log = logging.getLogger("train")


class ConfigError(ValueError):
    """A config key or value this trainer cannot honour (message names the key)."""


@dataclass(frozen=True)
class Augment:
    """Augmentations beyond the recipe (all off in the recipe)."""

    random_offset: bool = False  # place short clips at a random offset in the 6 s window (else at 0)
    gain_db: float = 0.0  # random gain in ±gain_db
    noise_snr_db: tuple[float, float] | None = None  # white noise at an SNR drawn from this range
    noise_probability: float = 0.0
    telephone_probability: float = 0.0  # 8 kHz μ-law round trip
    floor_noise_dbfs: tuple[float, float] | None = None  # white noise over the whole 6 s window
    floor_noise_probability: float = 0.0  # (padding included) at this absolute level
    concat_probability: float = 0.0  # build the window from consecutive clips of the same speaker and
    concat_gap_seconds: tuple[float, float] = (0.2, 1.0)  # emotion with pauses like a turn's (streaming)
    spec_time_masks: int = 0
    spec_time_width: int = 0  # frames
    spec_freq_masks: int = 0
    spec_freq_width: int = 0  # mel bins
    vtlp_probability: float = 0.0  # vocal tract length perturbation: warp the frequency axis of this share
    vtlp_range: tuple[float, float] = (0.9, 1.1)  # of windows by a factor drawn uniformly from this range
    speed_factors: tuple[float, ...] = ()  # speed-perturbed copies of every clip (tempo, pitch and formants
    speed_probability: float = 0.0  # scaled together); this share of training windows comes from a copy
    # (factors equally likely), whose teacher targets are its own encoding
    phone_copies: int = 0  # copies of every clip through random phone lines (emostream.channel), this
    phone_probability: float = 0.0  # share of training windows from one (teacher targets: the clean original's)


SPEAKER_CENTRE = ("none", "heads", "all")  # what the teacher subtracts speaker means from (train.teacher.FoldTeacher)


@dataclass(frozen=True)
class Distill:
    """Knowledge distillation from a Whisper-base teacher (``train/teacher.py``); off when no teacher."""

    teacher: str | None = None  # faster-whisper model directory (``--teacher DIR``)
    alpha: float = 0.5  # loss = (1 - alpha) * recipe BCE on labels + alpha * KD term
    temperature: float = 2.0  # softens teacher and student distributions in the KD term
    head_c: float = 0.5  # inverse L2 strength of the teacher's logistic-regression heads
    inner_folds: int = 4  # speaker-grouped splits giving out-of-speaker targets to training clips
    embed_weight: float = 0.0  # + embed_weight * cosine distance between a projection of the student's
    # pooled features and the teacher's standardised pooled embedding
    frame_weight: float = 0.0  # + frame_weight * cosine distance, per ~1 s time cell of the student's last
    # feature map (1x1 projection), to the teacher's frames pooled over that cell
    speaker_centre: str = "none"  # subtract each speaker's mean pooled encoder output from the teacher's
    # features: "none", before its heads ("heads"), or before the heads and
    # the embedding and frame targets ("all"); training only
    layers: tuple[int, ...] = ()  # encoder hidden states averaged into the teacher's features: () = the
    # encoder output (CTranslate2); else 0 = after the stem, k = after block k
    # (6 = the output of Whisper base), read by train.whisper_layers
    phone_targets: str = "source"  # a phone line's targets: the teacher on its clean "source" clip, or on
    # the line's own audio ("copy", as speed copies are; one more encoding each)
    anchor_weight: float = 0.0  # + anchor_weight * T^2 * KL(start || student) on the full-band windows of a
    # batch: "start" is the model the run began from (--pretrained), frozen, so a fine-tune keeps what it
    # knew where the new data does not ask it to change (learning without forgetting); works without a teacher


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs, resolved from YAML."""

    experiment_name: str = "emostream"
    # architecture
    backbone: str = "resnet50"
    dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth (timm drop_path_rate), training only; emostream.drop_path
    pool: str = "avg"
    pretrained: bool = False
    # audio
    sample_rate: int = SAMPLE_RATE
    n_fft: int = 2048
    hop_length: int = 512
    n_mels: int = 128
    f_min: float = 50.0
    f_max: float = SAMPLE_RATE / 2
    normalize: str = "none"  # spectrogram normalisation: "none" (recipe) or "utterance"
    chunk_seconds: float = WINDOW_SECONDS
    # mixing (recipe augmentation.mix_*)
    mix_audio: str = "Disabled"
    mix_concentration: float = 1.0
    mix_probability: float = 1.0
    # dataset
    data: str | None = None
    audio_column: str = "audio"
    label_column: str = "class"
    data_folder: str | None = None
    data_sample: float = 1.0
    folds: int = 4
    group_by: str = "speaker"  # "speaker" (honest), "corpus" (leave-one-corpus-out: one fold per
    # corpus, cfg.folds set from the data) or "audio" (the recipe's; leaks speakers)
    validation_strategy: str = "kfold"
    validation_size: float = 0.2
    exclude_speakers: tuple[str, ...] = ()
    # environment
    mixed_precision_training: bool = True
    mixed_precision_inference: bool = False
    seed: int = 42  # folds, teacher heads and (unless training_seed) training randomness
    training_seed: int | None = None  # emostream.training_seed: seeds only the student's training randomness
    # (initial weights, crops, augmentation, batch order), folds unchanged
    threads: int | None = None
    # prediction
    inference_chunk_seconds: float = WINDOW_SECONDS
    max_inference_chunk_seconds: float = 600.0
    inference_positions: int = 1  # > 1: test-time window averaging over this many placements of a
    # clip in the window (emostream.stream.placed_windows); 1 = the recipe
    metric: str = "ROC_AUC"
    # training
    batch_size: int = 32
    drop_last: bool = True
    epochs: int = 5
    evaluation_epochs: int = 1
    grad_accumulation: int = 1
    gradient_clip: float = 0.0
    learning_rate: float = 1e-3
    differential_learning_rate: float = 1e-3
    differential_learning_rate_layers: tuple[str, ...] = ()
    loss: str = "BCE"
    label_smoothing: float = 0.0
    optimizer: str = "AdamW"
    schedule: str = "Cosine"
    warmup_epochs: float = 0.0
    weight_decay: float = 0.0
    save_best_checkpoint: bool = False
    calculate_train_metric: bool = False
    calibrate: bool = True  # fit a softmax temperature on validation logits
    ema_decay: float = 0.0  # > 0: also keep an exponential moving average of the weights (this
    # decay per optimizer step); it is the model saved and reported, and
    # the raw weights' figures are kept beside it (training trajectory unchanged)
    augment: Augment = field(default_factory=Augment)
    distill: Distill = field(default_factory=Distill)
    notes: tuple[str, ...] = ()  # deviations applied while loading (logged and stored)

    @property
    def student_seed(self) -> int:
        """The seed of the student's training randomness: ``training_seed``, else ``seed``."""
        return self.seed if self.training_seed is None else self.training_seed

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = (
                dict(value.__dict__)
                if isinstance(value, (Augment, Distill))
                else (list(value) if isinstance(value, tuple) else value)
            )
        return out


def _choice(key: str, value: Any, allowed: dict[str, Any]) -> Any:
    if str(value) not in allowed:
        raise ConfigError(f"{key}: {value!r} is not supported (supported: {', '.join(allowed)})")
    return allowed[str(value)]


def _none(value: Any) -> bool:
    return value is None or str(value) in ("None", "", "null")


# Each recipe section has its function: ``(key, value, updates, notes)`` applies one key of that
# section to the resolved fields ``updates`` (notes: deviations applied while loading) and returns
# False for a key it does not know.


def _architecture(key: str, v: Any, u: dict[str, Any], notes: list[str]) -> bool:
    if key == "backbone":
        u["backbone"] = str(v)
    elif key == "dropout":
        u["dropout"] = float(v)
    elif key == "pool":
        u["pool"] = _choice("architecture.pool", v, {"Average": "avg", "Max": "max", "avg": "avg", "max": "max"})
    elif key == "pretrained":
        u["pretrained"] = bool(v)
    else:
        return False
    return True


def _audio(key: str, v: Any, u: dict[str, Any], notes: list[str]) -> bool:
    if key == "audio_parameters":
        _choice("audio.audio_parameters", v, {"Auto": None, "Manual": None})
    elif key == "sample_rate":
        if int(v) != SAMPLE_RATE:
            raise ConfigError(f"audio.sample_rate: {v} is not supported; emostream streams at {SAMPLE_RATE} Hz")
    elif key == "hop_size":
        u["hop_length"] = int(v)
    elif key == "stft_window_size":
        u["n_fft"] = int(v)
    elif key == "mel_frequency_bins":
        u["n_mels"] = int(v)
    elif key == "minimum_frequency":
        u["f_min"] = float(v)
    elif key == "maximum_frequency":
        nyquist = SAMPLE_RATE / 2
        if float(v) > nyquist:
            notes.append(f"audio.maximum_frequency {v} Hz clamped to the Nyquist frequency {nyquist:.0f} Hz")
            v = nyquist
        u["f_max"] = float(v)
    elif key == "spectrogram_normalization":
        _choice("audio.spectrogram_normalization", v, {"No": None, "False": None})
    elif key == "training_chunk_seconds":
        if float(v) != WINDOW_SECONDS:
            raise ConfigError(
                f"audio.training_chunk_seconds: {v} is not supported; the streaming window is {WINDOW_SECONDS} s"
            )
        u["chunk_seconds"] = float(v)
    else:
        return False
    return True


def _augmentation(key: str, v: Any, u: dict[str, Any], notes: list[str]) -> bool:
    if key == "mix_audio":
        u["mix_audio"] = _choice("augmentation.mix_audio", v, {"Disabled": "Disabled", "Mixup": "Mixup"})
    elif key == "mix_concentration":
        u["mix_concentration"] = float(v)
    elif key == "mix_iterations":
        if int(v) != 1:
            raise ConfigError(f"augmentation.mix_iterations: {v} is not supported (only 1)")
    elif key == "mix_probability":
        u["mix_probability"] = float(v)
    elif key == "mix_target":
        _choice("augmentation.mix_target", v, {"Ratio": None})
    else:
        return False
    return True


SEPARATE_DATAFRAMES = ("data_folder_test", "test_dataframe", "unlabeled_dataframe", "validation_dataframe")


def _dataset(key: str, v: Any, u: dict[str, Any], notes: list[str]) -> bool:
    if key == "audio_column":
        u["audio_column"] = str(v)
    elif key == "label_columns":
        cols = list(v) if isinstance(v, (list, tuple)) else [v]
        if len(cols) != 1:
            raise ConfigError(f"dataset.label_columns: {cols} — exactly one label column is supported")
        u["label_column"] = str(cols[0])
    elif key == "data_folder":
        u["data_folder"] = None if _none(v) else str(v)
    elif key == "train_dataframe":
        u["data"] = None if _none(v) else str(v)
    elif key in SEPARATE_DATAFRAMES:
        if not _none(v):
            raise ConfigError(
                f"dataset.{key}: separate dataframes are not supported; "
                "use k-fold CV and `python -m train evaluate --data` for held-out sets"
            )
    elif key == "data_sample":
        if not 0 < float(v) <= 1:
            raise ConfigError(f"dataset.data_sample: {v} must be in (0, 1]")
        u["data_sample"] = float(v)
    elif key == "data_sample_choice":
        pass  # data_sample applies to train and validation alike, as the recipe lists both
    elif key == "folds":
        vals = list(v) if isinstance(v, (list, tuple)) else [v]
        u["folds"] = int(vals[0])
    elif key == "group_fold_column":
        u["group_by"] = _choice(
            "dataset.group_fold_column", v, {"audio": "audio", "speaker": "speaker", "corpus": "corpus"}
        )
        if u["group_by"] == "audio":
            notes.append(
                "dataset.group_fold_column: audio groups folds by file: the same speakers appear "
                "in training and validation, so its scores overstate accuracy on unseen voices"
            )
    elif key == "validation_size":
        u["validation_size"] = float(v)
    elif key == "validation_strategy":
        u["validation_strategy"] = _choice("dataset.validation_strategy", v, {"kfold": "kfold"})
    else:
        return False
    return True


def _environment(key: str, v: Any, u: dict[str, Any], notes: list[str]) -> bool:
    if key == "gpus":
        pass  # device is auto-selected: CUDA when present, CPU otherwise
    elif key == "mixed_precision_inference":
        u["mixed_precision_inference"] = bool(v)
    elif key == "mixed_precision_training":
        u["mixed_precision_training"] = bool(v)
    elif key == "number_of_workers":
        pass  # audio is decoded once into an in-memory cache; batches need no loader workers
    elif key == "seed":
        if int(v) < 0:
            notes.append("environment.seed: -1 (random) replaced by seed 42 so runs and --resume are reproducible")
            v = 42
        u["seed"] = int(v)
    else:
        return False
    return True


def _logging(key: str, v: Any, u: dict[str, Any], notes: list[str]) -> bool:
    if key == "logger":
        if not _none(v):
            raise ConfigError(f"logging.logger: {v!r} is not supported (logs go to a file beside the outputs)")
    elif key == "neptune_project":
        if str(v):
            raise ConfigError("logging.neptune_project: Neptune logging is not supported")
    elif key == "number_of_audios":
        pass  # only used by external loggers, which are not supported
    else:
        return False
    return True


def _prediction(key: str, v: Any, u: dict[str, Any], notes: list[str]) -> bool:
    if key == "inference_chunk_method":
        _choice("prediction.inference_chunk_method", v, {"Fix": None})
    elif key == "inference_chunk_seconds":
        if float(v) != WINDOW_SECONDS:
            raise ConfigError(
                f"prediction.inference_chunk_seconds: {v} is not supported (the window is {WINDOW_SECONDS} s)"
            )
    elif key == "max_inference_chunk_seconds":
        u["max_inference_chunk_seconds"] = float(v)
    elif key == "metric":
        u["metric"] = _choice(
            "prediction.metric", v, {"ROC_AUC": "ROC_AUC", "UA": "UA", "F1": "F1", "Accuracy": "Accuracy"}
        )
    elif key == "probability_threshold":
        pass  # single-label task: the predicted class is the argmax; the threshold has no effect
    else:
        return False
    return True


def _training(key: str, v: Any, u: dict[str, Any], notes: list[str]) -> bool:
    if key == "automatically_adjust_batch_size":
        if bool(v):
            raise ConfigError("training.automatically_adjust_batch_size: true is not supported")
    elif key == "batch_size":
        u["batch_size"] = int(v)
    elif key == "build_scoring_pipelines":
        pass  # every run saves an emostream checkpoint, which is the scoring pipeline
    elif key == "calculate_train_metric":
        u["calculate_train_metric"] = bool(v)
    elif key == "differential_learning_rate":
        u["differential_learning_rate"] = float(v)
    elif key == "differential_learning_rate_layers":
        u["differential_learning_rate_layers"] = tuple(v or ())
    elif key == "drop_last_batch":
        u["drop_last"] = bool(v)
    elif key == "epochs":
        u["epochs"] = int(v)
    elif key == "evaluation_epochs":
        u["evaluation_epochs"] = max(1, int(v))
    elif key == "grad_accumulation":
        u["grad_accumulation"] = max(1, int(v))
    elif key == "gradient_clip":
        u["gradient_clip"] = float(v)
    elif key == "learning_rate":
        u["learning_rate"] = float(v)
    elif key == "loss_function":
        u["loss"] = _choice("training.loss_function", v, {"BCE": "BCE", "CrossEntropy": "CrossEntropy"})
    elif key == "optimizer":
        u["optimizer"] = _choice("training.optimizer", v, {"AdamW": "AdamW", "Adam": "Adam", "SGD": "SGD"})
    elif key == "run_interpretations":
        pass  # interpretations = the report's confusion matrix and training curves, always written
    elif key == "save_best_checkpoint":
        u["save_best_checkpoint"] = bool(v)
    elif key == "schedule":
        u["schedule"] = _choice(
            "training.schedule", v, {"Cosine": "Cosine", "Constant": "Constant", "Linear": "Linear"}
        )
    elif key == "train_validation_data":
        if bool(v):
            raise ConfigError(
                "training.train_validation_data: true is not supported; use `fit --all` for a final model"
            )
    elif key == "warmup_epochs":
        u["warmup_epochs"] = float(v)
    elif key == "weight_decay":
        u["weight_decay"] = float(v)
    else:
        return False
    return True


RECIPE_SECTIONS = {
    "architecture": _architecture,
    "audio": _audio,
    "augmentation": _augmentation,
    "dataset": _dataset,
    "environment": _environment,
    "logging": _logging,
    "prediction": _prediction,
    "training": _training,
}


def _resolve(raw: dict, pretrained_path: str | None) -> TrainConfig:
    """The config of a YAML mapping (``base:`` links followed): each recipe key through its section's
    function, ``emostream:`` through :func:`_extensions`, in the file's order."""
    u: dict[str, Any] = {}
    notes: list[str] = []
    for section, body in raw.items():
        if section in ("experiment_name",):
            u["experiment_name"] = str(body)
            continue
        if section in ("base", "description"):
            continue
        if section == "emostream":
            _extensions(body or {}, u)
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: unknown top-level key")
        apply = RECIPE_SECTIONS.get(section)
        for key, value in body.items():
            if apply is None or not apply(key, value, u, notes):
                raise ConfigError(f"{section}.{key}: unknown recipe key")
    if pretrained_path:
        u["pretrained"] = True
    u["notes"] = tuple(notes)
    return TrainConfig(**u)


_EXTENSION_KEYS = {
    "group_by",
    "seed",
    "label_smoothing",
    "calibrate",
    "exclude_speakers",
    "threads",
    "augment",
    "epochs",
    "normalize",
    "distill",
    "ema_decay",
    "inference_positions",
    "drop_path",
    "training_seed",
}


def _fraction(name: str, value, what: str) -> float:
    """``value`` as a float in [0, 1), where 0 turns ``what`` off; a ConfigError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{name}: {value} is not in [0, 1) (0 turns {what} off)")
    return float(value)


def _augment_section(value: dict) -> Augment:
    """``emostream.augment``: the augmentations beyond the recipe, checked."""
    names = {f.name for f in fields(Augment)}
    bad = set(value) - names
    if bad:
        raise ConfigError(
            f"emostream.augment.{sorted(bad)[0]}: unknown augmentation (known: {', '.join(sorted(names))})"
        )
    value = {k: (tuple(v) if isinstance(v, list) else v) for k, v in value.items()}
    a = Augment(**value)
    for name in (f.name for f in fields(Augment) if f.name.endswith("_probability")):
        if not 0.0 <= getattr(a, name) <= 1.0:
            raise ConfigError(f"emostream.augment.{name}: {getattr(a, name)} is not in [0, 1]")
    lo, hi = a.vtlp_range
    if not 0.5 <= lo <= hi <= 2.0:
        raise ConfigError(
            f"emostream.augment.vtlp_range: {list(a.vtlp_range)} must be [low, high] with 0.5 <= low <= high <= 2"
        )
    if any(
        isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.5 <= f <= 2.0 or f == 1.0
        for f in a.speed_factors
    ) or len(set(a.speed_factors)) != len(a.speed_factors):
        raise ConfigError(
            f"emostream.augment.speed_factors: {list(a.speed_factors)} must be distinct factors "
            "in [0.5, 2] other than 1"
        )
    if a.speed_probability and not a.speed_factors:
        raise ConfigError("emostream.augment.speed_probability needs emostream.augment.speed_factors")
    if not isinstance(a.phone_copies, int) or a.phone_copies < 0:
        raise ConfigError(f"emostream.augment.phone_copies: {a.phone_copies!r} must be a whole number >= 0")
    if a.phone_probability and not a.phone_copies:
        raise ConfigError("emostream.augment.phone_probability needs emostream.augment.phone_copies")
    return replace(a, speed_factors=tuple(float(f) for f in a.speed_factors))


def _distill_section(value: dict | None) -> Distill:
    """``emostream.distill``: the distillation settings, checked."""
    names = {f.name for f in fields(Distill)}
    bad = set(value or {}) - names
    if bad:
        raise ConfigError(f"emostream.distill.{sorted(bad)[0]}: unknown key (known: {', '.join(sorted(names))})")
    value = dict(value or {})
    if "layers" in value:
        layers = value["layers"]
        if (
            not isinstance(layers, list)
            or not all(isinstance(k, int) and not isinstance(k, bool) and k >= 0 for k in layers)
            or len(set(layers)) != len(layers)
        ):
            raise ConfigError(
                f"emostream.distill.layers: {layers!r} must be a list of distinct layer "
                "indices >= 0 (empty: the encoder output)"
            )
        value["layers"] = tuple(sorted(layers))
    d = Distill(**value)
    if not 0.0 <= d.alpha <= 1.0:
        raise ConfigError(f"emostream.distill.alpha: {d.alpha} is not in [0, 1]")
    if d.temperature <= 0 or d.head_c <= 0:
        raise ConfigError("emostream.distill.temperature and head_c must be positive")
    d = replace(
        d,
        speaker_centre=_choice("emostream.distill.speaker_centre", d.speaker_centre, {v: v for v in SPEAKER_CENTRE}),
    )
    d = replace(
        d,
        phone_targets=_choice("emostream.distill.phone_targets", d.phone_targets, {"source": "source", "copy": "copy"}),
    )
    for name in ("embed_weight", "frame_weight", "anchor_weight"):
        if getattr(d, name) < 0:
            raise ConfigError(f"emostream.distill.{name}: {getattr(d, name)} is negative")
    return d


def _extensions(body: dict, u: dict) -> None:
    """The ``emostream:`` section: the settings beyond the recipe."""
    for key, value in body.items():
        if key not in _EXTENSION_KEYS:
            raise ConfigError(f"emostream.{key}: unknown key (known: {', '.join(sorted(_EXTENSION_KEYS))})")
        if key == "augment":
            u["augment"] = _augment_section(value)
        elif key == "distill":
            u["distill"] = _distill_section(value)
        elif key == "group_by":
            u["group_by"] = _choice(
                "emostream.group_by", value, {"speaker": "speaker", "audio": "audio", "corpus": "corpus"}
            )
        elif key == "normalize":
            u["normalize"] = _choice("emostream.normalize", value, {n: n for n in NORMALIZATIONS})
        elif key == "ema_decay":
            u["ema_decay"] = _fraction("emostream.ema_decay", value, "the average")
        elif key == "drop_path":
            u["drop_path"] = _fraction("emostream.drop_path", value, "stochastic depth")
        elif key == "inference_positions":
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(
                    f"emostream.inference_positions: {value} is not a whole number >= 1 "
                    "(1 is the recipe's fixed chunks)"
                )
            u["inference_positions"] = value
        elif key == "exclude_speakers":
            u["exclude_speakers"] = tuple(value or ())
        elif key == "training_seed":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ConfigError(f"emostream.training_seed: {value!r} is not a whole number >= 0")
            u["training_seed"] = value
        else:
            u[key] = value


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_yaml(path: str | Path) -> dict:
    """Read a config, following ``base:`` links (relative to the file)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping")
    if "base" in raw:
        base = read_yaml(path.parent / raw["base"])
        raw = _merge(base, {k: v for k, v in raw.items() if k != "base"})
    return raw


def load_config(
    path: str | Path, pretrained_path: str | None = None, teacher: str | None = None, **overrides: Any
) -> TrainConfig:
    """Load and validate a config; ``overrides`` replace resolved fields (CLI flags); ``teacher``
    turns distillation on (or points it at another model directory)."""
    cfg = _resolve(read_yaml(path), pretrained_path)
    if teacher:
        cfg = replace(cfg, distill=replace(cfg.distill, teacher=str(teacher)))
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cfg = replace(cfg, **overrides) if overrides else cfg
    if cfg.pretrained and not pretrained_path:
        raise ConfigError(
            "architecture.pretrained: true needs local weights: pass --pretrained PATH "
            "(a timm ResNet state_dict) or set pretrained: false; nothing is downloaded here"
        )
    if cfg.augment.speed_factors and cfg.distill.speaker_centre != "none":
        # the speaker means would mix a voice with its own speed-shifted copies, which are other voices
        raise ConfigError(
            f"emostream.distill.speaker_centre {cfg.distill.speaker_centre!r} with "
            "emostream.augment.speed_factors is not supported: use one or the other"
        )
    return cfg
