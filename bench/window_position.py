"""How a model's accuracy depends on where speech sits in the 6 s window and on the noise floor.

Training clips are padded with digital zeros after the speech (the recipe's padding), while a
streaming window holds speech anywhere, with the line's noise floor around it. This script places
each clip of a labelled set at the start, middle or end of a 6 s window, optionally adds white noise
at a fixed dBFS level over the whole window, and reports accuracy and UA for each variant. By
default it uses the clips of the speakers reserved for ``examples/`` (never trained on).

    python bench/window_position.py [--checkpoint DIR] [--data ../shared/data/emotion-speech]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

from emostream.audio import WINDOW_SAMPLES, load_mono
from emostream.model import CLASSES, DEFAULT_CHECKPOINT, Predictor

ROOT = Path(__file__).resolve().parents[1]


def place(clip: np.ndarray, where: str, floor_dbfs: float | None, rng: np.random.Generator) -> np.ndarray:
    """One 6 s window with ``clip`` at its start, middle or end, plus an optional noise floor."""
    clip = clip[:WINDOW_SAMPLES]
    window = np.zeros(WINDOW_SAMPLES, np.float32)
    offset = {"start": 0, "middle": (WINDOW_SAMPLES - len(clip)) // 2, "end": WINDOW_SAMPLES - len(clip)}[where]
    window[offset : offset + len(clip)] = clip
    if floor_dbfs is not None:
        window += rng.standard_normal(WINDOW_SAMPLES).astype(np.float32) * np.float32(10 ** (floor_dbfs / 20))
    return window


def add_heldout_args(p: argparse.ArgumentParser) -> None:
    """``--checkpoint``, ``--data`` and ``--speakers``: the model and the held-out clips to score."""
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "emotion-speech"))
    p.add_argument(
        "--speakers",
        default=str(ROOT / "examples" / "reserved_speakers.txt"),
        help="file with one speaker id per line (default: the examples' reserved speakers)",
    )


def load_heldout(args: argparse.Namespace) -> tuple[list[np.ndarray], np.ndarray, set[str]]:
    """The clips of ``args.speakers`` in the manifest of ``args.data``, their class indices and the speakers."""
    manifest = Path(args.data) / "manifest.csv"
    if not manifest.exists():
        raise SystemExit(f"no manifest at {manifest}")
    speakers = set(Path(args.speakers).read_text().split())
    rows = [r for r in csv.DictReader(open(manifest, newline="")) if r["speaker"] in speakers]
    clips = [load_mono(Path(args.data) / r["path"]) for r in rows]
    return clips, np.array([CLASSES.index(r["label"]) for r in rows]), speakers


def accuracy_ua(pred: np.ndarray, y: np.ndarray) -> str:
    """``"accuracy | UA"`` of predicted class indices, for a Markdown table row."""
    ua = np.mean([(pred[y == k] == k).mean() for k in np.unique(y)])
    return f"{(pred == y).mean():.3f} | {ua:.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_heldout_args(p)
    args = p.parse_args(argv)
    clips, y, speakers = load_heldout(args)
    predictor = Predictor.from_checkpoint(args.checkpoint)
    print(f"{len(clips)} clips of {', '.join(sorted(speakers))}; checkpoint {args.checkpoint}\n")
    print("| speech at | noise floor | accuracy | UA |")
    print("|---|---|---|---|")
    for where in ("start", "middle", "end"):
        for floor in (None, -70.0, -60.0):
            rng = np.random.default_rng(0)
            x = np.stack([place(c, where, floor, rng) for c in clips])
            pred = np.concatenate([predictor.predict(x[i : i + 32]) for i in range(0, len(x), 32)]).argmax(1)
            print(
                f"| {where} | {'none (zeros)' if floor is None else f'{floor:.0f} dBFS'} | {accuracy_ua(pred, y)} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
