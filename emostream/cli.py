"""``emostream`` command line: replay, classify (and the live sources of later modules)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__

REPLAY_CHUNK_SECONDS = 0.1  # replay feeds audio in chunks of this size


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        raise UsageError(message)


def _positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="emostream", description="Real-time speech emotion analysis for phone calls.")
    p.add_argument("--version", action="version", version=f"emostream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(sp):
        sp.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
        sp.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
        sp.add_argument("--fp32", action="store_true", help="disable bf16/fp16 autocast")

    def stream_args(sp):
        sp.add_argument("--hop", type=_positive(float), default=1.0, help="seconds between windows (default 1.0)")
        sp.add_argument("--min-seconds", type=_positive(float), default=1.0,
                        help="audio needed before the first window (default 1.0; shorter windows are zero-padded)")
        sp.add_argument("--smooth", type=float, default=1.0,
                        help="EMA weight of the newest window in (0, 1]; 1 = no smoothing (default)")
        sp.add_argument("--events", metavar="OUT.jsonl", help="write events as JSON lines (flushed per event)")
        sp.add_argument("--no-dashboard", action="store_true", help="plain lines instead of the live dashboard")

    r = sub.add_parser("replay", help="replay a recorded call through the live pipeline")
    r.add_argument("file")
    pace = r.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive(float), default=1.0, help="playback speed (1.0 = real time)")
    pace.add_argument("--fast", action="store_true", help="as fast as the model goes")
    r.add_argument("--channel-names", help="comma-separated names, one per channel (e.g. agent,customer)")
    r.add_argument("--stream", help="stream id in events (default: file name)")
    stream_args(r)
    model_args(r)

    c = sub.add_parser("classify", help="whole-file emotion with the recipe's fixed 6 s chunks")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--json", action="store_true", help="one JSON line per file")
    model_args(c)
    return p


def _load_predictor(args):
    from .model import DEFAULT_CHECKPOINT, Predictor

    path = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    device = None if args.device == "auto" else args.device
    if device and device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available")
    return Predictor.from_checkpoint(path, device=device, mixed_precision=not args.fp32)


def cmd_classify(args) -> int:
    from .audio import load_mono
    from .stream import fixed_chunks

    predictor = _load_predictor(args)
    from .model import CLASSES

    failures = 0
    for path in args.paths:
        try:
            audio = load_mono(path)
        except ValueError as exc:
            print(f"emostream: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        probs = predictor.predict(fixed_chunks(audio)).mean(axis=0)
        k = int(np.argmax(probs))
        record = {"path": str(path), "label": CLASSES[k], "confidence": round(float(probs[k]), 4),
                  "probabilities": {c: round(float(p), 4) for c, p in zip(CLASSES, probs)},
                  "duration": round(len(audio) / 16000, 3)}
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            print(f"{path}\t{record['label']}\t{record['confidence']:.2f}", flush=True)
    return 2 if failures else 0


def cmd_replay(args) -> int:
    from .analyzer import Analyzer, AnalyzerConfig
    from .audio import SAMPLE_RATE, load_audio
    from .dashboard import DashboardInfo, make_display
    from .stream import StreamConfig, StreamWindower
    from .timeline import JsonlWriter

    if not 0 < args.smooth <= 1:
        raise UsageError(f"--smooth must be in (0, 1], got {args.smooth}")
    try:
        stream_cfg = StreamConfig(hop_seconds=args.hop, min_seconds=args.min_seconds)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    audio = load_audio(args.file)
    if audio.shape[1] == 0 or not np.any(audio):
        raise UsageError(f"audio is empty or silent: {args.file}")
    n_channels = audio.shape[0]
    if args.channel_names:
        names = tuple(n.strip() for n in args.channel_names.split(","))
        if len(names) != n_channels or len(set(names)) != len(names) or not all(names):
            raise UsageError(f"--channel-names needs {n_channels} distinct names for {args.file}, got {args.channel_names!r}")
    else:
        names = tuple(f"ch{i}" for i in range(n_channels))
    predictor = _load_predictor(args)
    stream = args.stream or Path(args.file).stem
    writer = JsonlWriter(args.events) if args.events else None
    info = DashboardInfo(source=f"replay {args.file}", stream=stream, channels=names,
                         device=str(predictor.device), hop_seconds=args.hop)
    display = make_display(info, enabled=not args.no_dashboard)
    sinks = [display.update] + ([writer.write] if writer else [])
    analyzer = Analyzer(predictor.predict, stream, names, AnalyzerConfig(smooth=args.smooth), args.hop, sinks)
    windower = StreamWindower(stream, names, stream_cfg)
    chunk = int(REPLAY_CHUNK_SECONDS * SAMPLE_RATE)
    interrupted = False
    with display:
        t0 = time.monotonic()
        try:
            for pos in range(0, audio.shape[1], chunk):
                if not args.fast:
                    wait = t0 + pos / SAMPLE_RATE / args.speed - time.monotonic()
                    if wait > 0:
                        time.sleep(wait)
                analyzer.process(windower.push_frames(audio[:, pos:pos + chunk]))
                display.set_clock(windower.seconds, time.monotonic() - t0)
            analyzer.process(windower.flush())
            display.set_clock(windower.seconds, time.monotonic() - t0)
        except KeyboardInterrupt:
            interrupted = True
            display.log("interrupted: summary of the audio so far")
        summary = analyzer.timeline.summary()
        if writer:
            writer.write(summary)
            writer.close()
        display.finish(summary)
    return 130 if interrupted else 0


COMMANDS = {"replay": cmd_replay, "classify": cmd_classify}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emostream`` console script."""
    from .audio import AudioError
    from .model import CheckpointError

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    except (AudioError, CheckpointError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emostream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
