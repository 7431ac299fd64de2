"""emostream report: a constructed timeline as self-contained HTML (inline SVG) and as PNG."""

from __future__ import annotations

import json
import re

import pytest

from emostream.cli import main
from emostream.report import load_timeline, render_html
from emostream.timeline import CLASSES, Timeline, make_event


def write_timeline(path, with_summary=True):
    """Two channels, 12 windows each: the customer turns Angry from 5 s on, the agent is silent at 3-4 s."""
    events, timeline = [], Timeline("call-7", ("agent", "customer"))
    for t in range(1, 13):
        for ch in ("agent", "customer"):
            if ch == "agent" and t in (3, 4):
                probs = None
            else:
                angry = 0.9 if (ch == "customer" and t >= 5) else 0.05
                rest = (1 - angry) / 6
                probs = [angry] + [rest] * 6
            e = make_event("call-7", ch, max(0, t - 6), t, probs)
            timeline.add(e)
            events.append(e)
    alert = {
        "type": "alert",
        "stream": "call-7",
        "call_id": "call-7",
        "channel": "customer",
        "rule": "Angry>=0.7 for 3s",
        "label": "Angry",
        "threshold": 0.7,
        "seconds": 3.0,
        "state": "raised",
        "t": 8.0,
        "since": 5.0,
    }
    with open(path, "w") as f:
        for e in events[:15]:
            f.write(json.dumps(e) + "\n")
        f.write(json.dumps(alert) + "\n")
        for e in events[15:]:
            f.write(json.dumps(e) + "\n")
        if with_summary:
            f.write(json.dumps(timeline.summary()) + "\n")
    return path


def test_html_report_is_self_contained_and_shows_the_timeline(tmp_path, capsys):
    src = write_timeline(tmp_path / "call.jsonl")
    assert main(["report", str(src), "--out", str(tmp_path / "call.html")]) == 0
    page = (tmp_path / "call.html").read_text()
    assert page.count("<svg") == 2 and "<h2>agent</h2>" in page and "<h2>customer</h2>" in page
    assert "<script" not in page and not re.search(r"(src|href)=", page)  # nothing loaded from anywhere
    assert re.findall(r"https?://[^\"' ]+", page) == ["http://www.w3.org/2000/svg"] * 2  # the SVG namespace only
    assert page.count("Angry&gt;=0.7 for 3s raised at 0:08") == 1
    # customer: Angry dominant (8 of 12 s); agent: 2 windows without speech -> one silence polygon gap
    assert "<th>dominant</th><td colspan=2>Angry</td>" in page
    call = load_timeline(src)
    assert call.channels == ("agent", "customer") and call.duration == 12.0 and len(call.alerts) == 1
    assert call.summary["channels"]["customer"]["shares"]["Angry"] == pytest.approx(8 / 12, abs=1e-3)
    agent_svg = page.split("<svg")[1]
    assert agent_svg.count("<polygon") == 2 * len(CLASSES)  # two runs of speech around the silent windows


def test_report_without_summary_recomputes_it(tmp_path):
    src = write_timeline(tmp_path / "live.jsonl", with_summary=False)  # a call still streaming
    with_summary = write_timeline(tmp_path / "done.jsonl")
    assert load_timeline(src).summary == load_timeline(with_summary).summary
    assert "<svg" in render_html(load_timeline(src))


def test_png_report(tmp_path):
    pytest.importorskip("matplotlib")
    src = write_timeline(tmp_path / "call.jsonl")
    assert main(["report", str(src), "--out", str(tmp_path / "call.png")]) == 0
    data = (tmp_path / "call.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_report_errors_are_one_line(tmp_path, capsys):
    src = write_timeline(tmp_path / "call.jsonl")
    (tmp_path / "junk.jsonl").write_text("this is not json\n")
    (tmp_path / "empty.jsonl").write_text(json.dumps({"type": "summary", "channels": {}}) + "\n")
    for argv, message in (
        (["report", str(src), "--out", str(tmp_path / "x.pdf")], "must end in .html or .png"),
        (["report", str(tmp_path / "junk.jsonl"), "--out", str(tmp_path / "j.html")], "not a JSON line"),
        (["report", str(tmp_path / "empty.jsonl"), "--out", str(tmp_path / "e.html")], "no events"),
        (["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "m.html")], "missing.jsonl"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_report_on_a_wrong_or_live_file(tmp_path):
    """Issue #42 item 3, as a user meets it (subprocess): an audio file or a missing JSONL is one
    line and exit 2, never a traceback; a live call's half-written last line is skipped with a note."""
    import subprocess
    import sys

    from .conftest import ROOT

    def run(*args):
        return subprocess.run(
            [sys.executable, "-m", "emostream", "report", *args], capture_output=True, text=True, cwd=ROOT, timeout=120
        )

    for src, message in (
        (ROOT / "examples" / "call_mono.flac", "not a JSONL timeline"),
        (tmp_path / "missing.jsonl", "no such file"),
    ):
        r = run(str(src), "--out", str(tmp_path / "x.html"))
        assert r.returncode == 2 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert r.stderr.startswith("emostream: error:") and message in r.stderr
    live = write_timeline(tmp_path / "live.jsonl", with_summary=False)
    with open(live, "a") as f:
        f.write('{"stream": "call-7", "channel": "agent", "t_st')  # the writer is mid-line
    r = run(str(live), "--out", str(tmp_path / "live.html"))
    assert r.returncode == 0, r.stderr
    assert "skipped the last line" in r.stderr and (tmp_path / "live.html").exists()
    assert load_timeline(live).duration == 12.0
    (tmp_path / "bad.jsonl").write_text('{"a": 1\n' + live.read_text())  # a broken line inside is an error
    assert run(str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "b.html")).returncode == 2


def test_two_hour_call_report_is_readable_and_small(tmp_path):
    """#42 item 8: a 2-hour timeline: h:mm ticks, per-minute averages past 15 minutes, HTML < 1 MB;
    #42 item 10: the footer quotes the model card's accuracy from model.json (not "about half")."""
    import numpy as np

    from emostream.report import accuracy_sentence

    rng = np.random.default_rng(0)
    timeline, path = Timeline("long-call", ("agent", "customer")), tmp_path / "long.jsonl"
    with open(path, "w") as f:
        for t in range(1, 7201):
            for ch in ("agent", "customer"):
                p = rng.dirichlet(np.ones(len(CLASSES))) if (t // 300) % 4 else None  # 5 min silent in 20
                e = make_event("long-call", ch, max(0, t - 6), t, p)
                timeline.add(e)
                f.write(json.dumps(e) + "\n")
        f.write(json.dumps(timeline.summary()) + "\n")
    assert main(["report", str(path), "--out", str(tmp_path / "long.html")]) == 0
    page = (tmp_path / "long.html").read_text()
    assert len(page.encode()) < 1_000_000
    assert "1-minute averages" in page
    ticks = re.findall(r'class="tl">([^<]+)<', page)
    assert ticks[:5] == ["0:00", "0:10", "0:20", "0:30", "0:40"] and ticks[-1] == "2:00"  # h:mm, every 10 min
    customer = page.split("<svg")[2]
    assert customer.count("<polygon") == 7 * 6  # six runs of speech, each minute one step
    assert "6 times in 10" in page and "about half" not in page and accuracy_sentence() in page.replace("&#x27;", "'")
    pytest.importorskip("matplotlib")
    assert main(["report", str(path), "--out", str(tmp_path / "long.png")]) == 0
    assert (tmp_path / "long.png").read_bytes()[:4] == b"\x89PNG"


def test_short_call_keeps_every_window():
    from emostream.report import _plot_segments, _segments, _tick_label

    call = load_timeline(write_timeline(__import__("pathlib").Path(__import__("tempfile").mkdtemp()) / "c.jsonl"))
    assert _plot_segments(call, "customer") == _segments(call.events["customer"])
    assert (_tick_label(90, 600), _tick_label(5400, 7200)) == ("1:30", "1:30")
