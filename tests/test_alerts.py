"""Escalation alert rules on constructed timelines: they fire exactly when the rule holds."""

import json
import subprocess
import sys

import pytest

from emostream.alerts import AlertRule, AlertTracker
from emostream.timeline import CLASSES

from .conftest import ROOT


def event(t_end, angry, channel="customer", speech=True):
    probs = {c: (angry if c == "Angry" else (1 - angry) / 6) for c in CLASSES}
    return {
        "stream": "s",
        "channel": channel,
        "t_start": max(0.0, t_end - 6),
        "t_end": float(t_end),
        "speech": speech,
        "label": None,
        "confidence": None,
        "probabilities": probs if speech else None,
    }


def test_parse_rules():
    r = AlertRule.parse("angry >= 0.7 for 10s")
    assert (r.label, r.threshold, r.seconds, r.strict) == ("Angry", 0.7, 10.0, False)
    assert r.name == "Angry>=0.7 for 10s"
    assert AlertRule.parse("Sad>0.5").seconds == 0 and AlertRule.parse("Sad>0.5").strict
    for bad in ("Angry", "Grumpy>=0.5", "Angry>=1.5", "Angry>=0.5 for ten"):
        with pytest.raises(ValueError):
            AlertRule.parse(bad)


def test_raised_after_the_duration_and_cleared_by_the_first_break():
    """Without hysteresis (clear below the raise threshold at once) the first break clears."""
    tracker = AlertTracker([AlertRule.parse("Angry>=0.7 for 3s clear below 0.7")], "s")
    angry = [0.2, 0.8, 0.9, 0.7, 0.95, 0.9, 0.5, 0.9]  # window ends 1..8
    fired = {}
    for t, p in enumerate(angry, start=1):
        for msg in tracker.update(event(t, p)):
            fired[t] = msg
    # the run starts at t=2 (first window >= 0.7); 3 s later (t=5) it is raised; t=7 (0.5) clears it
    assert sorted(fired) == [5, 7]
    assert fired[5]["state"] == "raised" and fired[5]["since"] == 2.0 and fired[5]["t"] == 5.0
    assert fired[7]["state"] == "cleared"
    assert tracker.active == []


def test_parse_clear_clause_and_defaults():
    r = AlertRule.parse("Sad>=0.6 for 3s")
    assert (r.clear_threshold, r.clear_after) == (pytest.approx(0.5), 5.0)  # the defaults: 0.1 lower, 5 s
    assert r.name == "Sad>=0.6 for 3s"  # rule names of existing deployments do not change
    r = AlertRule.parse("sad >= 0.6 for 3s clear below 0.4 for 8s")
    assert (r.label, r.threshold, r.seconds, r.clear_threshold, r.clear_after) == ("Sad", 0.6, 3.0, 0.4, 8.0)
    assert r.name == "Sad>=0.6 for 3s clear below 0.4 for 8s" and AlertRule.parse(r.name) == r
    assert AlertRule.parse("Angry>0.7, clear < 0.5").clear_after == 0.0
    assert AlertRule.parse("Neutral>=0.05").clear_threshold == 0.0
    for bad in ("Sad>=0.6 clear below 0.7", "Sad>=0.6 clear above 0.4", "Sad>=0.6 for 3s clear"):
        with pytest.raises(ValueError):
            AlertRule.parse(bad)


def test_hysteresis_holds_through_dips_and_clears_after_a_quiet_run():
    """#42 item 6: Sad>=0.6 for 3s was raised at 12 s and cleared at 13 s, again at 34/35: now a dip
    holds the alert, and it clears only after 5 s below 0.5 (silence counts as below)."""
    tracker = AlertTracker([AlertRule.parse("Sad>=0.6 for 3s")], "s")
    sad = {t: 0.3 for t in range(1, 41)}
    sad.update({t: 0.7 for t in range(9, 13)})  # run 9..12: raised at 12
    sad.update({13: 0.55, 14: 0.45, 15: 0.4, 16: 0.65, 17: 0.7})  # between, 2 s below, back up: held
    sad.update({t: 0.2 for t in range(18, 23)})  # 18..22 below (18 + 5 s = 23)
    states = []
    for t in range(1, 41):
        speech = t != 20  # a pause inside the quiet run counts towards clearing
        e = {
            "stream": "s",
            "channel": "customer",
            "t_start": max(0.0, t - 6),
            "t_end": float(t),
            "speech": speech,
            "probabilities": {c: (sad[t] if c == "Sad" else (1 - sad[t]) / 6) for c in CLASSES} if speech else None,
        }
        states += [(m["state"], m["t"], m["since"]) for m in tracker.update(e)]
    assert states == [("raised", 12.0, 9.0), ("cleared", 23.0, 9.0)]
    cleared = tracker.history[-1]
    assert cleared["clear_below"] == pytest.approx(0.5) and cleared["clear_seconds"] == 5.0


def test_raise_again_after_a_clear_needs_a_new_run():
    tracker = AlertTracker([AlertRule.parse("Angry>=0.7 for 2s clear below 0.5 for 1s")], "s")
    seq = [0.8, 0.8, 0.8, 0.4, 0.4, 0.8, 0.8, 0.8]  # raised at 3, cleared at 5, raised again at 8
    out = [(m["state"], m["t"]) for t, p in enumerate(seq, start=1) for m in tracker.update(event(t, p))]
    assert out == [("raised", 3.0), ("cleared", 5.0), ("raised", 8.0)]


def test_silence_breaks_the_run_and_channels_are_independent():
    tracker = AlertTracker([AlertRule.parse("Angry>=0.7 for 2s")], "s")
    out = []
    for t in range(1, 7):
        out += tracker.update(event(t, 0.9, "customer", speech=(t != 3)))
        out += tracker.update(event(t, 0.1, "agent"))
    # customer: runs 1-2 (broken by silence at 3), then 4.. -> raised at 6 (4 + 2 s); agent never
    assert [(m["channel"], m["state"], m["t"]) for m in out] == [("customer", "raised", 6.0)]
    assert [m["rule"] for m in tracker.active] == ["Angry>=0.7 for 2s"]


def test_strict_threshold_and_zero_duration():
    tracker = AlertTracker([AlertRule.parse("Angry>0.7")], "s")
    assert tracker.update(event(1, 0.7)) == []
    assert [m["state"] for m in tracker.update(event(2, 0.71))] == ["raised"]


def test_replay_writes_alerts_to_the_events_file(tmp_path):
    """The CLI path: replay --alert puts alert messages into the JSONL next to the events."""
    out = tmp_path / "e.jsonl"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "emostream",
            "replay",
            str(ROOT / "examples" / "call_mono.flac"),
            "--fast",
            "--no-dashboard",
            "--events",
            str(out),
            "--alert",
            "Neutral>=0.0 for 2s",
            "--vad",
            "energy",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    alerts = [x for x in lines if x.get("type") == "alert"]
    first_speech = min(x["t_end"] for x in lines if x.get("speech"))
    assert alerts and alerts[0]["state"] == "raised" and alerts[0]["t"] >= first_speech + 2
    assert "ALERT: ch0 Neutral>=0 for 2s" in proc.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "emostream", "replay", "x.wav", "--alert", "Grumpy>=1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "unknown emotion" in bad.stderr and "Traceback" not in bad.stderr


# --- the alert webhook: a local HTTP server receives the POSTs -------------------------------

import asyncio  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer  # noqa: E402

from emostream.webhook import AlertWebhook, WebhookConfig  # noqa: E402


class Endpoint:
    """``with Endpoint(statuses) as ep:`` an HTTP server on 127.0.0.1 answering POSTs with the next
    status of ``statuses`` (the last one repeats); ``ep.posts`` holds (JSON body, headers)."""

    def __init__(self, statuses=(200,), delay: float = 0.0):
        self.statuses = list(statuses)
        self.delay = delay
        self.posts: list[tuple[dict, dict]] = []
        self.attempts = 0
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status = endpoint.statuses[min(endpoint.attempts, len(endpoint.statuses) - 1)]
                endpoint.attempts += 1
                time.sleep(endpoint.delay)
                if status == 200:
                    endpoint.posts.append((body, dict(self.headers)))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/hooks/emostream?key=secret"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def alert_message(n=0):
    return {
        "type": "alert",
        "call_id": f"c{n}",
        "channel": "customer",
        "rule": "Angry>=0.7 for 10s",
        "state": "raised",
        "t": 12.0,
        "since": 2.0,
    }


def test_webhook_delivers_in_order_with_headers():
    with Endpoint() as ep:
        hook = AlertWebhook(WebhookConfig(ep.url, headers=(("Authorization", "Bearer T"),)))
        assert all(hook.send(alert_message(n)) for n in range(3))
        hook.close(10)
    assert [body["call_id"] for body, _ in ep.posts] == ["c0", "c1", "c2"]
    headers = ep.posts[0][1]
    assert headers["Content-Type"] == "application/json" and headers["Authorization"] == "Bearer T"
    assert hook.stats.as_dict() == {"delivered": 3, "failed": 0, "dropped": 0, "retries": 0, "last_error": None}


def test_webhook_retries_with_backoff_then_gives_up_without_blocking():
    outcomes = []
    with Endpoint([503, 500, 200]) as flaky, Endpoint([500]) as down, Endpoint([400]) as refusing:
        ok = AlertWebhook(WebhookConfig(flaky.url, retries=3, backoff_seconds=0.05), outcomes.append)
        bad = AlertWebhook(WebhookConfig(down.url, retries=2, backoff_seconds=0.05))
        no = AlertWebhook(WebhookConfig(refusing.url, retries=3, backoff_seconds=0.05))
        t0 = time.monotonic()
        for hook in (ok, bad, no):
            hook.send(alert_message())
        assert time.monotonic() - t0 < 0.05  # send only queues
        for hook in (ok, bad, no):
            hook.close(10)
    assert flaky.attempts == 3 and len(flaky.posts) == 1 and outcomes == ["retry", "retry", "delivered"]
    assert ok.stats.delivered == 1 and ok.stats.retries == 2
    assert down.attempts == 3 and bad.stats.failed == 1 and bad.stats.last_error == "HTTP 500"
    assert refusing.attempts == 1 and no.stats.failed == 1 and no.stats.retries == 0  # a 4xx is not retried
    # nobody listening: connection refused is retried, then given up
    gone = AlertWebhook(WebhookConfig("http://127.0.0.1:9/none", retries=1, backoff_seconds=0.01))
    gone.send(alert_message())
    gone.close(10)
    assert gone.stats.failed == 1 and gone.stats.retries == 1 and "Connection" in gone.stats.last_error


def test_webhook_queue_bound_and_close_deadline():
    with Endpoint([200], delay=0.3) as slow:
        hook = AlertWebhook(WebhookConfig(slow.url, max_queue=2, timeout_seconds=2))
        sent = [hook.send(alert_message(n)) for n in range(6)]
        t0 = time.monotonic()
        hook.close(0.5)  # the queue cannot drain in time: the rest is given up, close returns
        assert time.monotonic() - t0 < 3.5
    assert sent.count(False) >= 3 and hook.stats.dropped >= 3
    assert hook.stats.delivered + hook.stats.dropped + hook.stats.failed == 6
    assert not hook.send(alert_message()) and hook.stats.dropped >= 4  # closed: nothing more is queued


def test_webhook_config_rejects_bad_urls():
    for bad in ("ftp://x/y", "not a url", "http://"):
        with pytest.raises(ValueError):
            WebhookConfig(bad)
    from emostream.webhook import redact_url

    assert redact_url("https://user:pw@hooks.example.com:8443/a/b?token=x") == "https://hooks.example.com:8443/a/b"


def test_server_posts_alerts_and_a_failing_endpoint_never_breaks_the_call(tmp_path):
    """serve --alert --alert-webhook: the POST carries the alert message; with the endpoint down the
    call still ends normally with its summary, and /metrics counts the failure."""
    from emostream.client import SendOptions, send_file
    from emostream.server import ServerConfig
    from emostream.vad import VadConfig

    from .live_util import ServerThread, write_call

    audio = write_call(tmp_path / "call.wav", 5.0, channels=1)
    rule = AlertRule.parse("Neutral>=0.5 for 2s")  # the constant test predictor answers 0.7 Neutral
    for statuses, delivered in (([200], True), ([500], False)):
        with Endpoint(statuses) as ep:
            config = ServerConfig(
                port=0,
                vad=VadConfig.named("energy"),
                analyse="all",
                alerts=(rule,),
                alert_webhook=WebhookConfig(ep.url, retries=2, backoff_seconds=0.05),
            )
            with ServerThread(config) as srv:
                result = asyncio.run(send_file(audio, srv.url, SendOptions(protocol="pcm", fast=True)))
                assert result.close_code == 1000 and result.summary is not None
                deadline = time.monotonic() + 10
                while (
                    time.monotonic() < deadline
                    and (srv.server.webhook.stats.delivered + srv.server.webhook.stats.failed) < 1
                ):
                    time.sleep(0.05)
                metrics = srv.server.metrics.render().decode()
        if delivered:
            ((body, _),) = ep.posts
            assert body["type"] == "alert" and body["state"] == "raised" and body["rule"] == "Neutral>=0.5 for 2s"
            assert body["call_id"] == result.call_id and body["t"] == 3.0
            assert 'emostream_alert_webhook_total{outcome="delivered"} 1.0' in metrics
        else:
            assert ep.attempts == 3 and not ep.posts
            assert 'emostream_alert_webhook_total{outcome="failed"} 1.0' in metrics
            assert 'emostream_alert_webhook_total{outcome="retried"} 2.0' in metrics


def test_replay_posts_alerts_to_the_webhook(tmp_path, capsys):
    import soundfile as sf

    from emostream.cli import main

    audio, rate = sf.read(ROOT / "examples" / "call_mono.flac")
    sf.write(tmp_path / "call.flac", audio[: 12 * rate], rate)
    with Endpoint() as ep:
        rc = main(
            [
                "replay",
                str(tmp_path / "call.flac"),
                "--fast",
                "--no-dashboard",
                "--vad",
                "energy",
                "--alert",
                "Neutral>=0.0 for 2s",
                "--alert-webhook",
                ep.url,
                "--events",
                str(tmp_path / "e.jsonl"),
            ]
        )
    assert rc == 0
    written = [json.loads(x) for x in (tmp_path / "e.jsonl").read_text().splitlines()]
    assert [b for b, _ in ep.posts] == [x for x in written if x.get("type") == "alert"] and ep.posts
    assert main(["replay", "x.wav", "--alert-webhook", ep.url]) == 2
    assert "needs at least one --alert" in capsys.readouterr().err
    assert main(["replay", "x.wav", "--alert", "Sad>0.5", "--alert-webhook", "ftp://nope"]) == 2
