"""What the probes of finished CV folds share: their arguments and their data."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..argtypes import DEFAULT_CACHE, fold_list


def probe_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The arguments of every probe of finished CV folds (:mod:`train.probes.speaker_centring`,
    :mod:`train.probes.teacher_gap`)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="the run's config (its seed fixes the folds)")
    p.add_argument("--run", required=True, help="cv output directory with foldK/checkpoint")
    p.add_argument("--folds", type=fold_list, default=[1, 3], metavar="K,K,...")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="decoded-audio (and teacher) cache directory")
    return p


def probe_data(cfg, cache_dir: str | Path):
    """A config's clips, their decode cache, the CV's folds and the class index of each clip."""
    from emostream.model import CLASSES

    from ..data import build_cache, config_clips, fold_config, make_folds

    clips = config_clips(cfg)
    cfg = fold_config(cfg, clips)
    cache = build_cache(clips, cache_dir, cfg.max_inference_chunk_seconds)
    return (
        clips,
        cache,
        make_folds(clips, cfg.folds, cfg.group_by, cfg.seed),
        np.array([CLASSES.index(c.label) for c in clips]),
    )
