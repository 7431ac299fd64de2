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
    return {"stream": "s", "channel": channel, "t_start": max(0.0, t_end - 6), "t_end": float(t_end),
            "speech": speech, "label": None, "confidence": None, "probabilities": probs if speech else None}


def test_parse_rules():
    r = AlertRule.parse("angry >= 0.7 for 10s")
    assert (r.label, r.threshold, r.seconds, r.strict) == ("Angry", 0.7, 10.0, False)
    assert r.name == "Angry>=0.7 for 10s"
    assert AlertRule.parse("Sad>0.5").seconds == 0 and AlertRule.parse("Sad>0.5").strict
    for bad in ("Angry", "Grumpy>=0.5", "Angry>=1.5", "Angry>=0.5 for ten"):
        with pytest.raises(ValueError):
            AlertRule.parse(bad)


def test_raised_after_the_duration_and_cleared_by_the_first_break():
    tracker = AlertTracker([AlertRule.parse("Angry>=0.7 for 3s")], "s")
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
    proc = subprocess.run([sys.executable, "-m", "emostream", "replay", str(ROOT / "examples" / "call_mono.flac"),
                           "--fast", "--no-dashboard", "--events", str(out), "--alert", "Neutral>=0.0 for 2s",
                           "--vad", "energy"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    alerts = [x for x in lines if x.get("type") == "alert"]
    first_speech = min(x["t_end"] for x in lines if x.get("speech"))
    assert alerts and alerts[0]["state"] == "raised" and alerts[0]["t"] >= first_speech + 2
    assert "ALERT: ch0 Neutral>=0 for 2s" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "emostream", "replay", "x.wav", "--alert", "Grumpy>=1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown emotion" in bad.stderr and "Traceback" not in bad.stderr
