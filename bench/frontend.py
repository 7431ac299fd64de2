"""Front-end cost per call: how many real-time calls one core's front end could carry (issue #44).

Everything ``emostream serve`` does for a call except the model: N server calls
(:class:`~emostream.live_call.LiveCall`: resampler, windower, speech gate, analyzer, metrics) fed
20 ms frames (Twilio's size) as fast as the event loop takes them, one task per call (as the
server's connection handlers), with a constant model (the :class:`~emostream.worker.InferenceWorker`
answers every window at once with fixed probabilities, so no inference cost is counted). The figure
is call-seconds of audio processed per CPU-second of this process: the real-time calls one core
could carry if the model cost nothing. Run with the speech gate on (Silero, serve's default) and off.
At 8 kHz (``--rate``, the default: a phone bridge) the gate runs Silero's 8 kHz network.

    python bench/frontend.py [--calls 50] [--seconds 20] [--frame-ms 20] [--vads silero,off]
                             [--rate 8000] [--driver tasks|gather] [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

from emostream import CLASSES
from emostream.audio import SAMPLE_RATE, load_mono
from emostream.live_call import LiveCall
from emostream.metrics import ServerMetrics
from emostream.protocols import Start
from emostream.server_config import ServerConfig
from emostream.vad import VadConfig
from emostream.worker import InferenceWorker, WorkerConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "call_mono.flac"
CONSTANT = np.full(len(CLASSES), 1.0 / len(CLASSES), dtype=np.float32)


def constant_model(windows: np.ndarray) -> np.ndarray:
    """Fixed probabilities for every window: the model's cost left out."""
    return np.tile(CONSTANT, (len(windows), 1))


def call_audio(source: np.ndarray, seconds: float, offset: int, rate: int) -> np.ndarray:
    """``seconds`` of the source from ``offset`` (looped), at ``rate`` (8 kHz: a phone bridge's rate)."""
    n = int(seconds * SAMPLE_RATE)
    x = source[(offset + np.arange(n)) % len(source)].astype(np.float32)
    if rate != SAMPLE_RATE:
        from scipy.signal import resample_poly

        x = resample_poly(x, rate, SAMPLE_RATE).astype(np.float32)
    return x


async def run(
    calls: int, seconds: float, frame_ms: float, vad: str, rate: int, hop: float, driver: str = "tasks"
) -> dict:
    """Feed ``calls`` calls of ``seconds`` each, frame by frame; CPU time of this process. ``driver``:
    ``tasks`` (one task per call, as the server) or ``gather`` (issue #44's baseline: every frame
    step gathers all calls' pushes, a new task per frame and call)."""
    worker = InferenceWorker(constant_model, WorkerConfig(max_batch=64, max_wait_ms=1.0, max_pending=1 << 16))
    await worker.start()
    cfg = ServerConfig(hop_seconds=hop, vad=VadConfig.named(vad), worker=worker.config)
    metrics = ServerMetrics(lambda: {"live_calls": {}, "queue": 0, "subscribers": 0, "ready": 1, "dropped": 0})
    source = load_mono(SOURCE)
    rng = np.random.default_rng(0)
    frame = int(round(frame_ms / 1000 * rate))
    audio = [call_audio(source, seconds, int(o), rate) for o in rng.integers(0, 60 * SAMPLE_RATE, calls)]
    live = [
        LiveCall(Start(f"call-{i}", ("customer",), rate, persist=False), "pcm", worker, None, cfg, metrics)
        for i in range(calls)
    ]
    n_frames = min(len(a) for a in audio) // frame
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if driver == "gather":  # all calls' next frames gathered at once: a task per frame and call
        events = 0
        for k in range(n_frames):
            frames = (c.push([(0, a[k * frame : (k + 1) * frame])]) for c, a in zip(live, audio))
            events += sum(len(e) for e in await asyncio.gather(*frames))
    else:  # one task per call, as serve's connection handlers; each frame one turn of the loop

        async def feed(call: LiveCall, x: np.ndarray) -> int:
            n = 0
            for k in range(n_frames):
                n += len(await call.push([(0, x[k * frame : (k + 1) * frame])]))
                await asyncio.sleep(0)  # as if the next frame came from the socket
            return n

        events = sum(await asyncio.gather(*(feed(c, a) for c, a in zip(live, audio))))
    for c in live:
        await c.finish("completed")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    await worker.stop()
    audio_seconds = calls * n_frames * frame / rate
    return {
        "calls": calls,
        "vad": vad,
        "rate": rate,
        "frame_ms": frame_ms,
        "hop": hop,
        "driver": driver,
        "audio_seconds": round(audio_seconds, 1),
        "events": events,
        "wall_s": round(wall, 3),
        "cpu_s": round(cpu, 4),
        "call_seconds_per_cpu_second": round(audio_seconds / cpu, 1),
        "realtime_calls_per_core": int(audio_seconds / cpu),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=50)
    p.add_argument("--seconds", type=float, default=20.0, help="audio per call")
    p.add_argument("--frame-ms", type=float, default=20.0)
    p.add_argument("--vads", default="silero,off")
    p.add_argument("--rate", type=int, default=8000, help="the calls' sample rate (8000: Twilio, most bridges)")
    p.add_argument("--hop", type=float, default=1.0)
    p.add_argument(
        "--driver",
        choices=("tasks", "gather"),
        default="tasks",
        help="tasks: one task per call, each frame a turn of the event loop (as serve); gather: a new task "
        "per frame and call (the first baseline's harness)",
    )
    p.add_argument("--json", dest="json_out")
    p.add_argument("--quick", action="store_true", help="5 calls of 4 s (seconds)")
    args = p.parse_args(argv)
    if args.quick:
        args.calls, args.seconds = 5, 4.0
    rows = []
    for vad in args.vads.split(","):
        rows.append(asyncio.run(run(args.calls, args.seconds, args.frame_ms, vad, args.rate, args.hop, args.driver)))
        print(json.dumps(rows[-1]), flush=True)
    print("\n| speech gate | calls | rate | frame | call-seconds per CPU-second (real-time calls per core) |")
    print("|---|---|---|---|---|")
    for r in rows:
        rate, per_cpu = f"{r['rate']} Hz", r["call_seconds_per_cpu_second"]
        print(f"| {r['vad']} | {r['calls']} | {rate} | {r['frame_ms']:g} ms | {per_cpu} |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"date": str(date.today()), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
