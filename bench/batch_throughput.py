"""Batch throughput: seconds of call audio ``emostream batch`` analyses per second of wall time.

A call archive is made from the three example calls (``examples/*.flac``: mono, stereo agent +
customer, telephone), copied ``--copies`` times under different names (so every copy is analysed:
nothing is skipped as done). Each configuration runs ``emostream batch`` as its own process, as a
user would, into a fresh output folder, with the defaults (Silero speech gate, hop 1 s, all channels,
the shipped model, bf16 on CPU):

- ``local`` with ``--workers 1`` (this process, torch on every core) and ``--workers 2`` (two worker
  processes, ``cores / 2`` torch threads each);
- ``ray`` (``--ray``: a local Ray instance started by the command, Ray Data with ``--workers N``
  model actors of ``cores / N`` CPUs each).

Per run: audio seconds (a stereo call counts its duration once), the batch's own wall time (from the
first file to the summary table: model loading and actor start-up included, Ray's own start-up not)
and the whole command's wall time; the throughput is audio seconds per batch wall second.

    python bench/batch_throughput.py [--copies 3] [--configs local:1,local:2,ray:1,ray:2] [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ("call_mono.flac", "call_stereo.flac", "call_telephone.flac")
LINE = re.compile(r"(\d+) analysed \(([\d.]+) s of audio in ([\d.]+) s")


def make_archive(folder: Path, copies: int, seconds: float | None) -> float:
    """``copies`` of every example call (cut to ``seconds`` if given); returns the audio seconds."""
    total = 0.0
    for k in range(copies):
        for name in EXAMPLES:
            audio, rate = sf.read(ROOT / "examples" / name)
            if seconds:
                audio = audio[: int(seconds * rate)]
            sf.write(folder / f"{Path(name).stem}_{k:03d}.flac", audio, rate)
            total += len(audio) / rate
    return total


def run(config: str, archive: Path, out: Path) -> dict:
    """One ``emostream batch`` process; its figures."""
    engine, workers = config.split(":")
    cores = os.cpu_count() or 1
    argv = [
        sys.executable,
        "-m",
        "emostream",
        "batch",
        str(archive),
        "--out",
        str(out),
        "--workers",
        workers,
        "--quiet",
    ]
    if engine == "ray":
        argv += ["--ray", "--ray-cpus", str(max(1, cores // int(workers)))]
    t0 = time.monotonic()
    proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    total = time.monotonic() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{config} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    m = LINE.search(proc.stdout)
    if not m:
        raise SystemExit(f"{config}: no summary line in {proc.stdout[-500:]!r}")
    calls, audio, wall = int(m.group(1)), float(m.group(2)), float(m.group(3))
    return {
        "engine": engine,
        "workers": int(workers),
        "calls": calls,
        "audio_seconds": audio,
        "batch_seconds": wall,
        "command_seconds": round(total, 1),
        "audio_per_second": round(audio / wall, 2),
        "audio_per_second_command": round(audio / total, 2),
    }


def machine() -> str:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import torch
    from inference import cpu_name  # bench/inference.py, beside this script

    try:
        import ray

        ray_version = ray.__version__
    except ImportError:
        ray_version = "not installed"
    return f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, ray {ray_version}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--copies", type=int, default=3, help="copies of the three example calls (default 3: 9 calls)")
    p.add_argument("--seconds", type=float, default=None, help="cut every call to this many seconds")
    p.add_argument("--configs", default="local:1,local:2,ray:1,ray:2", help="engine:workers, comma-separated")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--quick", action="store_true", help="1 copy cut to 5 s, local:1 and ray:1 (about half a minute)")
    args = p.parse_args(argv)
    if args.quick:
        args.copies, args.seconds, args.configs = 1, 5.0, "local:1,ray:1"
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    print(f"machine: {machine()}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="emostream-batch-bench-") as tmp:
        archive = Path(tmp) / "calls"
        archive.mkdir()
        audio = make_archive(archive, args.copies, args.seconds)
        print(f"archive: {len(list(archive.iterdir()))} calls, {audio:.1f} s of audio", flush=True)
        for config in configs:
            out = Path(tmp) / f"out-{config.replace(':', '-')}"
            row = run(config, archive, out)
            shutil.rmtree(out)
            rows.append(row)
            print(
                f"{row['engine']:5s} workers {row['workers']}: {row['audio_seconds']:.0f} s of audio in "
                f"{row['batch_seconds']:.1f} s = {row['audio_per_second']:.1f} s/s "
                f"(whole command {row['command_seconds']:.1f} s = {row['audio_per_second_command']:.1f} s/s)",
                flush=True,
            )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"machine": machine(), "copies": args.copies, "seconds": args.seconds, "rows": rows}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
