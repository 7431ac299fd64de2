"""Soak: ``emostream serve`` under abuse, overload and broken peers at the same time (issue 40).

``emostream serve`` runs as its own process on 127.0.0.1 (the shipped model, or ``--no-model``); this
script is every client at once, for ``--minutes``:

- ``--calls`` innocent real-time calls (``/v1/pcm``, mono 16 kHz speech from ``examples/call_mono.flac``,
  20 ms frames at real-time pace, ``--call-seconds`` each, then ``stop``; a new call follows in the
  same slot until the soak ends). Each must end with close 1000 and a summary and receive one event
  per window (``expected_ends``): anything else counts as an innocent call closed or windows lost;
- ``--drops`` real-time calls that vanish (TCP reset, no close frame) at a random moment, then redial;
- one fast sender (``send --fast``: ``--fast-seconds`` of audio as fast as the server reads it, looped);
- attackers, ``--attackers`` connections of each kind, each redialling when closed: Twilio timestamp
  jumps of 1 h (until the call length limit), AudioHook ``discarded`` of 1 h, ``/v1/pcm`` calls that send
  zero-length frames instead of audio, unauthenticated Twilio ``connected`` keepalives that never
  start, and text frames of 100,000 ``[``;
- a ``/healthz`` probe every ``--probe-ms`` (a thread with its own connections: the latency of the
  server's event loop, not of this script's) and the server's RSS every ``--rss-seconds``.

Reported: ``/healthz`` latency p50/p99/max; innocent calls completed, closed (and how: keepalive or
other) and windows lost per call; the close codes each attack kind got; the server's ERROR log lines
and tracebacks; RSS over time and its change after warm-up (the first ``--warmup`` of the run).
Targets (issue 40, 20 innocent calls on the 2-core machine): p99 < 200 ms, 0 innocent calls closed,
0 windows lost, RSS flat (within 5 %) after warm-up.

    python bench/soak.py [--calls 20] [--minutes 5] [--call-seconds 60] [--drops 4] [--attackers 2]
                         [--no-model] [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http.client
import json
import os
import random
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from serve_process import ServeProcess

from emostream.audio import SAMPLE_RATE, TELEPHONE_RATE, float32_to_int16, load_mono, mulaw_encode
from emostream.protocols import format_duration

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "examples" / "call_mono.flac"
FRAME_SECONDS = 0.02
TARGET_P99_MS = 200.0
TARGET_RSS_CHANGE = 0.05
ATTACKS = ("gap_jump", "audiohook_discard", "no_audio", "unauthenticated", "deep_json")


@dataclass(frozen=True)
class SoakConfig:
    """One soak run."""

    calls: int = 20  # innocent real-time calls at any time
    seconds: float = 300.0  # soak length
    call_seconds: float = 60.0  # audio per innocent call
    drops: int = 4  # real-time calls that vanish at a random moment, then redial
    fast_seconds: float = 120.0  # audio per fast-sender call
    attackers: int = 2  # connections per attack kind
    probe_ms: float = 250.0  # /healthz probe period
    rss_seconds: float = 5.0  # RSS sample period
    warmup: float = 0.3  # share of the run before RSS flatness is judged
    idle_timeout: float = 60.0  # serve --idle-timeout
    start_timeout: float = 5.0  # serve --start-timeout
    no_model: bool = False
    vad: str = "silero"
    seed: int = 0


def expected_windows(seconds: float, hop: float = 1.0) -> int:
    """Events of a stream of ``seconds``: one per hop, plus the final partial window."""
    whole = int(round(seconds / hop, 6))
    return whole + (0 if abs(whole * hop - seconds) < 1e-6 else 1)


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


class Server(ServeProcess):
    """``emostream serve`` on a free port of 127.0.0.1, its stderr (JSON log lines) collected."""

    def __init__(self, cfg: SoakConfig, events_dir: Path):
        cmd = [
            sys.executable,
            "-m",
            "emostream",
            "serve",
            "--port",
            "0",
            "--max-calls",
            "128",
            "--events-dir",
            str(events_dir),
            "--vad",
            cfg.vad,
            "--log-format",
            "json",
            "--idle-timeout",
            str(cfg.idle_timeout),
            "--start-timeout",
            str(cfg.start_timeout),
        ]
        if cfg.no_model:
            cmd.append("--no-model")
        else:
            cmd.append("--warm-up")  # every batch size before /readyz, as a deployment (and capacity.py) runs it
        super().__init__(cmd)
        self.url = f"ws://127.0.0.1:{self.port}"
        self.keep_reading()
        while time.monotonic() < self.deadline and get(self.port, "/readyz")[0] != 200:
            time.sleep(0.2)

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def log_problems(self) -> dict:
        """ERROR lines and tracebacks in the server's log."""
        errors, tracebacks, samples = 0, 0, []
        for line in self.lines:
            try:
                entry = json.loads(line)
            except ValueError:
                tracebacks += "Traceback" in line
                continue
            if isinstance(entry, dict) and (entry.get("level") in ("ERROR", "CRITICAL") or "exc" in entry):
                errors += 1
                tracebacks += "exc" in entry
                samples.append(str(entry.get("message"))[:160])
        return {"error_lines": errors, "tracebacks": tracebacks, "examples": samples[:5]}


def get(port: int, path: str) -> tuple[int, float]:
    """``GET path``: (status, milliseconds); status 0 when the request failed."""
    t0 = time.perf_counter()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", path)
        status = conn.getresponse().status
        conn.close()
    except OSError:
        status = 0
    return status, (time.perf_counter() - t0) * 1000


class Monitor:
    """The /healthz probe and the RSS sampler, in threads of their own."""

    def __init__(self, server: Server, cfg: SoakConfig):
        self.server, self.cfg = server, cfg
        self.healthz: list[float] = []
        self.failed_probes = 0
        self.rss: list[tuple[float, float]] = []
        self.t0 = time.monotonic()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._probe, daemon=True),
            threading.Thread(target=self._sample, daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _probe(self) -> None:
        while not self._stop.wait(self.cfg.probe_ms / 1000):
            status, ms = get(self.server.port, "/healthz")
            if status == 200:
                self.healthz.append(ms)
            else:
                self.failed_probes += 1

    def _sample(self) -> None:
        while True:
            self.rss.append((round(time.monotonic() - self.t0, 1), round(self.server.rss_mb(), 1)))
            if self._stop.wait(self.cfg.rss_seconds):
                return

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(35)


class Soak:
    """Every client of the soak, in one event loop."""

    def __init__(self, cfg: SoakConfig, server: Server, source: np.ndarray):
        self.cfg, self.server, self.source = cfg, server, source
        self.rng = random.Random(cfg.seed)
        self.innocent: list[dict] = []
        self.drops: list[dict] = []
        self.fast: list[dict] = []
        self.attacks: dict[str, Counter] = {k: Counter() for k in ATTACKS}
        self.deadline = 0.0

    def pcm(self, seconds: float) -> bytes:
        n = int(seconds * SAMPLE_RATE)
        start = self.rng.randrange(len(self.source))
        return float32_to_int16(self.source[(start + np.arange(n)) % len(self.source)]).astype("<i2").tobytes()

    async def pcm_call(self, seconds: float, fast: bool = False, vanish_at: float | None = None) -> dict:
        """One /v1/pcm call; returns what happened to it."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        from emostream.keepalive import KeepaliveClientConnection

        call_id = f"soak-{uuid.uuid4().hex[:12]}"
        data = self.pcm(seconds)
        frame = int(FRAME_SECONDS * SAMPLE_RATE) * 2
        out = {
            "call_id": call_id,
            "seconds": seconds,
            "expected": expected_windows(seconds),
            "events": 0,
            "summary": False,
            "code": None,
            "reason": "",
            "latencies": [],
            "max_send_lag_s": 0.0,
        }
        loop = asyncio.get_running_loop()
        async with connect(
            self.server.url + "/v1/pcm", max_size=2**22, open_timeout=30, create_connection=KeepaliveClientConnection
        ) as ws:
            await ws.send(
                json.dumps(
                    {
                        "type": "start",
                        "call_id": call_id,
                        "sample_rate": SAMPLE_RATE,
                        "channels": 1,
                        "encoding": "pcm_s16le",
                        "channel_names": ["customer"],
                    }
                )
            )
            t0 = loop.time()

            async def reader() -> None:
                try:
                    async for message in ws:
                        m = json.loads(message)
                        if m.get("type") == "event":
                            out["events"] += 1
                            if not fast:  # arrival minus when the window's last sample was due
                                out["latencies"].append(loop.time() - t0 - m["t_end"])
                        elif m.get("type") == "summary":
                            out["summary"] = True
                except ConnectionClosed:
                    pass

            task = asyncio.create_task(reader())
            try:
                for k, pos in enumerate(range(0, len(data), frame)):
                    if not fast:
                        wait = t0 + k * FRAME_SECONDS - loop.time()
                        if wait > 0:
                            await asyncio.sleep(wait)
                        else:  # this script is late: its own lag, not the server's
                            out["max_send_lag_s"] = max(out["max_send_lag_s"], -wait)
                    if vanish_at is not None and k * FRAME_SECONDS >= vanish_at:
                        ws.transport.abort()  # vanish: no close frame, no stop
                        out["vanished_at"] = round(k * FRAME_SECONDS, 2)
                        break
                    await ws.send(data[pos : pos + frame])
                else:
                    await ws.send(json.dumps({"type": "stop"}))
            except ConnectionClosed:
                pass
            try:
                await asyncio.wait_for(task, 120)
            except asyncio.TimeoutError:
                task.cancel()
            out["code"], out["reason"] = ws.close_code, ws.close_reason or ""
        return out

    async def innocent_slot(self, offset: float) -> None:
        await asyncio.sleep(offset)
        loop = asyncio.get_running_loop()
        while loop.time() + self.cfg.call_seconds < self.deadline:
            self.innocent.append(await self.pcm_call(self.cfg.call_seconds))

    async def drop_slot(self) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() + 5 < self.deadline:
            seconds = self.rng.uniform(5, max(6.0, self.cfg.call_seconds))
            self.drops.append(await self.pcm_call(seconds + 5, vanish_at=seconds))
            await asyncio.sleep(1.0)

    async def fast_slot(self) -> None:
        loop = asyncio.get_running_loop()
        while loop.time() + 5 < self.deadline:
            self.fast.append(await self.pcm_call(self.cfg.fast_seconds, fast=True))

    async def attacker(self, kind: str) -> None:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed, InvalidStatus

        loop = asyncio.get_running_loop()
        while loop.time() < self.deadline - 1:
            try:
                async with connect(
                    self.server.url + ATTACK_PATHS[kind],
                    max_size=2**22,
                    open_timeout=30,
                    additional_headers=AUDIOHOOK_HEADERS() if kind == "audiohook_discard" else None,
                    close_timeout=2,
                ) as ws:
                    try:
                        await asyncio.wait_for(ATTACK_STEPS[kind](ws), self.deadline - loop.time())
                        await asyncio.wait_for(ws.wait_closed(), max(0.1, self.deadline - loop.time()))
                    except (ConnectionClosed, asyncio.TimeoutError):
                        pass
                    code = ws.close_code if ws.close_code is not None else "open at the end"
            except InvalidStatus as exc:
                code = f"HTTP {exc.response.status_code}"
            except OSError as exc:
                code = f"connect failed: {exc}"
            self.attacks[kind][str(code)] += 1
            await asyncio.sleep(0.5)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.deadline = loop.time() + self.cfg.seconds
        stagger = self.cfg.call_seconds / 2
        tasks = [self.innocent_slot(stagger * i / max(1, self.cfg.calls)) for i in range(self.cfg.calls)]
        tasks += [self.drop_slot() for _ in range(self.cfg.drops)] + [self.fast_slot()]
        tasks += [self.attacker(kind) for kind in ATTACKS for _ in range(self.cfg.attackers)]
        await asyncio.gather(*tasks)


# --- attacks --------------------------------------------------------------------------------------


def _mulaw_frame(seconds: float = FRAME_SECONDS) -> str:
    codes = mulaw_encode(float32_to_int16(np.zeros(int(seconds * TELEPHONE_RATE), np.float32) + 0.01))
    return base64.b64encode(codes.tobytes()).decode()


async def attack_gap_jump(ws) -> None:
    """Twilio media whose timestamps jump an hour at a time: O(1) per jump, then the call length limit."""
    sid = f"MZ{uuid.uuid4().hex}"
    await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
    await ws.send(
        json.dumps(
            {
                "event": "start",
                "streamSid": sid,
                "start": {
                    "streamSid": sid,
                    "callSid": f"CA{uuid.uuid4().hex}",
                    "tracks": ["inbound"],
                    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
                },
            }
        )
    )
    payload = _mulaw_frame()
    for hour in range(6):
        await ws.send(
            json.dumps(
                {
                    "event": "media",
                    "streamSid": sid,
                    "media": {"track": "inbound", "timestamp": str(hour * 3_600_000), "payload": payload},
                }
            )
        )
        await asyncio.sleep(0.5)


async def attack_audiohook_discard(ws) -> None:
    """AudioHook ``discarded`` of an hour each, until the call length limit."""
    sid = ws.request.headers["Audiohook-Session-Id"]
    seq = 0

    async def message(kind: str, **params) -> None:
        nonlocal seq
        seq += 1
        await ws.send(
            json.dumps(
                {
                    "version": "2",
                    "type": kind,
                    "seq": seq,
                    "serverseq": 0,
                    "id": sid,
                    "position": format_duration(0),
                    "parameters": params,
                }
            )
        )

    await message(
        "open",
        organizationId=str(uuid.uuid4()),
        conversationId=str(uuid.uuid4()),
        participant={"id": str(uuid.uuid4())},
        media=[{"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}],
    )
    for k in range(6):
        await message("discarded", start=format_duration(k * 3600), discarded="PT3600S")
        await asyncio.sleep(0.5)


async def attack_no_audio(ws) -> None:
    """A started call that sends zero-length frames instead of audio (the idle timeout must count audio)."""
    await ws.send(
        json.dumps(
            {
                "type": "start",
                "call_id": f"idle-{uuid.uuid4().hex[:12]}",
                "sample_rate": 16000,
                "channels": 1,
                "channel_names": ["customer"],
            }
        )
    )
    while True:
        await ws.send(b"")
        await asyncio.sleep(1.0)


async def attack_unauthenticated(ws) -> None:
    """Twilio ``connected`` every second, never a start (the start deadline must close it)."""
    while True:
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await asyncio.sleep(1.0)


async def attack_deep_json(ws) -> None:
    """A text frame of 100,000 ``[`` (bad input: 1007, never 1011)."""
    await ws.send("[" * 100_000)


ATTACK_PATHS = {
    "gap_jump": "/v1/twilio",
    "audiohook_discard": "/v1/audiohook",
    "no_audio": "/v1/pcm",
    "unauthenticated": "/v1/twilio",
    "deep_json": "/v1/pcm",
}
ATTACK_STEPS = {
    "gap_jump": attack_gap_jump,
    "audiohook_discard": attack_audiohook_discard,
    "no_audio": attack_no_audio,
    "unauthenticated": attack_unauthenticated,
    "deep_json": attack_deep_json,
}


def AUDIOHOOK_HEADERS() -> dict:  # noqa: N802 - a fresh set per connection
    return {
        "Audiohook-Organization-Id": str(uuid.uuid4()),
        "Audiohook-Correlation-Id": str(uuid.uuid4()),
        "Audiohook-Session-Id": str(uuid.uuid4()),
        "X-API-KEY": "soak",
    }


# --- report -----------------------------------------------------------------------------------------


def report(cfg: SoakConfig, soak: Soak, monitor: Monitor, server: Server, wall: float) -> dict:
    calls = soak.innocent
    closed = [c for c in calls if c["code"] != 1000 or not c["summary"]]
    lost = [max(0, c["expected"] - c["events"]) for c in calls]
    latencies = [x for c in calls for x in c.pop("latencies")]
    rss = monitor.rss
    after = [mb for t, mb in rss if t >= cfg.warmup * wall]
    base = after[0] if after else float("nan")
    return {
        "config": asdict(cfg),
        "wall_seconds": round(wall, 1),
        "healthz": {
            "probes": len(monitor.healthz),
            "failed": monitor.failed_probes,
            "p50_ms": round(percentile(monitor.healthz, 50), 1),
            "p99_ms": round(percentile(monitor.healthz, 99), 1),
            "max_ms": round(max(monitor.healthz, default=float("nan")), 1),
        },
        "innocent": {
            "calls": len(calls),
            "closed": len(closed),
            "keepalive_closed": sum("keepalive" in c["reason"] for c in closed),
            "closes": dict(Counter(f"{c['code']} {c['reason']}".strip() for c in closed)),
            "windows_expected": sum(c["expected"] for c in calls),
            "windows_received": sum(c["events"] for c in calls),
            "windows_lost": sum(lost),
            "max_lost_per_call": max(lost, default=0),
            "event_latency_s": {
                "p50": round(percentile(latencies, 50), 3),
                "p99": round(percentile(latencies, 99), 3),
                "max": round(max(latencies, default=float("nan")), 3),
            },
            "max_send_lag_s": round(max((c["max_send_lag_s"] for c in calls), default=0.0), 3),
        },
        "drops": {"calls": len(soak.drops)},
        "fast_sender": {
            "calls": len(soak.fast),
            "completed": sum(c["code"] == 1000 and c["summary"] for c in soak.fast),
            "closes": dict(Counter(f"{c['code']} {c['reason']}".strip() for c in soak.fast)),
            "windows_lost": sum(max(0, c["expected"] - c["events"]) for c in soak.fast if c["summary"]),
        },
        "attacks": {k: dict(v) for k, v in soak.attacks.items()},
        "server_log": server.log_problems(),
        "rss_mb": rss,
        "rss_after_warmup": {
            "first_mb": base,
            "last_mb": after[-1] if after else float("nan"),
            "min_mb": min(after, default=float("nan")),
            "max_mb": max(after, default=float("nan")),
            "change": round((after[-1] - base) / base, 4) if after else float("nan"),
            "spread": round((max(after) - min(after)) / base, 4) if after else float("nan"),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--calls", type=int, default=20, help="innocent real-time calls (default 20)")
    p.add_argument("--minutes", type=float, default=5.0, help="soak length (default 5)")
    p.add_argument("--call-seconds", type=float, default=60.0, help="audio per innocent call (default 60)")
    p.add_argument("--drops", type=int, default=4, help="calls that vanish at random moments (default 4)")
    p.add_argument("--fast-seconds", type=float, default=120.0, help="audio per fast-sender call (default 120)")
    p.add_argument("--attackers", type=int, default=2, help="connections per attack kind (default 2)")
    p.add_argument("--vad", default="silero", choices=("silero", "energy", "off"))
    p.add_argument("--no-model", action="store_true", help="serve --no-model (the constant predictor)")
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--quick", action="store_true", help="2 calls, 15 s, no model, short timeouts (a few seconds)")
    args = p.parse_args(argv)
    cfg = SoakConfig(
        calls=args.calls,
        seconds=args.minutes * 60,
        call_seconds=args.call_seconds,
        drops=args.drops,
        fast_seconds=args.fast_seconds,
        attackers=args.attackers,
        no_model=args.no_model,
        vad=args.vad,
    )
    if args.quick:
        cfg = SoakConfig(
            calls=2,
            seconds=12.0,
            call_seconds=4.0,
            drops=1,
            fast_seconds=6.0,
            attackers=1,
            probe_ms=100,
            rss_seconds=1.0,
            idle_timeout=3.0,
            start_timeout=2.0,
            no_model=True,
            vad="energy",
        )
    source = load_mono(SOURCE)
    with tempfile.TemporaryDirectory() as tmp:
        server = Server(cfg, Path(tmp))
        try:
            monitor = Monitor(server, cfg)
            soak = Soak(cfg, server, source)
            t0 = time.monotonic()
            asyncio.run(soak.run())
            wall = time.monotonic() - t0
            monitor.stop()
        finally:
            server.stop()
    result = report(cfg, soak, monitor, server, wall)
    result["machine"] = f"{os.cpu_count()} cores"
    h, i, r = result["healthz"], result["innocent"], result["rss_after_warmup"]
    print(f"/healthz p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms, max {h['max_ms']} ms ({h['probes']} probes)")
    print(
        f"innocent calls: {i['calls']}, closed {i['closed']} (keepalive {i['keepalive_closed']}), windows lost "
        f"{i['windows_lost']} of {i['windows_expected']} (max {i['max_lost_per_call']} per call)"
    )
    lat = i["event_latency_s"]
    print(
        f"innocent event latency p50 {lat['p50']} s, p99 {lat['p99']} s, max {lat['max']} s "
        f"(this script's own send lag at most {i['max_send_lag_s']} s)"
    )
    print(
        f"RSS after warm-up: {r['first_mb']} -> {r['last_mb']} MB (change {r['change']:+.1%}, spread {r['spread']:.1%})"
    )
    print(f"attacks: {json.dumps(result['attacks'])}")
    print(f"fast sender: {json.dumps(result['fast_sender'])}; drops: {result['drops']['calls']}")
    print(f"server log: {json.dumps(result['server_log'])}")
    met = (h["p99_ms"] < TARGET_P99_MS, i["closed"] == 0, i["windows_lost"] == 0, abs(r["change"]) <= TARGET_RSS_CHANGE)
    print(
        "targets (p99 < 200 ms, 0 closed, 0 lost, RSS within 5 %): " + ", ".join("met" if m else "MISSED" for m in met)
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
