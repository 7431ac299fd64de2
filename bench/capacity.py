"""Capacity: how many simultaneous real-time calls one machine analyses, and how fast events come.

N simulated calls stream real speech (``examples/call_mono.flac``, each call from its own offset,
looped) at real-time pace in 20 ms frames, each call starting at a random phase of the hop, through
the live pipeline of ``emostream serve``:

- ``inproc``: every call is a server :class:`~emostream.live_call.LiveCall` (resampler, windower,
  speech gate, analyzer) fed in one event loop, all sharing one :class:`InferenceWorker`;
- ``ws``: ``emostream serve`` runs as its own process and every call is a ``/v1/pcm`` websocket
  client on 127.0.0.1 (this script is the load generator; its CPU use is reported too).

Per N: event latency = wall time the event is delivered (returned to the connection handler
in-process; received by the client over websocket) minus the wall time the window's last sample was
due, p50/p95/p99; CPU use of the analysing process in cores (2 = both cores of this machine);
backlog = windows due but not yet delivered (the largest seen); model batches. A run is real time
when p99 latency stays below the hop (every event arrives before the call's next window is due);
the table also marks the issue's target (p99 < 300 ms). Sweeps stop at the first N that is not real time.
Backend ``torch-bf16`` is the torch model with mixed precision (``serve --backend torch``; ``serve``'s
default until the int8 model, ``onnx-int8``, became a CPU's default): bf16 on a CPU with fast bf16
kernels, fp32 on one without (each row's ``precision`` says which ran).

    python bench/capacity.py [--modes inproc,ws] [--backends torch-bf16,torch-fp32,onnx,onnx-int8] [--hops 1.0,0.5]
                             [--calls 1,10,20,40,60,80] [--seconds 30] [--vad off] [--device cpu|cuda]
                             [--onnx MODEL.onnx] [--int8 INT8.onnx] [--json OUT] [--quick]

Backend ``onnx-int8`` is ONNX Runtime on an export with int8 convolutions (``emostream export --int8``).
Backend ``none`` is ``serve --no-model`` (a fixed Neutral answer: the front end alone; ``ws`` only).
``--workers N`` runs ``serve --workers N`` (a fleet of N front-end processes on the port, issue #44);
the server's CPU is then that of its whole process tree (front ends, supervisor, Ray). ``--frame-ms``
sets the frame length the calls send (20 ms as Twilio; AudioHook and many bridges send 100 ms or more),
``--compression none`` makes them send raw frames instead of offering permessage-deflate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from serve_process import ServeProcess

from emostream.audio import SAMPLE_RATE, float32_to_int16, load_mono
from emostream.live_call import LiveCall
from emostream.metrics import ServerMetrics
from emostream.model import precision_name
from emostream.protocols import Start
from emostream.server_config import ServerConfig
from emostream.vad import VadConfig
from emostream.worker import InferenceWorker, WorkerConfig

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "call_mono.flac"
BACKENDS = ("torch-bf16", "torch-fp32", "onnx", "onnx-int8", "none")
TARGET_P99_MS = 300.0


@dataclass(frozen=True)
class RunConfig:
    """One measurement: a mode, a backend, a hop and a number of calls."""

    mode: str = "inproc"  # inproc | ws
    backend: str = "torch-bf16"  # torch-bf16 | torch-fp32 | onnx | onnx-int8 (onnx_path: the int8 export)
    hop: float = 1.0
    calls: int = 1
    seconds: float = 30.0  # audio per call
    frame_ms: float = 20.0
    vad: str = "off"
    max_batch: int = 32
    max_wait_ms: float = 10.0
    seed: int = 0
    device: str = "cpu"  # cpu | cuda (torch backends; torch-bf16 is fp16 autocast there)
    workers: int = 1  # serve --workers (ws mode)
    compression: str = "deflate"  # the calls' websocket compression offer: deflate (the library's default) | none


def call_audio(source: np.ndarray, seconds: float, offset: int) -> np.ndarray:
    """``seconds`` of the source starting at ``offset``, looped."""
    n = int(seconds * SAMPLE_RATE)
    idx = (offset + np.arange(n)) % len(source)
    return source[idx].astype(np.float32)


def windows_due(elapsed: float, hop: float, total: int, min_seconds: float = 1.0) -> int:
    """Windows of a call whose end lies ``elapsed`` seconds or more in the past (schedule of stream.py)."""
    hop_n = int(round(hop * SAMPLE_RATE))
    first = max(hop_n, -(-int(round(min_seconds * SAMPLE_RATE)) // hop_n) * hop_n) / SAMPLE_RATE
    if elapsed < first:
        return 0
    return min(total, int((elapsed - first) / hop + 1e-9) + 1)


class Tracker:
    """Latencies, deliveries and backlog of one run (all calls)."""

    def __init__(self, cfg: RunConfig, t0s: np.ndarray, windows_per_call: int):
        self.cfg, self.t0s, self.total = cfg, t0s, windows_per_call
        self.latencies: list[float] = []
        self.t_ends: list[float] = []  # the window's end in its call (seconds of audio)
        self.delivered = np.zeros(len(t0s), dtype=np.int64)
        self.max_backlog = 0

    def event(self, call: int, t_end: float, now: float) -> None:
        self.latencies.append(now - (self.t0s[call] + t_end))
        self.t_ends.append(t_end)
        self.delivered[call] += 1

    def backlog(self, now: float) -> int:
        due = sum(windows_due(now - t0, self.cfg.hop, self.total) for t0 in self.t0s)
        return int(due - self.delivered.sum())

    async def sample(self, loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self.max_backlog = max(self.max_backlog, self.backlog(loop.time()))
            try:
                await asyncio.wait_for(stop.wait(), 0.1)
            except asyncio.TimeoutError:
                pass


def run_precision(backend: str, device: str = "cpu") -> str:
    """What a backend computes in on ``device``: ONNX Runtime and torch-fp32 in fp32, onnx-int8's
    convolutions in int8, torch-bf16 in what mixed precision chooses there
    (:func:`emostream.model.precision_name`: fp16 on CUDA)."""
    if backend in ("none", "onnx-int8"):
        return backend.removeprefix("onnx-")
    return precision_name(torch.device(device), backend == "torch-bf16")


def summarize(cfg: RunConfig, tracker: Tracker, wall: float, cpu: float, extra: dict) -> dict:
    lat = np.array(tracker.latencies) * 1000 if tracker.latencies else np.array([np.nan])
    p50, p95, p99 = (float(np.percentile(lat, q)) for q in (50, 95, 99))
    expected = tracker.total * cfg.calls
    row = {
        **asdict(cfg),
        "events": int(len(tracker.latencies)),
        "expected_events": int(expected),
        "p50_ms": round(p50, 1),
        "p95_ms": round(p95, 1),
        "p99_ms": round(p99, 1),
        "max_ms": round(float(np.nanmax(lat)), 1),
        **late_profile(tracker),
        "cpu_cores": round(cpu / wall, 2),
        "max_backlog": tracker.max_backlog,
        "precision": run_precision(cfg.backend, cfg.device),
        **extra,
    }
    row["realtime"] = bool(len(tracker.latencies) >= 0.98 * expected and p99 < 1000 * cfg.hop)
    row["meets_target"] = bool(row["realtime"] and p99 < TARGET_P99_MS)
    return row


def late_profile(tracker: Tracker, bucket: float = 5.0) -> dict:
    """When late events happened: events over the 300 ms target per ``bucket`` seconds of call time
    (the first bucket holds the start, when every call begins within one hop), and p99 without the
    first bucket (the steady state)."""
    if not tracker.latencies:
        return {}
    lat = np.array(tracker.latencies) * 1000
    t = np.array(tracker.t_ends)
    late = np.bincount((t[lat > TARGET_P99_MS] // bucket).astype(int), minlength=int(t.max() // bucket) + 1)
    steady = lat[t >= bucket]
    return {
        "late_per_5s": [int(x) for x in late],
        "p99_after_5s_ms": round(float(np.percentile(steady, 99)), 1) if len(steady) else None,
    }


def schedule(cfg: RunConfig, loop: asyncio.AbstractEventLoop, lead: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(cfg.seed)
    t0s = loop.time() + lead + rng.uniform(0, cfg.hop, cfg.calls)
    offsets = rng.integers(0, 60 * SAMPLE_RATE, cfg.calls)
    return t0s, offsets


# --- in-process ----------------------------------------------------------------------------------


async def run_inproc(cfg: RunConfig, predict, source: np.ndarray, worker: InferenceWorker) -> dict:
    loop = asyncio.get_running_loop()
    server_cfg = ServerConfig(hop_seconds=cfg.hop, vad=VadConfig.named(cfg.vad), worker=worker.config)
    metrics = ServerMetrics(lambda: {"live_calls": {}, "queue": 0, "subscribers": 0, "ready": 1, "dropped": 0})
    t0s, offsets = schedule(cfg, loop)
    frame = int(round(cfg.frame_ms / 1000 * SAMPLE_RATE))
    n_frames = int(cfg.seconds * SAMPLE_RATE) // frame
    tracker = Tracker(cfg, t0s, windows_due(n_frames * frame / SAMPLE_RATE, cfg.hop, 10**9))

    async def one(i: int) -> None:
        # a mono customer stream, with the server's metrics (as in emostream serve)
        call = LiveCall(
            Start(f"call-{i}", ("customer",), SAMPLE_RATE, persist=False), "pcm", worker, None, server_cfg, metrics
        )
        x = call_audio(source, n_frames * frame / SAMPLE_RATE, int(offsets[i]))
        for k in range(n_frames):
            delay = t0s[i] + (k + 1) * frame / SAMPLE_RATE - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            events = await call.push([(0, x[k * frame : (k + 1) * frame])])
            now = loop.time()
            for e in events:
                tracker.event(i, e["t_end"], now)
        await call.finish("completed")

    stop = asyncio.Event()
    sampler = asyncio.create_task(tracker.sample(loop, stop))
    stats0 = (worker.stats.batches, worker.stats.windows, worker.stats.busy_seconds)
    start_wall, start_cpu = loop.time(), time.process_time()
    await asyncio.gather(*(one(i) for i in range(cfg.calls)))
    wall, cpu = loop.time() - start_wall, time.process_time() - start_cpu
    stop.set()
    await sampler
    batches = worker.stats.batches - stats0[0]
    windows = worker.stats.windows - stats0[1]
    extra = {
        "batches": batches,
        "mean_batch": round(windows / max(1, batches), 2),
        "model_busy": round((worker.stats.busy_seconds - stats0[2]) / wall, 2),
        "client_cpu_cores": None,
    }
    return summarize(cfg, tracker, wall, cpu, extra)


# --- over websocket -------------------------------------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live descendants (Linux /proc): a fleet's front ends and
    Ray's processes count with the server."""
    total = 0.0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
            for task in Path(f"/proc/{p}/task").iterdir():
                stack += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


class ServerProcess(ServeProcess):
    """``emostream serve`` in a child process on a free port of 127.0.0.1."""

    stop_seconds = 30.0

    def __init__(self, cfg: RunConfig, onnx_path: str | None, max_calls: int):
        cmd = [
            sys.executable,
            "-m",
            "emostream",
            "serve",
            "--port",
            "0",
            "--max-calls",
            str(max_calls),
            "--max-unstarted",  # every call connects before any starts: above serve's default 32, 503s
            str(max(32, max_calls)),
            "--hop",
            str(cfg.hop),
            "--vad",
            cfg.vad,
            "--max-batch",
            str(cfg.max_batch),
            "--max-wait-ms",
            str(cfg.max_wait_ms),
            "--warm-up",
            "--device",
            cfg.device,
            "--idle-timeout",
            "120",
            "--workers",
            str(cfg.workers),
        ]
        if cfg.backend == "none":
            cmd.append("--no-model")
        elif cfg.backend == "torch-fp32":
            cmd.append("--fp32")
        elif cfg.backend == "torch-bf16":
            cmd += ["--backend", "torch"]  # serve's default on a CPU is the int8 model (emostream.int8)
        elif cfg.backend in ("onnx", "onnx-int8"):
            cmd += ["--backend", "onnx", "--onnx", str(onnx_path)]
        super().__init__(cmd)
        port = self.port
        self.url = f"ws://127.0.0.1:{port}/v1/pcm"
        while time.monotonic() < self.deadline:  # the model warms up after the server listens: wait for /readyz
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                time.sleep(0.2)
        self.keep_reading()


async def run_ws(cfg: RunConfig, server: ServerProcess, source: np.ndarray) -> dict:
    from websockets.asyncio.client import connect

    loop = asyncio.get_running_loop()
    frame = int(round(cfg.frame_ms / 1000 * SAMPLE_RATE))
    n_frames = int(cfg.seconds * SAMPLE_RATE) // frame
    compression = "deflate" if cfg.compression == "deflate" else None
    sockets = [await connect(server.url, max_size=2**22, compression=compression) for _ in range(cfg.calls)]
    t0s, offsets = schedule(cfg, loop, lead=0.5)
    tracker = Tracker(cfg, t0s, windows_due(n_frames * frame / SAMPLE_RATE, cfg.hop, 10**9))
    errors: list[str] = []

    async def one(i: int, ws) -> None:
        pcm = (
            float32_to_int16(call_audio(source, n_frames * frame / SAMPLE_RATE, int(offsets[i])))
            .astype("<i2")
            .tobytes()
        )
        await ws.send(
            json.dumps(
                {
                    "type": "start",
                    "call_id": f"cap-{cfg.seed}-{cfg.calls}-{i}",
                    "sample_rate": SAMPLE_RATE,
                    "channels": 1,
                    "encoding": "pcm_s16le",
                    "channel_names": ["customer"],
                }
            )
        )

        async def receive() -> None:
            async for message in ws:
                m = json.loads(message)
                if m.get("type") == "event":
                    tracker.event(i, m["t_end"], loop.time())
                elif m.get("type") == "error":
                    errors.append(m.get("message", ""))
                elif m.get("type") == "summary":
                    return

        reader = asyncio.create_task(receive())
        step = 2 * frame
        for k in range(n_frames):
            delay = t0s[i] + (k + 1) * frame / SAMPLE_RATE - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await ws.send(pcm[k * step : (k + 1) * step])
        await ws.send(json.dumps({"type": "stop"}))
        await asyncio.wait_for(reader, 120)
        await ws.close()

    stop = asyncio.Event()
    sampler = asyncio.create_task(tracker.sample(loop, stop))
    start_wall, start_cpu, start_srv = loop.time(), time.process_time(), proc_cpu_seconds(server.proc.pid)
    await asyncio.gather(*(one(i, ws) for i, ws in enumerate(sockets)))
    wall = loop.time() - start_wall
    cpu, srv = time.process_time() - start_cpu, proc_cpu_seconds(server.proc.pid) - start_srv
    stop.set()
    await sampler
    row = summarize(
        cfg,
        tracker,
        wall,
        srv,
        {"batches": None, "mean_batch": None, "model_busy": None, "client_cpu_cores": round(cpu / wall, 2)},
    )
    if errors:
        row["errors"] = errors[:3]
    return row


# --- sweeps ----------------------------------------------------------------------------------------


def load_predict(backend: str, onnx_path: str | None, device: str = "cpu"):
    if backend in ("onnx", "onnx-int8"):
        from emostream.onnx_model import OnnxPredictor

        return OnnxPredictor.from_file(onnx_path, device=device).predict
    from emostream.model import Predictor

    return Predictor.from_checkpoint(device=device, mixed_precision=backend == "torch-bf16").predict


def sweep(
    base: RunConfig, calls: list[int], source: np.ndarray, onnx_path: str | None, keep_going: bool, show
) -> list[dict]:
    """Runs of increasing N for one mode/backend/hop; stops after the first that is not real time."""
    rows = []

    async def inproc() -> None:
        worker = InferenceWorker(
            load_predict(base.backend, onnx_path, base.device),
            WorkerConfig(max_batch=base.max_batch, max_wait_ms=base.max_wait_ms, max_pending=max(4096, base.max_batch)),
        )
        await worker.start()
        await worker.warm_up()
        try:
            for n in calls:
                rows.append(await run_inproc(replace(base, calls=n), worker.predict, source, worker))
                show(rows[-1])
                if not rows[-1]["realtime"] and not keep_going:
                    break
        finally:
            await worker.stop()

    if base.mode == "inproc":
        asyncio.run(inproc())
        return rows
    server = ServerProcess(base, onnx_path, max(calls) + 8)
    try:
        for n in calls:
            rows.append(asyncio.run(run_ws(replace(base, calls=n), server, source)))
            show(rows[-1])
            if not rows[-1]["realtime"] and not keep_going:
                break
    finally:
        server.stop()
    return rows


def machine() -> str:
    import torch
    from inference import cpu_name  # bench/inference.py, beside this script

    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu_name()}, {os.cpu_count()} cores{gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads)"


def markdown(rows: list[dict]) -> str:
    out = [
        "| mode | backend | workers | hop s | calls | p50 ms | p95 ms | p99 ms | CPU cores (client) | max backlog | "
        "mean batch | real time | p99 < 300 ms |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        client = f" ({r['client_cpu_cores']:.2f})" if r.get("client_cpu_cores") is not None else ""
        mean_batch = "" if r.get("mean_batch") is None else f"{r['mean_batch']:.1f}"
        out.append(
            f"| {r['mode']} | {r['backend']} ({r['precision']}) | {r.get('workers', 1)} | {r['hop']:g} | "
            f"{r['calls']} | {r['p50_ms']:.0f} | "
            f"{r['p95_ms']:.0f} | {r['p99_ms']:.0f} | {r['cpu_cores']:.2f}{client} | {r['max_backlog']} | "
            f"{mean_batch} | {'yes' if r['realtime'] else 'no'} | {'yes' if r['meets_target'] else 'no'} |"
        )
    return "\n".join(out)


def capacity_summary(rows: list[dict]) -> list[dict]:
    """Per mode/backend/hop: the largest N real time and the largest N meeting the target."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["mode"], r["backend"], r["hop"]), []).append(r)
    out = []
    for (mode, backend, hop), rs in groups.items():
        rt = [r["calls"] for r in rs if r["realtime"]]
        tg = [r["calls"] for r in rs if r["meets_target"]]
        single = next((r["p50_ms"] for r in rs if r["calls"] == 1), None)
        out.append(
            {
                "mode": mode,
                "backend": backend,
                "hop": hop,
                "max_realtime_calls": max(rt, default=0),
                "max_calls_p99_under_300ms": max(tg, default=0),
                "single_call_p50_ms": single,
                "largest_tried": max(r["calls"] for r in rs),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--modes", default="inproc,ws")
    p.add_argument("--backends", default=",".join(BACKENDS))
    p.add_argument("--hops", default="1.0,0.5")
    p.add_argument("--calls", default="1,10,20,40,60,80,100")
    p.add_argument("--seconds", type=float, default=30.0, help="audio per call and run")
    p.add_argument("--vad", default="off", choices=("off", "energy", "silero"))
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-wait-ms", type=float, default=10.0)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the model runs (serve's --device)")
    p.add_argument("--onnx", default=None, help="exported model for the onnx backend (default: export one now)")
    p.add_argument("--int8", default=None, help="int8 export for the onnx-int8 backend (emostream export --int8)")
    p.add_argument("--workers", type=int, default=1, help="serve --workers N (ws mode; default 1)")
    p.add_argument("--frame-ms", type=float, default=20.0, help="frame length the calls send (default 20)")
    p.add_argument(
        "--compression",
        default="deflate",
        choices=("deflate", "none"),
        help="websocket permessage-deflate offered by the calls (default deflate, the websockets default; "
        "none: raw frames, cheaper for both sides)",
    )
    p.add_argument("--keep-going", action="store_true", help="do not stop a sweep at the first N that is not real time")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--quick", action="store_true", help="bf16, hop 1, 1 and 3 calls of 3 s, both modes (< 30 s)")
    args = p.parse_args(argv)
    if args.quick:
        args.backends, args.hops, args.calls, args.seconds, args.max_batch = "torch-bf16", "1.0", "1,3", 3.0, 4
    modes = args.modes.split(",")
    backends = args.backends.split(",")
    for b in backends:
        if b not in BACKENDS:
            p.error(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    if "onnx-int8" in backends and not args.int8:
        p.error("--backends onnx-int8 needs --int8 INT8.onnx (emostream export --onnx ... --int8 --calibrate DIR)")
    calls = sorted(int(n) for n in args.calls.split(","))
    source = load_mono(SOURCE)
    onnx_path, tmp = args.onnx, None
    if "onnx" in backends and onnx_path is None:
        from emostream.onnx_model import export_onnx

        tmp = tempfile.TemporaryDirectory()
        onnx_path = str(export_onnx(out=Path(tmp.name) / "emostream.onnx"))
    print(f"machine: {machine()}", flush=True)
    rows: list[dict] = []
    show = lambda r: print(json.dumps(r), flush=True)  # noqa: E731
    for mode in modes:
        for backend in backends:
            for hop in (float(h) for h in args.hops.split(",")):
                base = RunConfig(
                    mode=mode,
                    backend=backend,
                    hop=hop,
                    seconds=args.seconds,
                    vad=args.vad,
                    max_batch=args.max_batch,
                    max_wait_ms=args.max_wait_ms,
                    device=args.device,
                    workers=args.workers,
                    frame_ms=args.frame_ms,
                    compression=args.compression,
                )
                if backend == "none" and mode != "ws":
                    p.error("backend none (serve --no-model) is measured from outside: --modes ws")
                model_file = args.int8 if backend == "onnx-int8" else onnx_path
                rows += sweep(base, calls, source, model_file, args.keep_going, show)
    summary = capacity_summary(rows)
    print("\n" + markdown(rows) + "\n")
    print("| mode | backend | hop s | largest N real time | largest N with p99 < 300 ms | single call p50 ms |")
    print("|---|---|---|---|---|---|")
    for s in summary:
        print(
            f"| {s['mode']} | {s['backend']} | {s['hop']:g} | {s['max_realtime_calls']} (tried up to "
            f"{s['largest_tried']}) | {s['max_calls_p99_under_300ms']} | {s['single_call_p50_ms']} |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine(), "rows": rows, "summary": summary}, indent=2))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
