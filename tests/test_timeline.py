import json

import numpy as np
import pytest

from emostream.timeline import CLASSES, JsonlWriter, Smoother, Timeline, make_event, read_events


def onehot(label: str, p: float = 0.9) -> np.ndarray:
    v = np.full(len(CLASSES), (1 - p) / (len(CLASSES) - 1))
    v[CLASSES.index(label)] = p
    return v


def test_event_shape_matches_design():
    e = make_event("call-42", "customer", 12.0, 18.0, onehot("Angry", 0.81))
    assert list(e) == [
        "type",
        "stream",
        "channel",
        "t_start",
        "t_end",
        "speech",
        "label",
        "confidence",
        "probabilities",
    ]
    assert e["type"] == "event"  # every JSONL line has a type (#42 item 5)
    assert e["label"] == "Angry" and e["confidence"] == 0.81 and e["speech"] is True
    assert list(e["probabilities"]) == list(CLASSES)
    assert abs(sum(e["probabilities"].values()) - 1) < 1e-3
    silent = make_event("c", "agent", 0.0, 1.0, None)
    assert silent["speech"] is False and silent["label"] is None and silent["probabilities"] is None
    json.dumps(e)


def test_smoother_ema():
    s = Smoother(0.5)
    a = s("x", onehot("Angry", 1.0 - 1e-9))
    b = s("x", onehot("Sad", 1.0 - 1e-9))
    assert np.isclose(b[CLASSES.index("Angry")], 0.5, atol=1e-6)
    assert s("x", None) is None  # silence passes through
    assert s("y", onehot("Happy"))[3] == pytest.approx(0.9)  # channels independent
    assert Smoother(1.0)("x", a) is a
    with pytest.raises(ValueError):
        Smoother(0)


def test_summary_shares_count_new_audio_once():
    tl = Timeline("s", ("a",), hop_seconds=1.0)
    # windows end at 1..6 (start 0) then 7, 8 (start 1, 2): each adds 1 s of new audio
    labels = ["Neutral"] * 4 + ["Angry"] * 4
    for k, lab in enumerate(labels, start=1):
        tl.add(make_event("s", "a", max(0, k - 6), k, onehot(lab, 0.6 + 0.01 * k)))
    tl.add(make_event("s", "a", 3.0, 9.0, None))
    s = tl.summary()["channels"]["a"]
    assert s["windows"] == 9 and s["speech_windows"] == 8 and s["speech_seconds"] == 8.0
    assert s["shares"]["Angry"] == 0.5 and s["shares"]["Neutral"] == 0.5
    assert s["peaks"][0]["label"] == "Angry" and s["peaks"][0]["t_end"] == 8
    assert all(p["label"] != "Neutral" for p in s["peaks"])


def test_summary_without_speech():
    tl = Timeline("s", ("a", "b"))
    tl.add(make_event("s", "a", 0, 1, None))
    summary = tl.summary()
    assert summary["type"] == "summary" and summary["channels"]["a"]["dominant"] is None
    assert summary["channels"]["b"]["windows"] == 0


def test_jsonl_writer_flushes_each_event(tmp_path):
    path = tmp_path / "e.jsonl"
    w = JsonlWriter(path)
    w.write(make_event("s", "a", 0, 1, onehot("Sad")))
    assert len(path.read_text().splitlines()) == 1  # visible before close
    w.write({"type": "summary"})
    w.close()
    assert len(read_events(path)) == 1
    with pytest.raises(FileNotFoundError):
        JsonlWriter(tmp_path / "missing" / "e.jsonl")


def _summary_from_all_events(timeline: Timeline, events: dict, peaks: int = 3) -> dict:
    """The summary as computed before issue 40, from every event (the running tally must match it)."""
    channels, duration = {}, 0.0
    for name in timeline.channels:
        evs = events.get(name, [])
        duration = max(duration, max((e["t_end"] for e in evs), default=0.0))
        time_by_label = dict.fromkeys(CLASSES, 0.0)
        speech_seconds, prev_end = 0.0, 0.0
        for e in evs:
            new = max(0.0, e["t_end"] - max(prev_end, e["t_start"]))
            prev_end = e["t_end"]
            if e["speech"]:
                speech_seconds += new
                time_by_label[e["label"]] += new
        shares = {c: (round(t / speech_seconds, 4) if speech_seconds else 0.0) for c, t in time_by_label.items()}
        ranked = sorted(
            (e for e in evs if e["speech"] and e["label"] != "Neutral"), key=lambda e: e["confidence"], reverse=True
        )[:peaks]
        channels[name] = {
            "windows": len(evs),
            "speech_windows": sum(1 for e in evs if e["speech"]),
            "speech_seconds": round(speech_seconds, 3),
            "shares": shares,
            "dominant": max(shares, key=shares.get) if speech_seconds else None,
            "peaks": [{k: e[k] for k in ("label", "confidence", "t_start", "t_end")} for e in ranked],
        }
    return {"type": "summary", "stream": timeline.stream, "duration": round(duration, 3), "channels": channels}


def test_running_summary_matches_all_events_while_keeping_few():
    """Issue 40: a live call keeps only its newest events; its summary (a running tally) is the one
    computed from every event, ties between peaks included."""
    rng = np.random.default_rng(0)
    kept = Timeline("s", ("a", "b"), max_events=7)
    every: dict = {}
    for k in range(1, 200):
        for ch in ("a", "b"):
            probs = None if rng.random() < 0.3 else rng.dirichlet(np.ones(len(CLASSES)) * 0.5)
            if probs is not None and k % 17 == 0:
                probs = np.eye(len(CLASSES))[k % len(CLASSES)] * 0.9 + 0.1 / len(CLASSES)  # equal confidences
            e = make_event("s", ch, max(0.0, k - 6.0), float(k), probs)
            kept.add(e)
            every.setdefault(ch, []).append(e)
    assert kept.summary() == _summary_from_all_events(kept, every)
    assert all(7 <= len(v) <= 7 + 7 // 4 + 1 for v in kept.events.values())
    assert kept.events["a"][-1] is every["a"][-1]
    assert Timeline("s", ("a", "b"), 1.0, every).summary() == kept.summary()  # built from events (report)


def test_peaks_do_not_overlap():
    """#42 item 7: Sad 0.82 at 28-34, 0.74 at 26-32 and 0.73 at 27-33 are one moment: the summary
    keeps its best window and the next peaks come from other moments."""
    tl = Timeline("s", ("a",))
    conf = {32: 0.74, 33: 0.73, 34: 0.82, 35: 0.6, 50: 0.7, 70: 0.65}
    for t in range(6, 80):
        tl.add(make_event("s", "a", t - 6, t, onehot("Sad", conf.get(t, 0.3))))
    peaks = tl.summary()["channels"]["a"]["peaks"]
    assert [(p["confidence"], p["t_start"], p["t_end"]) for p in peaks] == [
        (0.82, 28, 34),
        (0.7, 44, 50),
        (0.65, 64, 70),
    ]
    for a, b in zip(peaks, peaks[1:]):
        assert a["t_end"] <= b["t_start"] or b["t_end"] <= a["t_start"]
