"""The ``emostream`` argument parser: the file commands here, the live ones in :mod:`.parser_live`,
and the examples each ``--help`` ends with."""

from __future__ import annotations

import argparse

from .. import __version__
from ..argtypes import fraction as _fraction
from ..argtypes import name_list
from ..argtypes import positive as _positive
from ..compliance import ANALYSE_CHOICES
from ..stream import CLIP_POSITIONS
from .common import Parser, alert_args, backend_args, model_device, vad_args
from .parser_live import add_live_commands


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="emostream", description="Real-time speech emotion analysis for phone calls.")
    p.add_argument("--version", action="version", version=f"emostream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    def model_args(sp):
        sp.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
        sp.add_argument(
            "--device",
            default="auto",
            type=model_device,
            help="the model's device: auto (cuda when present), cpu or cuda",
        )
        sp.add_argument(
            "--fp32",
            action="store_true",
            help="no reduced precision: torch in fp32 (default: int8 on a CPU, see --backend; fp16 autocast on CUDA; "
            "--backend torch: bf16 on a CPU with fast bf16 kernels, else fp32)",
        )
        backend_args(sp)

    def stream_args(sp):
        sp.add_argument("--hop", type=_positive(float), default=1.0, help="seconds between windows (default 1.0)")
        sp.add_argument(
            "--min-seconds",
            type=_positive(float),
            default=1.0,
            help="audio needed before the first window (default 1.0; shorter windows are zero-padded)",
        )
        sp.add_argument(
            "--smooth",
            type=_fraction,
            default=1.0,
            help="EMA weight of the newest window in (0, 1]; 1 = no smoothing (default)",
        )
        sp.add_argument("--events", metavar="OUT.jsonl", help="write events as JSON lines (flushed per event)")
        sp.add_argument("--no-dashboard", action="store_true", help="plain lines instead of the live dashboard")
        vad_args(sp)

    r = sub.add_parser("replay", help="replay a recorded call through the live pipeline")
    r.add_argument("file")
    pace = r.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive(float), default=1.0, help="playback speed (1.0 = real time)")
    pace.add_argument("--fast", action="store_true", help="as fast as the model goes")
    r.add_argument(
        "--channel-names", type=name_list, help="comma-separated names, one per channel (e.g. agent,customer)"
    )
    r.add_argument("--stream", help="stream id in events (default: file name)")
    r.add_argument(
        "--analyse",
        choices=ANALYSE_CHOICES,
        default="all",
        help="channels to analyse: customer, agent (by --channel-names) or all (default)",
    )
    alert_args(r)
    stream_args(r)
    model_args(r)

    c = sub.add_parser("classify", help="whole-file emotion: mean logit over placements of the file in the 6 s window")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--json", action="store_true", help="one JSON line per file")
    c.add_argument(
        "--positions",
        type=_positive(int),
        default=CLIP_POSITIONS,
        metavar="P",
        help="average the logits over P placements of a short file in the window, as a stream's hops "
        f"see it (test-time window averaging; P times the compute; default {CLIP_POSITIONS}, "
        "the cross-validated protocol; 1: the recipe's fixed 6 s chunks)",
    )
    vad_args(c)
    model_args(c)

    b = sub.add_parser(
        "batch",
        help="analyse a folder of recorded calls: a JSONL timeline per call and a Parquet "
        "table of summaries (resumable; emostream[scale])",
    )
    b.add_argument("input", metavar="INPUT_DIR_OR_GLOB", help="a folder (searched recursively), a glob or one file")
    b.add_argument("--out", required=True, metavar="OUT_DIR", help="where <call>.jsonl and summary.parquet go")
    b.add_argument(
        "--workers",
        type=_positive(int),
        default=1,
        help="model workers: processes here, or Ray Data actors with --ray (default 1)",
    )
    b.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run on Ray Data: no ADDRESS starts a new local Ray instance, 'auto' joins this node's cluster, "
        "HOST:PORT a cluster's head, ray://HOST:10001 a remote one (put --ray after INPUT)",
    )
    b.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per Ray Data model actor (default 1)")
    b.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray Data model actor (default 0)")
    b.add_argument(
        "--channel-names",
        type=name_list,
        help="the files' channels, comma-separated (default: ch0 for mono, "
        "agent,customer for stereo, as emostream send names them)",
    )
    b.add_argument(
        "--analyse",
        choices=ANALYSE_CHOICES,
        default="all",
        help="channels to analyse: customer, agent (by channel name) or all (default: your own "
        "recordings; in the EU analysing staff is prohibited, AI Act Art. 5(1)(f): use customer)",
    )
    b.add_argument(
        "--plots",
        choices=("html", "png"),
        default=None,
        help="also write a report per call, <call>.html (self-contained) or <call>.png (matplotlib)",
    )
    b.add_argument("--hop", type=_positive(float), default=1.0, help="seconds between windows (default 1.0)")
    b.add_argument(
        "--min-seconds", type=_positive(float), default=1.0, help="audio before the first window (default 1.0)"
    )
    b.add_argument(
        "--smooth", type=_fraction, default=1.0, help="EMA weight of the newest window in (0, 1] (default 1)"
    )
    b.add_argument("--quiet", action="store_true", help="no progress; only failures and the final line")
    vad_args(b)
    alert_args(b)
    model_args(b)

    rp = sub.add_parser("report", help="a call's timeline (JSONL) as a self-contained HTML page or a PNG")
    rp.add_argument("jsonl", metavar="CALL.jsonl", help="timeline from replay --events, serve --events-dir or batch")
    rp.add_argument("--out", required=True, metavar="CALL.html|CALL.png", help="output; the suffix picks the format")

    e = sub.add_parser("export", help="export the model, mel front end included, to one ONNX file")
    e.add_argument("--onnx", required=True, metavar="OUT.onnx", help="file to write")
    e.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
    e.add_argument(
        "--int8",
        action="store_true",
        help="quantise the convolutions to int8 (static; ranges from the checkpoint's int8_ranges.json, or "
        "calibrated on --calibrate's audio): the model a CPU runs by default",
    )
    e.add_argument("--calibrate", metavar="DIR", help="folder of speech audio for --int8's calibration windows")
    e.add_argument(
        "--calibration-windows", type=_positive(int), default=256, metavar="N", help="windows drawn (default 256)"
    )
    e.add_argument(
        "--save-ranges",
        action="store_true",
        help="with --calibrate: keep the ranges in the checkpoint (int8_ranges.json), for the CPU's default int8 model",
    )
    add_live_commands(sub, model_args, stream_args)
    for name, sp in sub.choices.items():
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
        sp.epilog = "examples:\n" + "\n".join(f"  {line}" for line in HELP_EXAMPLES[name])
    return p


# The last lines of each command's --help (they run as written from the repository root).
HELP_EXAMPLES: dict[str, tuple[str, ...]] = {
    "replay": (
        "emostream replay examples/call_stereo.flac --channel-names agent,customer",
        "emostream replay examples/call_mono.flac --fast --no-dashboard --events timeline.jsonl",
        'emostream replay call.wav --fast --alert "Angry>=0.7 for 10s"',
    ),
    "classify": ("emostream classify clip1.wav clip2.flac", "emostream classify examples/call_mono.flac --json"),
    "batch": (
        "emostream batch calls/ --out results/",
        "emostream batch 'calls/**/*.wav' --out results/ --analyse customer --plots html",
    ),
    "report": (
        "emostream report timeline.jsonl --out timeline.html",
        "emostream report results/call-7.jsonl --out call-7.png",
    ),
    "export": (
        "emostream export --onnx emostream.onnx",
        "emostream export --onnx emostream-int8.onnx --int8",
        "emostream classify clip.wav --onnx emostream.onnx",
    ),
    "serve": (
        'emostream serve --events-dir calls/ --token "$TOKEN"',
        "emostream serve --port 8765 --dashboard --no-model",
    ),
    "send": (
        "emostream send examples/call_stereo.flac ws://127.0.0.1:8765 --channel-names agent,customer",
        "emostream send examples/call_mono.flac ws://127.0.0.1:8765 --channel-names customer --fast",
        "emostream send examples/call_telephone.flac ws://127.0.0.1:8765 --protocol twilio",
    ),
    "watch": (
        "emostream watch ws://127.0.0.1:8765",
        "emostream watch ws://127.0.0.1:8765 --call-id call-7 --no-dashboard",
    ),
    "mic": (
        "emostream mic --list-devices",
        'emostream mic --input-device "USB Headset" --events mic.jsonl',
        "emostream mic --seconds 30 --no-dashboard --device cpu",
    ),
}
