"""Privacy and compliance controls: --analyse per protocol, no audio on disk unless --record,
retention of timelines."""

import asyncio
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from emostream.client import SendError, SendOptions, send_file
from emostream.compliance import (
    CallRecorder,
    ChannelSelectionError,
    analysed_channels,
    expire_recordings,
    expire_timelines,
)
from emostream.server import ServerConfig
from emostream.timeline import read_events
from emostream.vad import VadConfig

from .conftest import speechlike
from .live_util import ServerThread, expected_ends

CUSTOMER = {"pcm": "customer", "twilio": "customer", "audiohook": "customer"}  # one vocabulary (#42 item 4)
AGENT = {"pcm": "agent", "twilio": "agent", "audiohook": "agent"}


def agent_silent_call(path: Path, seconds: float = 4.0, sr: int = 16000) -> Path:
    """Stereo agent,customer file: the agent channel is digital silence, the customer speaks."""
    customer = speechlike(seconds, sr, f0=180, seed=3)
    sf.write(path, np.stack([np.zeros_like(customer), customer], axis=1), sr, subtype="PCM_16")
    return path


def test_analysed_channels_by_role_and_protocol():
    assert analysed_channels(("agent", "customer"), "customer", "pcm") == (1,)
    assert analysed_channels(("agent", "customer"), "agent", "pcm") == (0,)
    assert analysed_channels(("customer", "agent"), "customer", "twilio") == (0,)  # the server's names
    assert analysed_channels(("customer", "agent"), "agent", "twilio") == (1,)
    assert analysed_channels(("customer", "agent"), "customer", "audiohook") == (0,)
    assert analysed_channels(("ch0", "ch1"), "all") == (0, 1)
    with pytest.raises(ChannelSelectionError, match="no customer channel.*ch0.*--analyse all"):
        analysed_channels(("ch0",), "customer", "pcm")
    with pytest.raises(ValueError):
        analysed_channels(("customer",), "everyone")


@pytest.mark.parametrize("protocol", ["pcm", "twilio", "audiohook"])
def test_analyse_customer_yields_customer_events_only(protocol, tmp_path):
    """The skipped channel produces nothing: not on the wire, not in the JSONL, not on /v1/events,
    not in the summary. The customer's audio is the channel analysed (it speaks; the agent is silent)."""
    audio = agent_silent_call(tmp_path / "call.wav")
    hub_messages = []
    cfg = ServerConfig(port=0, analyse="customer", events_dir=tmp_path / "ev", vad=VadConfig.named("energy"))
    with ServerThread(cfg) as srv:
        srv.server.hub.listeners.append(hub_messages.append)
        result = asyncio.run(
            send_file(audio, srv.url, SendOptions(protocol=protocol, fast=True, call_id="c-" + protocol))
        )
    assert result.close_code == 1000
    customer = CUSTOMER[protocol]
    assert {e["channel"] for e in result.events} == {customer}
    assert len(result.events) == len(expected_ends(4.0))
    assert sum(e["speech"] for e in result.events) >= len(result.events) - 1  # the speaking channel
    assert list(result.summary["channels"]) == [customer]
    stored = read_events(tmp_path / "ev" / f"{result.call_id}.jsonl")
    assert {e["channel"] for e in stored if "channel" in e} == {customer}
    events = [m for m in hub_messages if m.get("type") == "event"]
    assert events and {m["channel"] for m in events} == {customer}
    started = next(m for m in hub_messages if m.get("type") == "call_started")
    assert started["analysed"] == [customer] and AGENT[protocol] in started["channels"]
    assert AGENT[protocol] not in json.dumps(result.summary["channels"])


def test_analyse_agent_and_all(tmp_path):
    audio = agent_silent_call(tmp_path / "call.wav", 3.0)
    for analyse, channels in (("agent", {"agent"}), ("all", {"agent", "customer"})):
        with ServerThread(ServerConfig(port=0, analyse=analyse, vad=VadConfig.named("energy"))) as srv:
            result = asyncio.run(send_file(audio, srv.url, SendOptions(fast=True)))
        assert {e["channel"] for e in result.events} == channels
        agent = [e for e in result.events if e["channel"] == "agent"]
        assert not any(e["speech"] for e in agent)  # the silent channel: silence windows only


def test_call_without_a_customer_channel_is_refused_with_a_reason(tmp_path):
    mono = tmp_path / "mono.wav"
    sf.write(mono, speechlike(2.0, 16000), 16000, subtype="PCM_16")
    with ServerThread(ServerConfig(port=0, analyse="customer", events_dir=tmp_path / "ev")) as srv:
        result = asyncio.run(send_file(mono, srv.url, SendOptions(fast=True)))
        assert result.close_code == 1008 and "no customer channel" in result.close_reason
        named = asyncio.run(send_file(mono, srv.url, SendOptions(fast=True, channel_names=("customer",), call_id="m2")))
    assert named.close_code == 1000 and {e["channel"] for e in named.events} == {"customer"}
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["m2.jsonl"]  # nothing for the refused call


def test_send_needs_agent_and_customer_names_for_stereo_telephony(tmp_path):
    audio = agent_silent_call(tmp_path / "call.wav", 1.0)
    with pytest.raises(SendError, match="agent and customer"):
        asyncio.run(send_file(audio, "ws://127.0.0.1:9", SendOptions(protocol="twilio", channel_names=("a", "b"))))


def _audio_like_files(root: Path, payload: bytes) -> list[Path]:
    """Files under ``root`` that are audio: decodable by libsndfile, or holding a 4 KiB run of the
    raw PCM the call sent (any headerless dump)."""
    probes = [payload[i : i + 4096] for i in range(0, len(payload) - 4096, len(payload) // 8)]
    found = []
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        try:
            sf.info(str(path))
            found.append(path)
            continue
        except Exception:
            pass
        data = path.read_bytes()
        if any(p in data for p in probes):
            found.append(path)
    return found


@pytest.mark.parametrize("record", [False, True])
def test_no_audio_on_disk_unless_record(record, tmp_path, tmp_path_factory, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)  # "anywhere in the working directory"
    source = tmp_path_factory.mktemp("input") / "call.wav"
    seconds = 3.0
    data = np.stack([speechlike(seconds, 16000, f0=140, seed=1), speechlike(seconds, 16000, f0=210, seed=2)], axis=1)
    sf.write(source, data, 16000, subtype="PCM_16")
    payload = (np.clip(data, -1, 1) * 32767).astype("<i2").tobytes()
    cfg = ServerConfig(
        port=0,
        analyse="all",
        events_dir=work / "events",
        record_dir=(work / "recordings") if record else None,
        vad=VadConfig.named("energy"),
    )
    with ServerThread(cfg) as srv:
        result = asyncio.run(send_file(source, srv.url, SendOptions(fast=True, call_id="privacy-1")))
    assert result.close_code == 1000
    assert (work / "events" / "privacy-1.jsonl").exists()
    found = _audio_like_files(work, payload)
    if not record:
        assert found == []
        return
    assert found == [work / "recordings" / "privacy-1.wav"]
    recorded, sr = sf.read(work / "recordings" / "privacy-1.wav", dtype="float32")
    assert sr == 16000 and recorded.shape == data.shape
    assert np.abs(recorded - data).max() < 2 / 32768  # the audio as received (16-bit)


def test_recorder_aligns_channels_sent_separately(tmp_path):
    rec = CallRecorder(tmp_path / "r.wav", 8000, 2)
    rec.write(0, np.full(100, 0.5, np.float32))
    rec.silence(1, 60)
    rec.write(1, np.full(70, -0.5, np.float32))
    rec.silence(None, 10)
    rec.close()
    x, sr = sf.read(tmp_path / "r.wav", dtype="float32")
    assert sr == 8000 and x.shape == (140, 2)
    assert np.allclose(x[:100, 0], 0.5, atol=1e-4) and np.allclose(x[100:, 0], 0)
    assert np.allclose(x[:60, 1], 0) and np.allclose(x[60:130, 1], -0.5, atol=1e-4) and np.allclose(x[130:, 1], 0)


def test_expire_timelines_keeps_recent_and_live_files(tmp_path):
    now = time.time()
    old, recent, live, other = (tmp_path / n for n in ("old.jsonl", "recent.jsonl", "live.jsonl", "notes.txt"))
    for path in (old, recent, live, other):
        path.write_text("{}\n")
    for path in (old, live, other):
        os.utime(path, (now - 8 * 86400, now - 8 * 86400))
    deleted = expire_timelines(tmp_path, 7, keep={live}, now=now)
    assert deleted == [old]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["live.jsonl", "notes.txt", "recent.jsonl"]
    with pytest.raises(ValueError):
        expire_timelines(tmp_path, 0)


def test_server_applies_retention_at_start(tmp_path):
    ev = tmp_path / "ev"
    ev.mkdir()
    (ev / "ancient.jsonl").write_text("{}\n")
    os.utime(ev / "ancient.jsonl", (time.time() - 40 * 86400,) * 2)
    (ev / "fresh.jsonl").write_text("{}\n")
    with ServerThread(ServerConfig(port=0, events_dir=ev, events_retention_days=30)):
        pass
    assert sorted(p.name for p in ev.iterdir()) == ["fresh.jsonl"]
    with pytest.raises(ValueError, match="events directory"):
        ServerConfig(events_retention_days=3)


def test_recordings_expire_with_their_own_retention(tmp_path):
    now = time.time()
    rec = tmp_path / "rec"
    rec.mkdir()
    for name, age_days in (("old.wav", 10), ("live.wav", 10), ("new.wav", 1), ("old.jsonl", 10)):
        (rec / name).write_bytes(b"x")
        os.utime(rec / name, (now - age_days * 86400,) * 2)
    assert expire_recordings(rec, 7, keep={rec / "live.wav"}, now=now) == [rec / "old.wav"]
    assert sorted(p.name for p in rec.iterdir()) == ["live.wav", "new.wav", "old.jsonl"]
    (rec / "older.wav").write_bytes(b"x")
    os.utime(rec / "older.wav", (now - 40 * 86400,) * 2)
    with ServerThread(ServerConfig(port=0, record_dir=rec, record_retention_days=30)):
        pass
    assert not (rec / "older.wav").exists() and (rec / "new.wav").exists()
    with pytest.raises(ValueError, match="--record"):
        ServerConfig(record_retention_days=3)
