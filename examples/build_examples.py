"""Build the recorded example calls in ``examples/`` from reserved speakers' acted clips.

Run from the repository root::

    PYTHONPATH=. .venv/bin/python examples/build_examples.py [--data DIR]

The calls are concatenations of acted emotional-speech clips (RAVDESS, EmoDB), not real
phone calls.  Only ``RESERVED_SPEAKERS`` are used: the shipped checkpoint is trained with
these speakers excluded, so the examples are speech it has never heard.

Outputs (all in this folder): ``call_mono.flac``, ``call_stereo.flac``,
``call_telephone.flac``, one ``<name>.segments.csv`` ground-truth file per call,
``index.json`` and ``reserved_speakers.txt``.  The build is deterministic
(``random.Random(0)``).
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

from emostream.audio import SAMPLE_RATE, load_mono, telephone_channel

# Speakers held out of the shipped checkpoint's training; the examples use only these.
# Also written to examples/reserved_speakers.txt (one per line) for the training code.
RESERVED_SPEAKERS = ("ravdess_19", "ravdess_20", "emodb_03")

HERE = Path(__file__).resolve().parent
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "emotion-speech"

NOISE_DBFS = -70.0          # RMS of the gaussian floor added to every channel
LEAD_S = 0.5                # silence before the first turn and after the last
IN_TURN_GAP_S = 0.3         # silence between the clips of one turn
TURN_GAP_S = (1.0, 2.0)     # silence between turns, drawn uniformly


@dataclass(frozen=True)
class Turn:
    channel: str     # channel name ("ch0", "agent", "customer")
    speaker: str
    label: str
    n_clips: int = 2


@dataclass(frozen=True)
class CallSpec:
    name: str
    channels: tuple[str, ...]
    turns: tuple[Turn, ...]
    telephone: bool
    description: str


def _mono_turns(speaker: str, labels: list[str], n_clips: int = 2) -> tuple[Turn, ...]:
    return tuple(Turn("ch0", speaker, lab, n_clips) for lab in labels)


CALLS = (
    CallSpec(
        name="call_mono",
        channels=("ch0",),
        turns=_mono_turns("ravdess_20",
                          ["Neutral", "Happy", "Sad", "Angry", "Fearful", "Surprised", "Disgusted"]),
        telephone=False,
        description="Mono, one English female speaker (RAVDESS actor 20) going through seven "
                    "emotions, two acted clips per turn, 1-2 s pauses between turns.",
    ),
    CallSpec(
        name="call_stereo",
        channels=("agent", "customer"),
        turns=(
            Turn("agent", "ravdess_19", "Neutral"),
            Turn("customer", "ravdess_20", "Neutral"),
            Turn("agent", "ravdess_19", "Happy"),
            Turn("customer", "ravdess_20", "Sad"),
            Turn("agent", "ravdess_19", "Sad"),
            Turn("customer", "ravdess_20", "Angry"),
            Turn("agent", "ravdess_19", "Neutral"),
            Turn("customer", "ravdess_20", "Disgusted"),
            Turn("agent", "ravdess_19", "Happy"),
            Turn("customer", "ravdess_20", "Happy"),
        ),
        telephone=False,
        description="Stereo, channel 0 = agent (RAVDESS actor 19, male, calm: Neutral/Happy/Sad), "
                    "channel 1 = customer (RAVDESS actor 20, female) escalating "
                    "Neutral -> Sad -> Angry -> Disgusted and ending Happy; turns alternate.",
    ),
    CallSpec(
        name="call_telephone",
        channels=("ch0",),
        # EmoDB clips are 2 s long, so three clips per turn keep each emotion ~6.6 s.
        turns=_mono_turns("emodb_03",
                          ["Neutral", "Angry", "Sad", "Happy", "Fearful", "Angry", "Neutral"],
                          n_clips=3),
        telephone=True,
        description="Mono, one German male speaker (EmoDB speaker 03), five emotions, three "
                    "acted clips per turn, then the whole call through a simulated phone line "
                    "(8 kHz G.711 mu-law round trip), stored at 16 kHz.",
    ),
)


def read_manifest(data_dir: Path) -> list[dict[str, str]]:
    with open(data_dir / "manifest.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["speaker"] in RESERVED_SPEAKERS]
    if not rows:
        sys.exit(f"no clips of {RESERVED_SPEAKERS} in {data_dir / 'manifest.csv'}")
    return sorted(rows, key=lambda r: r["path"])


class ClipPool:
    """Per (speaker, label) clips; draws without replacement across all calls, reusing
    clips only when a pool runs dry."""

    def __init__(self, rows: list[dict[str, str]], rng: random.Random):
        self.rng = rng
        self.unused: dict[tuple[str, str], list[str]] = {}
        self.all: dict[tuple[str, str], list[str]] = {}
        for r in rows:
            self.all.setdefault((r["speaker"], r["label"]), []).append(r["path"])
        for key, paths in self.all.items():
            self.unused[key] = list(paths)
        self.reused: list[str] = []

    def draw(self, speaker: str, label: str, n: int) -> list[str]:
        key = (speaker, label)
        if key not in self.all:
            sys.exit(f"no {label} clips for {speaker}")
        out = []
        for _ in range(n):
            if not self.unused[key]:
                self.unused[key] = [p for p in self.all[key] if p not in out]
                self.reused.append(f"{speaker}/{label}")
            pick = self.rng.choice(self.unused[key])
            self.unused[key].remove(pick)
            out.append(pick)
        return out


def build_call(spec: CallSpec, pool: ClipPool, rng: random.Random, data_dir: Path):
    """Return (signal float32 (channels, frames), segment rows)."""
    ch_index = {name: i for i, name in enumerate(spec.channels)}
    pieces: list[tuple[int, int, np.ndarray]] = []   # (channel, start sample, samples)
    segments: list[dict[str, str]] = []
    pos = int(round(LEAD_S * SAMPLE_RATE))
    for t, turn in enumerate(spec.turns):
        if t > 0:
            pos += int(round(rng.uniform(*TURN_GAP_S) * SAMPLE_RATE))
        for c, rel in enumerate(pool.draw(turn.speaker, turn.label, turn.n_clips)):
            if c > 0:
                pos += int(round(IN_TURN_GAP_S * SAMPLE_RATE))
            clip = load_mono(data_dir / rel)
            pieces.append((ch_index[turn.channel], pos, clip))
            segments.append({
                "t_start": f"{pos / SAMPLE_RATE:.3f}",
                "t_end": f"{(pos + len(clip)) / SAMPLE_RATE:.3f}",
                "label": turn.label,
                "speaker": turn.speaker,
                "channel": turn.channel,
                "source": rel,
            })
            pos += len(clip)
    total = pos + int(round(LEAD_S * SAMPLE_RATE))
    signal = np.zeros((len(spec.channels), total), dtype=np.float32)
    for ch, start, clip in pieces:
        signal[ch, start:start + len(clip)] += clip
    noise_rng = np.random.default_rng(rng.randrange(2**32))
    sigma = 10.0 ** (NOISE_DBFS / 20.0)
    signal += noise_rng.normal(0.0, sigma, signal.shape).astype(np.float32)
    if spec.telephone:
        signal = np.stack([telephone_channel(ch)[:total] for ch in signal])
    return signal, segments


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help=f"emotion-speech folder with manifest.csv (default {DEFAULT_DATA})")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: examples/)")
    args = ap.parse_args(argv)

    rng = random.Random(0)
    pool = ClipPool(read_manifest(args.data), rng)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reserved_speakers.txt").write_text("\n".join(RESERVED_SPEAKERS) + "\n")

    index = []
    for spec in CALLS:
        signal, segments = build_call(spec, pool, rng, args.data)
        n_clipped = int(np.count_nonzero(np.abs(signal) > 1.0))
        signal = np.clip(signal, -1.0, 1.0)
        duration = signal.shape[1] / SAMPLE_RATE
        if not 30.0 <= duration <= 90.0:
            sys.exit(f"{spec.name}: {duration:.1f} s is outside 30-90 s")
        audio_name = f"{spec.name}.flac"
        sf.write(str(args.out / audio_name), signal.T, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        seg_name = f"{spec.name}.segments.csv"
        with open(args.out / seg_name, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=["t_start", "t_end", "label", "speaker", "channel", "source"])
            w.writeheader()
            w.writerows(segments)
        index.append({
            "file": audio_name,
            "channels": list(spec.channels),
            "sample_rate": SAMPLE_RATE,
            "duration_s": round(duration, 3),
            "description": spec.description,
            "segments": seg_name,
        })
        seq = " -> ".join(f"{t.channel}:{t.label}" if len(spec.channels) > 1 else t.label
                          for t in spec.turns)
        print(f"{audio_name}: {duration:.2f} s, {len(spec.channels)} ch, {len(segments)} clips"
              f"{f', {n_clipped} samples clipped' if n_clipped else ''}\n  {seq}")
    (args.out / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    if pool.reused:
        print("reused clips (pool ran dry):", ", ".join(sorted(set(pool.reused))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
