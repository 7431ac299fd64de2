"""The fleet view (:mod:`emostream.fleet`) and ``serve --workers N`` (:mod:`emostream.cli.fleet`).

In-process: two real servers on one event loop share one :class:`FleetRegistry` through
:class:`LocalActor` (Ray's ``actor.method.remote()`` surface over the plain object, the transport
only): a call on one front end is listed, detailed and streamed by the other. Then the real thing:
``emostream serve --workers 2 --no-model`` as its own process on a local Ray instance it starts:
calls land on both front ends (SO_REUSEPORT), each front end's ``/v1/calls``, ``/v1/events`` and
``/metrics`` cover both, and a front end killed mid-call has its calls ended with a summary (file and
events) while the other's calls go on; the supervisor restarts it and stops cleanly on SIGTERM.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from types import SimpleNamespace

import pytest
from websockets.asyncio.client import connect

from emostream.client import SendOptions, send_file
from emostream.fleet import LOST_REASON, POLL_SECONDS, FleetLink, FleetRegistry, MirroredCall
from emostream.server import EmoServer, ServerConfig
from emostream.vad import VadConfig
from emostream.worker import constant_predictor

from .conftest import ROOT
from .live_util import write_call


class LocalActor:
    """``handle.method.remote(*args)`` -> an awaitable, over an in-process object (what a Ray actor
    handle offers; the registry's code is the actor's)."""

    def __init__(self, obj):
        self.obj = obj

    def __getattr__(self, name):
        method = getattr(self.obj, name)
        return SimpleNamespace(remote=lambda *a, **k: asyncio.ensure_future(method(*a, **k)))


def config(**kwargs) -> ServerConfig:
    return ServerConfig(**{"port": 0, "vad": VadConfig.named("energy"), "analyse": "all", **kwargs})


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(interval)


def test_two_front_ends_share_calls_events_and_summaries(tmp_path):
    path = write_call(tmp_path / "call.wav", 5.0)

    async def scenario():
        registry = LocalActor(FleetRegistry(max_events=900))
        a = EmoServer(config(events_dir=tmp_path / "a"), constant_predictor(), fleet=FleetLink(registry, 0))
        b = EmoServer(config(), constant_predictor(), fleet=FleetLink(registry, 1))
        port_a, port_b = await a.start(), await b.start()
        try:
            # a /v1/events subscriber of b, connected before the call starts on a
            async with connect(f"ws://127.0.0.1:{port_b}/v1/events") as sub:
                hello = json.loads(await sub.recv())
                assert hello["type"] == "hello" and hello["worker"] == 1 and hello["calls"] == []
                result = await send_file(path, f"ws://127.0.0.1:{port_a}", SendOptions(fast=True, call_id="c-a"))
                assert result.close_code == 1000 and result.summary is not None
                seen = []
                while not seen or seen[-1]["type"] != "call_ended":
                    seen.append(json.loads(await asyncio.wait_for(sub.recv(), 10)))
            kinds = [m["type"] for m in seen]
            assert kinds[0] == "call_started" and kinds[-2:] == ["summary", "call_ended"], kinds
            assert seen[0]["worker"] == 0  # the front end holding the call
            assert [m for m in seen if m["type"] == "event"] == [{"type": "event", **e} for e in result.events]
            assert seen[-2] == result.summary
            # b lists and details a's call as a does
            assert [c.listing() for c in b.listed_calls()] == [c.listing() for c in a.listed_calls()]
            assert b.find_call("c-a").detail() == a.find_call("c-a").detail()
            # a call that starts on b while a subscriber of a is connected: live in a's hello and listing
            slow = asyncio.create_task(send_file(path, f"ws://127.0.0.1:{port_b}", SendOptions(call_id="c-b")))
            await wait_until(lambda: "c-b" in a.hub.calls)
            async with connect(f"ws://127.0.0.1:{port_a}/v1/events") as sub:
                hello = json.loads(await sub.recv())
                assert [c["call_id"] for c in hello["calls"]] == ["c-b"] and hello["calls"][0]["worker"] == 1
            assert {c.call_id for c in a.listed_calls()} == {"c-a", "c-b"}
            assert a.find_call("c-b").live and a.find_call("c-b").worker == 1
            # the same call id on the other front end is refused while it streams (as on one server)
            dup = await send_file(path, f"ws://127.0.0.1:{port_a}", SendOptions(call_id="c-b", fast=True))
            assert dup.close_code == 1008 and dup.summary is None
            # the fleet's live gauges: b's live call counted in a's /metrics
            await wait_until(lambda: 1 in a.fleet.status and a.fleet.status[1]["live_calls"].get("pcm") == 1, 5)
            metrics = a.metrics.render().decode()
            assert 'emostream_live_calls{protocol="pcm"} 1.0' in metrics and "emostream_front_ends 2.0" in metrics
            await slow
            await wait_until(lambda: not a.find_call("c-b").live)
            assert a.find_call("c-b").summary["call_id"] == "c-b"
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_front_ends_join_a_restarted_registry_with_their_live_calls(tmp_path):
    """The registry's process dies and Ray starts it again, empty (a new epoch): each front end joins
    it again with its live calls, so the other front end lists them again, their events flow, and the
    new registry can end them with a summary."""
    path = write_call(tmp_path / "call.wav", 12.0)

    async def scenario():
        registry = LocalActor(FleetRegistry(max_events=900))
        a = EmoServer(config(), constant_predictor(), fleet=FleetLink(registry, 0))
        b = EmoServer(config(), constant_predictor(), fleet=FleetLink(registry, 1))
        port_a = await a.start()
        await b.start()
        try:
            call = asyncio.create_task(send_file(path, f"ws://127.0.0.1:{port_a}", SendOptions(call_id="c-a")))
            events = lambda c: len(c.detail()["events"])  # noqa: E731
            await wait_until(lambda: b.find_call("c-a") is not None and events(b.find_call("c-a")) >= 1)
            old_epoch = a.fleet.epoch
            registry.obj = FleetRegistry(max_events=900)  # what a restart leaves: no calls, a new epoch
            await wait_until(lambda: a.fleet.epoch == b.fleet.epoch == registry.obj.epoch != old_epoch)
            await wait_until(lambda: "c-a" in registry.obj.calls and b.find_call("c-a") is not None)
            assert registry.obj.calls["c-a"].live and registry.obj.calls["c-a"].worker == 0
            assert events(registry.obj.calls["c-a"]) >= 1  # the new registry has the call's history from a's detail
            seen = events(b.find_call("c-a"))
            await wait_until(lambda: events(b.find_call("c-a")) > seen)  # events flow again
            assert "c-a" in b.hub.calls  # in b's hello
            assert await registry.obj.claim(1) == 2  # front-end numbers stay unique after the restart
            result = await call
            assert result.close_code == 1000
            await wait_until(lambda: not b.find_call("c-a").live)
            assert b.find_call("c-a").summary == result.summary
        finally:
            await a.stop()
            await b.stop()

    asyncio.run(scenario())


def test_mirror_keeps_the_running_summary_and_ends_lost_calls():
    """A call's mirror summarises every event it saw (as the call's own timeline does); the registry
    ends a dead front end's live calls with that summary, and a late joiner sees the fleet."""

    async def scenario():
        registry = FleetRegistry(max_events=3)
        started = {
            "type": "call_started",
            "call_id": "x",
            "protocol": "pcm",
            "channels": ["ch0"],
            "analysed": ["ch0"],
            "hop_seconds": 1.0,
            "started_at": 1.7e9,
            "info": {},
            "worker": 4,
        }
        probs = {c: 0.0 for c in ("Angry", "Disgusted", "Fearful", "Happy", "Neutral", "Sad", "Surprised")}
        events = []
        for k in range(8):
            label = "Angry" if k < 5 else "Sad"
            events.append(
                {
                    "type": "event",
                    "stream": "x",
                    "channel": "ch0",
                    "t_start": max(0, k - 5),
                    "t_end": k + 1,
                    "speech": True,
                    "label": label,
                    "confidence": 0.9,
                    "probabilities": {**probs, label: 0.9},
                }
            )
        await registry.publish(4, [started, *events])
        other = await registry.poll(5, 0, timeout=0.01)
        assert [m for _, m in other["messages"]] == [started, *events] and other["cursor"] == 9
        assert (await registry.poll(4, 0, timeout=0.01))["messages"] == []  # not its own
        mirror = registry.calls["x"]
        assert len(mirror.detail()["events"]) <= 3 + 3 // 4 + 1  # kept: bounded, like a LiveCall's
        summaries = await registry.worker_lost(4, {"name": "m"})
        (summary,) = summaries
        channel = summary["channels"]["ch0"]
        assert summary["end_reason"] == LOST_REASON and summary["call_id"] == "x" and summary["model"] == {"name": "m"}
        assert channel["windows"] == 8 and channel["dominant"] == "Angry" and channel["shares"]["Sad"] == 0.375
        tail = (await registry.poll(5, 9, timeout=0.01))["messages"]
        assert [(o, m["type"]) for o, m in tail] == [(-1, "summary"), (-1, "call_ended")]
        assert await registry.worker_lost(4) == []  # ended once
        joined = await registry.join(6)
        assert joined["cursor"] == 11 and [d["call"]["end_reason"] for d in joined["calls"]] == [LOST_REASON]
        assert MirroredCall.from_detail(joined["calls"][0]).listing() == mirror.listing()
        # a poll whose cursor fell out of the backlog is told to resync
        small = FleetRegistry(keep=4)
        await small.publish(0, [started] + events[:6])
        assert (await small.poll(1, 1, timeout=0.01))["resync"]

    asyncio.run(scenario())


# -- the real fleet: serve --workers 2 on a local Ray instance

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'emostream[scale]')")


def start_fleet(tmp_path, *extra):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "emostream",
            "serve",
            "--workers",
            "2",
            "--no-model",
            "--port",
            "0",
            "--analyse",
            "all",
            "--vad",
            "energy",
            "--events-dir",
            str(tmp_path / "events"),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines = []
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        m = re.search(r"listening on ws://127\.0\.0\.1:(\d+).*?2 front ends \(pids (\d+), (\d+)\)", line)
        if m:
            return proc, int(m.group(1)), {int(m.group(2)), int(m.group(3))}, lines
    proc.kill()
    raise AssertionError("fleet did not start:\n" + "".join(lines)[-3000:])


def registry_pids() -> set[int]:
    """Pids of the processes running the fleet registry actor (Ray names them ``ray::FleetRegistry...``)."""
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::FleetRegistry"):
                    pids.add(int(entry))
        except (OSError, ValueError):
            continue
    return pids


def from_each_front_end(url: str, tries: int = 60) -> dict[int, dict]:
    """GET ``url`` on fresh connections until both front ends have answered (the kernel picks one per
    connection): front end -> its answer."""
    answers: dict[int, dict] = {}
    for _ in range(tries):
        body = get_json(url)
        answers.setdefault(body["worker"], body)
        if len(answers) == 2:
            return answers
    raise AssertionError(f"only front ends {sorted(answers)} answered {url}")


def test_serve_workers_two_front_ends_one_view_and_a_killed_one(tmp_path):
    path = write_call(tmp_path / "call.wav", 14.0)
    proc, port, pids, lines = start_fleet(tmp_path)
    base = f"http://127.0.0.1:{port}"
    try:

        async def scenario():
            calls: dict[str, asyncio.Task] = {}
            holder: dict[str, int] = {}
            # paced calls, one at a time, until both front ends hold some (at most 12)
            for k in range(12):
                call_id = f"call-{k}"
                calls[call_id] = asyncio.create_task(
                    send_file(path, f"ws://127.0.0.1:{port}", SendOptions(call_id=call_id))
                )
                for _ in range(100):
                    listed = (await asyncio.to_thread(get_json, f"{base}/v1/calls"))["calls"]
                    holder = {c["call_id"]: c["worker"] for c in listed if c["ended_at"] is None}
                    if call_id in holder:
                        break
                    await asyncio.sleep(0.05)
                if len(set(holder.values())) == 2:
                    break
            assert len(set(holder.values())) == 2, holder
            # each front end lists every live call (news of another front end's call takes 100-200 ms
            # to arrive: asked again until then, for 10 s at most), and its hello names them
            deadline = time.monotonic() + 10
            while True:
                answers = await asyncio.to_thread(from_each_front_end, f"{base}/v1/calls")
                lives = {
                    w: {c["call_id"]: c["worker"] for c in body["calls"] if c["ended_at"] is None}
                    for w, body in answers.items()
                }
                if all(live == holder for live in lives.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            for worker, live in lives.items():
                assert live == holder, (worker, live, holder)
            hellos = {}
            subs = []
            for _ in range(40):
                sub = await connect(f"ws://127.0.0.1:{port}/v1/events")
                hello = json.loads(await sub.recv())
                if hello["worker"] in hellos:
                    await sub.close()
                    continue
                hellos[hello["worker"]] = hello
                subs.append(sub)
                if len(hellos) == 2:
                    break
            assert len(hellos) == 2
            for hello in hellos.values():
                assert {c["call_id"] for c in hello["calls"]} == set(holder)
            # one subscriber gets events of calls on both front ends
            streams = set()
            while len(streams) < len(holder):
                m = json.loads(await asyncio.wait_for(subs[0].recv(), 10))
                if m["type"] == "event":
                    streams.add(m["stream"])
            # the registry's process dies: Ray starts it again, empty; both front ends join it again
            # with their live calls (the lost-call summaries below come from the new one)
            (old,) = registry_pids()
            os.kill(old, signal.SIGKILL)
            deadline = time.monotonic() + 30
            while registry_pids() in (set(), {old}):
                assert time.monotonic() < deadline, "the registry was not restarted"
                await asyncio.sleep(0.2)
            # a failed poll, its pause, a poll that sees the new epoch, then the join
            await asyncio.sleep(3 * POLL_SECONDS + 1)
            # kill the front end of one call (SIGKILL: no chance to write anything)
            victim = holder["call-0"]
            health = await asyncio.to_thread(from_each_front_end, f"{base}/healthz")
            os.kill(health[victim]["pid"], signal.SIGKILL)
            lost = {c for c, w in holder.items() if w == victim}
            survivor = next(s for s, h in zip(subs, hellos) if h != victim)
            ended = {}
            while set(ended) != lost:
                m = json.loads(await asyncio.wait_for(survivor.recv(), 30))
                if m["type"] == "summary" and m["end_reason"] == LOST_REASON:
                    ended[m["call_id"]] = m
            results = await asyncio.gather(*calls.values())
            for sub in subs:
                await sub.close()
            return holder, lost, ended, dict(zip(calls, results)), victim

        holder, lost, ended, results, victim = asyncio.run(scenario())
        for call_id in lost:  # the killed front end's calls: summary in the file, none to the client
            assert results[call_id].summary is None
            summary = json.loads((tmp_path / "events" / f"{call_id}.jsonl").read_text().splitlines()[-1])
            assert summary == ended[call_id] and summary["type"] == "summary"
            assert summary["channels"] and all(ch["windows"] > 0 for ch in summary["channels"].values())
        for call_id, result in results.items():  # the others' calls went on to the end
            if call_id not in lost:
                assert result.close_code == 1000 and result.summary["end_reason"] == "completed"
                assert result.summary["duration"] == pytest.approx(14.0, abs=0.05)
        # the supervisor restarted the dead one; both answer again, with the fleet's ended calls
        deadline = time.monotonic() + 60
        while True:
            try:
                health = from_each_front_end(f"{base}/healthz", tries=20)
                if health[victim]["pid"] not in pids:
                    break
            except AssertionError:
                pass
            assert time.monotonic() < deadline, "front end not restarted"
            time.sleep(0.5)
        metrics = urllib.request.urlopen(f"{base}/metrics", timeout=10).read().decode()
        completed = re.search(r'^emostream_calls_total\{outcome="completed",protocol="pcm"\} (\S+)$', metrics, re.M)
        assert float(completed.group(1)) == len(holder) - len(lost)  # summed over front ends, the dead one's too
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert proc.returncode == 0, err[-3000:]
    assert re.search(rf"front end {victim} \(pid \d+\) exited with code -9 .* {len(lost)} call\(s\) ended", err), err
    assert "emostream serve: stopped" in err
    assert err.count("the registry restarted; joining it again") == 2, err[-3000:]


def test_serve_workers_refuses_the_dashboard_and_bad_counts(capsys):
    from emostream.cli import main

    assert main(["serve", "--workers", "2", "--dashboard", "--no-model"]) == 2
    assert "emostream watch" in capsys.readouterr().err
    assert main(["serve", "--workers", "0", "--no-model"]) == 2
    assert "--workers: must be >= 1" in capsys.readouterr().err


def test_workers_auto_is_the_cores_this_process_may_use():
    from emostream.cli import build_parser

    args = build_parser().parse_args(["serve", "--workers", "auto"])
    assert args.workers == len(os.sched_getaffinity(0)) >= 1
    assert build_parser().parse_args(["serve"]).workers == 1
