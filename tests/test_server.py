"""The websocket server over 127.0.0.1: protocols end to end, auth, bad input, load, vanishing peers."""

import asyncio
import base64
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from emostream.audio import float32_to_int16, mulaw_encode
from emostream.auth import AudioHookKey, sign_audiohook_request, twilio_signature
from emostream.client import SendOptions, send_file
from emostream.model import CLASSES
from emostream.protocols import format_duration
from emostream.server import ServerConfig
from emostream.timeline import read_events
from emostream.vad import VadConfig

from .conftest import ROOT, speechlike
from .live_util import ServerThread, expected_ends, write_call

PCM_START = {"type": "start", "call_id": "c1", "sample_rate": 16000, "channels": 1, "encoding": "pcm_s16le"}


def pcm_bytes(seconds, sr=16000, f0=150.0):
    return float32_to_int16(speechlike(seconds, sr, f0=f0)).astype("<i2").tobytes()


def recv_all(ws, timeout=20):
    """Every JSON text message until the server closes; returns (messages, close code, reason)."""
    out = []
    try:
        while True:
            data = ws.recv(timeout=timeout)
            if isinstance(data, str):
                out.append(json.loads(data))
    except ConnectionClosed as exc:
        return out, exc.rcvd.code if exc.rcvd else None, exc.rcvd.reason if exc.rcvd else ""


def by_channel(events):
    out = {}
    for e in events:
        out.setdefault(e["channel"], []).append(e)
    return out


# --- end to end per protocol ----------------------------------------------------------------


@pytest.mark.parametrize("protocol", ["pcm", "twilio", "audiohook"])
def test_call_per_protocol_timestamps_summary_and_jsonl(protocol, tmp_path):
    audio = write_call(tmp_path / "call.wav", 4.5)
    with ServerThread(port=0, events_dir=tmp_path / "events") as srv:
        result = asyncio.run(send_file(audio, srv.url, SendOptions(protocol=protocol, fast=True)))
    assert result.close_code == 1000 and result.summary is not None
    names = {"pcm": ("agent", "customer"), "twilio": ("customer", "agent"), "audiohook": ("customer", "agent")}[
        protocol
    ]
    sources = {"pcm": names, "twilio": ("inbound", "outbound"), "audiohook": ("external", "internal")}[protocol]
    channels = by_channel(result.events)
    assert set(channels) == set(names) == set(result.summary["channels"])
    for name in names:
        ends = [e["t_end"] for e in channels[name]]
        assert ends == pytest.approx(expected_ends(4.5), abs=2e-3)
        assert [e["t_start"] for e in channels[name]] == pytest.approx([max(0.0, t - 6) for t in ends], abs=2e-3)
        assert all(e["speech"] and e["label"] == "Neutral" for e in channels[name])
    assert result.summary["duration"] == pytest.approx(4.5, abs=2e-3)
    lines = [json.loads(line) for line in (tmp_path / "events" / f"{result.call_id}.jsonl").read_text().splitlines()]
    assert lines[-1]["type"] == "summary" and lines[-1]["end_reason"] == "completed"
    assert len(lines) - 1 == len(result.events)
    # one vocabulary for every protocol (#42 item 4); the bridge's own name in source_channel
    assert {(e["channel"], e["source_channel"]) for e in lines[:-1]} == set(zip(names, sources))
    # every line has a type; the summary names the model and the call's UTC start (#42 item 5)
    assert {x["type"] for x in lines[:-1]} == {"event"} and isinstance(
        lines[-1]["model"], dict
    )  # none here: no model_info
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", lines[-1]["started_at"])


def test_example_call_with_the_real_model(predictor, tmp_path):
    """The shipped model behind the server: a short stretch of the stereo example, sent over all three
    protocols at once (their windows share the worker's batches)."""
    import soundfile as sf

    data, sr = sf.read(ROOT / "examples" / "call_stereo.flac", dtype="float32")
    sf.write(tmp_path / "short.wav", data[: int(3.5 * sr)], sr)
    with ServerThread(port=0, predict=predictor.predict) as srv:

        async def calls():
            return await asyncio.gather(
                *[
                    send_file(tmp_path / "short.wav", srv.url, SendOptions(protocol=p, fast=True))
                    for p in ("pcm", "twilio", "audiohook")
                ]
            )

        results = asyncio.run(calls())
        stats = srv.server.worker.stats
    for result in results:
        assert result.summary is not None and len(result.summary["channels"]) == 2
        assert sorted({e["t_end"] for e in result.events}) == pytest.approx([1.0, 2.0, 3.0, 3.5], abs=2e-3)
        for e in result.events:
            if e["speech"]:
                assert e["label"] in CLASSES and abs(sum(e["probabilities"].values()) - 1) < 1e-3
    assert stats.windows == sum(sum(e["speech"] for e in r.events) for r in results)


# --- Twilio ----------------------------------------------------------------------------------


def twilio_messages(call_sid="CA" + "1" * 32, token=None, gap_ms=0, seconds=2.0):
    params = {"token": token} if token else {}
    yield {"event": "connected", "protocol": "Call", "version": "1.0.0"}
    yield {
        "event": "start",
        "sequenceNumber": "1",
        "streamSid": "MZ1",
        "start": {
            "accountSid": "AC1",
            "streamSid": "MZ1",
            "callSid": call_sid,
            "tracks": ["inbound"],
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        },
    }
    codes = mulaw_encode(float32_to_int16(speechlike(seconds, 8000)))
    half = len(codes) // 2
    for k, pos in enumerate(range(0, len(codes), 160)):
        ts = pos // 8 + (gap_ms if pos >= half else 0)
        yield {
            "event": "media",
            "sequenceNumber": str(k + 2),
            "streamSid": "MZ1",
            "media": {
                "track": "inbound",
                "chunk": str(k + 1),
                "timestamp": str(ts),
                "payload": base64.b64encode(codes[pos : pos + 160].tobytes()).decode(),
            },
        }
    yield {"event": "mark", "sequenceNumber": "999", "streamSid": "MZ1", "mark": {"name": "end"}}
    yield {
        "event": "stop",
        "sequenceNumber": "1000",
        "streamSid": "MZ1",
        "stop": {"accountSid": "AC1", "callSid": call_sid},
    }


def test_twilio_gap_in_timestamps_keeps_track_on_twilio_clock(tmp_path):
    with ServerThread(port=0, events_dir=tmp_path) as srv:
        with connect(srv.url + "/v1/twilio") as ws:
            for m in twilio_messages(gap_ms=1500):
                ws.send(json.dumps(m))
            messages, code, _ = recv_all(ws)
    assert code == 1000 and messages == []  # Twilio gets nothing back
    events = read_events(tmp_path / ("CA" + "1" * 32 + ".jsonl"))
    assert [e["t_end"] for e in events] == pytest.approx(expected_ends(3.5), abs=2e-3)


def test_twilio_signature_and_token(tmp_path):
    cfg = ServerConfig(port=0, token="tok", twilio_auth_token="twilio-secret", public_url="wss://calls.example.com")
    with ServerThread(cfg) as srv:
        good = twilio_signature("twilio-secret", "wss://calls.example.com/v1/twilio")
        with connect(srv.url + "/v1/twilio", additional_headers={"X-Twilio-Signature": good}) as ws:
            for m in twilio_messages(seconds=1.2):
                ws.send(json.dumps(m))
            assert recv_all(ws)[1] == 1000
        for headers in ({"X-Twilio-Signature": good[:-2] + "xx"}, {}):
            with pytest.raises(InvalidStatus) as info:
                connect(srv.url + "/v1/twilio", additional_headers=headers)
            assert info.value.response.status_code == 401
    with ServerThread(ServerConfig(port=0, token="tok")) as srv:
        # no header token: the start message must carry it as a custom parameter
        for token, code in (("nope", 1008), (None, 1008), ("tok", 1000)):
            with connect(srv.url + "/v1/twilio") as ws:
                try:
                    for m in twilio_messages(call_sid=f"CA{uuid.uuid4().hex}", token=token, seconds=1.2):
                        ws.send(json.dumps(m))
                except ConnectionClosed:
                    pass
                assert recv_all(ws)[1] == code
        with connect(srv.url + "/v1/twilio?token=tok") as ws:  # or in the URL
            for m in twilio_messages(seconds=1.2):
                ws.send(json.dumps(m))
            assert recv_all(ws)[1] == 1000


# --- AudioHook -------------------------------------------------------------------------------

ORG, CONV, PART = (str(uuid.uuid4()) for _ in range(3))


class AhClient:
    def __init__(self, ws, session_id):
        self.ws, self.id, self.seq, self.serverseq, self.samples = ws, session_id, 0, 0, 0

    def send(self, kind, **params):
        self.seq += 1
        self.ws.send(
            json.dumps(
                {
                    "version": "2",
                    "type": kind,
                    "seq": self.seq,
                    "serverseq": self.serverseq,
                    "id": self.id,
                    "position": format_duration(self.samples / 8000),
                    "parameters": params,
                }
            )
        )

    def recv(self):
        m = json.loads(self.ws.recv(timeout=20))
        self.serverseq = m["seq"]
        return m


def ah_headers(session_id, key="k"):
    return {
        "Audiohook-Organization-Id": ORG,
        "Audiohook-Correlation-Id": str(uuid.uuid4()),
        "Audiohook-Session-Id": session_id,
        "X-API-KEY": key,
    }


def test_audiohook_message_sequence(tmp_path):
    sid = str(uuid.uuid4())
    offers = [
        {"type": "audio", "format": "L16", "channels": ["external"], "rate": 8000},
        {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000},
    ]
    with ServerThread(port=0, events_dir=tmp_path) as srv:
        with connect(srv.url + "/v1/audiohook", additional_headers=ah_headers(sid)) as ws:
            c = AhClient(ws, sid)
            c.send(
                "open",
                organizationId=ORG,
                conversationId=CONV,
                participant={"id": PART, "ani": "", "aniName": "", "dnis": ""},
                media=offers,
                language="en-US",
                supportedLanguages=True,
            )
            opened = c.recv()
            assert (
                opened["type"] == "opened" and opened["seq"] == 1 and opened["clientseq"] == 1 and opened["id"] == sid
            )
            assert opened["version"] == "2" and opened["parameters"]["media"] == [offers[1]]
            assert opened["parameters"]["supportedLanguages"] == ["en-US", "de-DE"]
            c.send("ping", rtt="PT0.01S")
            pong = c.recv()
            assert (pong["type"], pong["seq"], pong["clientseq"]) == ("pong", 2, 2)
            stereo = np.stack([speechlike(1.5, 8000), speechlike(1.5, 8000, f0=220)], axis=1)
            codes = mulaw_encode(float32_to_int16(stereo.reshape(-1)))
            received = []
            for pos in range(0, len(codes), 320):
                ws.send(codes[pos : pos + 320].tobytes())
                c.samples += 160
            c.send("paused")
            c.send("resumed", start=format_duration(1.5), discarded="PT1S")  # 1 s not sent: a gap
            c.send("update", language="de-DE")
            c.send("discarded", start="PT2.5S", discarded="PT0.5S")
            c.send("error", code=500, message="client hiccup")
            ws.send(codes[:1600].tobytes())  # 0.1 s more at position 3.0
            c.send("close", reason="end")
            while True:
                m = c.recv()
                received.append(m)
                if m["type"] == "closed":
                    break
    seqs = [m["seq"] for m in received]
    assert seqs == list(range(3, 3 + len(received)))  # grows by exactly one
    assert all(m["clientseq"] <= c.seq and m["id"] == sid and m["version"] == "2" for m in received)
    assert received[-1]["clientseq"] == c.seq
    entities = [m["parameters"]["entities"][0] for m in received if m["type"] == "event"]
    assert entities[-1]["type"] == "emostream.summary"
    emotions = [e["data"] for e in entities if e["type"] == "emostream.emotion"]
    ends = sorted({float(d["offset"][2:-1]) + float(d["duration"][2:-1]) for d in emotions})
    assert ends == pytest.approx([1.0, 2.0, 3.0, 3.1], abs=2e-3)  # the gaps keep the position clock
    assert {(d["channel"], d["channelId"]) for d in emotions} == {("customer", 0), ("agent", 1)}
    assert (tmp_path / f"{sid}.jsonl").exists()


def test_audiohook_probe_and_bad_seq(tmp_path):
    null = "00000000-0000-0000-0000-000000000000"
    with ServerThread(port=0, events_dir=tmp_path) as srv:
        sid = str(uuid.uuid4())
        with connect(srv.url + "/v1/audiohook", additional_headers=ah_headers(sid)) as ws:
            c = AhClient(ws, sid)
            c.send(
                "open",
                organizationId=ORG,
                conversationId=null,
                participant={"id": null, "ani": "", "aniName": "", "dnis": ""},
                media=[{"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000}],
            )
            assert c.recv()["type"] == "opened"
            ws.send(b"")  # probes may send a 0-byte frame
            c.send("close", reason="end")
            assert c.recv()["type"] == "closed"
        assert list(tmp_path.iterdir()) == []  # probes leave no timeline
        sid = str(uuid.uuid4())
        with connect(srv.url + "/v1/audiohook", additional_headers=ah_headers(sid)) as ws:
            c = AhClient(ws, sid)
            c.send(
                "open",
                organizationId=ORG,
                conversationId=CONV,
                participant={"id": PART},
                media=[{"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}],
            )
            c.recv()
            c.seq += 5  # skip sequence numbers
            c.send("ping")
            disconnect = c.recv()
            assert disconnect["type"] == "disconnect" and disconnect["parameters"]["reason"] == "error"
            assert "seq" in disconnect["parameters"]["info"]
            c.send("close", reason="error")
            assert c.recv()["type"] == "closed"


def test_audiohook_signed_connections():
    secret = os.urandom(32)
    key = AudioHookKey("key1", secret)
    with ServerThread(ServerConfig(port=0, audiohook_keys=(key,))) as srv:

        def headers(sign=True, created=None, api_key="key1", target="/v1/audiohook"):
            h = ah_headers(str(uuid.uuid4()), api_key)
            if sign:
                signed = sign_audiohook_request(
                    {**h, "Host": f"127.0.0.1:{srv.port}"}, target, "key1", secret, created=created
                )
                h["Signature-Input"], h["Signature"] = signed["Signature-Input"], signed["Signature"]
            return h

        with connect(srv.url + "/v1/audiohook", additional_headers=headers()):
            pass
        for bad in (
            headers(sign=False),
            headers(created=int(time.time()) - 120),
            headers(api_key="key2"),
            headers(target="/v1/other"),
            {**headers(), "Audiohook-Session-Id": str(uuid.uuid4())},
        ):
            with pytest.raises(InvalidStatus) as info:
                connect(srv.url + "/v1/audiohook", additional_headers=bad)
            assert info.value.response.status_code == 401
        result = asyncio.run(
            send_file(
                ROOT / "examples" / "call_mono.flac",
                srv.url,
                SendOptions(protocol="audiohook", fast=True, audiohook_key=key),
            )
        )
        assert result.summary is not None and set(result.summary["channels"]) == {"customer"}


# --- auth, routing, limits -------------------------------------------------------------------


def test_token_auth_and_routing():
    with ServerThread(ServerConfig(port=0, token="s3cret")) as srv:
        for path, headers in (
            ("/v1/pcm", {"Authorization": "Bearer s3cret"}),
            ("/v1/pcm", {"X-API-KEY": "s3cret"}),
            ("/v1/pcm?token=s3cret", {}),
            ("/v1/events?token=s3cret", {}),
        ):
            with connect(srv.url + path, additional_headers=headers):
                pass
        for path, headers, status in (
            ("/v1/pcm", {}, 401),
            ("/v1/pcm", {"Authorization": "Bearer nope"}, 401),
            ("/v1/audiohook", {"X-API-KEY": "nope"}, 401),
            ("/v1/events", {}, 401),
            ("/v2/anything", {"Authorization": "Bearer s3cret"}, 404),
            ("/v1/nothere?token=nope", {}, 404),
        ):
            with pytest.raises(InvalidStatus) as info:
                connect(srv.url + path, additional_headers=headers)
            assert info.value.response.status_code == status
            assert b"c1" not in info.value.response.body  # says nothing about calls


def test_max_calls_and_idle_timeout():
    with ServerThread(ServerConfig(port=0, max_calls=1, idle_timeout=0.5, analyse="all")) as srv:
        with connect(srv.url + "/v1/pcm") as ws:
            ws.send(json.dumps(PCM_START))
            assert json.loads(ws.recv(timeout=5))["type"] == "started"
            with pytest.raises(InvalidStatus) as info:
                connect(srv.url + "/v1/pcm")
            assert info.value.response.status_code == 503
            messages, code, reason = recv_all(ws)  # then silence: closed for idleness
        assert code == 1001 and "idle" in reason
        with connect(srv.url + "/v1/pcm") as ws:  # the slot is free again
            ws.send(json.dumps({**PCM_START, "call_id": "c2"}))
            assert json.loads(ws.recv(timeout=5))["type"] == "started"


BAD_INPUTS = [
    ("pcm", ["{not json"], 1007, "malformed JSON"),
    ("pcm", ['{"type": "dance"}'], 1007, "unknown message type"),
    ("pcm", [json.dumps({**PCM_START, "encoding": "opus"})], 1007, "encoding 'opus' not supported"),
    ("pcm", [json.dumps(PCM_START), b"\x01\x02\x03"], 1007, "not a whole number"),
    ("pcm", [json.dumps({**PCM_START, "sample_rate": 7})], 1007, "sample_rate 7 not supported"),
    ("pcm", [json.dumps({**PCM_START, "sample_rate": 96000000})], 1007, "not supported"),
    ("pcm", [b"\x00\x00"], 1007, "audio before the start"),
    ("pcm", [json.dumps(PCM_START), b"\x00" * (300 * 1024)], 1009, ""),
    ("twilio", [b"\x00\x01"], 1007, "JSON text frames"),
    (
        "twilio",
        [
            '{"event": "start", "start": {"streamSid": "MZ1", "mediaFormat": {"encoding": "audio/L16", '
            '"sampleRate": 8000, "channels": 1}}}'
        ],
        1007,
        "encoding",
    ),
    ("twilio", ['{"event": "bogus"}'], 1007, "unknown event"),
]


def test_bad_input_closes_only_that_call(tmp_path):
    """Each malformed input gets a clear close reason; a concurrent good call is untouched and the
    server keeps serving."""
    good = write_call(tmp_path / "good.wav", 6.0, channels=1)
    with ServerThread(port=0, events_dir=tmp_path / "ev") as srv:

        async def good_call():
            return await send_file(good, srv.url, SendOptions(protocol="pcm", call_id="good-call"))

        loop = asyncio.new_event_loop()
        future = loop.run_in_executor(None, lambda: asyncio.run(good_call()))
        for protocol, frames, code, fragment in BAD_INPUTS:
            with connect(f"{srv.url}/v1/{protocol}") as ws:
                try:
                    for frame in frames:
                        ws.send(frame)
                except ConnectionClosed:
                    pass
                messages, got_code, reason = recv_all(ws)
            assert got_code == code, (frames, reason)
            assert fragment in reason
            if protocol == "pcm" and code == 1007:
                assert messages[-1]["type"] == "error" and fragment in messages[-1]["message"]
        result = loop.run_until_complete(future)
        loop.close()
        assert result.summary is not None and result.close_code == 1000
        assert [e["t_end"] for e in result.events] == expected_ends(6.0)
        ok = asyncio.run(send_file(good, srv.url, SendOptions(protocol="pcm", fast=True, call_id="after")))
        assert ok.summary is not None
        assert srv.server.errors >= sum(1 for b in BAD_INPUTS if b[2] == 1007)  # 1009 is closed by websockets itself


def test_call_length_is_bounded_gaps_included(tmp_path):
    """A Twilio timestamp far in the future cannot make the server chew through hours of silence."""
    with ServerThread(ServerConfig(port=0, max_call_seconds=30, events_dir=tmp_path)) as srv:
        with connect(srv.url + "/v1/twilio") as ws:
            messages = list(twilio_messages(gap_ms=3_600_000, seconds=1.0))
            try:
                for m in messages:
                    ws.send(json.dumps(m))
            except ConnectionClosed:
                pass
            _, code, reason = recv_all(ws)
        assert code == 1008 and "longer than the limit of 30 s" in reason
    lines = [json.loads(line) for line in (tmp_path / ("CA" + "1" * 32 + ".jsonl")).read_text().splitlines()]
    assert lines[-1]["type"] == "summary" and lines[-1]["duration"] < 1


def test_resampled_rates_and_g711(tmp_path):
    with ServerThread(port=0) as srv:
        for rate, encoding in ((8000, "pcm_s16le"), (44100, "pcm_s16le"), (8000, "mulaw"), (8000, "alaw")):
            with connect(srv.url + "/v1/pcm") as ws:
                ws.send(
                    json.dumps(
                        {**PCM_START, "call_id": f"r{rate}{encoding}", "sample_rate": rate, "encoding": encoding}
                    )
                )
                x = float32_to_int16(speechlike(2.2, rate))
                if encoding == "mulaw":
                    data = mulaw_encode(x).tobytes()
                elif encoding == "alaw":
                    from emostream.audio import alaw_encode

                    data = alaw_encode(x).tobytes()
                else:
                    data = x.astype("<i2").tobytes()
                ws.send(data)
                ws.send(json.dumps({"type": "stop"}))
                messages, code, _ = recv_all(ws)
            assert code == 1000
            events = [m for m in messages if m["type"] == "event"]
            assert [e["t_end"] for e in events] == pytest.approx([1.0, 2.0, 2.2], abs=1e-3)
            assert messages[-1]["type"] == "summary"


# --- /v1/events ------------------------------------------------------------------------------


def test_events_feed_sees_every_call(tmp_path):
    audio = write_call(tmp_path / "c.wav", 2.5)
    with ServerThread(port=0) as srv:
        with connect(srv.url + "/v1/events") as sub:
            assert json.loads(sub.recv(timeout=5))["type"] == "hello"
            asyncio.run(send_file(audio, srv.url, SendOptions(protocol="pcm", fast=True, call_id="feed-1")))
            kinds = []
            while "call_ended" not in kinds:
                m = json.loads(sub.recv(timeout=10))
                kinds.append(m["type"])
            assert kinds[0] == "call_started" and kinds[-2:] == ["summary", "call_ended"]
            assert kinds.count("event") == 2 * len(expected_ends(2.5))
            sub.send("hello?")  # read-only
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    sub.recv(timeout=5)
            assert info.value.rcvd.code == 1008


# --- load and vanishing peers ------------------------------------------------------------------


def test_twenty_concurrent_calls(tmp_path):
    audio = write_call(tmp_path / "c.wav", 3.2)
    with ServerThread(
        ServerConfig(port=0, events_dir=tmp_path / "ev", max_calls=20, vad=VadConfig.named("energy"))
    ) as srv:

        async def all_calls():
            protocols = ["pcm", "twilio", "audiohook", "pcm"] * 5
            return await asyncio.gather(
                *[
                    send_file(
                        audio,
                        srv.url,
                        SendOptions(protocol=p, fast=True, call_id=f"load-{i}" if p != "audiohook" else None),
                    )
                    for i, p in enumerate(protocols)
                ]
            )

        t0 = time.monotonic()
        results = asyncio.run(all_calls())
        elapsed = time.monotonic() - t0
        stats = srv.server.worker.stats
    assert all(r.summary is not None and r.close_code == 1000 for r in results)
    for r in results:
        assert sorted({e["t_end"] for e in r.events}) == pytest.approx(expected_ends(3.2), abs=2e-3)
    assert len(list((tmp_path / "ev").iterdir())) == 20
    assert stats.largest_batch > 2  # windows of different calls shared model calls
    assert elapsed < 60


def test_killed_client_leaves_complete_jsonl(tmp_path):
    audio = write_call(tmp_path / "long.wav", 30.0, channels=1)
    with ServerThread(port=0, events_dir=tmp_path / "ev") as srv:
        proc = subprocess.Popen(
            [sys.executable, "-m", "emostream", "send", str(audio), srv.url, "--call-id", "victim", "--quiet"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        path = tmp_path / "ev" / "victim.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not path.exists() or len(path.read_text().splitlines()) < 3):
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and "summary" not in path.read_text():
            time.sleep(0.1)
        assert srv.server.calls == {}
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    events, summary = lines[:-1], lines[-1]
    assert summary["type"] == "summary" and summary["end_reason"] == "peer disconnected"
    ends = [e["t_end"] for e in events]
    assert len(ends) >= 3 and ends[: int(ends[-1])] == [float(k) for k in range(1, int(ends[-1]) + 1)]
    assert summary["channels"]["ch0"]["windows"] == len(events)
