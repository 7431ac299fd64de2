"""The parser of the live commands: ``serve`` (with its Ray Serve options), ``send``, ``watch`` and ``mic``."""

from __future__ import annotations

from ..argtypes import fraction as _fraction
from ..argtypes import name_list
from ..argtypes import positive as _positive
from ..compliance import ANALYSE_CHOICES
from .common import alert_args, backend_args, model_device, port, vad_args


def workers_arg(text: str) -> int:
    """``--workers``: a count >= 1 or ``auto`` (the cores this process may run on)."""
    import argparse
    import os

    if text == "auto":
        try:
            return len(os.sched_getaffinity(0))
        except AttributeError:  # not Linux
            return os.cpu_count() or 1
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number or auto, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def ray_args(sv) -> None:
    """``serve --ray``: inference on a Ray Serve deployment (emostream[scale])."""
    g = sv.add_argument_group("Ray Serve (emostream[scale])")
    g.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="run the model on a Ray Serve deployment: no ADDRESS starts a new local Ray instance, 'auto' "
        "joins this node's cluster, HOST:PORT a cluster's head, ray://HOST:10001 a remote one "
        "(Ray Client)",
    )
    g.add_argument(
        "--ray-replicas",
        default="1",
        metavar="N|MIN:MAX",
        help="model replicas: N, or MIN:MAX to autoscale between them (default 1)",
    )
    g.add_argument(
        "--ray-target-requests",
        type=_positive(float),
        default=16.0,
        help="autoscaling: ongoing requests per replica to aim for (default 16; one request = one call's new windows)",
    )
    g.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs per replica (default 1)")
    g.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs per replica (default 0; e.g. 1 or 0.5)")
    g.add_argument(
        "--ray-app",
        default="emostream",
        help="Serve application name (default emostream); a running one is reused, so several front ends share it",
    )
    g.add_argument("--ray-redeploy", action="store_true", help="replace a running application with these settings")


def add_live_commands(sub, model_args, stream_args) -> None:
    """The live sources of issue #4: serve, send, watch, mic."""
    sv = sub.add_parser("serve", help="websocket server for live calls (raw PCM, Twilio, AudioHook)")
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    sv.add_argument("--port", type=port, default=8765, help="port (default 8765; 0 = any free port)")
    sv.add_argument(
        "--token",
        default=None,
        help="required token (Bearer, X-API-KEY or ?token=); default: $EMOSTREAM_TOKEN, else none",
    )
    sv.add_argument("--max-calls", type=_positive(int), default=100, help="concurrent calls (default 100)")
    sv.add_argument(
        "--workers",
        type=workers_arg,
        default=1,
        metavar="N|auto",
        help="front-end processes on the one port (default 1; auto = this machine's cores). More than one "
        "starts a fleet: one model on a Ray Serve deployment and one view of every call on every front "
        "end (needs emostream[scale]; --ray ADDRESS joins a cluster instead of starting a local one)",
    )
    sv.add_argument("--events-dir", metavar="DIR", help="append each call's timeline to DIR/<call_id>.jsonl")
    sv.add_argument("--dashboard", action="store_true", help="show the supervisor dashboard of all calls")
    sv.add_argument("--hop", type=_positive(float), default=1.0, help="seconds between windows (default 1.0)")
    sv.add_argument(
        "--min-seconds", type=_positive(float), default=1.0, help="audio before the first window (default 1.0)"
    )
    sv.add_argument(
        "--smooth", type=_fraction, default=1.0, help="EMA weight of the newest window in (0, 1] (default 1)"
    )
    vad_args(sv)
    sv.add_argument(
        "--idle-timeout",
        type=_positive(float),
        default=60.0,
        help="close calls that send no audio this long (s, default 60; close 1001)",
    )
    sv.add_argument(
        "--start-timeout",
        type=_positive(float),
        default=5.0,
        help="close connections that have not started a call this long after connecting (s, default 5; close 1008)",
    )
    sv.add_argument(
        "--max-unstarted",
        type=_positive(int),
        default=32,
        help="connections waiting for their call to start, at most (default 32; more get HTTP 503)",
    )
    sv.add_argument(
        "--max-call-minutes",
        type=_positive(float),
        default=240.0,
        help="longest call in minutes of audio, gaps included (default 240)",
    )
    sv.add_argument(
        "--max-message-kb", type=_positive(int), default=256, help="largest websocket message in KiB (default 256)"
    )
    sv.add_argument("--max-batch", type=_positive(int), default=32, help="windows per model call (default 32)")
    sv.add_argument(
        "--max-wait-ms", type=float, default=10.0, help="how long a window waits for a fuller batch (default 10)"
    )
    sv.add_argument(
        "--twilio-auth-token",
        default=None,
        help="validate X-Twilio-Signature with this auth token (default: $TWILIO_AUTH_TOKEN)",
    )
    sv.add_argument(
        "--public-url",
        default=None,
        help="the wss://host[:port] Twilio connects to, when behind a proxy (for signatures)",
    )
    sv.add_argument(
        "--audiohook-key",
        action="append",
        default=[],
        metavar="KEY:SECRET",
        help="AudioHook API key and base64 client secret; requests must be signed (repeatable)",
    )
    sv.add_argument(
        "--warm-up",
        action="store_true",
        help="run the model once per batch size before listening (first calls are not slow)",
    )
    sv.add_argument(
        "--no-model",
        action="store_true",
        help="answer every window with a fixed Neutral distribution (bridge and load tests, no model)",
    )
    sv.add_argument("--verbose", action="store_true", help="log every connection")
    sv.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="text (default) or json: one JSON object per line with the call id; never audio or tokens",
    )
    sv.add_argument(
        "--analyse",
        choices=ANALYSE_CHOICES,
        default="customer",
        help="channels to analyse: customer (default; AudioHook external, Twilio inbound, the pcm "
        "channel named 'customer': events name it customer on every protocol), agent, or all. In the EU, "
        "analysing staff is prohibited "
        "(AI Act Art. 5(1)(f)): keep 'customer'",
    )
    sv.add_argument(
        "--record",
        metavar="DIR",
        default=None,
        help="also write each call's audio as received to DIR/<call_id>.wav (off by default: "
        "the server stores no audio)",
    )
    sv.add_argument(
        "--events-retention-days",
        type=_positive(float),
        default=None,
        metavar="DAYS",
        help="delete timelines in --events-dir older than DAYS (checked at start and hourly)",
    )
    sv.add_argument(
        "--record-retention-days",
        type=_positive(float),
        default=None,
        metavar="DAYS",
        help="delete recordings in --record DIR older than DAYS (checked at start and hourly)",
    )
    alert_args(sv)
    model_args(sv)
    ray_args(sv)

    sd = sub.add_parser("send", help="stream a recorded call to a server as a bridge would and print the events")
    sd.add_argument("file", help="the recorded call to stream (any format replay reads; stereo: one party per channel)")
    sd.add_argument("url", help="server, e.g. ws://127.0.0.1:8765")
    sd.add_argument(
        "--protocol",
        choices=("pcm", "twilio", "audiohook"),
        default="pcm",
        help="the bridge to act as: pcm (raw PCM on /v1/pcm, default), twilio (Media Streams on "
        "/v1/twilio, 8 kHz mu-law) or audiohook (Genesys AudioHook on /v1/audiohook)",
    )
    sd.add_argument("--fast", action="store_true", help="send as fast as the server takes it (default: real time)")
    sd.add_argument("--token", default=None, help="server token (default: $EMOSTREAM_TOKEN)")
    sd.add_argument("--call-id", default=None, help="call id (default: file name for pcm, random for the others)")
    sd.add_argument("--encoding", choices=("pcm_s16le", "mulaw", "alaw"), default="pcm_s16le", help="pcm only")
    sd.add_argument(
        "--rate",
        type=int,
        choices=(8000, 16000),
        default=None,
        help="pcm only: sample rate (default 16000 for pcm_s16le, 8000 for mulaw/alaw)",
    )
    sd.add_argument(
        "--channel-names",
        type=name_list,
        help="the file's channels, comma-separated (default: ch0 for mono, agent,customer for stereo); "
        "pcm sends them as names, twilio/audiohook send the customer as inbound/external",
    )
    sd.add_argument("--audiohook-key", default=None, metavar="KEY:SECRET", help="audiohook only: sign the request")
    sd.add_argument("--quiet", action="store_true", help="print only the summary")

    w = sub.add_parser("watch", help="supervisor dashboard of every live call on a server")
    w.add_argument("url", help="server, e.g. ws://127.0.0.1:8765")
    w.add_argument("--token", default=None, help="server token (default: $EMOSTREAM_TOKEN)")
    w.add_argument("--call-id", default=None, help="only this call")
    w.add_argument("--no-dashboard", action="store_true", help="plain lines instead of the dashboard")

    m = sub.add_parser("mic", help="analyse a microphone (or any audio input) live")
    m.add_argument(
        "--input-device",
        dest="input_device",
        default=None,
        metavar="N|NAME",
        help="the sound card: input device index or (part of its) name (see --list-devices); "
        "default: the system default input",
    )
    m.add_argument("--list-devices", action="store_true", help="list input devices and exit")
    m.add_argument("--rate", type=_positive(int), default=None, help="capture rate (default: the device's)")
    m.add_argument("--channels", type=int, choices=(1, 2), default=1, help="channels to capture (default 1)")
    m.add_argument("--seconds", type=_positive(float), default=None, help="stop after this much audio")
    stream_args(m)
    m.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the shipped model)")
    m.add_argument(
        "--device",
        "--model-device",
        dest="device",
        default="auto",
        type=model_device,
        help="the model's device, as in every command: auto (cuda when present), cpu or cuda",
    )
    m.add_argument(
        "--fp32",
        action="store_true",
        help="no reduced precision: torch in fp32 (default: int8 on a CPU, see --backend; fp16 autocast on CUDA; "
        "--backend torch: bf16 on a CPU with fast bf16 kernels, else fp32)",
    )
    backend_args(m)
