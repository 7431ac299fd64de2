"""Memory and time of one long call in each file mode: ``batch``, ``replay --fast`` and ``classify``.

A mono call of ``--minutes`` minutes is made by looping ``examples/call_mono.flac`` (real speech,
16 kHz FLAC, written block by block so making it takes little memory) into ``--work`` (default: a
temporary folder; the file is not kept). Each mode runs as its own ``python -m emostream`` process,
as a user would, with the defaults (Silero speech gate, hop 1 s, the shipped model); per mode the
peak resident memory of that process (``ru_maxrss`` from ``os.wait4``) and its wall time, start-up
included. Issue #42's target: under 1 GB in every mode for a 2-hour call, i.e. memory that does not
grow with the call's length.

    python bench/long_call.py [--minutes 120] [--modes batch,replay,classify] [--onnx MODEL.onnx]
                              [--repo PATH] [--json OUT] [--quick]

``--repo`` runs another checkout's ``emostream`` on the same file (a before/after comparison);
``--quick`` is a 1-minute call (the test of this script).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "call_mono.flac"
MODES = ("batch", "replay", "classify")
RSS_TARGET_MB = 1024  # issue #42: < 1 GB RSS for a 2-hour call in each mode
SAMPLE_SECONDS = 0.1  # how often the process's own (anonymous) memory is read
NOISE_DBFS = -70.0  # --gated: level of the line noise between the speech at the start and the end


def make_call(path: Path, minutes: float, gated: bool = False) -> float:
    """``minutes`` of the example call, looped, as 16 kHz mono FLAC; returns its seconds. ``gated``:
    the example call at the start and at the end, line noise at ``NOISE_DBFS`` between (the speech
    gate skips it: the decoding, windows, events and memory of a long call without hours of model time)."""
    audio, rate = sf.read(SOURCE, dtype="float32")
    total = int(minutes * 60 * rate)
    rng = np.random.default_rng(0)
    with sf.SoundFile(path, "w", rate, 1, format="FLAC", subtype="PCM_16") as f:
        written = 0
        while written < total:
            piece = audio[: total - written]
            if gated and len(audio) <= written < total - 2 * len(audio):
                piece = (
                    10 ** (NOISE_DBFS / 20)
                    * np.sqrt(2)
                    * rng.standard_normal(min(len(audio), total - 2 * len(audio) - written))
                ).astype(np.float32)
            f.write(piece)
            written += len(piece)
    return total / rate


def command(mode: str, call: Path, out: Path, onnx: Path | None = None) -> list[str]:
    """The user's command for ``mode`` on ``call`` (outputs under ``out``; ``onnx``: that exported
    model instead of the default one: on a CPU the int8 model, emostream.int8)."""
    model = ["--onnx", str(onnx)] if onnx else []
    if mode == "batch":
        return ["batch", str(call), "--out", str(out / "batch"), "--quiet", *model]
    if mode == "replay":
        return ["replay", str(call), "--fast", "--no-dashboard", "--events", str(out / "replay.jsonl"), *model]
    return ["classify", str(call), "--json", *model]


def run_mode(argv: list[str], cwd: Path) -> dict:
    """Run ``python -m emostream ARGV`` in ``cwd``: exit code, wall time and the peak RSS of that
    process (``os.wait4``; Popen's own wait would reap it without the usage)."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    t0 = time.monotonic()
    with tempfile.TemporaryFile() as out_f, tempfile.TemporaryFile() as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "emostream", *argv], cwd=cwd, env=env, stdout=out_f, stderr=err_f
        )
        anon = [0]
        sampler = threading.Thread(target=_sample_anon, args=(proc.pid, anon), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(proc.pid, 0)
        sampler.join(timeout=1)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out_f.seek(0)
        err_f.seek(0)
        out, err = out_f.read().decode(errors="replace"), err_f.read().decode(errors="replace")
    return {
        "rc": proc.returncode,
        "wall_s": round(time.monotonic() - t0, 1),
        "max_rss_mb": round(usage.ru_maxrss / 1024),
        "max_anon_mb": round(anon[0] / 1024),
        "stdout": out[-2000:],
        "stderr": err[-500:],
    }


def _sample_anon(pid: int, peak: list[int]) -> None:
    """Largest ``RssAnon`` (KiB) of process ``pid`` seen every ``SAMPLE_SECONDS`` until it exits: the
    memory of its own, without the shared libraries that ``ru_maxrss`` also counts (torch's alone
    are about 0.4 GB of file-backed pages here)."""
    status = Path(f"/proc/{pid}/status")
    while True:
        try:
            text = status.read_text()
        except OSError:
            return
        if "RssAnon:" not in text:  # a zombie: it has exited
            return
        peak[0] = max(peak[0], int(text.split("RssAnon:")[1].split()[0]))
        time.sleep(SAMPLE_SECONDS)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=120.0)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--repo", type=Path, default=ROOT, help="checkout whose emostream runs (default: this one)")
    p.add_argument("--work", type=Path, default=None, help="folder for the call and the outputs (default: a temp dir)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--quick", action="store_true", help="a 1-minute call")
    p.add_argument("--gated", action="store_true", help="speech at the start and the end only, noise between")
    p.add_argument(
        "--onnx",
        type=Path,
        default=None,
        help="run the model from this file (emostream export --onnx) on ONNX Runtime: no torch in the process",
    )
    args = p.parse_args()
    minutes = 1.0 if args.quick else args.minutes
    work = args.work or Path(tempfile.mkdtemp(prefix="emostream-long-"))
    work.mkdir(parents=True, exist_ok=True)
    call = work / f"call_{minutes:g}min.flac"
    try:
        seconds = make_call(call, minutes, args.gated)
        rows = []
        for mode in args.modes.split(","):
            out = work / f"out-{mode}"
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir()
            argv = command(mode, call, out, args.onnx.resolve() if args.onnx else None)
            r = run_mode(argv, args.repo.resolve())
            row = {
                "mode": mode,
                "command": "emostream " + " ".join(argv).replace(str(work) + "/", ""),
                "audio_seconds": round(seconds, 1),
                "rc": r["rc"],
                "wall_s": r["wall_s"],
                "max_rss_mb": r["max_rss_mb"],
                "max_anon_mb": r["max_anon_mb"],
                "under_target": r["max_rss_mb"] < RSS_TARGET_MB,
                "repo": str(args.repo.resolve()),
            }
            if mode == "replay":
                lines = (out / "replay.jsonl").read_text().splitlines() if (out / "replay.jsonl").exists() else []
                row["lines"] = len(lines)
            elif mode == "batch":
                done = out / "batch" / f"{call.stem}.jsonl"
                row["lines"] = len(done.read_text().splitlines()) if done.exists() else 0
            else:
                row["record"] = json.loads(r["stdout"].strip().splitlines()[-1]) if r["stdout"].strip() else None
            if r["rc"] != 0:
                row["stderr"] = r["stderr"]
            rows.append(row)
            if args.json:  # after every mode: a long run that is stopped keeps what it measured
                args.json.write_text(json.dumps({"machine": machine(), "minutes": minutes, "rows": rows}, indent=1))
            print(
                f"{mode}: rc {r['rc']}, {r['wall_s']} s, max RSS {r['max_rss_mb']} MB (own {r['max_anon_mb']} MB)",
                file=sys.stderr,
                flush=True,
            )
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
        else:
            call.unlink(missing_ok=True)
    result = {
        "machine": machine(),
        "minutes": minutes,
        "gated": args.gated,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "rows": rows,
    }
    print(f"{result['date']} · {result['machine']} · {minutes:g}-minute mono call (examples/call_mono.flac looped)")
    print("| mode | command | audio | wall time | max RSS | of which its own (peak RssAnon) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['mode']} | `{r['command']}` | {r['audio_seconds'] / 60:.0f} min | {r['wall_s']:.0f} s | "
            f"{r['max_rss_mb']} MB | {r['max_anon_mb']} MB |"
        )
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all(r["rc"] in (0,) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
