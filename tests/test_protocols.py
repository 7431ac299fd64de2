"""Pure protocol state machines, authentication helpers, streaming resampler and worker."""

import asyncio
import base64
import hashlib
import hmac
import json
import time

import numpy as np
import pytest

from emostream.analyzer import Analyzer, AnalyzerConfig
from emostream.audio import StreamResampler, alaw_encode, float32_to_int16, mulaw_decode, mulaw_encode, resample
from emostream.audiohook import NULL_UUID, AudioHookSession
from emostream.auth import (
    AudioHookKey,
    request_token,
    sign_audiohook_request,
    token_ok,
    twilio_signature,
    twilio_signature_ok,
    verify_audiohook_request,
)
from emostream.protocols import (
    CLOSE_POLICY,
    Audio,
    End,
    PcmSession,
    ProtocolError,
    Send,
    Silence,
    Start,
    format_duration,
    parse_duration,
)
from emostream.stream import StreamWindower
from emostream.twilio_media import TwilioSession
from emostream.vad import VadConfig
from emostream.worker import InferenceWorker, WorkerConfig, WorkerOverloaded, constant_predictor

from .conftest import speechlike

SID = "6f1b3a52-0c0e-4e43-9d0b-1f7e0a3c9b11"
ORG = "d7934305-0972-4844-938e-9060eef73d05"
CONV = "090eaa2f-72fa-480a-83e0-8667ff89c0ec"
PART = "883efee8-3d6c-4537-b500-6d7ca4b92fa0"


# --- PCM -------------------------------------------------------------------------------------


def pcm_start(**kw):
    msg = {
        "type": "start",
        "call_id": "c1",
        "sample_rate": 16000,
        "channels": 2,
        "encoding": "pcm_s16le",
        "channel_names": ["agent", "customer"],
    }
    msg.update(kw)
    return json.dumps(msg)


def test_pcm_start_audio_stop():
    s = PcmSession()
    actions = s.on_text(pcm_start())
    assert isinstance(actions[0], Start) and actions[0].channels == ("agent", "customer")
    assert isinstance(actions[1], Send) and actions[1].message["type"] == "started"
    left, right = np.array([1000, -2000, 3000], np.int16), np.array([7, 8, 9], np.int16)
    frame = np.stack([left, right], axis=1).reshape(-1).astype("<i2").tobytes()
    a0, a1 = s.on_binary(frame)
    assert (a0.channel, a1.channel) == (0, 1)
    np.testing.assert_allclose(a0.samples * 32768, left)
    np.testing.assert_allclose(a1.samples * 32768, right)
    assert isinstance(s.on_text('{"type": "stop"}')[0], End)


@pytest.mark.parametrize("encoding,encode", [("mulaw", mulaw_encode), ("alaw", alaw_encode)])
def test_pcm_g711_decoding(encoding, encode):
    s = PcmSession()
    s.on_text(pcm_start(encoding=encoding, sample_rate=8000, channels=1, channel_names=["x"]))
    x = speechlike(0.1, 8000)
    (a,) = s.on_binary(encode(float32_to_int16(x)).tobytes())
    assert np.abs(a.samples - x).max() < 0.01


@pytest.mark.parametrize(
    "text,fragment",
    [
        ("{nope", "malformed JSON"),
        ("[1, 2]", "JSON object"),
        ('{"type": "hello"}', "unknown message type"),
        ('{"type": "stop"}', "stop before start"),
        (pcm_start(encoding="opus"), "encoding 'opus' not supported"),
        (pcm_start(sample_rate=7), "sample_rate 7 not supported"),
        (pcm_start(sample_rate=10**9), "not supported"),
        (pcm_start(sample_rate="16000"), "not supported"),
        (pcm_start(channels=3), "channels must be 1 or 2"),
        (pcm_start(channel_names=["a", "a"]), "distinct"),
        (pcm_start(call_id="../etc/passwd"), "call_id"),
        (pcm_start(call_id=""), "call_id"),
    ],
)
def test_pcm_rejects(text, fragment):
    with pytest.raises(ProtocolError, match=fragment) as info:
        PcmSession().on_text(text)
    assert info.value.code == 1007


def test_pcm_rejects_bad_frames():
    s = PcmSession()
    with pytest.raises(ProtocolError, match="before the start"):
        s.on_binary(b"\x00\x00")
    s.on_text(pcm_start())
    with pytest.raises(ProtocolError, match="not a whole number of 4-byte"):
        s.on_binary(b"\x00" * 6)
    assert s.on_binary(b"") == []
    with pytest.raises(ProtocolError, match="duplicate start"):
        s.on_text(pcm_start())


# --- Twilio ----------------------------------------------------------------------------------


def twilio_start(**custom):
    return json.dumps(
        {
            "event": "start",
            "sequenceNumber": "1",
            "streamSid": "MZ1",
            "start": {
                "accountSid": "AC1",
                "streamSid": "MZ1",
                "callSid": "CA1",
                "tracks": ["inbound", "outbound"],
                "customParameters": custom,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        }
    )


def twilio_media(track, ts, samples, chunk=1):
    payload = base64.b64encode(mulaw_encode(float32_to_int16(samples)).tobytes()).decode()
    return json.dumps(
        {
            "event": "media",
            "sequenceNumber": "2",
            "streamSid": "MZ1",
            "media": {"track": track, "chunk": str(chunk), "timestamp": str(ts), "payload": payload},
        }
    )


def test_twilio_tracks_become_channels_and_timestamps_fill_gaps():
    s = TwilioSession()
    assert s.on_text(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})) == []
    (start,) = s.on_text(twilio_start())
    assert start.call_id == "CA1" and start.channels == ("customer", "agent") and start.sample_rate == 8000
    assert start.source_channels == ("inbound", "outbound")
    x = speechlike(0.02, 8000)
    (a,) = s.on_text(twilio_media("outbound", 0, x))
    assert a.channel == 1 and len(a.samples) == 160
    np.testing.assert_allclose(a.samples, mulaw_decode(mulaw_encode(float32_to_int16(x))) / 32768)
    assert len(s.on_text(twilio_media("outbound", 20, x))) == 1  # on time: no gap
    gap, audio = s.on_text(twilio_media("outbound", 1000, x))  # 960 ms missing
    assert isinstance(gap, Silence) and gap.channel == 1 and gap.samples == 8000 - 320
    assert isinstance(audio, Audio)
    assert [
        type(a)
        for a in s.on_text(
            json.dumps({"event": "dtmf", "streamSid": "MZ1", "dtmf": {"track": "inbound_track", "digit": "5"}})
        )
    ] != []
    s.on_text(json.dumps({"event": "mark", "streamSid": "MZ1", "mark": {"name": "greeting"}}))
    assert s.dtmf == ["5"] and s.marks == ["greeting"]
    assert isinstance(s.on_text(json.dumps({"event": "stop", "streamSid": "MZ1", "stop": {}}))[0], End)


@pytest.mark.parametrize(
    "setup,message,fragment",
    [
        (False, twilio_media("inbound", 0, np.zeros(160)), "before start"),
        (False, twilio_start().replace("audio/x-mulaw", "audio/x-alaw"), "encoding"),
        (False, twilio_start().replace('"sampleRate": 8000', '"sampleRate": 16000'), "sampleRate"),
        (True, '{"event": "media", "streamSid": "MZ1", "media": {"track": "inbound", "payload": "***"}}', "base64"),
        (True, '{"event": "media", "streamSid": "MZ1", "media": {"track": "both", "payload": ""}}', "track"),
        (True, '{"event": "media", "streamSid": "MZ9", "media": {"track": "inbound", "payload": ""}}', "streamSid"),
        (True, '{"event": "hangup"}', "unknown event"),
        (True, "not json", "malformed JSON"),
    ],
)
def test_twilio_rejects(setup, message, fragment):
    s = TwilioSession()
    if setup:
        s.on_text(twilio_start())
    with pytest.raises(ProtocolError, match=fragment):
        s.on_text(message)


def test_twilio_binary_frames_and_token():
    with pytest.raises(ProtocolError, match="JSON text"):
        TwilioSession().on_binary(b"\x00")
    with pytest.raises(ProtocolError, match="unauthorized") as info:
        TwilioSession(token="s3cret").on_text(twilio_start(token="wrong"))
    assert info.value.code == CLOSE_POLICY
    (start,) = TwilioSession(token="s3cret").on_text(twilio_start(token="s3cret", call_id="my-call"))
    assert start.call_id == "my-call"


# --- AudioHook -------------------------------------------------------------------------------


class Client:
    """A minimal AudioHook client state: seq and serverseq bookkeeping."""

    def __init__(self, session_id=SID):
        self.id, self.seq, self.serverseq, self.position = session_id, 0, 0, 0.0

    def msg(self, kind, **params):
        self.seq += 1
        return json.dumps(
            {
                "version": "2",
                "type": kind,
                "seq": self.seq,
                "serverseq": self.serverseq,
                "id": self.id,
                "position": format_duration(self.position),
                "parameters": params,
            }
        )

    def got(self, message):
        self.serverseq = message["seq"]
        return message


OFFERS = [
    {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000},
    {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000},
    {"type": "audio", "format": "L16", "channels": ["internal", "external"], "rate": 8000},
]


def open_params(media=OFFERS, conv=CONV, part=PART, **kw):
    return dict(
        organizationId=ORG,
        conversationId=conv,
        participant={"id": part, "ani": "+1", "aniName": "", "dnis": "+2"},
        media=media,
        language="en-US",
        **kw,
    )


def test_audiohook_open_ping_close_sequence():
    s, c = AudioHookSession(SID, ("en-US", "de-DE")), Client()
    start, sent = s.on_text(c.msg("open", **open_params(supportedLanguages=True)))
    opened = c.got(sent.message)
    assert opened == {
        "version": "2",
        "type": "opened",
        "seq": 1,
        "clientseq": 1,
        "id": SID,
        "parameters": {"startPaused": False, "media": [OFFERS[1]], "supportedLanguages": ["en-US", "de-DE"]},
    }
    assert json.dumps(opened["parameters"]["media"][0]) == json.dumps(OFFERS[1])  # exact copy, key order kept
    assert start.channels == ("customer", "agent") and start.call_id == SID and start.persist
    (pong,) = s.on_text(c.msg("ping", rtt="PT0.05S"))
    assert c.got(pong.message)["type"] == "pong" and pong.message["seq"] == 2 and pong.message["clientseq"] == 2
    frame = mulaw_encode(float32_to_int16(np.zeros(320))).tobytes()  # 160 stereo samples
    a, b = s.on_binary(frame)
    assert (a.channel, b.channel, len(a.samples)) == (0, 1, 160) and s.position == 160
    for kind, params in [
        ("paused", {}),
        ("update", {"language": "de-DE"}),
        ("resumed", {"start": "PT0.02S", "discarded": "PT1S"}),
        ("discarded", {"start": "PT1.02S", "discarded": "PT0.5S"}),
        ("error", {"code": 500, "message": "oops"}),
    ]:
        actions = s.on_text(c.msg(kind, **params))
        assert not any(isinstance(x, Send) for x in actions)
    assert s.language == "de-DE" and s.position == int(1.52 * 8000) and s.state == "ACTIVE"
    (end,) = s.on_text(c.msg("close", reason="end"))
    assert isinstance(end, End)
    event = s.event_message(
        {
            "channel": "agent",
            "t_start": 0.0,
            "t_end": 1.0,
            "speech": False,
            "label": None,
            "confidence": None,
            "probabilities": None,
        }
    )
    closing = s.summary_messages({"type": "summary", "channels": {}})
    seqs = [event["seq"]] + [m["seq"] for m in closing]
    assert seqs == [3, 4, 5] and [m["type"] for m in closing] == ["event", "closed"]
    assert all(m["clientseq"] == c.seq and m["id"] == SID and m["version"] == "2" for m in [event] + closing)
    assert event["parameters"]["entities"][0]["data"]["channelId"] == 1


def test_audiohook_select_media_and_probe():
    assert AudioHookSession.select_media([OFFERS[0]]) is OFFERS[0]
    assert (
        AudioHookSession.select_media([{"type": "audio", "format": "opus", "channels": ["external"], "rate": 8000}])
        is None
    )
    s, c = AudioHookSession(None), Client(SID)
    start, sent = s.on_text(c.msg("open", **open_params(conv=NULL_UUID, part=NULL_UUID)))
    assert s.id == SID and not start.persist and s.probe
    assert s.on_binary(b"") == []
    (end,) = s.on_text(c.msg("close", reason="end"))
    assert [m["type"] for m in s.summary_messages(None)] == ["closed"]


def test_audiohook_no_acceptable_media():
    s, c = AudioHookSession(SID), Client()
    (sent,) = s.on_text(
        c.msg(
            "open", **open_params(media=[{"type": "audio", "format": "opus", "channels": ["external"], "rate": 48000}])
        )
    )
    assert sent.message["parameters"]["media"] == []
    with pytest.raises(ProtocolError, match="No media selected"):
        s.on_binary(b"\x00\x00")


@pytest.mark.parametrize(
    "mutate,fragment",
    [
        (lambda m: {**m, "seq": 5}, "Invalid seq"),
        (lambda m: {**m, "serverseq": 9}, "Invalid serverseq"),
        (lambda m: {**m, "id": "11111111-2222-4333-8444-555555555555"}, "Session identifier mismatch"),
        (lambda m: {**m, "version": "1"}, "well-formed"),
        (lambda m: {**m, "position": "5 seconds"}, "well-formed"),
        (lambda m: {**m, "type": "dance"}, "not a supported client message"),
    ],
)
def test_audiohook_errors_become_disconnect_then_close_is_answered(mutate, fragment):
    s, c = AudioHookSession(SID), Client()
    s.on_text(c.msg("open", **open_params()))
    c.serverseq = 1
    bad = mutate(json.loads(c.msg("ping")))
    with pytest.raises(ProtocolError, match=fragment) as info:
        s.on_text(json.dumps(bad))
    (disconnect,) = s.error_messages(info.value)
    assert disconnect["type"] == "disconnect" and disconnect["parameters"]["reason"] == "error"
    assert disconnect["seq"] == 2
    c.seq = s.clientseq
    assert s.on_binary(b"\x00\x00") == []  # audio after the error is ignored
    (end,) = s.on_text(c.msg("close", reason="error"))
    assert isinstance(end, End)
    assert s.summary_messages(None)[-1]["type"] == "closed"


def test_audiohook_audio_rules():
    s, c = AudioHookSession(SID), Client()
    with pytest.raises(ProtocolError, match="Received audio in state PREPARING"):
        s.on_binary(b"\x00\x00")
    s.on_text(c.msg("open", **open_params()))
    with pytest.raises(ProtocolError, match="multiple of bytes per sample"):
        s.on_binary(b"\x00\x00\x00")
    with pytest.raises(ProtocolError, match="too large"):
        s.on_text("x" * 70000)


def test_durations():
    assert format_duration(12.5) == "PT12.5S" and format_duration(3) == "PT3S" and format_duration(0.0201) == "PT0.02S"
    assert parse_duration("PT1.25S") == 1.25
    with pytest.raises(ProtocolError):
        parse_duration("1.25")


# --- authentication --------------------------------------------------------------------------


def test_request_token_sources():
    assert request_token({"Authorization": "Bearer abc"}, "/v1/pcm") == "abc"
    assert request_token({"X-API-KEY": "abc"}, "/v1/pcm") == "abc"
    assert request_token({}, "/v1/twilio?token=abc&x=1") == "abc"
    assert token_ok("abc", {}, "/v1/pcm?token=abc") and not token_ok("abc", {}, "/v1/pcm?token=abd")
    assert not token_ok("abc", {}, "/v1/pcm")


def test_twilio_signature_is_hmac_sha1_of_url():
    url = "wss://calls.example.com/v1/twilio"
    expected = base64.b64encode(hmac.new(b"tok", url.encode(), hashlib.sha1).digest()).decode()
    assert twilio_signature("tok", url) == expected
    assert twilio_signature_ok("tok", expected, url)
    assert not twilio_signature_ok("tok", expected, url + "x") and not twilio_signature_ok("tok", None, url)
    # POST form parameters are appended sorted, key then value (Twilio's webhook rule)
    assert (
        twilio_signature("tok", "https://a/b", {"b": "2", "a": "1"})
        == base64.b64encode(hmac.new(b"tok", b"https://a/ba1b2", hashlib.sha1).digest()).decode()
    )


def audiohook_headers():
    return {
        "host": "calls.example.com",
        "audiohook-organization-id": ORG,
        "audiohook-session-id": SID,
        "audiohook-correlation-id": CONV,
        "x-api-key": "key1",
    }


def test_audiohook_signature_roundtrip_and_failures():
    secret = b"0123456789abcdef0123456789abcdef"
    keys = {"key1": secret}
    now = int(time.time())
    signed = sign_audiohook_request(audiohook_headers(), "/v1/audiohook", "key1", secret, created=now)
    assert 'keyid="key1"' in signed["Signature-Input"] and signed["Signature"].startswith("sig1=:")
    assert verify_audiohook_request(signed, "/v1/audiohook", keys, now=now) is None
    assert verify_audiohook_request(signed, "/v1/other", keys, now=now) == "signature does not match"
    assert verify_audiohook_request({**signed, "audiohook-session-id": CONV}, "/v1/audiohook", keys, now=now)
    assert verify_audiohook_request(signed, "/v1/audiohook", {"key1": b"other"}, now=now) == "signature does not match"
    assert verify_audiohook_request(signed, "/v1/audiohook", {}, now=now) == "signature does not match"
    assert verify_audiohook_request(signed, "/v1/audiohook", keys, now=now + 60) == "signature expired"
    assert verify_audiohook_request(signed, "/v1/audiohook", keys, now=now - 60) == "signature created in the future"
    assert verify_audiohook_request(audiohook_headers(), "/v1/audiohook", keys, now=now) == "request is not signed"
    assert verify_audiohook_request(audiohook_headers(), "/v1/audiohook", {"key1": b""}, now=now) is None
    short = sign_audiohook_request(audiohook_headers(), "/v1/audiohook", "key1", secret, created=now, nonce="abc")
    assert verify_audiohook_request(short, "/v1/audiohook", keys, now=now) == "missing or short nonce"
    other_key = sign_audiohook_request(
        {**audiohook_headers(), "x-api-key": "key2"}, "/v1/audiohook", "key1", secret, created=now
    )
    assert "keyid" in verify_audiohook_request(other_key, "/v1/audiohook", keys, now=now)
    assert verify_audiohook_request({**signed, "Signature": "garbage"}, "/v1/audiohook", keys, now=now)


def test_audiohook_signature_base_matches_reference_layout():
    """The signature base is the RFC 9421 layout the reference implementation signs."""
    from emostream.auth import signature_base

    base = signature_base(
        ["@request-target", "x-api-key"],
        {"@request-target": "/a?b=1", "x-api-key": "k"},
        [("keyid", "k"), ("nonce", "n"), ("alg", "hmac-sha256"), ("created", 1), ("expires", 2)],
    )
    assert base == (
        '"@request-target": /a?b=1\n"x-api-key": k\n'
        '"@signature-params": ("@request-target" "x-api-key");keyid="k";nonce="n";alg="hmac-sha256";created=1;expires=2'
    )


def test_audiohook_key_parsing():
    key = AudioHookKey.parse("abc:" + base64.b64encode(b"secret").decode())
    assert key == AudioHookKey("abc", b"secret")
    assert AudioHookKey.parse("abc:").secret == b""
    for bad in ("nocolon", ":c2VjcmV0", "abc:***"):
        with pytest.raises(ValueError):
            AudioHookKey.parse(bad)


# --- streaming resampler, analyzer async path, worker ----------------------------------------


@pytest.mark.parametrize("orig", [8000, 11025, 44100, 48000])
def test_stream_resampler_matches_whole_signal(orig):
    rng = np.random.default_rng(orig)
    x = (0.1 * rng.standard_normal(orig + 77)).astype(np.float32)
    r = StreamResampler(orig, 16000)
    parts, pos = [], 0
    while pos < len(x):
        k = int(rng.integers(1, 500))
        parts.append(r.push(x[pos : pos + k]))
        pos += k
    y = np.concatenate(parts + [r.flush()])
    ref = resample(x, orig, 16000)
    assert len(y) == len(ref)
    np.testing.assert_allclose(y, ref, atol=1e-4)


def test_process_async_equals_process():
    predict = lambda w: np.tile(np.linspace(0.1, 0.2, 7) / np.linspace(0.1, 0.2, 7).sum(), (len(w), 1))  # noqa: E731
    audio = np.stack([speechlike(3.3), np.zeros(int(3.3 * 16000), np.float32)])

    def windows():
        w = StreamWindower("s", ("a", "b"))
        return w.push_frames(audio) + w.flush()

    config = AnalyzerConfig(vad=VadConfig.named("energy"))  # the test tone is sound, not a voice
    sync = Analyzer(predict, "s", ("a", "b"), config).process(windows())

    async def infer(x):
        return predict(x)

    asy = asyncio.run(Analyzer(predict, "s", ("a", "b"), config).process_async(windows(), infer))
    assert sync == asy and any(e["speech"] for e in sync) and not all(e["speech"] for e in sync)


def test_worker_batches_across_callers_and_reports_failures():
    calls = []

    def predict(x):
        calls.append(len(x))
        if np.any(x[:, 0] == 9):
            raise ValueError("bad window")
        return constant_predictor()(x)

    async def main():
        worker = InferenceWorker(predict, WorkerConfig(max_batch=8, max_wait_ms=50, max_pending=16))
        await worker.start()
        outs = await asyncio.gather(*[worker.infer(np.zeros((2, 10), np.float32)) for _ in range(4)])
        assert all(o.shape == (2, 7) for o in outs)
        assert calls == [8] and worker.stats.largest_batch == 8
        with pytest.raises(WorkerOverloaded):
            await worker.infer(np.zeros((17, 10), np.float32))
        with pytest.raises(RuntimeError, match="bad window"):
            await worker.infer(np.full((1, 10), 9, np.float32))
        assert (await worker.infer(np.zeros((1, 10), np.float32))).shape == (1, 7)  # still working
        await worker.stop()

    asyncio.run(main())


def test_worker_warm_up_runs_every_batch_size_in_the_worker_thread():
    import threading

    seen = []

    def predict(x):
        seen.append((x.shape, threading.current_thread().name))
        return constant_predictor()(x)

    async def main():
        worker = InferenceWorker(predict, WorkerConfig(max_batch=4, max_pending=8))
        with pytest.raises(RuntimeError, match="not running"):
            await worker.warm_up()
        await worker.start()
        assert await worker.warm_up() >= 0
        await worker.stop()

    asyncio.run(main())
    assert [shape for shape, _ in seen] == [(n, 16000 * 6) for n in (1, 2, 3, 4)]
    assert all(name.startswith("emostream-infer") for _, name in seen)


# --- robustness: whatever a peer sends, a session answers with actions or a ProtocolError ------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

KEYS = [
    "type",
    "event",
    "call_id",
    "sample_rate",
    "channels",
    "encoding",
    "channel_names",
    "start",
    "media",
    "streamSid",
    "track",
    "payload",
    "timestamp",
    "mediaFormat",
    "tracks",
    "customParameters",
    "version",
    "id",
    "seq",
    "serverseq",
    "position",
    "parameters",
    "organizationId",
    "conversationId",
    "participant",
    "format",
    "rate",
    "discarded",
    "language",
    "supportedLanguages",
]
VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(10**12), 10**12)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(
        [
            "start",
            "stop",
            "media",
            "open",
            "ping",
            "close",
            "paused",
            "resumed",
            "discarded",
            "inbound",
            "outbound",
            "PCMU",
            "L16",
            "external",
            "internal",
            "audio",
            "PT1S",
            "2",
            "pcm_s16le",
            "mulaw",
            SID,
            NULL_UUID,
            "audio/x-mulaw",
            "AAAA",
        ]
    )
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(KEYS), inner, max_size=4),
    max_leaves=12,
)
FRAMES = st.one_of(
    st.dictionaries(st.sampled_from(KEYS), VALUES, max_size=6).map(json.dumps),
    st.text(max_size=30),
    st.binary(max_size=64),
)

OPENERS = {
    PcmSession: [pcm_start()],
    TwilioSession: [twilio_start()],
    AudioHookSession: [Client().msg("open", **open_params())],
}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(frames=st.lists(FRAMES, max_size=6), opened=st.booleans())
def test_sessions_raise_only_protocol_errors(frames, opened):
    for cls, openers in OPENERS.items():
        session = cls(SID) if cls is AudioHookSession else cls()
        for frame in (openers if opened else []) + frames:
            try:
                actions = session.on_text(frame) if isinstance(frame, str) else session.on_binary(frame)
            except ProtocolError as err:
                assert 1000 <= err.code < 5000 and str(err)
                session.error_messages(err)
                if not session.graceful_errors:
                    break
                continue
            assert all(isinstance(a, (Start, Audio, Silence, Send, End)) or type(a).__name__ == "Note" for a in actions)


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(0, 400), max_size=8))
def test_pcm_frames_split_anywhere_on_sample_frames(cuts):
    """However a bridge chunks the stream (on whole stereo sample frames), the decoded audio is the same."""
    pcm = float32_to_int16(speechlike(0.1, 8000)).astype("<i2")
    stereo = np.stack([pcm, pcm[::-1]], axis=1).reshape(-1).tobytes()
    s = PcmSession()
    s.on_text(pcm_start(sample_rate=8000))
    bounds = sorted({min(4 * c, len(stereo)) for c in cuts} | {0, len(stereo)})
    left = np.concatenate(
        [a.samples for lo, hi in zip(bounds, bounds[1:]) for a in s.on_binary(stereo[lo:hi]) if a.channel == 0]
    )
    np.testing.assert_array_equal(left, pcm / 32768.0)
