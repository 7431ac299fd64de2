"""``emostream`` command line: replay, classify, batch, report and the live sources (serve, send, watch, mic)."""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .argtypes import fraction as _fraction
from .argtypes import positive as _positive
from .compliance import ANALYSE_CHOICES
from .stream import CLIP_POSITIONS

PARITY_TOLERANCE = 1e-3     # export: largest accepted |logit difference| between ONNX Runtime and torch
WEBHOOK_CLOSE_SECONDS = 30.0  # replay/batch: how long queued alert POSTs may still take at the end
BATCH_SKIPPED_SHOWN = 10      # batch: skipped files named on stderr (the rest counted)


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        raise UsageError(message)


def _model_device(text: str) -> str:
    """``--device``: the model's device in every command (mic's sound card is ``--input-device``)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a model device: auto, cpu, cuda or cuda:N "
                                         "(mic's sound card is --input-device)")
    return text


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="emostream", description="Real-time speech emotion analysis for phone calls.")
    p.add_argument("--version", action="version", version=f"emostream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(sp):
        sp.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
        sp.add_argument("--device", default="auto", type=_model_device,
                        help="the model's device: auto (cuda when present), cpu or cuda")
        sp.add_argument("--fp32", action="store_true", help="no mixed precision (default: fp16 autocast on CUDA, bf16 on a CPU with fast bf16 kernels, else fp32)")
        backend_args(sp)

    def stream_args(sp):
        sp.add_argument("--hop", type=_positive(float), default=1.0, help="seconds between windows (default 1.0)")
        sp.add_argument("--min-seconds", type=_positive(float), default=1.0,
                        help="audio needed before the first window (default 1.0; shorter windows are zero-padded)")
        sp.add_argument("--smooth", type=_fraction, default=1.0,
                        help="EMA weight of the newest window in (0, 1]; 1 = no smoothing (default)")
        sp.add_argument("--events", metavar="OUT.jsonl", help="write events as JSON lines (flushed per event)")
        sp.add_argument("--no-dashboard", action="store_true", help="plain lines instead of the live dashboard")
        vad_args(sp)

    r = sub.add_parser("replay", help="replay a recorded call through the live pipeline")
    r.add_argument("file")
    pace = r.add_mutually_exclusive_group()
    pace.add_argument("--speed", type=_positive(float), default=1.0, help="playback speed (1.0 = real time)")
    pace.add_argument("--fast", action="store_true", help="as fast as the model goes")
    r.add_argument("--channel-names", help="comma-separated names, one per channel (e.g. agent,customer)")
    r.add_argument("--stream", help="stream id in events (default: file name)")
    r.add_argument("--analyse", choices=ANALYSE_CHOICES, default="all",
                   help="channels to analyse: customer, agent (by --channel-names) or all (default)")
    alert_args(r)
    stream_args(r)
    model_args(r)

    c = sub.add_parser("classify", help="whole-file emotion: mean logit over placements of the file in the 6 s window")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--json", action="store_true", help="one JSON line per file")
    c.add_argument("--positions", type=_positive(int), default=CLIP_POSITIONS, metavar="P",
                   help="average the logits over P placements of a short file in the window, as a stream's hops "
                        f"see it (test-time window averaging; P times the compute; default {CLIP_POSITIONS}, "
                        "the cross-validated protocol; 1: the recipe's fixed 6 s chunks)")
    vad_args(c)
    model_args(c)

    b = sub.add_parser("batch", help="analyse a folder of recorded calls: a JSONL timeline per call and a Parquet "
                                     "table of summaries (resumable; emostream[scale])")
    b.add_argument("input", metavar="INPUT_DIR_OR_GLOB", help="a folder (searched recursively), a glob or one file")
    b.add_argument("--out", required=True, metavar="OUT_DIR", help="where <call>.jsonl and summary.parquet go")
    b.add_argument("--workers", type=_positive(int), default=1,
                   help="model workers: processes here, or Ray Data actors with --ray (default 1)")
    b.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run on Ray Data: no ADDRESS starts a new local Ray instance, 'auto' joins this node's cluster, "
                        "HOST:PORT a cluster's head, ray://HOST:10001 a remote one (put --ray after INPUT)")
    b.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per Ray Data model actor (default 1)")
    b.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per Ray Data model actor (default 0)")
    b.add_argument("--channel-names", help="the files' channels, comma-separated (default: ch0 for mono, "
                                           "agent,customer for stereo, as emostream send names them)")
    b.add_argument("--analyse", choices=ANALYSE_CHOICES, default="all",
                   help="channels to analyse: customer, agent (by channel name) or all (default: your own "
                        "recordings; in the EU analysing staff is prohibited, AI Act Art. 5(1)(f): use customer)")
    b.add_argument("--plots", choices=("html", "png"), default=None,
                   help="also write a report per call, <call>.html (self-contained) or <call>.png (matplotlib)")
    b.add_argument("--hop", type=_positive(float), default=1.0, help="seconds between windows (default 1.0)")
    b.add_argument("--min-seconds", type=_positive(float), default=1.0, help="audio before the first window (default 1.0)")
    b.add_argument("--smooth", type=_fraction, default=1.0, help="EMA weight of the newest window in (0, 1] (default 1)")
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
    add_live_commands(sub, model_args, stream_args)
    for name, sp in sub.choices.items():
        sp.formatter_class = argparse.RawDescriptionHelpFormatter
        sp.epilog = "examples:\n" + "\n".join(f"  {line}" for line in HELP_EXAMPLES[name])
    return p


# The last lines of each command's --help (they run as written from the repository root).
HELP_EXAMPLES: dict[str, tuple[str, ...]] = {
    "replay": ("emostream replay examples/call_stereo.flac --channel-names agent,customer",
               "emostream replay examples/call_mono.flac --fast --no-dashboard --events timeline.jsonl",
               'emostream replay call.wav --fast --alert "Angry>=0.7 for 10s"'),
    "classify": ("emostream classify clip1.wav clip2.flac",
                 "emostream classify examples/call_mono.flac --json"),
    "batch": ("emostream batch calls/ --out results/",
              "emostream batch 'calls/**/*.wav' --out results/ --analyse customer --plots html"),
    "report": ("emostream report timeline.jsonl --out timeline.html",
               "emostream report results/call-7.jsonl --out call-7.png"),
    "export": ("emostream export --onnx emostream.onnx",
               "emostream classify clip.wav --onnx emostream.onnx"),
    "serve": ('emostream serve --events-dir calls/ --token "$TOKEN"',
              "emostream serve --port 8765 --dashboard --no-model"),
    "send": ("emostream send examples/call_stereo.flac ws://127.0.0.1:8765 --channel-names agent,customer",
             "emostream send examples/call_mono.flac ws://127.0.0.1:8765 --channel-names customer --fast",
             "emostream send examples/call_telephone.flac ws://127.0.0.1:8765 --protocol twilio"),
    "watch": ("emostream watch ws://127.0.0.1:8765",
              "emostream watch ws://127.0.0.1:8765 --call-id call-7 --no-dashboard"),
    "mic": ("emostream mic --list-devices",
            'emostream mic --input-device "USB Headset" --events mic.jsonl',
            "emostream mic --seconds 30 --no-dashboard --device cpu"),
}


def backend_args(sp) -> None:
    """``--backend``/``--onnx``: which runtime runs the model."""
    sp.add_argument("--backend", choices=("torch", "onnx"), default=None,
                    help="torch (default) or onnx (ONNX Runtime, fp32; needs --onnx)")
    sp.add_argument("--onnx", metavar="MODEL.onnx", default=None,
                    help="ONNX model made by 'emostream export --onnx' (implies --backend onnx)")


def alert_args(sp) -> None:
    """``--alert RULE``: escalation rules, and ``--alert-webhook URL`` to POST them."""
    sp.add_argument("--alert", action="append", default=[], metavar="RULE", type=_alert_rule,
                    help='escalation rule per channel, e.g. "Angry>=0.7 for 10s" (repeatable); it clears after 5 s '
                         'below the threshold minus 0.1 (silence counts as below) unless the rule says, e.g. '
                         '"Angry>=0.7 for 10s clear below 0.5 for 8s"')
    sp.add_argument("--alert-webhook", metavar="URL", default=None,
                    help="also POST every alert (raised and cleared) as JSON to this http(s) URL, in the background, "
                         "retried with backoff; failures are logged and counted, never stop a call")
    sp.add_argument("--alert-webhook-token", metavar="TOKEN", default=None,
                    help="send 'Authorization: Bearer TOKEN' with each POST (default: $EMOSTREAM_WEBHOOK_TOKEN)")


def _webhook_config(args):
    """The :class:`~emostream.webhook.WebhookConfig` of ``--alert-webhook``, or None."""
    from .webhook import WebhookConfig

    if not args.alert_webhook:
        return None
    if not args.alert:
        raise UsageError("--alert-webhook needs at least one --alert rule")
    token = _env_default(args.alert_webhook_token, "EMOSTREAM_WEBHOOK_TOKEN")
    try:
        return WebhookConfig(args.alert_webhook, headers=(("Authorization", f"Bearer {token}"),) if token else ())
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _webhook_report(webhook) -> None:
    """One stderr line when some alert POSTs did not get through."""
    s = webhook.stats
    if s.failed or s.dropped:
        print(f"emostream: alert webhook: {s.delivered} delivered, {s.failed} failed, {s.dropped} dropped"
              f" (last error: {s.last_error})", file=sys.stderr, flush=True)


def _alert_rule(text: str):
    from .alerts import AlertRule

    try:
        return AlertRule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def vad_args(sp) -> None:
    """``--vad``: which windows are classified."""
    sp.add_argument("--vad", choices=("silero", "energy", "off"), default="silero",
                    help="speech gate: silero (neural voice activity detector, default), energy (any sound "
                         "above -50 dBFS) or off (classify every window)")


def ray_args(sv) -> None:
    """``serve --ray``: inference on a Ray Serve deployment (emostream[scale])."""
    g = sv.add_argument_group("Ray Serve (emostream[scale])")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run the model on a Ray Serve deployment: no ADDRESS starts a new local Ray instance, 'auto' "
                        "joins this node's cluster, HOST:PORT a cluster's head, ray://HOST:10001 a remote one "
                        "(Ray Client)")
    g.add_argument("--ray-replicas", default="1", metavar="N|MIN:MAX",
                   help="model replicas: N, or MIN:MAX to autoscale between them (default 1)")
    g.add_argument("--ray-target-requests", type=_positive(float), default=16.0,
                   help="autoscaling: ongoing requests per replica to aim for (default 16; one request = one call's "
                        "new windows)")
    g.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    g.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per replica (default 0; e.g. 1 or 0.5)")
    g.add_argument("--ray-app", default="emostream", help="Serve application name (default emostream); a running "
                   "one is reused, so several front ends share it")
    g.add_argument("--ray-redeploy", action="store_true", help="replace a running application with these settings")


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535: {text!r}")
    return value


def add_live_commands(sub, model_args, stream_args) -> None:
    """The live sources of issue #4: serve, send, watch, mic."""
    sv = sub.add_parser("serve", help="websocket server for live calls (raw PCM, Twilio, AudioHook)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    sv.add_argument("--port", type=_port, default=8765, help="port (default 8765; 0 = any free port)")
    sv.add_argument("--token", default=None,
                    help="required token (Bearer, X-API-KEY or ?token=); default: $EMOSTREAM_TOKEN, else none")
    sv.add_argument("--max-calls", type=_positive(int), default=100, help="concurrent calls (default 100)")
    sv.add_argument("--events-dir", metavar="DIR", help="append each call's timeline to DIR/<call_id>.jsonl")
    sv.add_argument("--dashboard", action="store_true", help="show the supervisor dashboard of all calls")
    sv.add_argument("--hop", type=_positive(float), default=1.0, help="seconds between windows (default 1.0)")
    sv.add_argument("--min-seconds", type=_positive(float), default=1.0, help="audio before the first window (default 1.0)")
    sv.add_argument("--smooth", type=_fraction, default=1.0, help="EMA weight of the newest window in (0, 1] (default 1)")
    vad_args(sv)
    sv.add_argument("--idle-timeout", type=_positive(float), default=60.0,
                    help="close calls that send no audio this long (s, default 60; close 1001)")
    sv.add_argument("--start-timeout", type=_positive(float), default=5.0,
                    help="close connections that have not started a call this long after connecting (s, default 5; close 1008)")
    sv.add_argument("--max-unstarted", type=_positive(int), default=32,
                    help="connections waiting for their call to start, at most (default 32; more get HTTP 503)")
    sv.add_argument("--max-call-minutes", type=_positive(float), default=240.0,
                    help="longest call in minutes of audio, gaps included (default 240)")
    sv.add_argument("--max-message-kb", type=_positive(int), default=256, help="largest websocket message in KiB (default 256)")
    sv.add_argument("--max-batch", type=_positive(int), default=32, help="windows per model call (default 32)")
    sv.add_argument("--max-wait-ms", type=float, default=10.0, help="how long a window waits for a fuller batch (default 10)")
    sv.add_argument("--twilio-auth-token", default=None,
                    help="validate X-Twilio-Signature with this auth token (default: $TWILIO_AUTH_TOKEN)")
    sv.add_argument("--public-url", default=None,
                    help="the wss://host[:port] Twilio connects to, when behind a proxy (for signatures)")
    sv.add_argument("--audiohook-key", action="append", default=[], metavar="KEY:SECRET",
                    help="AudioHook API key and base64 client secret; requests must be signed (repeatable)")
    sv.add_argument("--warm-up", action="store_true",
                    help="run the model once per batch size before listening (first calls are not slow)")
    sv.add_argument("--no-model", action="store_true",
                    help="answer every window with a fixed Neutral distribution (bridge and load tests, no model)")
    sv.add_argument("--verbose", action="store_true", help="log every connection")
    sv.add_argument("--log-format", choices=("text", "json"), default="text",
                    help="text (default) or json: one JSON object per line with the call id; never audio or tokens")
    sv.add_argument("--analyse", choices=ANALYSE_CHOICES, default="customer",
                    help="channels to analyse: customer (default; AudioHook external, Twilio inbound, the pcm "
                         "channel named 'customer': events name it customer on every protocol), agent, or all. In the EU, analysing staff is prohibited "
                         "(AI Act Art. 5(1)(f)): keep 'customer'")
    sv.add_argument("--record", metavar="DIR", default=None,
                    help="also write each call's audio as received to DIR/<call_id>.wav (off by default: "
                         "the server stores no audio)")
    sv.add_argument("--events-retention-days", type=_positive(float), default=None, metavar="DAYS",
                    help="delete timelines in --events-dir older than DAYS (checked at start and hourly)")
    sv.add_argument("--record-retention-days", type=_positive(float), default=None, metavar="DAYS",
                    help="delete recordings in --record DIR older than DAYS (checked at start and hourly)")
    alert_args(sv)
    model_args(sv)
    ray_args(sv)

    sd = sub.add_parser("send", help="stream a recorded call to a server as a bridge would and print the events")
    sd.add_argument("file", help="the recorded call to stream (any format replay reads; stereo: one party per channel)")
    sd.add_argument("url", help="server, e.g. ws://127.0.0.1:8765")
    sd.add_argument("--protocol", choices=("pcm", "twilio", "audiohook"), default="pcm",
                    help="the bridge to act as: pcm (raw PCM on /v1/pcm, default), twilio (Media Streams on "
                         "/v1/twilio, 8 kHz mu-law) or audiohook (Genesys AudioHook on /v1/audiohook)")
    sd.add_argument("--fast", action="store_true", help="send as fast as the server takes it (default: real time)")
    sd.add_argument("--token", default=None, help="server token (default: $EMOSTREAM_TOKEN)")
    sd.add_argument("--call-id", default=None, help="call id (default: file name for pcm, random for the others)")
    sd.add_argument("--encoding", choices=("pcm_s16le", "mulaw", "alaw"), default="pcm_s16le", help="pcm only")
    sd.add_argument("--rate", type=int, choices=(8000, 16000), default=None,
                    help="pcm only: sample rate (default 16000 for pcm_s16le, 8000 for mulaw/alaw)")
    sd.add_argument("--channel-names",
                    help="the file's channels, comma-separated (default: ch0 for mono, agent,customer for stereo); "
                         "pcm sends them as names, twilio/audiohook send the customer as inbound/external")
    sd.add_argument("--audiohook-key", default=None, metavar="KEY:SECRET", help="audiohook only: sign the request")
    sd.add_argument("--quiet", action="store_true", help="print only the summary")

    w = sub.add_parser("watch", help="supervisor dashboard of every live call on a server")
    w.add_argument("url", help="server, e.g. ws://127.0.0.1:8765")
    w.add_argument("--token", default=None, help="server token (default: $EMOSTREAM_TOKEN)")
    w.add_argument("--call-id", default=None, help="only this call")
    w.add_argument("--no-dashboard", action="store_true", help="plain lines instead of the dashboard")

    m = sub.add_parser("mic", help="analyse a microphone (or any audio input) live")
    m.add_argument("--input-device", dest="input_device", default=None, metavar="N|NAME",
                   help="the sound card: input device index or (part of its) name (see --list-devices); "
                        "default: the system default input")
    m.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    m.add_argument("--rate", type=_positive(int), default=None, help="capture rate (default: the device's)")
    m.add_argument("--channels", type=int, choices=(1, 2), default=1, help="channels to capture (default 1)")
    m.add_argument("--seconds", type=_positive(float), default=None, help="stop after this much audio")
    stream_args(m)
    m.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
    m.add_argument("--device", "--model-device", dest="device", default="auto", type=_model_device,
                   help="the model's device, as in every command: auto (cuda when present), cpu or cuda")
    m.add_argument("--fp32", action="store_true", help="no mixed precision (default: fp16 autocast on CUDA, bf16 on a CPU with fast bf16 kernels, else fp32)")
    backend_args(m)


def _load_predictor(args):
    """The model of the command's model options (:func:`emostream.loading.load_predictor`)."""
    from .loading import ModelOptionsError, load_predictor

    try:
        return load_predictor(args.checkpoint, device=args.device, fp32=getattr(args, "fp32", False),
                              backend=getattr(args, "backend", None), onnx=getattr(args, "onnx", None))
    except ModelOptionsError as exc:
        raise UsageError(str(exc)) from None


def _model_info(predictor, args) -> dict[str, str]:
    """:func:`emostream.loading.model_info` for the command's model options."""
    from .loading import model_info

    return model_info(predictor, checkpoint=args.checkpoint, onnx=getattr(args, "onnx", None))


def cmd_classify(args) -> int:
    from .audio import AudioError
    from .whole_file import LONG_FILE_SECONDS, classify_file

    vad = _vad(args)
    predictor = _load_predictor(args)
    failures = 0
    for path in args.paths:
        try:
            record = classify_file(path, predictor, args.positions, vad)
        except AudioError as exc:
            print(f"emostream: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        if not record["speech"]:
            failures += 1
            print(f"emostream: {path}: no speech ({record['speech_seconds']:g} s found by --vad {args.vad}, "
                  f"{vad.min_speech_seconds:g} s needed): not classified", file=sys.stderr, flush=True)
        elif record["duration"] > LONG_FILE_SECONDS:
            print(f"emostream: note: {path} is {record['duration'] / 60:.0f} min long; one label for a whole "
                  f"recording hides how it changes: 'emostream replay --fast {path} --events OUT.jsonl' or "
                  f"'emostream batch' give a timeline", file=sys.stderr, flush=True)
        if args.json:
            print(json.dumps(record), flush=True)
        elif record["speech"]:
            print(f"{path}\t{record['label']}\t{record['confidence']:.2f}", flush=True)
        else:
            print(f"{path}\t-\t-", flush=True)
    return 2 if failures else 0


def cmd_export(args) -> int:
    from .loading import checkpoint_path
    from .model import Predictor
    from .onnx_model import OnnxExportError, OnnxPredictor, export_onnx, parity_windows

    checkpoint = checkpoint_path(args.checkpoint)
    out = Path(args.onnx)
    if out.is_dir():
        raise UsageError(f"--onnx is a directory: {out}")
    t0 = time.monotonic()
    try:
        export_onnx(checkpoint, out)
    except OnnxExportError as exc:
        raise UsageError(str(exc)) from None
    seconds = time.monotonic() - t0
    windows = parity_windows()
    reference = Predictor.from_checkpoint(checkpoint, device="cpu", mixed_precision=False).logits(windows).numpy()
    diff = float(np.abs(OnnxPredictor.from_file(out).logits(windows) - reference).max())
    print(f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB) in {seconds:.1f} s; max |logit difference| "
          f"against torch fp32 on {len(windows)} windows: {diff:.2e}", flush=True)
    if diff > PARITY_TOLERANCE:
        print(f"emostream: error: the ONNX model differs from torch by more than {PARITY_TOLERANCE}", file=sys.stderr)
        return 1
    return 0


def _show_alert(display):
    """An alert sink that logs raised and cleared alerts on the display."""
    def show(alert: dict) -> None:
        verb = "ALERT" if alert["state"] == "raised" else "alert cleared"
        display.log(f"{verb}: {alert['channel']} {alert['rule']} at {alert['t']:.1f} s")
    return show


def cmd_replay(args) -> int:
    from .analyzer import AnalyzerConfig
    from .compliance import ChannelSelectionError, analysed_channels
    from .audio import SAMPLE_RATE, audio_info, is_silent, stream_audio
    from .dashboard import DashboardInfo, make_display
    from .model_files import model_identity
    from .pipeline import REPLAY_CHUNK_SECONDS, CallPipeline, channel_names
    from .stream import StreamConfig
    from .timeline import FILE_START_FROM, JsonlWriter, file_start_time
    from .webhook import AlertWebhook

    try:
        stream_cfg = StreamConfig(hop_seconds=args.hop, min_seconds=args.min_seconds)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    webhook_config = _webhook_config(args)
    info = audio_info(args.file)
    if info.frames == 0 or is_silent(args.file):
        raise UsageError(f"audio is empty or silent: {args.file}")
    n_channels = info.channels
    try:
        names = channel_names(args.channel_names.split(",") if args.channel_names else None, n_channels)
    except ValueError:
        raise UsageError(f"--channel-names needs {n_channels} distinct names for {args.file}, got {args.channel_names!r}") from None
    try:
        keep = analysed_channels(names, args.analyse)
    except ChannelSelectionError as exc:
        raise UsageError(str(exc)) from None
    names = tuple(names[i] for i in keep)  # the rest is never analysed
    predictor = _load_predictor(args)
    stream = args.stream or Path(args.file).stem
    writer = JsonlWriter(args.events) if args.events else None
    webhook = AlertWebhook(webhook_config) if webhook_config else None
    info = DashboardInfo(source=f"replay {args.file}", stream=stream, channels=names,
                         device=str(predictor.device), hop_seconds=args.hop)
    display = make_display(info, enabled=not args.no_dashboard)
    sinks = [display.update] + ([writer.write] if writer else [])
    alert_sinks = [_show_alert(display)] + ([writer.write] if writer else []) + ([webhook.send] if webhook is not None else [])
    pipeline = CallPipeline(predictor.predict, stream, names, stream_config=stream_cfg,
                            analyzer_config=AnalyzerConfig(smooth=args.smooth, vad=_vad(args)), sinks=sinks,
                            alert_rules=args.alert, alert_sinks=alert_sinks)
    chunk = int(REPLAY_CHUNK_SECONDS * SAMPLE_RATE)
    interrupted = False
    with display:
        t0 = time.monotonic()
        try:
            pos = 0
            for block in stream_audio(args.file):  # decoded block by block: memory bounded however long
                block = block[list(keep)]
                for start in range(0, block.shape[1], chunk):
                    if not args.fast:
                        wait = t0 + pos / SAMPLE_RATE / args.speed - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                    piece = block[:, start:start + chunk]
                    pipeline.push(piece)
                    pos += piece.shape[1]
                    display.set_clock(pipeline.seconds, time.monotonic() - t0)
            pipeline.flush()
            display.set_clock(pipeline.seconds, time.monotonic() - t0)
        except KeyboardInterrupt:
            interrupted = True
            display.log("interrupted: summary of the audio so far")
        summary = pipeline.summary()
        summary.update(model=model_identity(args.checkpoint, args.onnx),
                       started_at=file_start_time(args.file, pipeline.seconds),
                       started_at_from=FILE_START_FROM)
        if writer:
            writer.write(summary)
            writer.close()
        display.finish(summary)
    if webhook is not None:
        webhook.close(WEBHOOK_CLOSE_SECONDS)
        _webhook_report(webhook)
    return 130 if interrupted else 0


def cmd_batch(args) -> int:
    import os

    from .batch import BatchConfig, BatchError, find_inputs, run_batch
    from .webhook import AlertWebhook
    from .worker import ModelSpec

    from importlib.util import find_spec

    # checked, not imported: pyarrow is loaded for the summary table once the model is gone (issue #42)
    if find_spec("pyarrow") is None:
        raise UsageError("batch writes its summary table with pyarrow: pip install 'emostream[scale]'")
    if args.plots == "png" and find_spec("matplotlib") is None:
        raise UsageError("--plots png needs matplotlib: pip install 'emostream[report]' (or use --plots html)")
    names = tuple(n.strip() for n in args.channel_names.split(",")) if args.channel_names else None
    try:
        config = BatchConfig(hop_seconds=args.hop, min_seconds=args.min_seconds, smooth=args.smooth, vad=_vad(args),
                             channel_names=names, analyse=args.analyse, alerts=tuple(args.alert))
        skipped: list[tuple[str, str]] = []
        calls = find_inputs(args.input, skipped)
    except (ValueError, BatchError) as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out is not a directory: {out}")
    webhook_config = _webhook_config(args)
    spec = ModelSpec.from_args(args)
    started = False
    if args.ray is not None:
        scale = _import_scale()
        gpu = args.ray_gpus > 0
        spec = ModelSpec(**{**spec.__dict__, "device": args.device if args.device != "auto" else ("cuda" if gpu else "cpu"),
                            "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                            "onnx": str(Path(args.onnx).resolve()) if args.onnx else None,
                            "threads": None if gpu else max(1, int(args.ray_cpus))})
        _check_model_files(spec)
        try:
            started = scale.connect(args.ray)
        except scale.ScaleError as exc:
            raise UsageError(str(exc)) from None
    elif args.workers > 1:
        spec = ModelSpec(**{**spec.__dict__, "threads": max(1, (os.cpu_count() or 1) // args.workers)})
        _check_model_files(spec)
    if skipped:
        shown = ", ".join(f"{path} ({why})" for path, why in skipped[:BATCH_SKIPPED_SHOWN])
        more = f" and {len(skipped) - BATCH_SKIPPED_SHOWN} more" if len(skipped) > BATCH_SKIPPED_SHOWN else ""
        print(f"emostream: batch: skipped {len(skipped)} file(s): {shown}{more}", file=sys.stderr, flush=True)
    webhook = AlertWebhook(webhook_config) if webhook_config else None
    show = _batch_progress(len(calls), args.quiet)
    try:
        with show:
            report = run_batch(calls, out, spec, config, workers=args.workers, use_ray=args.ray is not None,
                               cpus_per_worker=args.ray_cpus, gpus_per_worker=args.ray_gpus, plots=args.plots,
                               webhook=webhook, progress=show.update)
    finally:
        if started:
            from .scale import shutdown

            shutdown(started, serve_used=False)
        if webhook is not None:
            webhook.close(WEBHOOK_CLOSE_SECONDS)
    analysed = report.ok
    speed = report.audio_seconds / report.wall_seconds if report.wall_seconds else 0.0
    print(f"batch: {report.total} call(s): {analysed} analysed ({report.audio_seconds:.1f} s of audio in "
          f"{report.wall_seconds:.1f} s, {speed:.1f} s of audio per second), {report.skipped} already done, "
          f"{len(report.failed)} failed; {report.table} ({report.rows} rows)", flush=True)
    if webhook is not None:
        _webhook_report(webhook)
    return 2 if report.failed else 0


class _batch_progress:
    """A progress bar on a terminal (stderr), else one line per call; failures always on stderr."""

    def __init__(self, total: int, quiet: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar = None
        if not quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(TextColumn("batch"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                                TimeElapsedColumn(), console=self.console, transient=True)
            self.task = self.bar.add_task("", total=total)
        self.quiet = quiet
        self.audio = 0.0
        self.failed = 0

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, result) -> None:
        if result.ok:
            self.audio += result.audio_seconds
        else:
            self.failed += 1
            line = f"emostream: error: {result.call_id}: {result.error}"
            if self.bar is not None:  # above the live bar, not through it
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                print(line, file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.audio:.0f} s of audio, {self.failed} failed")
        elif not self.quiet and result.ok:
            summary = result.lines[-1]
            dominant = ", ".join(f"{ch} {c['dominant'] or '-'}" for ch, c in summary["channels"].items())
            alerts = len(summary.get("alerts", []))
            print(f"{result.call_id}\t{result.audio_seconds:.1f} s\t{dominant}\t{alerts} alert(s)", flush=True)


def cmd_report(args) -> int:
    from .report import ReportError, write_report

    try:
        out, notes = write_report(args.jsonl, args.out)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the output cannot be written
        raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    for note in notes:
        print(f"emostream: note: {note}", file=sys.stderr, flush=True)
    print(f"wrote {out}", flush=True)
    return 0


def _vad(args):
    from .vad import VadConfig, VadUnavailable, silero_session

    config = VadConfig.named(args.vad)
    if config.kind == "silero":
        try:
            silero_session()
        except VadUnavailable as exc:
            raise UsageError(str(exc)) from None
    return config


def _env_default(value: str | None, name: str) -> str | None:
    import os

    return value if value is not None else (os.environ.get(name) or None)


def cmd_serve(args) -> int:
    import asyncio
    import logging

    from .auth import AudioHookKey
    from .logs import configure as configure_logs
    from .server import EmoServer, ServerConfig
    from .worker import WorkerConfig, constant_predictor

    try:
        keys = tuple(AudioHookKey.parse(k) for k in args.audiohook_key)
        config = ServerConfig(
            host=args.host, port=args.port, token=_env_default(args.token, "EMOSTREAM_TOKEN"),
            max_calls=args.max_calls, events_dir=Path(args.events_dir) if args.events_dir else None,
            hop_seconds=args.hop, min_seconds=args.min_seconds, smooth=args.smooth, vad=_vad(args),
            idle_timeout=args.idle_timeout, start_timeout=args.start_timeout, max_unstarted=args.max_unstarted,
            max_call_seconds=args.max_call_minutes * 60,
            max_message_bytes=args.max_message_kb * 1024,
            twilio_auth_token=_env_default(args.twilio_auth_token, "TWILIO_AUTH_TOKEN"),
            public_url=args.public_url, audiohook_keys=keys,
            worker=WorkerConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                max_pending=max(4096, args.max_batch)), warm_up=args.warm_up,
            analyse=args.analyse, record_dir=Path(args.record) if args.record else None,
            events_retention_days=args.events_retention_days, record_retention_days=args.record_retention_days,
            alerts=tuple(args.alert),
            alert_webhook=_webhook_config(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for flag, directory in (("--events-dir", config.events_dir), ("--record", config.record_dir)):
        if directory is not None and directory.exists() and not directory.is_dir():
            raise UsageError(f"{flag} is not a directory: {directory}")
    # JSON logs are for a log pipeline: everything at INFO. Text logs stay quiet unless --verbose.
    configure_logs(args.log_format, logging.INFO if args.verbose or args.log_format == "json" else logging.WARNING)
    ray_started, worker = False, None
    if args.ray is not None:
        worker, device, model_info, ray_started = _ray_worker(args, config)
        predict = None
    elif args.no_model:
        predict, device, model_info = constant_predictor(), "none (--no-model)", {"name": "none"}
    else:
        predictor = _load_predictor(args)
        predict, device, model_info = predictor.predict, str(predictor.device), _model_info(predictor, args)
    server = EmoServer(config, predict, device=device, model_info=model_info, worker=worker)

    async def run() -> None:
        import signal

        # A service manager stops the server with SIGTERM: finish like Ctrl-C (calls get their summaries).
        main_task = asyncio.current_task()
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        except (NotImplementedError, RuntimeError):  # not the main thread / no signal support
            pass
        try:
            port = await server.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
        auth = "token required" if config.token else "no token (set --token or EMOSTREAM_TOKEN)"
        print(f"emostream serve: listening on ws://{config.host}:{port} (/v1/pcm /v1/twilio /v1/audiohook "
              f"/v1/events); model on {device}; {auth}; supervisor page http://{config.host}:{port}/",
              file=sys.stderr, flush=True)
        view = None
        if args.dashboard:
            from rich.console import Console

            from .watch import PlainWatcher, SupervisorView

            console = Console()
            view = SupervisorView(f"serve :{port}", console) if console.is_terminal else PlainWatcher()
            server.hub.listeners.append(view.update)
            view.__enter__()
        try:
            await asyncio.Future()
        finally:
            await server.stop()
            if view is not None:
                view.__exit__(None, None, None)

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("emostream serve: stopped", file=sys.stderr)
    finally:
        if ray_started:
            from .scale import shutdown

            shutdown(ray_started)
    return 0


def _import_scale():
    try:
        from . import scale
    except ImportError as exc:
        raise UsageError(f"--ray needs emostream[scale] (pip install 'emostream[scale]'): {exc}") from None
    return scale


def _ray_worker(args, config):
    """``serve --ray``: join Ray, start (or reuse) the Serve deployment, and the worker that calls it."""
    from .worker import ModelSpec

    scale = _import_scale()
    try:
        low, high = scale.parse_replicas(args.ray_replicas)
        serve_config = scale.ServeConfig(app_name=args.ray_app, min_replicas=low, max_replicas=high,
                                         target_ongoing_requests=args.ray_target_requests, cpus=args.ray_cpus,
                                         gpus=args.ray_gpus, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                         warm_up=args.warm_up)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    device = args.device if args.device != "auto" else ("cuda" if args.ray_gpus > 0 else "cpu")
    spec = ModelSpec.from_args(args)
    spec = ModelSpec(**{**spec.__dict__, "device": device,
                        "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                        "onnx": str(Path(args.onnx).resolve()) if args.onnx else None,
                        "threads": max(1, int(args.ray_cpus)) if args.ray_gpus == 0 else None})
    if spec.backend != "constant":
        _check_model_files(spec)
    started = False
    try:
        started = scale.connect(args.ray)
        handle, info, deployed = scale.deploy(spec, serve_config, args.ray_redeploy)
    except scale.ScaleError as exc:
        if started:
            scale.shutdown(started)
        raise UsageError(str(exc)) from None
    if deployed:
        print(f"emostream serve: deployed Ray Serve application {serve_config.app_name!r} ({args.ray_replicas} "
              f"replica(s), {serve_config.cpus:g} CPU / {serve_config.gpus:g} GPU each, model on {info.get('device')})",
              file=sys.stderr, flush=True)
    else:
        print(f"emostream serve: using the running Ray Serve application {serve_config.app_name!r} (model on "
              f"{info.get('device')}; its replica settings stay as deployed, --ray-redeploy replaces them)",
              file=sys.stderr, flush=True)
    model_info = {k: v for k, v in info.items() if k != "device"}
    return scale.RayWorker(handle, config.worker), f"ray:{info.get('device')}", model_info, started


def _check_model_files(spec) -> None:
    """The checkpoint/ONNX file exists here (:func:`emostream.loading.check_model_files`)."""
    from .loading import ModelOptionsError, check_model_files

    try:
        check_model_files(backend=spec.backend, checkpoint=spec.checkpoint, onnx=spec.onnx)
    except ModelOptionsError as exc:
        raise UsageError(str(exc)) from None


def cmd_send(args) -> int:
    import asyncio

    from .auth import AudioHookKey
    from .client import SendError, SendOptions, endpoint_url, send_file

    try:
        endpoint_url(args.url, args.protocol)
        key = AudioHookKey.parse(args.audiohook_key) if args.audiohook_key else None
    except (SendError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    names = tuple(n.strip() for n in args.channel_names.split(",")) if args.channel_names else None
    if names is not None and (len(set(names)) != len(names) or not all(names)):
        raise UsageError(f"--channel-names must be distinct non-empty names, got {args.channel_names!r}")
    if not Path(args.file).exists():
        raise UsageError(f"no such file: {args.file}")
    hint = ""
    if names is None and args.protocol == "pcm":
        from .audio import AudioError, audio_info

        try:
            if audio_info(args.file).channels == 1:
                hint = (f"; {args.file} is mono, sent as channel 'ch0' and serve analyses the customer by default: "
                        "add --channel-names customer")
        except AudioError:
            pass  # send_file says why the file cannot be read
    options = SendOptions(protocol=args.protocol, fast=args.fast, token=_env_default(args.token, "EMOSTREAM_TOKEN"),
                          call_id=args.call_id, encoding=args.encoding, sample_rate=args.rate,
                          channel_names=names, audiohook_key=key)

    def show(message: dict) -> None:
        if not args.quiet or message.get("type") == "summary":
            print(json.dumps(message), flush=True)

    try:
        result = asyncio.run(send_file(args.file, args.url, options, show))
    except SendError as exc:
        raise UsageError(str(exc)) from None
    if result.summary is None:
        reason = result.close_reason or "connection closed"
        errors = [m.get("message") for m in result.messages if m.get("type") == "error"]
        print(f"emostream: error: call ended without a summary (close {result.close_code}: "
              f"{errors[0] if errors else reason}){hint}", file=sys.stderr)
        return 1
    return 0


def cmd_watch(args) -> int:
    import asyncio

    from websockets.exceptions import InvalidStatus

    from .watch import PlainWatcher, SupervisorView, events_url, watch

    try:
        events_url(args.url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from rich.console import Console

    console = Console()
    view = SupervisorView(args.url, console) if (not args.no_dashboard and console.is_terminal) else PlainWatcher()
    try:
        with view:
            closed = asyncio.run(watch(args.url, view.update, _env_default(args.token, "EMOSTREAM_TOKEN"), args.call_id))
    except InvalidStatus as exc:
        raise UsageError(f"server refused the connection: HTTP {exc.response.status_code}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise UsageError(f"cannot connect to {args.url}: {exc or type(exc).__name__}") from None
    if closed is not None:  # the server went away (stopped, restarted, or the network dropped)
        print(f"emostream: watch: the server closed the connection ({closed})", file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_mic(args) -> int:
    from .mic import MicError, run_mic_command

    try:
        return run_mic_command(args, _load_predictor)
    except MicError as exc:
        raise UsageError(str(exc)) from None


COMMANDS = {"replay": cmd_replay, "classify": cmd_classify, "export": cmd_export, "serve": cmd_serve, "send": cmd_send,
            "watch": cmd_watch, "mic": cmd_mic, "batch": cmd_batch, "report": cmd_report}


def _terminate_like_interrupt(signum, frame) -> None:
    """SIGTERM (a service manager, ``kill``) ends a command as Ctrl-C does: replay, mic, send, batch
    and serve still write the summary they promise."""
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emostream`` console script."""
    import signal
    import threading

    from .audio import AudioError
    from .loading import ModelOptionsError
    from .model_files import CheckpointError
    from .vad import VadUnavailable

    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate_like_interrupt)
    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    except (AudioError, CheckpointError, ModelOptionsError, VadUnavailable, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emostream: interrupted", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The console script and ``python -m emostream``: :func:`main`, then the interpreter's own exit
    steps (atexit handlers, other threads, flushed output) and a plain process exit. Skipped: the
    module and shared-library teardown, which touched ~125 MB of torch's and its CUDA libraries'
    pages after a call was done, the top of a long call's peak memory (issue #42)."""
    import atexit
    import os
    import threading

    try:
        code = main()
    except SystemExit as exc:  # argparse: --help, usage errors
        code = exc.code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    try:
        for thread in threading.enumerate():
            if thread is not threading.main_thread() and not thread.daemon:
                thread.join()
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


if __name__ == "__main__":
    run()
