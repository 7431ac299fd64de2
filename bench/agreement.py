"""How well the replayed timelines of the bundled example calls agree with their ground truth.

Runs ``emostream replay FILE --fast --no-dashboard --events ...`` (the real CLI path) on every call
in ``examples/index.json`` and scores the events with :func:`train.metrics.segment_agreement`: for each
classified window, the share of the labelled speech inside it whose label equals the window's label,
weighted by that speech time. Windows flagged as silence are not scored.

    python bench/agreement.py [--checkpoint DIR] [--hop 1.0] [--vad silero|energy|off] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from emostream.cli import main as emostream_main
from emostream.timeline import read_events

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `train` is a top-level package of the repository
from train.metrics import segment_agreement  # noqa: E402

EXAMPLES = ROOT / "examples"


def read_segments(path: Path) -> list[dict]:
    """Ground-truth segments of an example call (``t_start,t_end,label,speaker,channel``)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def score_example(
    entry: dict, hop: float, checkpoint: str | None, workdir: Path, extra: Sequence[str] = (), audio: Path | None = None
) -> dict:
    """Replay one example call (or ``audio``, a variant of it) with extra CLI options and score its
    events against its segments."""
    events_path = workdir / (Path(entry["file"]).stem + ".jsonl")
    argv = [
        "replay",
        str(audio or EXAMPLES / entry["file"]),
        "--fast",
        "--no-dashboard",
        "--hop",
        str(hop),
        "--events",
        str(events_path),
        "--channel-names",
        ",".join(entry["channels"]),
        *extra,
    ]
    if checkpoint:
        argv += ["--checkpoint", checkpoint]
    rc = emostream_main(argv)
    if rc != 0:
        raise SystemExit(f"replay of {entry['file']} failed with exit code {rc}")
    events = read_events(events_path)
    result = segment_agreement(events, read_segments(EXAMPLES / entry["segments"]))
    result["windows"] = len(events)
    result["silence_windows"] = sum(1 for e in events if not e.get("speech"))
    result["events"] = events
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--hop", type=float, default=1.0)
    p.add_argument("--vad", default="silero", choices=("silero", "energy", "off"), help="speech gate (default silero)")
    p.add_argument("--json", dest="json_out", default=None, help="also write the results as JSON")
    args = p.parse_args(argv)
    index = json.loads((EXAMPLES / "index.json").read_text())
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in index:
            results[entry["file"]] = score_example(entry, args.hop, args.checkpoint, Path(tmp), ["--vad", args.vad])
            results[entry["file"]].pop("events")
    total_a = sum(r["overall"]["agreement"] * r["overall"]["seconds"] for r in results.values())
    total_t = sum(r["overall"]["seconds"] for r in results.values())
    print("| call | channel | agreement | scored speech·window s | windows (silence) |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        for ch, v in r.items():
            if isinstance(v, dict) and ch != "overall":
                print(f"| {name} | {ch} | {v['agreement']:.3f} | {v['seconds']:.1f} | |")
        print(
            f"| {name} | all | **{r['overall']['agreement']:.3f}** | {r['overall']['seconds']:.1f} | "
            f"{r['windows']} ({r['silence_windows']}) |"
        )
    print(f"| all calls | all | **{total_a / total_t:.3f}** | {total_t:.1f} | |")
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"hop": args.hop, "vad": args.vad, "results": results, "overall": total_a / total_t}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
