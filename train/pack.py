"""Pack a config's training clips and its teacher into folders small enough to travel to a lent GPU.

A lent GPU machine receives the working tree and a few carried folders, 64 MiB a call, and nothing
else: not ``../shared`` (74 MB of FLAC) nor the teacher (Whisper base, 145 MB). ``pack`` writes what a
config's ``fit`` reads into parts of at most ``--part-mb`` each, to be carried one per call::

    OUT/part-1/manifest.csv            the config's clips (reserved speakers already left out), paths
                                       relative to it (audio/..., ../part-2/audio/...)
    OUT/part-1/<teacher>-blocksN/      the teacher's encoder cut after the blocks its layers need
                                       (train.whisper_layers.write_encoder_subset; 22 MB for block 3)
    OUT/part-K/audio/NNNNN.<ext>       the clips' files, byte for byte
    OUT/part-1/pack.json               what is where, and the number of files each part must hold

``python -m train.pack check OUT/part-1`` says whether every part has arrived (``train/gpu_fit.sh``
runs it first). Training only; ``emostream`` never imports it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

PACK_FILE = "pack.json"
MANIFEST = "manifest.csv"
DEFAULT_PART_MB = 50.0


class PackError(ValueError):
    """A pack that cannot be written or is incomplete (the message says what to do)."""


def _part_name(k: int) -> str:
    return f"part-{k}"


def write_pack(cfg, out: str | Path, part_mb: float = DEFAULT_PART_MB) -> dict:
    """Write the pack of ``cfg`` (a :class:`train.config.TrainConfig`) under ``out``; returns pack.json."""
    from .data import config_clips

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise PackError(f"{out} is not empty: pack into a new folder")
    clips = config_clips(cfg)  # a bad dataset fails before anything is written
    try:
        return _write(cfg, clips, out, part_mb)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half pack left behind (out was empty or absent)
        raise


def _write(cfg, clips, out: Path, part_mb: float) -> dict:
    import pandas as pd

    from .whisper_layers import encoder_blocks_needed, write_encoder_subset

    limit = int(part_mb * 1e6)
    first = out / _part_name(1)
    first.mkdir(parents=True)
    teacher = None
    used = 0
    if cfg.distill.teacher:
        if not cfg.distill.layers:
            raise PackError(
                "pack carries the teacher as a cut encoder (train.whisper_layers), which needs "
                "emostream.distill.layers; the CTranslate2 output-layer teacher cannot travel cut"
            )
        blocks = encoder_blocks_needed(cfg.distill.layers)
        src = Path(cfg.distill.teacher)
        teacher = f"{src.name}-blocks{blocks}"
        write_encoder_subset(src, first / teacher, blocks)
        used = sum(f.stat().st_size for f in (first / teacher).iterdir())
        if used > limit:
            raise PackError(f"the teacher alone ({used / 1e6:.1f} MB) is over --part-mb {part_mb:g}")
    part, rows, counts = 1, [], {_part_name(1): 0}
    for i, clip in enumerate(clips):
        src = Path(clip.path)
        size = src.stat().st_size
        if size > limit:
            raise PackError(f"{src} ({size / 1e6:.1f} MB) is over --part-mb {part_mb:g}")
        if used + size > limit:
            part, used = part + 1, 0
            counts[_part_name(part)] = 0
        rel = Path(_part_name(part)) / "audio" / f"{i:05d}{src.suffix.lower()}"
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)
        used += size
        counts[_part_name(part)] += 1
        rows.append(
            {
                "path": str(rel.relative_to(_part_name(1))) if part == 1 else f"../{rel}",
                "label": clip.label,
                "speaker": clip.speaker,
                "corpus": clip.corpus,
                "source": src.name,
            }
        )
    pd.DataFrame(rows).to_csv(first / MANIFEST, index=False)
    info = {
        "experiment": cfg.experiment_name,
        "clips": len(rows),
        "speakers": len({c.speaker for c in clips}),
        "teacher": teacher,
        "layers": list(cfg.distill.layers),
        "files": counts,
        "megabytes": {
            p: round(sum(f.stat().st_size for f in (out / p).rglob("*") if f.is_file()) / 1e6, 1) for p in counts
        },
    }
    (first / PACK_FILE).write_text(json.dumps(info, indent=1) + "\n")
    return info


def check_pack(first: str | Path) -> dict:
    """pack.json of the pack whose first part is ``first``, after checking that every part holds its
    files (a clear :class:`PackError` naming the parts still to carry)."""
    first = Path(first)
    try:
        info = json.loads((first / PACK_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PackError(f"{first} is not the first part of a pack ({PACK_FILE}: {exc})") from None
    missing = []
    for part, n in info["files"].items():
        audio = first.parent / part / "audio"
        have = sum(1 for _ in audio.iterdir()) if audio.is_dir() else 0
        if have != n:
            missing.append(f"{part} ({have} of {n} files)")
    if info.get("teacher") and not (first / info["teacher"] / "model.bin").is_file():
        missing.append(f"{_part_name(1)}/{info['teacher']}")
    if missing:
        raise PackError(
            f"pack {first.parent} is incomplete: {', '.join(missing)}; carry the missing parts "
            "(a machine that went cold between calls starts bare)"
        )
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.pack", description="Check a pack made by python -m train pack.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="is every part of the pack here?").add_argument(
        "first", help="the pack's part-1 folder"
    )
    args = p.parse_args(argv)
    try:
        info = check_pack(args.first)
    except PackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"pack {args.first}: {info['clips']} clips, {info['speakers']} speakers, parts "
        + ", ".join(f"{k} ({v} files)" for k, v in info["files"].items())
        + " all here"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
