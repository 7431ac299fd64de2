"""``python -m train fit|cv|evaluate|prepare|...`` — see README "Training" and train/DATA.md."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from emostream.argtypes import positive as _positive  # the positive-number argument type of emostream's CLI
from emostream.stream import CLIP_POSITIONS

from .argtypes import DEFAULT_CACHE, channel_list, fold_list, layer_list


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
        sp.add_argument(
            "--pretrained",
            metavar="PATH",
            help="local weights to start from: a timm ResNet state_dict, or an emostream checkpoint directory "
            "(fine-tuning)",
        )
        sp.add_argument("--cache", default=str(DEFAULT_CACHE), help="decoded-audio cache directory")
        sp.add_argument("--device", default=None, help="cpu, cuda (default: cuda when present)")
        sp.add_argument("--no-progress", action="store_true")
        sp.add_argument(
            "--teacher",
            metavar="DIR",
            help="distil from this faster-whisper model directory (e.g. ../shared/models/faster-whisper-base)",
        )

    fit = sub.add_parser("fit", help="train one fold (--fold K) or a final model on all data (--all)")
    common(fit)
    g = fit.add_mutually_exclusive_group()
    g.add_argument("--fold", type=int, default=0)
    g.add_argument("--all", action="store_true", help="train on every clip (no validation): the shipped model")
    fit.add_argument("--cv-report", help="cv_report.json whose metrics and temperature go into the checkpoint")
    fit.add_argument(
        "--clip-cv-report",
        help="cv_report.json of the same recipe scored with several placements "
        "(emostream.inference_positions > 1): its temperature becomes the "
        "checkpoint's clip temperature (emostream classify)",
    )
    cal = sub.add_parser(
        "calibrate",
        help="store CV-fitted temperatures in an existing checkpoint's model.json (the weights are untouched)",
    )
    cal.add_argument("--checkpoint", required=True)
    cal.add_argument(
        "--cv-report", required=True, help="cv_report.json scored with one placement: the window temperature"
    )
    cal.add_argument("--clip-cv-report", help="cv_report.json scored with several placements: the clip temperature")
    cv = sub.add_parser("cv", help="all folds, then an aggregate report")
    common(cv)
    cv.add_argument(
        "--folds",
        type=fold_list,
        metavar="K,K,...",
        help="only these folds (trained, or reused with --resume), and the report over them",
    )
    cv.add_argument(
        "--leave-one-corpus-out",
        action="store_true",
        help="one fold per corpus, each holding out that whole corpus (as emostream.group_by: corpus); "
        "the report gets a table per held-out corpus",
    )
    cv.add_argument(
        "--reevaluate",
        action="store_true",
        help="with --resume: predict finished folds again from their checkpoints with this config's "
        "inference settings (overwrites their logits) instead of reusing the stored logits",
    )
    cv.add_argument(
        "--channels",
        type=channel_list,
        metavar="C,C,...",
        help="beside full band and G.712, score each fold's model on these channel copies too: mulaw "
        "(8 kHz mu-law only), grid (every codec this build has, after the G.712 band) or codec names",
    )
    te = sub.add_parser(
        "teacher",
        help="encode the clips with the Whisper teacher (cached) and cross-validate "
        "the teacher alone on the student's folds",
    )
    common(te)
    te.add_argument(
        "--layers",
        nargs="+",
        type=layer_list,
        metavar="L[,L...]",
        help="compare teachers built on these encoder hidden states instead of the config's: each "
        "argument one layer or a comma list averaged (0 = after the stem, 6 = Whisper base's "
        "output); one report per choice and a table teacher_layers.md",
    )
    te.add_argument(
        "--channels",
        type=channel_list,
        metavar="C,C,...",
        help="also probe the teacher through these telephone channels (g712, mulaw, grid or codec "
        "names): heads fitted on clean (and clean + channel) clips, scored on each channel; "
        "teacher_channels.md",
    )
    en = sub.add_parser(
        "ensemble",
        help="report the mean probabilities of finished CV runs on the same folds "
        "(no training): what an ensemble of them would score",
    )
    en.add_argument("--config", required=True, help="the runs' config (its seed fixes the folds)")
    en.add_argument(
        "--runs",
        nargs="+",
        required=True,
        metavar="DIR",
        help="cv output directories holding foldK/val_logits.npy (e.g. train/reports/folds/<run>)",
    )
    en.add_argument("--folds", type=fold_list, required=True, metavar="K,K,...")
    en.add_argument("--data", help="manifest folder/CSV (default: the config's)")
    en.add_argument("--out", required=True, help="directory for the ensemble's folds and cv_report")
    en.add_argument("--cache", default=str(DEFAULT_CACHE), help="decoded-audio cache directory")
    pk = sub.add_parser(
        "pack",
        help="copy a config's clips and its teacher (cut after the blocks it uses) into "
        "parts small enough to carry to a lent GPU machine (train/gpu_fit.sh)",
    )
    pk.add_argument("--config", required=True, help="the config whose fit will read the pack")
    pk.add_argument("--data", help="manifest folder/CSV (default: the config's)")
    pk.add_argument("--teacher", metavar="DIR", help="faster-whisper model directory (default: the config's)")
    pk.add_argument("--out", required=True, help="a new folder for the parts (e.g. .devpack)")
    pk.add_argument(
        "--part-mb",
        type=_positive(float),
        default=50.0,
        metavar="MB",
        help="largest part, in MB (default 50: a call carries 64 MiB with the working tree)",
    )
    pr = sub.add_parser(
        "prepare",
        help="convert an emotional-speech corpus to 16 kHz mono FLAC + manifest.csv "
        "(train/DATA.md), or combine prepared folders into one manifest",
    )
    from .prepare import CORPORA

    pr.add_argument(
        "corpus",
        choices=[*CORPORA, "combine"],
        help="the corpus layout at SRC, or combine: one manifest over the prepared folders SRC ...",
    )
    pr.add_argument("src", nargs="+", metavar="SRC", help="the corpus's folder (combine: prepared folders)")
    pr.add_argument("--out", required=True, help="output folder, outside any repository (e.g. /work/data-extra/tess)")
    so = sub.add_parser(
        "soup",
        help="the uniform weight mean of checkpoints fine-tuned from the same start (a model soup), "
        "saved as a checkpoint",
    )
    so.add_argument("--checkpoints", nargs="+", required=True, metavar="DIR")
    so.add_argument("--out", required=True, metavar="DIR")
    ev = sub.add_parser("evaluate", help="metrics report of a checkpoint on a labelled set")
    ev.add_argument("--checkpoint", required=True)
    ev.add_argument("--data", required=True)
    ev.add_argument("--out", default=None)
    ev.add_argument("--cache", default=str(DEFAULT_CACHE))
    ev.add_argument("--device", default=None)
    ev.add_argument(
        "--speakers",
        metavar="FILE",
        help="only the clips of these speakers (one id per line, e.g. examples/reserved_speakers.txt: "
        "the held-out voices no shipped model trains on)",
    )
    ev.add_argument("--telephone", action="store_true", help="evaluate on the G.712 telephone copy (--channels g712)")
    ev.add_argument(
        "--channels",
        type=channel_list,
        default=None,
        metavar="C,C,...",
        help="score each channel copy, one report per channel under --out and one table: full (the "
        "files as they are), g712 (300-3400 Hz band-pass at 8 kHz + G.711 mu-law), mulaw (8 kHz "
        "mu-law only), grid (every codec of emostream.channel.CODECS this build has, after the "
        "G.712 band) or codec names; default full",
    )
    ev.add_argument(
        "--positions",
        type=_positive(int),
        default=CLIP_POSITIONS,
        metavar="P",
        help="average each clip's logits over P placements in the window (default "
        f"{CLIP_POSITIONS}, as emostream classify; 1: the recipe's fixed chunks)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from emostream.model import CheckpointError

    from .config import ConfigError
    from .data import DataError
    from .pack import PackError
    from .teacher import TeacherError
    from .whisper_layers import ModelFileError

    try:
        return _run(args)
    except (ConfigError, DataError, CheckpointError, TeacherError, PackError, ModelFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the last finished epoch is saved; rerun with --resume", file=sys.stderr)
        return 130


def _run(args) -> int:
    """One sub-command: those that need no config first, then the config's, in the order their data
    is prepared (clips, teacher encodings, speed and phone copies)."""
    if args.command == "prepare":
        return _prepare(args)
    if getattr(args, "reevaluate", False) and not args.resume:
        raise ConfigError_("--reevaluate rescores finished folds: use it with --resume")
    if args.command == "calibrate":
        return _calibrate(args)
    if args.command == "soup":
        from .soup import soup

        print(f"checkpoint: {soup([Path(c) for c in args.checkpoints], Path(args.out))}")
        return 0
    if args.command == "evaluate":
        return _evaluate(args)
    cv = clip_cv = None
    if args.command == "fit":  # read the reports before any decoding or training
        cv, clip_cv = _fit_reports(args)
    cfg = _run_config(args)
    if args.command == "pack":
        return _pack(args, cfg)
    cfg, clips, cache, out = _run_data(args, cfg)
    if args.command == "ensemble":
        return _ensemble(args, cfg, clips, cache, out)
    if args.command == "teacher" and args.layers:
        from .distill import teacher_layers_report

        table = teacher_layers_report(cfg, clips, cache, args.layers, args.cache, out)
        print(table)
        return 0
    features = _teacher_features(args, cfg, cache)
    if args.command == "teacher":
        return _teacher(args, cfg, clips, cache, features, out)
    speed, features = _copies(args, cfg, clips, cache, features)
    # from here on ``speed`` holds every copy training may draw from (SpeedCopies or CopySet)
    if args.command == "cv":
        return _cv(args, cfg, clips, cache, out, features, speed)
    if args.all:
        return _fit_all(args, cfg, clips, cache, out, features, speed, cv, clip_cv)
    return _fit_fold(args, cfg, clips, cache, out, features, speed)


def _calibrate(args) -> int:
    """``calibrate``: the CV reports' temperatures into an existing checkpoint."""
    from emostream.model import load_checkpoint

    from .calibration import read_cv_report, store_calibration

    load_checkpoint(args.checkpoint, "cpu")  # a clear error for a path that is not a checkpoint
    cv = read_cv_report(args.cv_report, clip=False)
    clip_cv = read_cv_report(args.clip_cv_report, clip=True) if args.clip_cv_report else None
    store_calibration(args.checkpoint, cv, clip_cv)
    print(
        f"{args.checkpoint}: temperature {cv['temperature']:.4f}"
        + (f", clip temperature {clip_cv['temperature']:.4f}" if clip_cv else "")
    )
    return 0


def _evaluate(args) -> int:
    """``evaluate``: a checkpoint's report on a labelled set (per channel copy with ``--channels``)."""
    from .data import DataError, build_cache, load_dataset
    from .evaluate import evaluate_channels, evaluate_checkpoint

    out = Path(args.out or Path(args.checkpoint) / "evaluation")
    _setup_logging(out)
    clips = load_dataset(args.data)
    if args.speakers:
        try:
            wanted = set(Path(args.speakers).read_text().split())
        except OSError as exc:
            raise DataError(f"speakers file {args.speakers}: {exc.strerror or exc}") from None
        clips = [c for c in clips if c.speaker in wanted]
        if not clips:
            raise DataError(f"no clips of the speakers in {args.speakers} in {args.data}")
    logging.getLogger("train").info(
        "%d clips of %d speakers%s",
        len(clips),
        len({c.speaker for c in clips}),
        f" (those of {args.speakers})" if args.speakers else "",
    )
    cache = build_cache(clips, args.cache)
    channels = args.channels or (["g712"] if args.telephone else ["full"])
    if channels != ["full"]:
        print(
            evaluate_channels(
                args.checkpoint, clips, cache, channels, out, device=args.device, positions=args.positions
            )
        )
        return 0
    evaluate_checkpoint(args.checkpoint, clips, cache, out, device=args.device, positions=args.positions)
    print((out / "evaluation.md").read_text())
    return 0


def _fit_reports(args) -> tuple[dict | None, dict | None]:
    """``fit``'s ``--cv-report`` and ``--clip-cv-report``, read and checked (None where not given)."""
    from .calibration import read_cv_report

    if (args.cv_report or args.clip_cv_report) and not args.all:
        raise ConfigError_("--cv-report and --clip-cv-report go with --all (the shipped model)")
    if args.clip_cv_report and not args.cv_report:
        raise ConfigError_("--clip-cv-report goes with --cv-report (the single-window temperature)")
    cv = read_cv_report(args.cv_report, clip=False) if args.cv_report else None
    clip_cv = read_cv_report(args.clip_cv_report, clip=True) if args.clip_cv_report else None
    return cv, clip_cv


def _run_config(args):
    """The config of a command that trains or reads training data, with its command-line overrides;
    its teacher directory checked before any decoding or training."""
    from .config import load_config

    cfg = load_config(
        args.config,
        pretrained_path=getattr(args, "pretrained", None),
        teacher=getattr(args, "teacher", None),
        epochs=getattr(args, "epochs", None),
        data=args.data,
        group_by="corpus" if getattr(args, "leave_one_corpus_out", False) else None,
    )
    if args.command == "teacher" and not cfg.distill.teacher:
        raise ConfigError_("no teacher: pass --teacher DIR or set emostream.distill.teacher")
    if cfg.distill.teacher and args.command != "ensemble":
        from .teacher import check_teacher_dir

        check_teacher_dir(cfg.distill.teacher)  # fail before any decoding or training
    return cfg


def _pack(args, cfg) -> int:
    """``pack``: the config's clips and teacher in parts for a lent GPU machine."""
    from .pack import write_pack

    if not cfg.data:
        raise ConfigError_("no data: pass --data or set dataset.train_dataframe")
    info = write_pack(cfg, args.out, args.part_mb)
    print(
        f"{args.out}: {info['clips']} clips of {info['speakers']} speakers, teacher {info['teacher']}; "
        + ", ".join(f"{k} {info['megabytes'][k]} MB" for k in info["files"])
    )
    return 0


def _run_data(args, cfg):
    """The run's output folder (logging to it), its clips and their decoded audio; returns the config
    with its folds set from the clips (leave-one-corpus-out: one per corpus), the clips, the cache and
    the folder."""
    import torch

    from .data import build_cache, config_clips, fold_config

    out = Path(args.out or Path("runs") / cfg.experiment_name)
    _setup_logging(out)
    log = logging.getLogger("train")
    for note in cfg.notes:
        log.info("note: %s", note)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if not cfg.data:
        raise ConfigError_("no data: pass --data or set dataset.train_dataframe")
    clips = config_clips(cfg)
    cfg = fold_config(cfg, clips)  # leave-one-corpus-out: one fold per corpus
    cache = build_cache(clips, args.cache, cfg.max_inference_chunk_seconds)
    log.info(
        "%d clips, %d speakers, %.1f min of audio",
        len(clips),
        len({c.speaker for c in clips}),
        cache.offsets[-1] / 16000 / 60,
    )
    return cfg, clips, cache, out


def _ensemble(args, cfg, clips, cache, out: Path) -> int:
    """``ensemble``: finished CV runs' mean probabilities written as folds, then reported."""
    from .cv import average_fold_logits, cross_validate
    from .data import make_folds

    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    average_fold_logits([Path(r) for r in args.runs], folds, args.folds, out)
    cross_validate(cfg, clips, cache, folds, out, resume=True, only_folds=args.folds, show_progress=False)
    print((out / "cv_report.md").read_text())
    return 0


def _teacher_features(args, cfg, cache):
    """The teacher's encodings of the clips (cached), or None without a teacher."""
    if not cfg.distill.teacher:
        return None
    from .teacher import build_teacher_cache

    features = build_teacher_cache(
        cache, cfg.distill.teacher, args.cache, threads=cfg.threads or 0, layers=cfg.distill.layers
    )
    logging.getLogger("train").info("teacher: %s, %d encoder frames cached", cfg.distill.teacher, len(features.frames))
    return features


def _teacher(args, cfg, clips, cache, features, out: Path) -> int:
    """``teacher``: the teacher alone cross-validated, and with ``--channels`` probed through them."""
    from .data import make_folds
    from .distill import teacher_cv

    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    teacher_cv(cfg, clips, features, folds, out)
    print((out / "teacher_report.md").read_text())
    channels = [c for c in args.channels or () if c != "full"]
    if channels:
        from .probes.teacher_channels import teacher_channel_probe

        print(teacher_channel_probe(cfg, clips, cache, features, channels, folds, args.cache, out))
    return 0


def _copies(args, cfg, clips, cache, features):
    """The speed and phone copies training may draw from (None without them), and the teacher's
    features extended to them; returns both."""
    log = logging.getLogger("train")
    speed = None
    if cfg.augment.speed_factors:
        from .data import build_speed_copies

        speed = build_speed_copies(clips, cache, cfg.augment.speed_factors, args.cache)
        if features is not None:
            from .teacher import build_teacher_cache

            features = features.extended(
                build_teacher_cache(
                    speed.copies_cache,
                    cfg.distill.teacher,
                    args.cache,
                    threads=cfg.threads or 0,
                    layers=cfg.distill.layers,
                )
            )
        log.info(
            "speed copies at %s: %.1f min of audio more",
            ", ".join(f"{f:g}" for f in speed.factors),
            speed.copies_cache.offsets[-1] / 16000 / 60,
        )
    if cfg.augment.phone_copies:
        from .data import with_phone_copies

        n_sources = len(speed.clips) if speed else len(clips)
        speed = with_phone_copies(clips, cache, speed, cfg.augment.phone_copies, cfg.seed, args.cache)
        if features is not None and cfg.distill.phone_targets == "copy":  # the teacher on the line itself
            from .teacher import build_teacher_cache

            features = features.extended(
                build_teacher_cache(
                    speed.phone_cache,
                    cfg.distill.teacher,
                    args.cache,
                    threads=cfg.threads or 0,
                    layers=cfg.distill.layers,
                )
            )
        elif features is not None:  # a phone line is labelled by the teacher on its clean source
            features = features.extended(features.repeated(np.tile(np.arange(n_sources), cfg.augment.phone_copies)))
        log.info(
            "phone copies: %d random lines of each of %d clips, %.1f min of audio more",
            cfg.augment.phone_copies,
            n_sources,
            (speed.cache.offsets[-1] - speed.cache.offsets[n_sources]) / 16000 / 60,
        )
    return speed, features


def _cross_validate(args, cfg, clips, cache, out: Path, features, speed, only_folds, **extra) -> int:
    """The folds ``only_folds`` of the CV (trained, or reused with ``--resume``), then its report."""
    from .cv import cross_validate
    from .data import make_folds

    folds = make_folds(clips, cfg.folds, cfg.group_by, cfg.seed)
    cross_validate(
        cfg,
        clips,
        cache,
        folds,
        out,
        resume=args.resume,
        pretrained_path=args.pretrained,
        only_folds=only_folds,
        device=args.device,
        show_progress=not args.no_progress,
        teacher_features=features,
        speed_copies=speed,
        **extra,
    )
    print((out / "cv_report.md").read_text())
    return 0


def _cv(args, cfg, clips, cache, out: Path, features, speed) -> int:
    """``cv``: every fold (or ``--folds``), then the report."""
    return _cross_validate(
        args,
        cfg,
        clips,
        cache,
        out,
        features,
        speed,
        args.folds,
        reevaluate=args.reevaluate,
        channels=tuple(args.channels or ()),
    )


def _fit_all(args, cfg, clips, cache, out: Path, features, speed, cv: dict | None, clip_cv: dict | None) -> int:
    """``fit --all``: the shipped model, trained on every clip, calibrated from ``--cv-report``."""
    from .calibration import cv_metadata, store_calibration
    from .fit import FitOptions, fit

    metadata = {
        "data": {
            "clips": len(clips),
            "speakers": sorted({c.speaker for c in clips}),
            "excluded_speakers": list(cfg.exclude_speakers),
        }
    }
    if cv:
        metadata["cv"] = cv_metadata(cv, clip_cv)
    teacher = None
    if features is not None:
        from .distill import fold_teacher

        teacher = fold_teacher(
            cfg,
            speed.clips if speed else clips,
            features,
            np.arange(len(clips)),
            speed.copies if speed else None,
            getattr(speed, "phone", None),
        )
        metadata["distillation"] = {
            "teacher": Path(cfg.distill.teacher).name,
            "alpha": cfg.distill.alpha,
            "temperature": cfg.distill.temperature,
        }
        if cfg.distill.layers:
            metadata["distillation"]["encoder_layers"] = list(cfg.distill.layers)
    res = fit(
        cfg,
        speed.clips if speed else clips,
        speed.cache if speed else cache,
        np.arange(len(clips)),
        None,
        out,
        FitOptions(
            resume=args.resume,
            pretrained_path=args.pretrained,
            metadata=metadata,
            device=args.device,
            show_progress=not args.no_progress,
        ),
        teacher=teacher,
        copies=speed.copies if speed else None,
        phone=getattr(speed, "phone", None),
    )
    if cv:
        store_calibration(res.checkpoint, cv, clip_cv)
    print(f"checkpoint: {res.checkpoint}")
    return 0


def _fit_fold(args, cfg, clips, cache, out: Path, features, speed) -> int:
    """``fit --fold K``: one fold of the CV, trained (or reused with ``--resume``) and reported."""
    return _cross_validate(args, cfg, clips, cache, out, features, speed, [args.fold])


def _prepare(args) -> int:
    """``prepare CORPUS SRC --out DIR`` and ``prepare combine SRC ... --out DIR``."""
    from .prepare import PrepareError, combine, prepare, summary_line

    logging.getLogger("train").addHandler(logging.StreamHandler(sys.stderr))
    logging.getLogger("train").setLevel(logging.INFO)
    if args.corpus == "combine":
        info = combine(args.src, args.out)
    else:
        if len(args.src) != 1:
            raise PrepareError(f"{args.corpus}: give one source folder, got {len(args.src)}")
        info = prepare(args.corpus, args.src[0], args.out)
    print(summary_line(info, args.out))
    return 0


def ConfigError_(msg: str):
    from .config import ConfigError

    return ConfigError(msg)


if __name__ == "__main__":
    sys.exit(main())
