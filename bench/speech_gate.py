"""Speech gating on the example calls: windows skipped, agreement kept, and what each detector hears.

For every example call (``examples/index.json``) and gate (``--vad off|energy|silero``) this replays
the call through the real CLI (``bench/agreement.py``'s :func:`score_example`) and reports:

- windows and how many were classified; the fraction skipped relative to ``off``;
- agreement with the ground truth over speech time (the scoring of ``bench/agreement.py``);
- speech covered: the share of ground-truth segment time that lies in the newest hop of a classified
  window (what the timeline still labels);

and, without the model, per detector and channel: the share of 32 ms frames inside ground-truth
segments that it calls speech (the acted clips hold about 1 s of silence at their edges, so 100 %
is not expected) and the share outside segments (pauses, the other party's turns: false alarms).
``--noisy DB`` repeats everything on a copy of the stereo call with white noise at DB dBFS over
both channels, a noisy line. ``--phone`` repeats every call through the G.712 telephone channel as
an 8 kHz file, the way a phone bridge delivers it: its calls are gated by Silero's 8 kHz network,
and the frame table adds that network (``silero_8k``, on the 8 kHz samples) beside the 16 kHz one
(on the same audio resampled to 16 kHz, as the gate saw phone calls before).

    python bench/speech_gate.py [--calls call_stereo.flac,...] [--noisy -45] [--phone] [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from agreement import EXAMPLES, read_segments, score_example  # noqa: E402

from emostream.audio import SAMPLE_RATE, load_audio, resample  # noqa: E402
from emostream.channel import TELEPHONE_RATE, g712_narrowband  # noqa: E402
from emostream.stream import frame_levels_db  # noqa: E402
from emostream.vad import FRAME, SileroStream, VadConfig  # noqa: E402

GATES = ("off", "energy", "silero")


def covered_seconds(events: list[dict], segments: list[dict], hop: float) -> tuple[float, float]:
    """(segment seconds inside the newest hop of a classified window, all segment seconds)."""
    covered = total = 0.0
    for s in segments:
        a, b = float(s["t_start"]), float(s["t_end"])
        total += b - a
        spans = sorted(
            (max(e["t_start"], e["t_end"] - hop), e["t_end"])
            for e in events
            if e["speech"] and e["channel"] == s["channel"] and e["t_end"] > a and e["t_end"] - hop < b
        )
        end = a
        for lo, hi in spans:
            lo, hi = max(lo, end), min(hi, b)
            if hi > lo:
                covered += hi - lo
                end = hi
    return covered, total


def frame_detection(
    audio: np.ndarray, channels: list[str], segments: list[dict], narrowband: np.ndarray | None = None
) -> dict:
    """Per detector: share of frames called speech inside and outside the ground-truth segments
    (``narrowband``: the same call at 8 kHz, for Silero's 8 kHz network)."""
    out = {}
    for kind in ("energy", "silero") + (("silero_8k",) if narrowband is not None else ()):
        inside_hits = inside_n = outside_hits = outside_n = 0
        for ch, name in enumerate(channels):
            x = audio[ch]
            if kind == "silero_8k":
                vad = SileroStream(history=narrowband.shape[1], rate=TELEPHONE_RATE)
                vad.feed(narrowband[ch])
                speech = vad.frames(0, narrowband.shape[1]) >= VadConfig.named("silero").threshold
                speech = speech[: len(x) // FRAME]
            elif kind == "silero":
                vad = SileroStream(history=len(x))
                vad.feed(x)
                speech = vad.frames(0, len(x)) >= VadConfig.named("silero").threshold
            else:
                speech = frame_levels_db(x, FRAME) > VadConfig.named("energy").threshold
            t = (np.arange(len(speech)) + 0.5) * FRAME / SAMPLE_RATE
            inside = np.zeros(len(speech), bool)
            for s in segments:
                if s["channel"] == name:
                    inside |= (t >= float(s["t_start"])) & (t < float(s["t_end"]))
            inside_hits += int(speech[inside].sum())
            inside_n += int(inside.sum())
            outside_hits += int(speech[~inside].sum())
            outside_n += int((~inside).sum())
        out[kind] = {
            "speech_in_segments": round(inside_hits / max(1, inside_n), 3),
            "speech_outside_segments": round(outside_hits / max(1, outside_n), 3),
        }
    return out


def run_call(
    entry: dict,
    gates: list[str],
    hop: float,
    checkpoint: str | None,
    workdir: Path,
    audio_path: Path | None = None,
    label: str | None = None,
) -> list[dict]:
    segments = read_segments(EXAMPLES / entry["segments"])
    rows, base = [], None
    for gate in gates:
        r = score_example(entry, hop, checkpoint, workdir, ["--vad", gate], audio=audio_path)
        classified = r["windows"] - r["silence_windows"]
        covered, total = covered_seconds(r["events"], segments, hop)
        row = {
            "call": label or entry["file"],
            "vad": gate,
            "windows": r["windows"],
            "classified": classified,
            "agreement": round(r["overall"]["agreement"], 4),
            "scored_seconds": r["overall"]["seconds"],
            "speech_covered": round(covered / total, 3),
            "per_channel": {
                ch: round(v["agreement"], 4)
                for ch, v in r.items()
                if isinstance(v, dict) and ch not in ("overall",) and "agreement" in v
            },
        }
        if gate == "off":
            base = classified
        row["skipped_vs_off"] = round(1 - classified / base, 3) if base else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", default=None, help="comma-separated example files (default: all)")
    p.add_argument("--gates", default=",".join(GATES))
    p.add_argument("--hop", type=float, default=1.0)
    p.add_argument("--checkpoint", default=None)
    p.add_argument(
        "--noisy",
        type=float,
        default=None,
        metavar="DBFS",
        help="also run the stereo call with white noise at this level (e.g. -45)",
    )
    p.add_argument("--phone", action="store_true", help="also every call through G.712 as an 8 kHz file")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--quick", action="store_true", help="the stereo call only, gates off and silero (< 1 min)")
    args = p.parse_args(argv)
    index = json.loads((EXAMPLES / "index.json").read_text())
    wanted = args.calls.split(",") if args.calls else [e["file"] for e in index]
    gates = args.gates.split(",")
    if args.quick:
        wanted, gates, args.noisy = ["call_stereo.flac"], ["off", "silero"], None
    if gates[0] != "off":
        gates = ["off"] + [g for g in gates if g != "off"]
    entries = [e for e in index if e["file"] in wanted]
    rows, detection = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            audio = load_audio(EXAMPLES / entry["file"])
            detection[entry["file"]] = frame_detection(
                audio, entry["channels"], read_segments(EXAMPLES / entry["segments"])
            )
            rows += run_call(entry, gates, args.hop, args.checkpoint, Path(tmp))
        stereo = next((e for e in index if e["file"] == "call_stereo.flac"), None)
        if args.noisy is not None and stereo is not None:
            audio = load_audio(EXAMPLES / stereo["file"])
            noise = np.random.default_rng(0).standard_normal(audio.shape).astype(np.float32) * 10 ** (args.noisy / 20)
            noisy = np.clip(audio + noise, -1, 1)
            path = Path(tmp) / "call_stereo_noisy.flac"
            sf.write(path, noisy.T, SAMPLE_RATE)
            label = f"call_stereo.flac + noise {args.noisy:g} dBFS"
            detection[label] = frame_detection(noisy, stereo["channels"], read_segments(EXAMPLES / stereo["segments"]))
            rows += run_call(stereo, gates, args.hop, args.checkpoint, Path(tmp), path, label)
        for entry in entries if args.phone else ():
            narrow = np.stack([g712_narrowband(x) for x in load_audio(EXAMPLES / entry["file"])])
            path = Path(tmp) / f"{Path(entry['file']).stem}_g712.flac"
            sf.write(path, narrow.T, TELEPHONE_RATE)
            wide = np.stack([resample(x, TELEPHONE_RATE, SAMPLE_RATE) for x in narrow])  # as replay resamples it
            label = f"{entry['file']} through G.712, 8 kHz"
            segments = read_segments(EXAMPLES / entry["segments"])
            detection[label] = frame_detection(wide, entry["channels"], segments, narrow)
            rows += run_call(entry, gates, args.hop, args.checkpoint, Path(tmp), path, label)
    print("\n| call | vad | windows | classified | skipped vs off | agreement | speech covered |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['call']} | {r['vad']} | {r['windows']} | {r['classified']} | "
            f"{100 * (r['skipped_vs_off'] or 0):.0f}% | {r['agreement']:.3f} | {100 * r['speech_covered']:.0f}% |"
        )
    print("\n| call | detector | frames called speech inside segments | outside segments |")
    print("|---|---|---|---|")
    for call, d in detection.items():
        for kind, v in d.items():
            print(
                f"| {call} | {kind} | {100 * v['speech_in_segments']:.0f}% "
                f"| {100 * v['speech_outside_segments']:.1f}% |"
            )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"hop": args.hop, "rows": rows, "detection": detection}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
