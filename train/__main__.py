"""``python -m train fit|cv|evaluate`` — see README "Training"."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from emostream.cli import _positive  # the positive-number argument type of emostream's own CLI
from emostream.stream import CLIP_POSITIONS

DEFAULT_CACHE = Path(".cache/emostream")


def _setup_logging(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("train")
    log.setLevel(logging.INFO)
    handler = logging.FileHandler(out_dir / "train.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(console)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train", description="Train and evaluate emostream models.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, config_required=True):
        sp.add_argument("--config", required=config_required, help="Hydrogen Torch YAML or train/configs/*.yaml")
        sp.add_argument("--data", help="manifest folder/CSV, Hydrogen Torch dataframe, or Emotions/<Class>/ tree")
        sp.add_argument("--out", help="output directory (default runs/<experiment>)")
        sp.add_argument("--epochs", type=int)
        sp.add_argument("--resume", action="store_true", help="continue from the last finished epoch / fold")
        sp.add_argument("--pretrained", metavar="PATH", help="local timm ResNet state_dict to start from")
        sp.add_argument("--cache", default=str(DEFAULT_CACHE), help="decoded-audio cache directory")
        sp.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
        sp.add_argument("--no-progress", action="store_true")
        sp.add_argument("--teacher", metavar="DIR", help="distil from this faster-whisper model directory "
                                                         "(e.g. ../shared/models/faster-whisper-base)")

    fit = sub.add_parser("fit", help="train one fold (--fold K) or a final model on all data (--all)")
    common(fit)
    g = fit.add_mutually_exclusive_group()
    g.add_argument("--fold", type=int, default=0)
    g.add_argument("--all", action="store_true", help="train on every clip (no validation): the shipped model")
    fit.add_argument("--cv-report", help="cv_report.json whose metrics and temperature go into the checkpoint")
    cv = sub.add_parser("cv", help="all folds, then an aggregate report")
    common(cv)
    cv.add_argument("--folds", type=_fold_list, metavar="K,K,...",
                    help="only these folds (trained, or reused with --resume), and the report over them")
    cv.add_argument("--reevaluate", action="store_true",
                    help="with --resume: predict finished folds again from their checkpoints with this config's "
                         "inference settings (overwrites their logits) instead of reusing the stored logits")
    te = sub.add_parser("teacher", help="encode the clips with the Whisper teacher (cached) and cross-validate "
                                         "the teacher alone on the student's folds")
    common(te)
    ev = sub.add_parser("evaluate", help="metrics report of a checkpoint on a labelled set")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--out", default=None)
    ev.add_argument("--cache", default=str(DEFAULT_CACHE))
    ev.add_argument("--device", default=None)
    ev.add_argument("--telephone", action="store_true", help="evaluate on a telephone-channel copy")
    ev.add_argument("--positions", type=_positive(int), default=CLIP_POSITIONS, metavar="P",
                    help="average each clip's logits over P placements in the window (default "
                         f"{CLIP_POSITIONS}, as emostream classify; 1: the recipe's fixed chunks)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .config import ConfigError
    from .data import DataError
    from .teacher import TeacherError
    from emostream.model import CheckpointError

    try:
        return _run(args)
    except (ConfigError, DataError, CheckpointError, TeacherError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is saved; rerun with --resume", file=sys.stderr)
        return 130


def _run(args) -> int:
    import torch

    from .config import load_config
    from .data import build_cache, load_dataset, make_folds
    from .engine import cross_validate, evaluate_checkpoint, fit

    if getattr(args, "reevaluate", False) and not args.resume:
        raise ConfigError_("--reevaluate rescores finished folds: use it with --resume")
    if args.command == "evaluate":
        out = Path(args.out or Path(args.checkpoint) / "evaluation")
        _setup_logging(out)
        clips = load_dataset(args.data)
        cache = build_cache(clips, args.cache)
        if args.telephone:
            from .data import AudioCache
            from emostream.audio import float32_to_int16, telephone_channel

            pieces = [float32_to_int16(telephone_channel(cache.clip(i))[: cache.clip_length(i)]) for i in range(len(cache))]
            cache = AudioCache(np.concatenate(pieces), cache.offsets)
        report = evaluate_checkpoint(args.checkpoint, clips, cache, out, device=args.device, positions=args.positions)
        print((out / "evaluation.md").read_text())
        return 0

    cfg = load_config(args.config, pretrained_path=args.pretrained, teacher=args.teacher, epochs=args.epochs, data=args.data)
    if args.command == "teacher" and not cfg.distill.teacher:
        raise ConfigError_("no teacher: pass --teacher DIR or set emostream.distill.teacher")
    if cfg.distill.teacher:
        from .teacher import check_teacher_dir
        check_teacher_dir(cfg.distill.teacher)  # fail before any decoding or training
    out = Path(args.out or Path("runs") / cfg.experiment_name)
    _setup_logging(out)
    log = logging.getLogger("train")
    for note in cfg.notes:
        log.info("note: %s", note)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.data:
        raise ConfigError_("no data: pass --data or set dataset.train_dataframe")
    clips = load_dataset(cfg.data, cfg.data_folder, cfg.audio_column, cfg.label_column)
    if cfg.exclude_speakers:
        before = len(clips)
        clips = [c for c in clips if c.speaker not in set(cfg.exclude_speakers)]
        log.info("excluded %d clips of reserved speakers %s", before - len(clips), ", ".join(cfg.exclude_speakers))
    if cfg.data_sample < 1:
        rng = np.random.default_rng(cfg.seed)
        keep = np.sort(rng.choice(len(clips), max(1, int(len(clips) * cfg.data_sample)), replace=False))
        clips = [clips[i] for i in keep]
    cache = build_cache(clips, args.cache, cfg.max_inference_chunk_seconds)
    log.info("%d clips, %d speakers, %.1f min of audio", len(clips), len({c.speaker for c in clips}),
             cache.offsets[-1] / 16000 / 60)
    features = None
    if cfg.distill.teacher:
        from .teacher import build_teacher_cache

        features = build_teacher_cache(cache, cfg.distill.teacher, args.cache, threads=cfg.threads or 0)
        log.info("teacher: %s, %d encoder frames cached", cfg.distill.teacher, len(features.frames))
    if args.command == "teacher":
        from .engine import teacher_cv

        teacher_cv(cfg, clips, features, make_folds(clips, cfg.folds, cfg.group_by, cfg.seed), out)
        print((out / "teacher_report.md").read_text())
        return 0
    if args.command == "cv":
        folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
        report = cross_validate(cfg, clips, cache, folds, out, resume=args.resume, pretrained_path=args.pretrained,
                                only_folds=args.folds, device=args.device, show_progress=not args.no_progress,
                                teacher_features=features, reevaluate=args.reevaluate)
        print((out / "cv_report.md").read_text())
        return 0
    if args.all:
        import json
        metadata = {"data": {"clips": len(clips), "speakers": sorted({c.speaker for c in clips}),
                             "excluded_speakers": list(cfg.exclude_speakers)}}
        if args.cv_report:
            cv = json.loads(Path(args.cv_report).read_text())
            metadata["cv"] = {"protocol": cv["protocol"], "summary": cv["summary"],
                              "summary_telephone": cv["summary_telephone"], "temperature": cv["temperature"]}
        teacher = None
        if features is not None:
            from .engine import fold_teacher

            teacher = fold_teacher(cfg, clips, features, np.arange(len(clips)))
            metadata["distillation"] = {"teacher": Path(cfg.distill.teacher).name, "alpha": cfg.distill.alpha,
                                        "temperature": cfg.distill.temperature}
        res = fit(cfg, clips, cache, np.arange(len(clips)), None, out, resume=args.resume,
                  pretrained_path=args.pretrained, metadata=metadata, device=args.device,
                  show_progress=not args.no_progress, teacher=teacher)
        if args.cv_report:
            _set_temperature(res.checkpoint, metadata["cv"]["temperature"])
        print(f"checkpoint: {res.checkpoint}")
        return 0
    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    report = cross_validate(cfg, clips, cache, folds, out, resume=args.resume, pretrained_path=args.pretrained,
                            only_folds=[args.fold], device=args.device, show_progress=not args.no_progress,
                            teacher_features=features)
    print((out / "cv_report.md").read_text())
    return 0


def _fold_list(text: str) -> list[int]:
    """``--folds 1,3`` as a list of fold numbers."""
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers separated by commas, got {text!r}") from None


def _set_temperature(checkpoint: Path, temperature: float) -> None:
    """Store the CV-fitted softmax temperature in the checkpoint's model config."""
    import json

    meta_path = Path(checkpoint) / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["model"]["temperature"] = float(temperature)
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def ConfigError_(msg: str):
    from .config import ConfigError
    return ConfigError(msg)


if __name__ == "__main__":
    sys.exit(main())
