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


# Each recipe key maps to a handler (section, key) -> function(value, updates, notes).
def _resolve(raw: dict, pretrained_path: str | None) -> TrainConfig:
    u: dict[str, Any] = {}
    notes: list[str] = []
    known: dict[tuple[str, str], Any] = {}

    def handler(section: str, key: str):
        def deco(fn):
            known[(section, key)] = fn
            return fn

        return deco

    # architecture ------------------------------------------------------------------------------
    @handler("architecture", "backbone")
    def _(v):
        u["backbone"] = str(v)

    @handler("architecture", "dropout")
    def _(v):
        u["dropout"] = float(v)

    @handler("architecture", "pool")
    def _(v):
        u["pool"] = _choice("architecture.pool", v, {"Average": "avg", "Max": "max", "avg": "avg", "max": "max"})

    @handler("architecture", "pretrained")
    def _(v):
        u["pretrained"] = bool(v)

    # audio -------------------------------------------------------------------------------------
    @handler("audio", "audio_parameters")
    def _(v):
        _choice("audio.audio_parameters", v, {"Auto": None, "Manual": None})

    @handler("audio", "sample_rate")
    def _(v):
        if int(v) != SAMPLE_RATE:
            raise ConfigError(f"audio.sample_rate: {v} is not supported; emostream streams at {SAMPLE_RATE} Hz")

    @handler("audio", "hop_size")
    def _(v):
        u["hop_length"] = int(v)

    @handler("audio", "stft_window_size")
    def _(v):
        u["n_fft"] = int(v)

    @handler("audio", "mel_frequency_bins")
    def _(v):
        u["n_mels"] = int(v)

    @handler("audio", "minimum_frequency")
    def _(v):
        u["f_min"] = float(v)

    @handler("audio", "maximum_frequency")
    def _(v):
        nyquist = SAMPLE_RATE / 2
        if float(v) > nyquist:
            notes.append(f"audio.maximum_frequency {v} Hz clamped to the Nyquist frequency {nyquist:.0f} Hz")
            v = nyquist
        u["f_max"] = float(v)

    @handler("audio", "spectrogram_normalization")
    def _(v):
        _choice("audio.spectrogram_normalization", v, {"No": None, "False": None})

    @handler("audio", "training_chunk_seconds")
    def _(v):
        if float(v) != WINDOW_SECONDS:
            raise ConfigError(
                f"audio.training_chunk_seconds: {v} is not supported; the streaming window is {WINDOW_SECONDS} s"
            )
        u["chunk_seconds"] = float(v)

    # augmentation ------------------------------------------------------------------------------
    @handler("augmentation", "mix_audio")
    def _(v):
        u["mix_audio"] = _choice("augmentation.mix_audio", v, {"Disabled": "Disabled", "Mixup": "Mixup"})

    @handler("augmentation", "mix_concentration")
    def _(v):
        u["mix_concentration"] = float(v)

    @handler("augmentation", "mix_iterations")
    def _(v):
        if int(v) != 1:
            raise ConfigError(f"augmentation.mix_iterations: {v} is not supported (only 1)")

    @handler("augmentation", "mix_probability")
    def _(v):
        u["mix_probability"] = float(v)

    @handler("augmentation", "mix_target")
    def _(v):
        _choice("augmentation.mix_target", v, {"Ratio": None})

    # dataset -----------------------------------------------------------------------------------
    @handler("dataset", "audio_column")
    def _(v):
        u["audio_column"] = str(v)

    @handler("dataset", "label_columns")
    def _(v):
        cols = list(v) if isinstance(v, (list, tuple)) else [v]
        if len(cols) != 1:
            raise ConfigError(f"dataset.label_columns: {cols} — exactly one label column is supported")
        u["label_column"] = str(cols[0])

    @handler("dataset", "data_folder")
    def _(v):
        u["data_folder"] = None if _none(v) else str(v)

    @handler("dataset", "train_dataframe")
    def _(v):
        u["data"] = None if _none(v) else str(v)

    for key in ("data_folder_test", "test_dataframe", "unlabeled_dataframe", "validation_dataframe"):

        @handler("dataset", key)
        def _(v, key=key):
            if not _none(v):
                raise ConfigError(
                    f"dataset.{key}: separate dataframes are not supported; "
                    "use k-fold CV and `python -m train evaluate --data` for held-out sets"
                )

    @handler("dataset", "data_sample")
    def _(v):
        if not 0 < float(v) <= 1:
            raise ConfigError(f"dataset.data_sample: {v} must be in (0, 1]")
        u["data_sample"] = float(v)

    @handler("dataset", "data_sample_choice")
    def _(v):
        pass  # data_sample applies to train and validation alike, as the recipe lists both

    @handler("dataset", "folds")
    def _(v):
        vals = list(v) if isinstance(v, (list, tuple)) else [v]
        u["folds"] = int(vals[0])

    @handler("dataset", "group_fold_column")
    def _(v):
        u["group_by"] = _choice(
            "dataset.group_fold_column", v, {"audio": "audio", "speaker": "speaker", "corpus": "corpus"}
        )
        if u["group_by"] == "audio":
            notes.append(
                "dataset.group_fold_column: audio groups folds by file: the same speakers appear "
                "in training and validation, so its scores overstate accuracy on unseen voices"
            )

    @handler("dataset", "validation_size")
    def _(v):
        u["validation_size"] = float(v)

    @handler("dataset", "validation_strategy")
    def _(v):
        u["validation_strategy"] = _choice("dataset.validation_strategy", v, {"kfold": "kfold"})

    # environment -------------------------------------------------------------------------------
    @handler("environment", "gpus")
    def _(v):
        pass  # device is auto-selected: CUDA when present, CPU otherwise

    @handler("environment", "mixed_precision_inference")
    def _(v):
        u["mixed_precision_inference"] = bool(v)

    @handler("environment", "mixed_precision_training")
    def _(v):
        u["mixed_precision_training"] = bool(v)

    @handler("environment", "number_of_workers")
    def _(v):
        pass  # audio is decoded once into an in-memory cache; batches need no loader workers

    @handler("environment", "seed")
    def _(v):
        if int(v) < 0:
            notes.append("environment.seed: -1 (random) replaced by seed 42 so runs and --resume are reproducible")
            v = 42
        u["seed"] = int(v)

    # logging -----------------------------------------------------------------------------------
    @handler("logging", "logger")
    def _(v):
        if not _none(v):
            raise ConfigError(f"logging.logger: {v!r} is not supported (logs go to a file beside the outputs)")

    @handler("logging", "neptune_project")
    def _(v):
        if str(v):
            raise ConfigError("logging.neptune_project: Neptune logging is not supported")

    @handler("logging", "number_of_audios")
    def _(v):
        pass  # only used by external loggers, which are not supported

    # prediction --------------------------------------------------------------------------------
    @handler("prediction", "inference_chunk_method")
    def _(v):
        _choice("prediction.inference_chunk_method", v, {"Fix": None})

    @handler("prediction", "inference_chunk_seconds")
    def _(v):
        if float(v) != WINDOW_SECONDS:
            raise ConfigError(
                f"prediction.inference_chunk_seconds: {v} is not supported (the window is {WINDOW_SECONDS} s)"
            )

    @handler("prediction", "max_inference_chunk_seconds")
    def _(v):
        u["max_inference_chunk_seconds"] = float(v)

    @handler("prediction", "metric")
    def _(v):
        u["metric"] = _choice(
            "prediction.metric", v, {"ROC_AUC": "ROC_AUC", "UA": "UA", "F1": "F1", "Accuracy": "Accuracy"}
        )

    @handler("prediction", "probability_threshold")
    def _(v):
        pass  # single-label task: the predicted class is the argmax; the threshold has no effect

    # training ----------------------------------------------------------------------------------
    @handler("training", "automatically_adjust_batch_size")
    def _(v):
        if bool(v):
            raise ConfigError("training.automatically_adjust_batch_size: true is not supported")

    @handler("training", "batch_size")
    def _(v):
        u["batch_size"] = int(v)

    @handler("training", "build_scoring_pipelines")
    def _(v):
        pass  # every run saves an emostream checkpoint, which is the scoring pipeline

    @handler("training", "calculate_train_metric")
    def _(v):
        u["calculate_train_metric"] = bool(v)

    @handler("training", "differential_learning_rate")
    def _(v):
        u["differential_learning_rate"] = float(v)

    @handler("training", "differential_learning_rate_layers")
    def _(v):
        u["differential_learning_rate_layers"] = tuple(v or ())

    @handler("training", "drop_last_batch")
    def _(v):
        u["drop_last"] = bool(v)

    @handler("training", "epochs")
    def _(v):
        u["epochs"] = int(v)

    @handler("training", "evaluation_epochs")
    def _(v):
        u["evaluation_epochs"] = max(1, int(v))

    @handler("training", "grad_accumulation")
    def _(v):
        u["grad_accumulation"] = max(1, int(v))

    @handler("training", "gradient_clip")
    def _(v):
        u["gradient_clip"] = float(v)

    @handler("training", "learning_rate")
    def _(v):
        u["learning_rate"] = float(v)

    @handler("training", "loss_function")
    def _(v):
        u["loss"] = _choice("training.loss_function", v, {"BCE": "BCE", "CrossEntropy": "CrossEntropy"})

    @handler("training", "optimizer")
    def _(v):
        u["optimizer"] = _choice("training.optimizer", v, {"AdamW": "AdamW", "Adam": "Adam", "SGD": "SGD"})

    @handler("training", "run_interpretations")
    def _(v):
        pass  # interpretations = the report's confusion matrix and training curves, always written

    @handler("training", "save_best_checkpoint")
    def _(v):
        u["save_best_checkpoint"] = bool(v)

    @handler("training", "schedule")
    def _(v):
        u["schedule"] = _choice(
            "training.schedule", v, {"Cosine": "Cosine", "Constant": "Constant", "Linear": "Linear"}
        )

    @handler("training", "train_validation_data")
    def _(v):
        if bool(v):
            raise ConfigError(
                "training.train_validation_data: true is not supported; use `fit --all` for a final model"
            )

    @handler("training", "warmup_epochs")
    def _(v):
        u["warmup_epochs"] = float(v)

    @handler("training", "weight_decay")
    def _(v):
        u["weight_decay"] = float(v)

    # walk the YAML -----------------------------------------------------------------------------
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
        for key, value in body.items():
            fn = known.get((section, key))
            if fn is None:
                raise ConfigError(f"{section}.{key}: unknown recipe key")
            fn(value)
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


def _extensions(body: dict, u: dict) -> None:
    for key, value in body.items():
        if key not in _EXTENSION_KEYS:
            raise ConfigError(f"emostream.{key}: unknown key (known: {', '.join(sorted(_EXTENSION_KEYS))})")
        if key == "augment":
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
                    f"emostream.augment.vtlp_range: {list(a.vtlp_range)} must be [low, high] with "
                    "0.5 <= low <= high <= 2"
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
            u["augment"] = replace(a, speed_factors=tuple(float(f) for f in a.speed_factors))
        elif key == "distill":
            names = {f.name for f in fields(Distill)}
            bad = set(value or {}) - names
            if bad:
                raise ConfigError(
                    f"emostream.distill.{sorted(bad)[0]}: unknown key (known: {', '.join(sorted(names))})"
                )
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
                speaker_centre=_choice(
                    "emostream.distill.speaker_centre", d.speaker_centre, {v: v for v in SPEAKER_CENTRE}
                ),
            )
            d = replace(
                d,
                phone_targets=_choice(
                    "emostream.distill.phone_targets", d.phone_targets, {"source": "source", "copy": "copy"}
                ),
            )
            for name in ("embed_weight", "frame_weight"):
                if getattr(d, name) < 0:
                    raise ConfigError(f"emostream.distill.{name}: {getattr(d, name)} is negative")
            u["distill"] = d
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
