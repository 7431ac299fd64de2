"""Issue 40: the live server under abuse, overload and broken peers (websocket clients against a real
server on 127.0.0.1, as tests/test_server.py). One test (or a few) per numbered item of the issue."""

import asyncio
import base64
import http.client
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import uuid

import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from emostream.audio import float32_to_int16, mulaw_encode
from emostream.auth import AudioHookKey, sign_audiohook_request
from emostream.client import SendOptions, send_file
from emostream.protocols import MAX_GAP_SECONDS
from emostream.server import ServerConfig
from emostream.timeline import read_events
from emostream.vad import VadConfig
from emostream.worker import constant_predictor

from .conftest import ROOT, speechlike
from .live_util import ServerThread, expected_ends, write_call
from .test_server import CONV, ORG, PART, PCM_START, AhClient, ah_headers, pcm_bytes, recv_all, twilio_messages


def config(**kwargs) -> ServerConfig:
    """ServerThread's default test configuration (energy gate, every channel), with changes."""
    return ServerConfig(**{"port": 0, "vad": VadConfig.named("energy"), "analyse": "all", **kwargs})


def slow_predictor(seconds: float):
    """The constant predictor, ``seconds`` per model call: the model is the bottleneck."""
    fast = constant_predictor()

    def predict(windows):
        time.sleep(seconds)
        return fast(windows)

    return predict


def jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def send_frames(ws, frames):
    try:
        for frame in frames:
            ws.send(frame)
    except ConnectionClosed:
        pass


def no_errors_logged(caplog):
    bad = [r for r in caplog.records if r.name.startswith("emostream") and (r.levelno >= logging.ERROR or r.exc_info)]
    assert not bad, [r.getMessage() for r in bad]


def healthz_ms(port: int) -> float:
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", "/healthz")
    assert conn.getresponse().status == 200
    conn.close()
    return (time.perf_counter() - t0) * 1000


def media(ts_ms: int, seconds: float = 0.02, k: int = 1) -> dict:
    codes = mulaw_encode(float32_to_int16(speechlike(seconds, 8000)))
    return {
        "event": "media",
        "sequenceNumber": str(k),
        "streamSid": "MZ1",
        "media": {
            "track": "inbound",
            "chunk": str(k),
            "timestamp": str(ts_ms),
            "payload": base64.b64encode(codes.tobytes()).decode(),
        },
    }


# --- 1. a gap costs O(1) ---------------------------------------------------------------------


def test_long_gap_is_one_record_and_the_schedule_restarts(tmp_path):
    """A Twilio timestamp 1 h ahead: one ``gap`` record, the windows before it end with a final one,
    the schedule restarts after it; a handful of lines, not 3,600, and the loop stays responsive."""
    messages = list(twilio_messages(seconds=2.0))  # connected, start, 2 s of media, mark, stop
    head, tail = messages[:2], messages[-2:]
    gap_ms = 3_600_000
    with ServerThread(config(events_dir=tmp_path)) as srv:
        with connect(srv.url + "/v1/twilio") as ws:
            for m in head:
                ws.send(json.dumps(m))
            for k in range(50):  # 1 s of audio
                ws.send(json.dumps(media(20 * k, k=k + 1)))
            t0 = time.monotonic()
            for k in range(125):  # 2.5 s more, an hour later
                ws.send(json.dumps(media(1000 + gap_ms + 20 * k, k=k + 51)))
            health = healthz_ms(srv.port)
            for m in tail:
                ws.send(json.dumps(m))
            _, code, _ = recv_all(ws)
            elapsed = time.monotonic() - t0
    assert code == 1000 and elapsed < 5 and health < 1000
    lines = jsonl(tmp_path / ("CA" + "1" * 32 + ".jsonl"))
    gaps = [x for x in lines if x.get("type") == "gap"]
    assert gaps == [
        {
            "type": "gap",
            "stream": "CA" + "1" * 32,
            "channel": "customer",
            "t_start": 1.0,
            "t_end": pytest.approx(3601.0, abs=1e-3),
        }
    ]
    ends = [e["t_end"] for e in read_events(tmp_path / ("CA" + "1" * 32 + ".jsonl"))]
    assert ends == pytest.approx([1.0, 3602.0, 3603.0, 3603.5], abs=2e-3)  # restarted at 3601 s
    assert len(lines) < 10
    assert lines[-1]["type"] == "summary" and lines[-1]["duration"] == pytest.approx(3603.5, abs=2e-3)


def test_gap_limits_per_message_and_audiohook_discards(tmp_path, caplog):
    """More than MAX_GAP_SECONDS in one message is bad input (1007); five 1-hour AudioHook ``discarded``
    cost a few messages, not 21,601."""
    with ServerThread(config(events_dir=tmp_path, max_call_seconds=6 * 3600)) as srv:
        with connect(srv.url + "/v1/twilio") as ws:
            head = list(twilio_messages(seconds=1.0))[:2]
            send_frames(
                ws,
                [json.dumps(m) for m in head]
                + [json.dumps(media(0)), json.dumps(media(int((MAX_GAP_SECONDS + 60) * 1000)))],
            )
            _, code, reason = recv_all(ws)
        assert code == 1007 and "jumps" in reason
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
            assert c.recv()["type"] == "opened"
            t0 = time.monotonic()
            for k in range(5):
                c.send("discarded", start=f"PT{k * 3600}S", discarded="PT3600S")
                c.samples = (k + 1) * 3600 * 8000
            ws.send(mulaw_encode(float32_to_int16(speechlike(1.0, 8000))).tobytes())
            c.send("close", reason="end")
            received = []
            while not received or received[-1]["type"] != "closed":
                received.append(c.recv())
            assert time.monotonic() - t0 < 5
    assert len(received) < 10
    lines = jsonl(tmp_path / f"{sid}.jsonl")
    assert [(g["t_start"], g["t_end"]) for g in lines if g.get("type") == "gap"] == [
        (0.0, 3600.0),
        (3600.0, 7200.0),
        (7200.0, 10800.0),
        (10800.0, 14400.0),
        (14400.0, 18000.0),
    ]
    no_errors_logged(caplog)


# --- 2. connections must start, send audio, and are bounded before they start ----------------------


def test_start_deadline_idle_counts_audio_and_unstarted_are_bounded(caplog):
    cfg = config(idle_timeout=1.0, start_timeout=1.0, max_unstarted=2, token="tok")
    with ServerThread(cfg) as srv:
        # zero-length binary frames after start are not audio: idle after 1 s
        with connect(srv.url + "/v1/pcm?token=tok") as ws:
            ws.send(json.dumps(PCM_START))
            assert json.loads(ws.recv(timeout=5))["type"] == "started"
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 5:
                    ws.send(b"")
                    time.sleep(0.1)
            except ConnectionClosed:
                pass
            _, code, reason = recv_all(ws, timeout=5)
        assert code == 1001 and "no audio" in reason and time.monotonic() - t0 < 3
        # unauthenticated Twilio "connected" frames: closed at the start deadline
        with connect(srv.url + "/v1/twilio") as ws:
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 5:
                    ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
                    time.sleep(0.1)
            except ConnectionClosed:
                pass
            _, code, reason = recv_all(ws, timeout=5)
        assert code == 1008 and "no start within 1 s" in reason and time.monotonic() - t0 < 3
        # at most max_unstarted connections wait for their start
        with connect(srv.url + "/v1/twilio"), connect(srv.url + "/v1/twilio"):
            with pytest.raises(InvalidStatus) as info:
                connect(srv.url + "/v1/twilio")
            assert info.value.response.status_code == 503
        time.sleep(0.2)
        with connect(srv.url + "/v1/pcm?token=tok") as ws:  # room again
            ws.send(json.dumps({**PCM_START, "call_id": "after"}))
            assert json.loads(ws.recv(timeout=5))["type"] == "started"


def test_audiohook_ping_before_open_meets_the_start_deadline():
    secret = os.urandom(32)
    key = AudioHookKey("key1", secret)
    with ServerThread(config(audiohook_keys=(key,), start_timeout=1.0)) as srv:
        sid = str(uuid.uuid4())
        h = ah_headers(sid, "key1")
        signed = sign_audiohook_request({**h, "Host": f"127.0.0.1:{srv.port}"}, "/v1/audiohook", "key1", secret)
        h.update({"Signature-Input": signed["Signature-Input"], "Signature": signed["Signature"]})
        with connect(srv.url + "/v1/audiohook", additional_headers=h) as ws:
            c = AhClient(ws, sid)
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < 5:
                    c.send("ping")
                    assert c.recv()["type"] == "pong"
                    time.sleep(0.1)
            except ConnectionClosed:
                pass
            _, code, _ = recv_all(ws, timeout=5)
        assert code == 1008 and time.monotonic() - t0 < 3


# --- 3. bad input is 1007 (or an AudioHook disconnect), never 1011 ---------------------------------


def test_deep_json_and_infinite_timestamps_are_bad_input(caplog):
    with ServerThread(config()) as srv:
        for path, frames in (
            ("/v1/pcm", ["[" * 100_000]),
            ("/v1/twilio", ["[" * 100_000]),
            ("/v1/pcm", [json.dumps({**PCM_START, "encoding": ["pcm_s16le"]})]),  # unhashable
            (
                "/v1/twilio",
                [json.dumps(m) for m in list(twilio_messages())[:2]]
                + [
                    '{"event": "media", "streamSid": "MZ1", "media": {"track": "inbound", '
                    '"timestamp": Infinity, "payload": ""}}'
                ],
            ),
        ):
            with connect(srv.url + path, max_size=None) as ws:
                send_frames(ws, frames)
                _, code, reason = recv_all(ws)
            assert code == 1007, (path, reason)
        sid = str(uuid.uuid4())
        with connect(srv.url + "/v1/audiohook", additional_headers=ah_headers(sid)) as ws:
            c = AhClient(ws, sid)
            ws.send("[" * 60_000)
            disconnect = c.recv()
            assert disconnect["type"] == "disconnect" and disconnect["parameters"]["reason"] == "error"
            assert "not valid JSON" in disconnect["parameters"]["info"]
            c.send("close", reason="error")
            assert c.recv()["type"] == "closed"
            _, code, _ = recv_all(ws)
        assert code == 1000
        sid = str(uuid.uuid4())
        with connect(srv.url + "/v1/audiohook", additional_headers=ah_headers(sid)) as ws:
            c = AhClient(ws, sid)
            c.send(
                "open",
                organizationId=ORG,
                conversationId=CONV,
                participant={"id": PART},
                media=[
                    {"type": "audio", "format": ["PCMU"], "channels": [["external"]], "rate": 8000},
                    {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000},
                ],
            )
            assert c.recv()["parameters"]["media"] == [
                {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}
            ]  # unhashable offers skipped, not a crash
            c.send("discarded", start="PT" + "9" * 400 + "S", discarded="PT1S")  # overflows a float
            disconnect = c.recv()
            assert disconnect["type"] == "disconnect" and disconnect["parameters"]["reason"] == "error"
        assert srv.server.errors >= 6
    no_errors_logged(caplog)


# --- 4. call ids are matched in full ---------------------------------------------------------------


def test_call_id_with_trailing_newline_is_refused(tmp_path):
    with ServerThread(config(events_dir=tmp_path)) as srv:
        with connect(srv.url + "/v1/pcm") as ws:
            send_frames(ws, [json.dumps({**PCM_START, "call_id": "x\n"})])
            _, code, reason = recv_all(ws)
        assert code == 1007 and "call_id" in reason
        with connect(srv.url + "/v1/twilio") as ws:
            messages = list(twilio_messages(seconds=0.2))
            messages[1]["start"]["customParameters"] = {"call_id": "x\n"}
            send_frames(ws, [json.dumps(m) for m in messages])
            _, code, reason = recv_all(ws)
        assert code == 1007 and "call id" in reason
        sid = str(uuid.uuid4())
        with connect(
            srv.url + "/v1/audiohook", additional_headers={**ah_headers(sid), "Audiohook-Session-Id": "-"}
        ) as ws:
            c = AhClient(ws, sid + "\n")  # an id with a newline in the messages
            c.send(
                "open",
                organizationId=ORG,
                conversationId=CONV,
                participant={"id": PART},
                media=[{"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}],
            )
            assert c.recv()["type"] == "disconnect"
    assert list(tmp_path.iterdir()) == []


# --- 5. a vanished peer is a normal event; what arrived is analysed ------------------------------


def test_peer_closing_mid_stream_loses_no_audio_and_logs_no_error(tmp_path, caplog):
    """The peer sends 4 s and closes without ``stop`` while the (slow) model is behind: every frame the
    server received is analysed before the summary; one INFO line, no traceback."""
    caplog.set_level(logging.INFO, logger="emostream")
    with ServerThread(config(events_dir=tmp_path), predict=slow_predictor(0.05)) as srv:
        with connect(srv.url + "/v1/pcm") as ws:
            ws.send(json.dumps({**PCM_START, "call_id": "closer"}))
            data = pcm_bytes(4.0)
            for pos in range(0, len(data), 640):
                ws.send(data[pos : pos + 640])
        path = tmp_path / "closer.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not path.exists() or '"summary"' not in path.read_text()):
            time.sleep(0.1)
        # and a TCP reset mid-call
        with connect(srv.url + "/v1/pcm") as ws:
            ws.send(json.dumps({**PCM_START, "call_id": "reset"}))
            data = pcm_bytes(2.0)
            for pos in range(0, len(data), 640):
                ws.send(data[pos : pos + 640])
            time.sleep(0.5)
            ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            ws.socket.close()  # a TCP reset: no close frame
        reset = tmp_path / "reset.jsonl"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not reset.exists() or '"summary"' not in reset.read_text()):
            time.sleep(0.1)
    summary = jsonl(path)[-1]
    assert summary["type"] == "summary" and summary["end_reason"].startswith("peer closed: 1000")
    assert summary["duration"] == pytest.approx(4.0, abs=1e-3)
    assert [e["t_end"] for e in read_events(path)] == pytest.approx(expected_ends(4.0), abs=2e-3)
    assert jsonl(reset)[-1]["end_reason"] == "peer disconnected"
    no_errors_logged(caplog)
    assert any("ended: peer" in r.getMessage() for r in caplog.records)


# --- 6. keepalive does not cut calls whose pongs wait behind our own backlog ------------------------


def test_keepalive_spares_fast_calls_behind_a_slow_model(tmp_path):
    """Three ``send --fast`` calls against a model slower than they send, with pings every 0.3 s and
    a 0.3 s pong timeout: the pongs wait behind audio the server has not read yet. The stock keepalive
    closes all three with 1011 "keepalive ping timeout"; this one lets them finish with every window."""
    audio = write_call(tmp_path / "c.wav", 12.0, channels=1)
    with ServerThread(config(ping_interval=0.3, ping_timeout=0.3), predict=slow_predictor(0.15)) as srv:

        async def calls():
            return await asyncio.gather(
                *[
                    send_file(audio, srv.url, SendOptions(protocol="pcm", fast=True, call_id=f"fast-{i}"))
                    for i in range(3)
                ]
            )

        results = asyncio.run(calls())
    for r in results:
        assert r.close_code == 1000 and r.summary is not None, r.close_reason
        assert [e["t_end"] for e in r.events] == pytest.approx(expected_ends(12.0), abs=2e-3)


async def _fast_pcm_call(url: str, factory, seconds: float) -> tuple[int, int | None]:
    """A /v1/pcm call sent as fast as possible with pings every 0.3 s (0.3 s timeout) on the client
    side: (events received, close code)."""
    from websockets.asyncio.client import connect as async_connect

    async with async_connect(
        url + "/v1/pcm", ping_interval=0.3, ping_timeout=0.3, close_timeout=1, create_connection=factory
    ) as ws:
        await ws.send(json.dumps({**PCM_START, "call_id": f"client-{uuid.uuid4().hex[:8]}"}))
        data = pcm_bytes(seconds)
        events = 0
        try:
            for pos in range(0, len(data), 640):
                await ws.send(data[pos : pos + 640])
            await ws.send(json.dumps({"type": "stop"}))
            async for message in ws:
                events += json.loads(message).get("type") == "event"
        except ConnectionClosed:
            pass
        return events, ws.close_code


def test_client_keepalive_spares_a_fast_sender_behind_a_slow_server():
    """The client side of item 6 (``emostream send`` and the soak use it): the client's pings wait in
    the server's socket buffers behind its own audio, where neither write buffer shows them; the
    server's events keep arriving, so the client keeps waiting. websockets' stock client keepalive
    cuts the call (1011 sent, 1006 seen)."""
    from emostream.keepalive import KeepaliveClientConnection

    with ServerThread(config(), predict=slow_predictor(0.15)) as srv:
        assert asyncio.run(_fast_pcm_call(srv.url, KeepaliveClientConnection, 12.0)) == (12, 1000)


def test_keepalive_still_closes_a_silent_peer(tmp_path):
    """A peer that stops answering pings (with nothing of ours backlogged) is still closed (1011)."""
    from websockets.asyncio.client import connect as async_connect

    with ServerThread(config(ping_interval=0.2, ping_timeout=0.2, idle_timeout=30, events_dir=tmp_path)) as srv:

        async def silent() -> float:
            async with async_connect(srv.url + "/v1/pcm", ping_interval=None, close_timeout=0.5) as ws:
                await ws.send(json.dumps(PCM_START))
                await ws.recv()
                ws.transport.pause_reading()  # pings go unanswered
                t0 = time.monotonic()
                while (
                    (tmp_path / "c1.jsonl").exists()
                    and '"summary"' not in (tmp_path / "c1.jsonl").read_text()
                    and time.monotonic() - t0 < 15
                ):
                    await asyncio.sleep(0.05)
                return time.monotonic() - t0

        assert asyncio.run(silent()) < 10
    assert jsonl(tmp_path / "c1.jsonl")[-1]["end_reason"] == "server closed: 1011 keepalive ping timeout"


# --- 7. end_reason says who closed and why ------------------------------------------------------


def test_end_reason_names_the_server_closing(tmp_path):
    with ServerThread(config(events_dir=tmp_path)) as srv:
        for call_id, frame, code in (("big", b"\x00" * (300 * 1024), 1009), ("utf8", None, 1007)):
            with connect(srv.url + "/v1/pcm", max_size=None) as ws:
                ws.send(json.dumps({**PCM_START, "call_id": call_id}))
                ws.recv(timeout=5)
                ws.send(pcm_bytes(1.2))
                try:
                    if frame is None:
                        ws.send(b"\xff\xfe{", text=True)  # a text frame that is not UTF-8
                    else:
                        ws.send(frame)
                except ConnectionClosed:
                    pass
                _, got, _ = recv_all(ws)
            assert got == code
            path = tmp_path / f"{call_id}.jsonl"
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and '"summary"' not in path.read_text():
                time.sleep(0.05)
            summary = jsonl(path)[-1]
            assert summary["end_reason"].startswith(f"server closed: {code}"), summary["end_reason"]
            assert summary["duration"] == pytest.approx(1.2, abs=1e-3)


# --- 8. nonces, methods, an AudioHook call with nothing to analyse, SIGTERM -------------------


def test_replayed_audiohook_signature_is_refused():
    secret = os.urandom(32)
    key = AudioHookKey("key1", secret)
    with ServerThread(config(audiohook_keys=(key,))) as srv:
        h = ah_headers(str(uuid.uuid4()), "key1")
        signed = sign_audiohook_request({**h, "Host": f"127.0.0.1:{srv.port}"}, "/v1/audiohook", "key1", secret)
        h.update({"Signature-Input": signed["Signature-Input"], "Signature": signed["Signature"]})
        with connect(srv.url + "/v1/audiohook", additional_headers=h):
            pass
        with pytest.raises(InvalidStatus) as info:
            connect(srv.url + "/v1/audiohook", additional_headers=h)
        assert info.value.response.status_code == 401


def test_other_methods_get_405_with_allow():
    with ServerThread(config()) as srv:
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            for path in ("/healthz", "/v1/calls", "/", "/v1/pcm"):
                conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
                conn.request(method, path)  # (a request with a body is dropped by websockets, unanswered)
                response = conn.getresponse()
                assert response.status == 405 and response.getheader("Allow") == "GET", (method, path)
                conn.close()


def test_audiohook_offering_only_the_agent_opens_with_no_media(tmp_path):
    with ServerThread(config(events_dir=tmp_path, analyse="customer")) as srv:
        sid = str(uuid.uuid4())
        with connect(srv.url + "/v1/audiohook", additional_headers=ah_headers(sid)) as ws:
            c = AhClient(ws, sid)
            c.send(
                "open",
                organizationId=ORG,
                conversationId=CONV,
                participant={"id": PART},
                media=[{"type": "audio", "format": "PCMU", "channels": ["internal"], "rate": 8000}],
            )
            opened = c.recv()
            assert opened["type"] == "opened" and opened["parameters"]["media"] == []
            c.send("ping")
            assert c.recv()["type"] == "pong"
            c.send("close", reason="end")
            assert c.recv()["type"] == "closed"
            _, code, _ = recv_all(ws)
        assert code == 1000
        metrics = srv.server.metrics.render().decode().splitlines()
    assert [
        line
        for line in metrics
        if line.startswith("emostream_calls_total")
        and 'outcome="not_analysed"' in line
        and 'protocol="audiohook"' in line
    ] == ['emostream_calls_total{outcome="not_analysed",protocol="audiohook"} 1.0']
    assert list(tmp_path.iterdir()) == []  # nothing analysed, nothing stored


def test_sigterm_ends_replay_with_a_summary(shipped_checkpoint, tmp_path):
    audio = write_call(tmp_path / "long.wav", 60.0, channels=1)
    out = tmp_path / "events.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "emostream", "replay", str(audio), "--no-dashboard", "--events", str(out)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 130
    lines = jsonl(out)
    assert lines[-1]["type"] == "summary" and lines[-1]["channels"]["ch0"]["windows"] >= len(lines) - 1 >= 2


# --- 9. memory: bounded events per live call, bounded ended calls ----------------------------


def test_live_call_keeps_bounded_events_and_the_page_bounded_ended_calls(tmp_path):
    audio = write_call(tmp_path / "c.wav", 30.0, channels=1)
    short = write_call(tmp_path / "s.wav", 1.5, channels=1)
    with ServerThread(config(max_events_kept=8, max_ended_calls=2)) as srv:

        def ended_calls() -> list[str]:
            return srv.call(_ended(srv.server))

        result = asyncio.run(send_file(audio, srv.url, SendOptions(protocol="pcm", fast=True, call_id="long")))
        deadline = time.monotonic() + 10
        while "long" not in ended_calls() and time.monotonic() < deadline:
            time.sleep(0.05)
        detail = srv.call(_detail(srv.server, "long"))
        for i in range(4):
            asyncio.run(send_file(short, srv.url, SendOptions(protocol="pcm", fast=True, call_id=f"s{i}")))
            deadline = time.monotonic() + 10
            while f"s{i}" not in ended_calls() and time.monotonic() < deadline:
                time.sleep(0.05)
        ended = ended_calls()
    assert result.summary["channels"]["ch0"]["windows"] == 30  # the summary counts every window
    assert 8 <= len(detail["events"]) <= 11  # the page gets the newest max_events_kept (+25 % slack)
    assert detail["events"][-1]["t_end"] == 30.0
    assert ended == ["s2", "s3"]


async def _ended(server) -> list[str]:
    return sorted(server.ended)


async def _detail(server, call_id: str) -> dict:
    return server.ended[call_id].detail()
