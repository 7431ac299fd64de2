"""The live-source commands: ``emostream send``, ``serve``, ``watch`` (CLI behaviour and errors)."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
from rich.console import Console

from emostream.cli import main
from emostream.watch import PlainWatcher, SupervisorView

from .conftest import EXAMPLES, ROOT
from .live_util import ServerThread, expected_ends, write_call

STEREO_SECONDS = 88.910375  # examples/call_stereo.flac


@pytest.mark.parametrize(
    "protocol,channels",
    [("pcm", ("agent", "customer")), ("twilio", ("customer", "agent")), ("audiohook", ("customer", "agent"))],
)
def test_send_example_call_prints_events_and_summary(protocol, channels, capsys):
    with ServerThread(port=0) as srv:
        args = ["send", str(EXAMPLES / "call_stereo.flac"), srv.url, "--protocol", protocol, "--fast"]
        if protocol == "pcm":
            args += ["--channel-names", "agent,customer"]
        assert main(args) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    summary = lines[-1]
    assert summary["type"] == "summary" and set(summary["channels"]) == set(channels)
    assert summary["duration"] == pytest.approx(STEREO_SECONDS, abs=2e-3)
    events = [m for m in lines if m.get("type") == "event"]
    for name in channels:
        ends = [e["t_end"] for e in events if e["channel"] == name]
        assert ends == pytest.approx(expected_ends(STEREO_SECONDS), abs=2e-3)


def one_line_error(capsys, fragment):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("emostream: error:") and fragment in err[0], err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_send_errors_are_one_line(tmp_path, capsys):
    audio = write_call(tmp_path / "a.wav", 1.0, channels=1)
    assert main(["send", str(audio), "http://127.0.0.1:1"]) == 2
    one_line_error(capsys, "ws://HOST:PORT")
    assert main(["send", str(tmp_path / "missing.wav"), "ws://127.0.0.1:1"]) == 2
    one_line_error(capsys, "no such file")
    assert main(["send", str(audio), f"ws://127.0.0.1:{free_port()}", "--fast"]) == 2
    one_line_error(capsys, "cannot connect")
    assert main(["send", str(audio), "ws://127.0.0.1:1", "--protocol", "sip"]) == 2
    one_line_error(capsys, "invalid choice")
    assert main(["send", str(audio), "ws://127.0.0.1:1", "--audiohook-key", "nocolon"]) == 2
    one_line_error(capsys, "KEY:SECRET")
    with ServerThread(port=0, token="t0k") as srv:
        assert main(["send", str(audio), srv.url, "--fast"]) == 2
        one_line_error(capsys, "HTTP 401")
        assert main(["send", str(audio), srv.url, "--fast", "--token", "t0k", "--quiet"]) == 0
        assert json.loads(capsys.readouterr().out)["type"] == "summary"


def test_serve_errors_are_one_line(capsys):
    assert main(["serve", "--no-model", "--audiohook-key", "k:***"]) == 2
    one_line_error(capsys, "base64")
    assert main(["serve", "--no-model", "--port", "70000"]) == 2
    one_line_error(capsys, "port")
    assert main(["serve", "--no-model", "--hop", "-1"]) == 2
    one_line_error(capsys, "must be > 0")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--no-model", "--port", str(busy.getsockname()[1])]) == 2
    one_line_error(capsys, "cannot listen")


def test_watch_errors_are_one_line(capsys):
    assert main(["watch", "localhost:8765"]) == 2
    one_line_error(capsys, "ws://HOST:PORT")
    assert main(["watch", f"ws://127.0.0.1:{free_port()}", "--no-dashboard"]) == 2
    one_line_error(capsys, "cannot connect")


def test_serve_send_watch_processes(tmp_path):
    """The real commands as a user runs them: serve (no model), watch, send; Ctrl-C stops serve."""
    env = {**os.environ, "EMOSTREAM_TOKEN": "tok"}
    # A shell without job control starts background jobs with SIGINT ignored, and children inherit
    # that: give the server the default disposition, as a terminal would.
    serve = subprocess.Popen(
        [sys.executable, "-m", "emostream", "serve", "--port", "0", "--no-model", "--events-dir", str(tmp_path / "ev")],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        line = serve.stderr.readline()
        match = re.search(r"listening on (ws://127\.0\.0\.1:\d+)", line)
        assert match, line
        url = match.group(1)
        assert "token required" in line
        assert re.search(r"supervisor page http://127\.0\.0\.1:\d+/$", line.strip())  # #42 item 10
        watch = subprocess.Popen(
            [sys.executable, "-m", "emostream", "watch", url, "--no-dashboard"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(1.5)  # let watch subscribe
        audio = write_call(tmp_path / "a.wav", 2.5)
        sent = subprocess.run(
            [
                sys.executable,
                "-m",
                "emostream",
                "send",
                str(audio),
                url,
                "--fast",
                "--call-id",
                "proc-call",
                "--protocol",
                "twilio",
            ],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr
        printed = [json.loads(line) for line in sent.stdout.splitlines()]
        # serve's default --analyse customer: only the inbound (customer) track has events
        assert printed[-1]["type"] == "summary" and len(printed) == 1 + len(expected_ends(2.5))
        assert {m["channel"] for m in printed[:-1]} == {"customer"}
        assert {m["source_channel"] for m in printed[:-1]} == {"inbound"}  # Twilio's own name, kept
        serve.send_signal(signal.SIGINT)
        assert serve.wait(20) == 0
        out, err = watch.communicate(timeout=20)
        # the server went away: watch says so and exits non-zero (#42 item 10)
        assert watch.returncode == 1 and "the server closed the connection (code 1001" in err, err
        assert "[proc-call] started (twilio: customer, agent)" in out
        assert "[proc-call] customer  0.0-2.5s" in out and "[proc-call] ended (completed)" in out
        lines = (tmp_path / "ev" / "proc-call.jsonl").read_text().splitlines()
        assert json.loads(lines[-1])["type"] == "summary"
    finally:
        for proc in (serve,):
            if proc.poll() is None:
                proc.kill()


def test_serve_stops_cleanly_on_sigterm(tmp_path):
    """A service manager's SIGTERM ends the server like Ctrl-C: exit 0, open calls get a summary."""
    serve = subprocess.Popen(
        [sys.executable, "-m", "emostream", "serve", "--port", "0", "--no-model", "--events-dir", str(tmp_path / "ev")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = serve.stderr.readline()
        assert "listening on" in line, line
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(20) == 0
        assert "stopped" in serve.stderr.read()
    finally:
        if serve.poll() is None:
            serve.kill()


def test_supervisor_view_renders_calls():
    view = SupervisorView("test")
    plain_lines = []
    plain = PlainWatcher()
    messages = [
        {"type": "hello", "calls": []},
        {"type": "call_started", "call_id": "c-1", "protocol": "pcm", "channels": ["agent", "customer"]},
        {
            "type": "event",
            "stream": "c-1",
            "channel": "agent",
            "t_start": 0.0,
            "t_end": 1.0,
            "speech": True,
            "label": "Angry",
            "confidence": 0.81,
            "probabilities": {},
        },
        {
            "type": "event",
            "stream": "c-1",
            "channel": "customer",
            "t_start": 0.0,
            "t_end": 1.0,
            "speech": False,
            "label": None,
            "confidence": None,
            "probabilities": None,
        },
        {"type": "summary", "stream": "c-1", "call_id": "c-1", "channels": {"agent": {"dominant": "Angry"}}},
        {"type": "call_ended", "call_id": "c-1", "reason": "completed"},
    ]
    for m in messages:
        view.update(m)
        plain_lines.append(plain.line(m))
    console = Console(record=True, width=120, color_system=None)
    console.print(view.render())
    text = console.export_text()
    assert "c-1 (ended)" in text and "dominant Angry" in text and "1/1" in text and "0/1" in text
    assert plain_lines[1] == "[c-1] started (pcm: agent, customer)"
    assert plain_lines[2] == "[c-1] agent  0.0-1.0s  Angry     0.81"
    assert plain_lines[3] == "[c-1] customer  0.0-1.0s  silence"
    assert plain_lines[-1] == "[c-1] ended (completed)"


def test_supervisor_view_shows_alerts_while_raised():
    view, plain = SupervisorView("test"), PlainWatcher()
    alert = {
        "type": "alert",
        "stream": "c-2",
        "call_id": "c-2",
        "channel": "customer",
        "rule": "Angry>=0.7 for 10s",
        "label": "Angry",
        "threshold": 0.7,
        "seconds": 10.0,
        "state": "raised",
        "t": 23.0,
        "since": 13.0,
    }
    view.update({"type": "call_started", "call_id": "c-2", "protocol": "twilio", "channels": ["customer"]})
    view.update(
        {
            "type": "event",
            "stream": "c-2",
            "channel": "customer",
            "t_start": 17.0,
            "t_end": 23.0,
            "speech": True,
            "label": "Angry",
            "confidence": 0.9,
            "probabilities": {},
        }
    )
    view.update(alert)

    def screen() -> str:
        console = Console(record=True, width=140, color_system=None)
        console.print(view.render())
        return console.export_text()

    assert "ALERT Angry>=0.7 for 10s" in screen()
    assert plain.line(alert) == "[c-2] customer  ALERT raised: Angry>=0.7 for 10s at 23.0s"
    view.update({**alert, "state": "cleared", "t": 30.0})
    assert "ALERT" not in screen()
