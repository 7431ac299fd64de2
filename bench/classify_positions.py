"""Cost and accuracy of whole-file scoring (`emostream classify`) against the number of placements.

`emostream classify` scores a file by the mean logit over ``P`` placements of it in the 6 s window
(:func:`emostream.stream.placed_windows`; ``P = 1`` is the recipe's fixed chunks, 5 the default since
run 25 of train/EXPERIMENTS.md). This script runs that exact path (``placed_windows`` then
``clip_probabilities``, one file at a time, as classify does) over the clips of the speakers reserved
for ``examples/`` (never trained on) for each ``P``, and reports windows, wall time, files per second,
the real-time factor (audio seconds per wall second) and accuracy / UA.

    python bench/classify_positions.py [--positions 1 3 5] [--checkpoint DIR] [--data ../shared/data/emotion-speech]
                                      [--limit N]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from window_position import accuracy_ua, add_heldout_args, load_heldout  # bench/ is on sys.path when run as a script

from emostream.audio import SAMPLE_RATE
from emostream.model import Predictor, clip_probabilities
from emostream.stream import placed_windows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heldout_args(p)
    p.add_argument("--positions", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--device", default=None)
    p.add_argument("--limit", type=int, default=None, help="only the first N clips (a quick check of the script)")
    args = p.parse_args(argv)
    clips, y, speakers = load_heldout(args)
    if args.limit is not None:
        clips, y = clips[: args.limit], y[: args.limit]
    audio_seconds = sum(len(c) for c in clips) / SAMPLE_RATE
    predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device)
    clip_probabilities(predictor, placed_windows(clips[0], 5))  # warm-up (allocator, oneDNN kernels)
    print(
        f"{len(clips)} clips ({audio_seconds:.0f} s of audio) of {', '.join(sorted(speakers))}; "
        f"device {predictor.device}\n"
    )
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
        print(
            f"| {positions} | {windows} | {wall:.1f} | {len(clips) / wall:.1f} | {audio_seconds / wall:.0f}× | "
            f"{accuracy_ua(pred, y)} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
