"""Cost and accuracy of whole-file scoring (`emostream classify`) against the number of placements.

`emostream classify` scores a file by the mean logit over ``P`` placements of it in the 6 s window
(:func:`emostream.stream.placed_windows`; ``P = 1`` is the recipe's fixed chunks, 5 the default since
run 25 of train/EXPERIMENTS.md). This script runs that exact path (``placed_windows`` then
``clip_probabilities``, one file at a time, as classify does) over the clips of the speakers reserved
for ``examples/`` (never trained on) for each ``P``, and reports windows, wall time, files per second,
the real-time factor (audio seconds per wall second) and accuracy / UA.

    python bench/classify_positions.py [--positions 1 3 5] [--checkpoint DIR] [--data ../shared/data/emotion-speech]
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np

from emostream.audio import SAMPLE_RATE, load_mono
from emostream.model import CLASSES, DEFAULT_CHECKPOINT, Predictor, clip_probabilities
from emostream.stream import placed_windows

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "emotion-speech"))
    p.add_argument("--speakers", default=str(ROOT / "examples" / "reserved_speakers.txt"),
                   help="file with one speaker id per line (default: the examples' reserved speakers)")
    p.add_argument("--positions", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    manifest = Path(args.data) / "manifest.csv"
    if not manifest.exists():
        raise SystemExit(f"no manifest at {manifest}")
    speakers = set(Path(args.speakers).read_text().split())
    rows = [r for r in csv.DictReader(open(manifest, newline="")) if r["speaker"] in speakers]
    clips = [load_mono(Path(args.data) / r["path"]) for r in rows]
    y = np.array([CLASSES.index(r["label"]) for r in rows])
    audio_seconds = sum(len(c) for c in clips) / SAMPLE_RATE
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    clip_probabilities(predictor, placed_windows(clips[0], 5))  # warm-up (allocator, oneDNN kernels)
    print(f"{len(rows)} clips ({audio_seconds:.0f} s of audio) of {', '.join(sorted(speakers))}; "
          f"device {predictor.device}\n")
    print("| placements | windows | wall s | files/s | real-time factor | accuracy | UA |")
    print("|---|---|---|---|---|---|---|")
    for positions in args.positions:
        windows = 0
        probs = []
        start = time.perf_counter()
        for c in clips:
            w = placed_windows(c, positions)
            windows += len(w)
            probs.append(clip_probabilities(predictor, w))
        wall = time.perf_counter() - start
        pred = np.stack(probs).argmax(1)
        ua = np.mean([(pred[y == k] == k).mean() for k in np.unique(y)])
        print(f"| {positions} | {windows} | {wall:.1f} | {len(clips) / wall:.1f} | {audio_seconds / wall:.0f}× | "
              f"{(pred == y).mean():.3f} | {ua:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
