"""``emostream`` command line: replay, classify and the live sources (serve, send, watch, mic)."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from . import __version__
from .compliance import ANALYSE_CHOICES

REPLAY_CHUNK_SECONDS = 0.1  # replay feeds audio in chunks of this size
PARITY_TOLERANCE = 1e-3     # export: largest accepted |logit difference| between ONNX Runtime and torch


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


def _fraction(text: str) -> float:
    """A number in (0, 1] (the EMA weight of ``--smooth``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="emostream", description="Real-time speech emotion analysis for phone calls.")
    p.add_argument("--version", action="version", version=f"emostream {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def model_args(sp):
        sp.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
        sp.add_argument("--device", default="auto", help="auto (cuda when present), cpu or cuda")
        sp.add_argument("--fp32", action="store_true", help="disable bf16/fp16 autocast")
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

    c = sub.add_parser("classify", help="whole-file emotion with the recipe's fixed 6 s chunks")
    c.add_argument("paths", nargs="+", metavar="PATH")
    c.add_argument("--json", action="store_true", help="one JSON line per file")
    model_args(c)

    e = sub.add_parser("export", help="export the model, mel front end included, to one ONNX file")
    e.add_argument("--onnx", required=True, metavar="OUT.onnx", help="file to write")
    e.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
    add_live_commands(sub, model_args, stream_args)
    return p


def backend_args(sp) -> None:
    """``--backend``/``--onnx``: which runtime runs the model."""
    sp.add_argument("--backend", choices=("torch", "onnx"), default=None,
                    help="torch (default) or onnx (ONNX Runtime, fp32; needs --onnx)")
    sp.add_argument("--onnx", metavar="MODEL.onnx", default=None,
                    help="ONNX model made by 'emostream export --onnx' (implies --backend onnx)")


def alert_args(sp) -> None:
    """``--alert RULE``: escalation rules."""
    sp.add_argument("--alert", action="append", default=[], metavar="RULE", type=_alert_rule,
                    help='escalation rule per channel, e.g. "Angry>=0.7 for 10s" (repeatable)')


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
    sv.add_argument("--idle-timeout", type=_positive(float), default=60.0, help="close calls silent this long (s, default 60)")
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
                         "channel named 'customer'), agent, or all. In the EU, analysing staff is prohibited "
                         "(AI Act Art. 5(1)(f)): keep 'customer'")
    sv.add_argument("--record", metavar="DIR", default=None,
                    help="also write each call's audio as received to DIR/<call_id>.wav (off by default: "
                         "the server stores no audio)")
    sv.add_argument("--events-retention-days", type=_positive(float), default=None, metavar="DAYS",
                    help="delete timelines in --events-dir older than DAYS (checked at start and hourly)")
    alert_args(sv)
    model_args(sv)

    sd = sub.add_parser("send", help="stream a recorded call to a server as a bridge would and print the events")
    sd.add_argument("file")
    sd.add_argument("url", help="server, e.g. ws://127.0.0.1:8765")
    sd.add_argument("--protocol", choices=("pcm", "twilio", "audiohook"), default="pcm")
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
    m.add_argument("--device", dest="input_device", default=None, metavar="N|NAME",
                   help="input device index or (part of its) name; default: the system default input")
    m.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    m.add_argument("--rate", type=_positive(int), default=None, help="capture rate (default: the device's)")
    m.add_argument("--channels", type=int, choices=(1, 2), default=1, help="channels to capture (default 1)")
    m.add_argument("--seconds", type=_positive(float), default=None, help="stop after this much audio")
    stream_args(m)
    m.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
    m.add_argument("--model-device", dest="device", default="auto", help="auto (cuda when present), cpu or cuda")
    m.add_argument("--fp32", action="store_true", help="disable bf16/fp16 autocast")
    backend_args(m)


def _load_predictor(args):
    from .model import DEFAULT_CHECKPOINT, Predictor

    backend, onnx_path = getattr(args, "backend", None), getattr(args, "onnx", None)
    if backend is None:
        backend = "onnx" if onnx_path else "torch"
    device = None if args.device == "auto" else args.device
    if backend == "onnx":
        from .onnx_model import OnnxPredictor

        if not onnx_path:
            raise UsageError("--backend onnx needs --onnx MODEL.onnx (make one with: emostream export --onnx MODEL.onnx)")
        if args.checkpoint:
            raise UsageError("--checkpoint does not apply to --backend onnx: the ONNX file holds the model")
        return OnnxPredictor.from_file(onnx_path, device=device)
    if onnx_path:
        raise UsageError("--onnx is only used with --backend onnx")
    path = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    if device and device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: no CUDA device is available")
    return Predictor.from_checkpoint(path, device=device, mixed_precision=not args.fp32)


def _model_info(predictor, args) -> dict[str, str]:
    """What ``/metrics`` reports as the model: checkpoint name, experiment, backbone, backend and the
    first 12 hex digits of the weights' SHA-256 (the identity to compare between replicas)."""
    import hashlib

    from .model import DEFAULT_CHECKPOINT

    onnx_path = getattr(args, "onnx", None)
    weights = Path(onnx_path) if onnx_path else (Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT) / "model.safetensors"
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    meta = getattr(getattr(predictor, "model", None), "metadata", None) or {}
    config = (meta.get("training") or {}).get("config") or {}
    return {"name": weights.stem if onnx_path else weights.parent.name, "sha256": digest.hexdigest()[:12],
            "experiment": str(config.get("experiment_name", "")), "backbone": str((meta.get("model") or {}).get("backbone", "")),
            "backend": "onnx" if onnx_path else "torch"}


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


def cmd_export(args) -> int:
    from .model import DEFAULT_CHECKPOINT, Predictor
    from .onnx_model import OnnxExportError, OnnxPredictor, export_onnx, parity_windows

    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
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


def _alert_sink(tracker, display, writer):
    """A timeline sink that runs the alert rules and shows/writes what they raise and clear."""
    def sink(event: dict) -> None:
        for alert in tracker.update(event):
            verb = "ALERT" if alert["state"] == "raised" else "alert cleared"
            display.log(f"{verb}: {alert['channel']} {alert['rule']} at {alert['t']:.1f} s")
            if writer:
                writer.write(alert)
    return sink


def cmd_replay(args) -> int:
    from .alerts import AlertTracker
    from .analyzer import Analyzer, AnalyzerConfig
    from .compliance import ChannelSelectionError, analysed_channels
    from .audio import SAMPLE_RATE, load_audio
    from .dashboard import DashboardInfo, make_display
    from .stream import StreamConfig, StreamWindower
    from .timeline import JsonlWriter

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
    try:
        keep = analysed_channels(names, args.analyse)
    except ChannelSelectionError as exc:
        raise UsageError(str(exc)) from None
    audio, names = audio[list(keep)], tuple(names[i] for i in keep)  # the rest is never analysed
    predictor = _load_predictor(args)
    stream = args.stream or Path(args.file).stem
    writer = JsonlWriter(args.events) if args.events else None
    info = DashboardInfo(source=f"replay {args.file}", stream=stream, channels=names,
                         device=str(predictor.device), hop_seconds=args.hop)
    display = make_display(info, enabled=not args.no_dashboard)
    sinks = [display.update] + ([writer.write] if writer else [])
    if args.alert:
        sinks.append(_alert_sink(AlertTracker(args.alert, stream), display, writer))
    analyzer = Analyzer(predictor.predict, stream, names, AnalyzerConfig(smooth=args.smooth, vad=_vad(args)),
                        args.hop, sinks)
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
            idle_timeout=args.idle_timeout, max_call_seconds=args.max_call_minutes * 60,
            max_message_bytes=args.max_message_kb * 1024,
            twilio_auth_token=_env_default(args.twilio_auth_token, "TWILIO_AUTH_TOKEN"),
            public_url=args.public_url, audiohook_keys=keys,
            worker=WorkerConfig(max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                                max_pending=max(4096, args.max_batch)), warm_up=args.warm_up,
            analyse=args.analyse, record_dir=Path(args.record) if args.record else None,
            events_retention_days=args.events_retention_days, alerts=tuple(args.alert))
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for flag, directory in (("--events-dir", config.events_dir), ("--record", config.record_dir)):
        if directory is not None and directory.exists() and not directory.is_dir():
            raise UsageError(f"{flag} is not a directory: {directory}")
    # JSON logs are for a log pipeline: everything at INFO. Text logs stay quiet unless --verbose.
    configure_logs(args.log_format, logging.INFO if args.verbose or args.log_format == "json" else logging.WARNING)
    if args.no_model:
        predict, device, model_info = constant_predictor(), "none (--no-model)", {"name": "none"}
    else:
        predictor = _load_predictor(args)
        predict, device, model_info = predictor.predict, str(predictor.device), _model_info(predictor, args)
    server = EmoServer(config, predict, device=device, model_info=model_info)

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
              f"/v1/events); model on {device}; {auth}", file=sys.stderr, flush=True)
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
    return 0


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
              f"{errors[0] if errors else reason})", file=sys.stderr)
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
            asyncio.run(watch(args.url, view.update, _env_default(args.token, "EMOSTREAM_TOKEN"), args.call_id))
    except InvalidStatus as exc:
        raise UsageError(f"server refused the connection: HTTP {exc.response.status_code}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise UsageError(f"cannot connect to {args.url}: {exc or type(exc).__name__}") from None
    return 0


def cmd_mic(args) -> int:
    from .mic import MicError, run_mic_command

    try:
        return run_mic_command(args, _load_predictor)
    except MicError as exc:
        raise UsageError(str(exc)) from None


COMMANDS = {"replay": cmd_replay, "classify": cmd_classify, "export": cmd_export, "serve": cmd_serve, "send": cmd_send,
            "watch": cmd_watch, "mic": cmd_mic}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``emostream`` console script."""
    from .audio import AudioError
    from .model import CheckpointError
    from .vad import VadUnavailable

    try:
        args = build_parser().parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    except (AudioError, CheckpointError, VadUnavailable, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("emostream: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
