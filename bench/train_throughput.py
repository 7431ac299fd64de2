"""Training throughput: samples per second of the real training loop, fp32 against mixed precision.

Runs :func:`train.fit.fit` itself (batch making with the config's augmentation, forward with
SpecAugment, loss, backward, AdamW step, per-epoch state saving) on synthetic clips of 2-5 s, so
no data set is needed, for two epochs, and reports the second epoch's ``samples_per_second`` (the
first one pays for one-off kernel set-up). ``fit`` always lays the CPU model out channels_last; the
variants differ in ``mixed_precision_training``: ``fp32``, or ``mixed`` as training runs it (fp16
autocast on CUDA; bf16 on a CPU with fast bf16 kernels, fp32 on one without: each row names what
ran), and on request ``bf16``: bf16 autocast forced on such a CPU (the cost that choice avoids).
``--prefetch 0,2`` measures each precision with batches made serially and made ahead on a thread
(``fit``'s default is :data:`train.batches.PREFETCH_BATCHES`; the trained weights are the same).

    python bench/train_throughput.py [--config train/configs/utterance_norm.yaml] [--steps 8]
                                     [--batch-size 32] [--precisions fp32,mixed,bf16] [--prefetch 0,2]
                                     [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `train` is a top-level package of the repository

from inference import forced_cpu_bf16  # noqa: E402  (bench/ is on sys.path when run as a script)

from emostream.audio import SAMPLE_RATE, float32_to_int16  # noqa: E402
from emostream.model import CLASSES, select_device  # noqa: E402
from train.batches import PREFETCH_BATCHES  # noqa: E402
from train.config import load_config  # noqa: E402
from train.data import AudioCache, Clip  # noqa: E402
from train.fit import FitOptions, fit  # noqa: E402

DEFAULT_CONFIG = ROOT / "train" / "configs" / "utterance_norm.yaml"


def synthetic_clips(n: int, seed: int = 0) -> tuple[list[Clip], AudioCache]:
    """``n`` voiced-sounding clips of 2-5 s with random labels, as an in-memory :class:`AudioCache`."""
    rng = np.random.default_rng(seed)
    pieces, offsets, clips = [], [0], []
    for i in range(n):
        t = np.arange(int(rng.uniform(2.0, 5.0) * SAMPLE_RATE)) / SAMPLE_RATE
        f0 = rng.uniform(90, 250)
        x = sum(np.sin(2 * np.pi * k * f0 * t) / k for k in range(1, 6)) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        x = 0.1 * x + 0.003 * rng.standard_normal(len(t))
        pieces.append(float32_to_int16(x.astype(np.float32)))
        offsets.append(offsets[-1] + len(t))
        clips.append(Clip(path=f"synthetic/{i}.wav", label=CLASSES[i % len(CLASSES)], speaker=f"s{i % 8}"))
    return clips, AudioCache(np.concatenate(pieces), np.asarray(offsets, dtype=np.int64))


def measure(
    config: Path, requested: str, steps: int, batch_size: int, device: str | None, prefetch: int = PREFETCH_BATCHES
) -> dict:
    """Two epochs of ``steps`` batches through :func:`fit`; the second epoch's rate. ``requested``:
    fp32, mixed (what training chooses here) or bf16 (forced on the CPU); ``prefetch``: batches
    made ahead on a thread (0: serially)."""
    if requested not in ("fp32", "mixed", "bf16"):
        raise SystemExit(f"--precisions: {requested!r} is not fp32, mixed or bf16")
    mixed = requested != "fp32"
    forced = requested == "bf16" and select_device(device).type == "cpu"
    cfg = load_config(config)
    cfg = replace(cfg, epochs=2, batch_size=batch_size, mixed_precision_training=mixed, evaluation_epochs=10**6)
    clips, cache = synthetic_clips(steps * batch_size)
    with tempfile.TemporaryDirectory() as tmp, forced_cpu_bf16() if forced else contextlib.nullcontext():
        t0 = time.perf_counter()
        result = fit(
            cfg,
            clips,
            cache,
            np.arange(len(clips)),
            None,
            Path(tmp),
            FitOptions(device=device, show_progress=False, telephone_eval=False, prefetch=prefetch),
        )
        total = time.perf_counter() - t0
    warm = result.history[-1]
    return {
        "requested": requested,
        "precision": warm["precision"],
        "batch_size": batch_size,
        "steps_per_epoch": steps,
        "prefetch": prefetch,
        "samples_per_s": round(warm["samples_per_second"], 2),
        "first_epoch_samples_per_s": round(result.history[0]["samples_per_second"], 2),
        "seconds_per_step": round(batch_size / warm["samples_per_second"], 3),
        "wall_s": round(total, 1),
        "config": str(Path(config).name),
        "augment": cfg.augment.__dict__ != type(cfg.augment)().__dict__,
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--steps", type=int, default=8, help="batches per epoch (two epochs are run)")
    p.add_argument("--batch-size", type=int, default=32, help="the recipe's batch size is 32")
    p.add_argument("--device", default=None)
    p.add_argument("--precisions", default="fp32,mixed", help="any of fp32, mixed (as training chooses), bf16 (forced)")
    p.add_argument(
        "--prefetch",
        default=str(PREFETCH_BATCHES),
        help="comma-separated batches made ahead on a thread, e.g. 0,2 (0: serially)",
    )
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--quick", action="store_true", help="one batch of 8 per epoch (< 1 min)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size = 1, 8
    try:
        prefetches = [int(x) for x in args.prefetch.split(",")]
    except ValueError:
        raise SystemExit(f"--prefetch: {args.prefetch!r} is not a comma-separated list of integers") from None
    rows = []
    for precision in args.precisions.split(","):
        for prefetch in prefetches:
            rows.append(measure(Path(args.config), precision, args.steps, args.batch_size, args.device, prefetch))
            print(json.dumps(rows[-1]), flush=True)
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    machine = f"{os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    print(f"\nmachine: {machine}\n")
    print("| requested | ran in | batches made ahead | batch | samples/s | s/step | first epoch samples/s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['requested']} | {r['precision']} + channels_last | {r['prefetch']} | {r['batch_size']} "
            f"| {r['samples_per_s']:.1f} | "
            f"{r['seconds_per_step']:.2f} | {r['first_epoch_samples_per_s']:.1f} |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
