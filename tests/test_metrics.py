"""/healthz, /readyz and /metrics of ``emostream serve``, over real HTTP on 127.0.0.1."""

import asyncio
import json
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from emostream.client import SendOptions, send_file
from emostream.server import ServerConfig
from emostream.vad import VadConfig
from emostream.worker import constant_predictor

from .live_util import ServerThread, write_call


def http(srv, path, token=None):
    """(status, headers, body bytes) of GET ``path``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"http://127.0.0.1:{srv.port}{path}", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def scrape(srv, token=None) -> dict:
    """``{(name, labels tuple): value}`` of every sample /metrics exposes, parsed by prometheus_client."""
    status, headers, body = http(srv, "/metrics", token)
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_healthz_and_readyz_before_and_after_warm_up():
    gate = threading.Event()
    base = constant_predictor()

    def slow_predict(windows):
        gate.wait(20)  # the warm-up inference blocks until the test lets it go
        return base(windows)

    with ServerThread(ServerConfig(port=0), predict=slow_predict) as srv:
        status, _, body = http(srv, "/healthz")
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, _, body = http(srv, "/readyz")
        assert status == 503 and json.loads(body) == {
            "ready": False,
            "device": "cpu",
            "live_calls": 0,
            "reason": "warming up the model",
        }
        assert scrape(srv)[("emostream_ready", ())] == 0
        gate.set()
        srv.call(srv.server.wait_ready(10))
        status, _, body = http(srv, "/readyz")
        assert status == 200 and json.loads(body)["ready"] is True
        assert scrape(srv)[("emostream_ready", ())] == 1


def test_readyz_reports_a_failed_warm_up():
    def broken(windows):
        raise RuntimeError("CUDA out of memory")

    with ServerThread(ServerConfig(port=0), predict=broken) as srv:
        with pytest.raises(RuntimeError):
            srv.call(srv.server.wait_ready(10))
        status, _, body = http(srv, "/readyz")
        assert status == 503 and "CUDA out of memory" in json.loads(body)["reason"]


def test_metrics_counters_move_by_exactly_the_windows_of_a_call(tmp_path):
    # one channel silent (silence windows), one speaking (classified windows)
    audio = write_call(tmp_path / "call.wav", 5.5)
    import soundfile as sf

    x, sr = sf.read(audio, dtype="float32")
    x[:, 0] = 0
    sf.write(audio, x, sr, subtype="PCM_16")
    with ServerThread(port=0, token="tok", vad=VadConfig.named("energy")) as srv:
        srv.call(srv.server.wait_ready(10))
        before = scrape(srv, "tok")
        result = asyncio.run(send_file(audio, srv.url, SendOptions(fast=True, token="tok")))
        after = scrape(srv, "tok")
    assert result.close_code == 1000
    classified = sum(e["speech"] for e in result.events)
    silence = len(result.events) - classified
    assert classified > 0 and silence > 0

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert delta("emostream_windows_total", result="classified") == classified
    assert delta("emostream_windows_total", result="silence") == silence
    assert delta("emostream_calls_total", protocol="pcm", outcome="completed") == 1
    assert delta("emostream_inference_batch_size_sum") == classified  # every classified window in a batch
    assert delta("emostream_event_latency_seconds_count") == len(result.events)
    assert after[("emostream_live_calls", (("protocol", "pcm"),))] == 0
    assert after[("emostream_inference_queue_windows", ())] == 0
    assert after[("emostream_windows_dropped_total", ())] == 0
    info = [k for k in after if k[0] == "emostream_build_info"]
    assert info and ("version", "0.1.0") in info[0][1]


def test_metrics_count_rejected_connections_and_need_the_token():
    with ServerThread(ServerConfig(port=0, token="tok", max_calls=1)) as srv:
        assert http(srv, "/metrics")[0] == 401
        assert http(srv, "/metrics", "wrong")[0] == 401
        for path, headers in (("/v1/pcm", {}), ("/v1/nowhere", {"Authorization": "Bearer tok"})):
            with pytest.raises(InvalidStatus):
                connect(srv.url + path, additional_headers=headers)
        with connect(srv.url + "/v1/pcm", additional_headers={"Authorization": "Bearer tok"}) as ws:
            ws.send(
                json.dumps(
                    {
                        "type": "start",
                        "call_id": "busy",
                        "sample_rate": 16000,
                        "channels": 1,
                        "channel_names": ["customer"],
                    }
                )
            )
            assert json.loads(ws.recv(timeout=5))["type"] == "started"
            with pytest.raises(InvalidStatus):
                connect(srv.url + "/v1/pcm", additional_headers={"Authorization": "Bearer tok"})
            m = scrape(srv, "tok")
            assert m[("emostream_live_calls", (("protocol", "pcm"),))] == 1
        rejected = {dict(k[1])["reason"]: v for k, v in m.items() if k[0] == "emostream_rejected_connections_total"}
        assert rejected["unauthorized"] == 3 and rejected["unknown_path"] == 1 and rejected["at_capacity"] == 1


def test_tickets_are_good_on_every_process_with_the_token_once_each(monkeypatch):
    """A ticket issued by one front end (or host) is redeemed by another that has the same token (the
    page's socket may land on either: SO_REUSEPORT, a load balancer); once per process, until it
    expires; never with another token, altered or made up."""
    import emostream.http_routes as routes

    a, b, other = routes.Tickets("tok"), routes.Tickets("tok"), routes.Tickets("not-tok")
    ticket = a.issue()
    assert b.redeem(ticket) and not b.redeem(ticket)  # another process with the token, once
    assert a.redeem(ticket) and not a.redeem(ticket)
    assert not other.redeem(a.issue())
    fresh = a.issue()
    flipped = fresh[:-2] + ("A" if fresh[-2] != "A" else "B") + fresh[-1]
    assert not b.redeem(flipped) and not b.redeem("") and not b.redeem("not a ticket!") and not b.redeem("AAAA")
    assert not routes.Tickets().redeem(routes.Tickets().issue())  # no token: this process's own key
    late = a.issue()
    monkeypatch.setattr(routes.time, "time", lambda: 1e12)
    assert not b.redeem(late)  # expired


def test_page_ticket_and_call_listing():
    """The supervisor page's HTTP side: static files with a strict CSP, tickets for /v1/events
    (single use, never the token in a URL), the call list and a call's timeline so far."""
    with ServerThread(ServerConfig(port=0, token="tok", analyse="all", vad=VadConfig.named("energy"))) as srv:
        status, headers, body = http(srv, "/")
        assert status == 200 and b"<html" in body.lower()
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        assert http(srv, "/static/app.js")[0] == 200
        assert http(srv, "/static/../server.py")[0] == 404
        assert http(srv, "/v1/ticket")[0] == 401
        status, _, body = http(srv, "/v1/ticket", "tok")
        ticket = json.loads(body)["ticket"]
        with connect(srv.url + f"/v1/events?ticket={ticket}") as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "hello"
        with pytest.raises(InvalidStatus) as info:  # single use
            connect(srv.url + f"/v1/events?ticket={ticket}")
        assert info.value.response.status_code == 401
        with connect(srv.url + "/v1/pcm", additional_headers={"Authorization": "Bearer tok"}) as ws:
            ws.send(
                json.dumps(
                    {
                        "type": "start",
                        "call_id": "page-1",
                        "sample_rate": 16000,
                        "channels": 1,
                        "channel_names": ["customer"],
                    }
                )
            )
            ws.recv(timeout=5)
            ws.send((np.ones(16000 * 2, "<i2") * 3000).tobytes())
            while json.loads(ws.recv(timeout=5)).get("t_end") != 2.0:
                pass
            calls = json.loads(http(srv, "/v1/calls", "tok")[2])["calls"]
            assert [c["call_id"] for c in calls] == ["page-1"] and calls[0]["ended_at"] is None
            status, _, body = http(srv, "/v1/calls/page-1", "tok")
            detail = json.loads(body)
            assert status == 200 and [e["t_end"] for e in detail["events"]] == [1.0, 2.0]
            ws.send(json.dumps({"type": "stop"}))
            while True:
                if json.loads(ws.recv(timeout=5)).get("type") == "summary":
                    break
        calls = json.loads(http(srv, "/v1/calls", "tok")[2])["calls"]
        assert calls[0]["ended_at"] is not None and calls[0]["end_reason"] == "completed"
        detail = json.loads(http(srv, "/v1/calls/page-1", "tok")[2])
        assert detail["summary"]["type"] == "summary"
        assert http(srv, "/v1/calls/nope", "tok")[0] == 404
