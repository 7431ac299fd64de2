"""Tests of the live dashboard and the plain printer (no TTY needed)."""

from __future__ import annotations

import io
import re

import pytest
from rich.console import Console

from emostream.dashboard import (
    CLASSES,
    EMOTION_COLORS,
    LEGEND_SWATCH,
    TIMELINE_BLOCK,
    Dashboard,
    DashboardInfo,
    format_clock,
    format_rtf,
)
from emostream.display import PlainPrinter, make_display

INFO = DashboardInfo(
    source="replay examples/call_stereo.flac",
    stream="call-42",
    channels=("customer", "agent"),
    device="cpu",
    hop_seconds=1.0,
)

ANSI = re.compile(r"\x1b\[")


def speech(channel: str, t: float, label: str, confidence: float) -> dict:
    rest = (1.0 - confidence) / (len(CLASSES) - 1)
    probs = {c: (confidence if c == label else rest) for c in CLASSES}
    return {
        "stream": "call-42",
        "channel": channel,
        "t_start": t,
        "t_end": t + 6.0,
        "speech": True,
        "label": label,
        "confidence": confidence,
        "probabilities": probs,
    }


def silence(channel: str, t: float) -> dict:
    return {
        "stream": "call-42",
        "channel": channel,
        "t_start": t,
        "t_end": t + 6.0,
        "speech": False,
        "label": None,
        "confidence": None,
        "probabilities": None,
    }


SUMMARY = {
    "type": "summary",
    "stream": "call-42",
    "duration": 84.0,
    "channels": {
        "customer": {
            "windows": 80,
            "speech_windows": 70,
            "speech_seconds": 70.0,
            "shares": {
                "Angry": 0.4,
                "Disgusted": 0.0,
                "Fearful": 0.05,
                "Happy": 0.0,
                "Neutral": 0.35,
                "Sad": 0.2,
                "Surprised": 0.0,
            },
            "dominant": "Angry",
            "peaks": [{"label": "Angry", "confidence": 0.93, "t_start": 30.0, "t_end": 36.0}],
        },
        "agent": {
            "windows": 80,
            "speech_windows": 60,
            "speech_seconds": 60.0,
            "shares": {
                "Angry": 0.0,
                "Disgusted": 0.0,
                "Fearful": 0.0,
                "Happy": 0.3,
                "Neutral": 0.7,
                "Sad": 0.0,
                "Surprised": 0.0,
            },
            "dominant": "Neutral",
            "peaks": [],
        },
    },
}


def recording_console() -> Console:
    return Console(record=True, width=120, force_terminal=True, color_system="truecolor")


def fed_dashboard(console: Console, **kwargs) -> Dashboard:
    dash = Dashboard(INFO, console=console, **kwargs)
    dash.update(speech("customer", 0.0, "Neutral", 0.62))
    dash.update(speech("agent", 0.0, "Happy", 0.70))
    dash.update(speech("customer", 1.0, "Neutral", 0.66))
    dash.update(silence("agent", 1.0))
    dash.update(speech("customer", 8.0, "Angry", 0.81))  # label change, dated at 00:13
    dash.set_clock(audio_seconds=60.0, wall_seconds=2.5)  # x24.0
    return dash


def test_render_shows_header_channels_current_legend_and_log() -> None:
    console = recording_console()
    dash = fed_dashboard(console)
    console.print(dash.render())
    text = console.export_text()

    assert "replay examples/call_stereo.flac" in text
    assert "call-42" in text
    assert "x24.0" in text
    assert "01:00" in text  # elapsed audio time mm:ss
    assert "cpu" in text
    assert "customer" in text and "agent" in text
    assert "Angry" in text and "0.81" in text  # customer's current emotion and confidence
    assert "silence" in text  # agent's latest window is silence
    legend = next(line for line in text.splitlines() if LEGEND_SWATCH in line)
    for cls in CLASSES:
        assert cls in legend
    assert "00:13 customer Neutral → Angry (0.81)" in text
    # the first label of a channel is logged too, but a repeated label is not
    assert text.count("customer — → Neutral") == 1
    assert "Neutral → Neutral" not in text


def test_html_export_contains_class_colour() -> None:
    console = recording_console()
    console.print(fed_dashboard(console).render())
    html = console.export_html()
    assert EMOTION_COLORS["Angry"].lower() in html.lower()


def test_log_message_and_only_changes_logged() -> None:
    console = recording_console()
    dash = Dashboard(INFO, console=console)
    dash.update(speech("customer", 0.0, "Sad", 0.5))
    dash.update(silence("customer", 1.0))
    dash.update(speech("customer", 2.0, "Sad", 0.55))  # same label across silence: no change
    dash.update(speech("customer", 3.0, "Fearful", 0.6))
    dash.log("input overrun, 0.5 s dropped")
    console.print(dash.render())
    text = console.export_text()
    assert text.count("Sad → ") == 1 and "Sad → Fearful (0.60)" in text
    assert "input overrun, 0.5 s dropped" in text


@pytest.mark.parametrize("width", [20, 60])
def test_timeline_width_is_bounded(width: int) -> None:
    console = recording_console()
    dash = Dashboard(INFO, console=console, timeline_width=width)
    for i in range(200):
        dash.update(speech("customer", float(i), CLASSES[i % len(CLASSES)], 0.9))
        dash.update(silence("agent", float(i)) if i % 2 else speech("agent", float(i), "Sad", 0.9))
    console.print(dash.render())
    text = console.export_text()
    lines = [line for line in text.splitlines() if TIMELINE_BLOCK in line]
    assert lines, "no timeline rendered"
    customer_blocks = sum(line.split("││")[0].count(TIMELINE_BLOCK) for line in lines)
    agent_blocks = sum(line.split("││")[1].count(TIMELINE_BLOCK) for line in lines)
    # at most `width` cells per channel (and never more than fits into the panel)
    assert 0 < customer_blocks <= width
    assert 0 < agent_blocks <= width // 2 + 1
    assert text.count(TIMELINE_BLOCK) <= 2 * width
    if width == 20:  # fits the panel: exactly the last 20 events
        assert customer_blocks == 20 and agent_blocks == 10


def test_unknown_channel_gets_a_panel() -> None:
    console = recording_console()
    dash = Dashboard(INFO, console=console)
    dash.update(speech("supervisor", 0.0, "Surprised", 0.77))
    console.print(dash.render())
    text = console.export_text()
    assert "supervisor" in text and "Surprised" in text and "0.77" in text


def test_finish_renders_summary() -> None:
    console = recording_console()
    dash = fed_dashboard(console)
    dash.finish(SUMMARY)
    text = console.export_text()
    assert "Summary" in text and "Dominant" in text
    row = next(line for line in text.splitlines() if line.strip().startswith("customer") and "70.0s" in line)
    assert "Angry" in row and "40%" in row
    agent_row = next(line for line in text.splitlines() if line.strip().startswith("agent") and "60.0s" in line)
    assert "Neutral" in agent_row and "70%" in agent_row


def test_live_context_runs() -> None:
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=True, color_system="truecolor")
    with Dashboard(INFO, console=console, refresh_per_second=20) as dash:
        dash.update(speech("customer", 0.0, "Angry", 0.9))
        dash.update(silence("agent", 0.0))
        dash.set_clock(6.0, 1.0)
        dash.finish(SUMMARY)
    assert "Summary" in out.getvalue()


def test_plain_printer_one_line_per_event_without_escape_codes() -> None:
    buf = io.StringIO()
    events = [
        speech("customer", 12.0, "Angry", 0.81),
        silence("agent", 12.0),
        speech("agent", 13.0, "Surprised", 0.5),
        speech("customer", 13.0, "Neutral", 0.7),
    ]
    with PlainPrinter(INFO, file=buf) as printer:
        for e in events:
            printer.update(e)
        printer.set_clock(19.0, 1.0)
    lines = buf.getvalue().splitlines()
    assert len(lines) == len(events)
    assert lines[0] == "[call-42] customer  12.0-18.0s  Angry     0.81"
    assert lines[1] == "[call-42] agent     12.0-18.0s  silence"
    assert lines[2] == "[call-42] agent     13.0-19.0s  Surprised 0.50"
    assert not ANSI.search(buf.getvalue())

    printer.finish(SUMMARY)
    tail = buf.getvalue().splitlines()[len(events) :]
    assert len(tail) == 1 + len(SUMMARY["channels"])
    assert "x19.0" in tail[0]
    assert "dominant Angry" in tail[1] and "Angry 40%" in tail[1]
    assert not ANSI.search(buf.getvalue())


def test_make_display_picks_by_terminal() -> None:
    plain_console = Console(file=io.StringIO(), force_terminal=False)
    assert isinstance(make_display(INFO, enabled=True, console=plain_console), PlainPrinter)
    tty_console = Console(file=io.StringIO(), force_terminal=True, _environ={"TERM": "xterm-256color"})
    assert isinstance(make_display(INFO, enabled=True, console=tty_console), Dashboard)
    assert isinstance(make_display(INFO, enabled=False, console=tty_console), PlainPrinter)
    dumb_console = Console(file=io.StringIO(), force_terminal=True, _environ={"TERM": "dumb"})
    assert isinstance(make_display(INFO, enabled=True, console=dumb_console), PlainPrinter)


def test_format_helpers() -> None:
    assert format_clock(14.9) == "00:14"
    assert format_clock(3725) == "1:02:05"
    assert format_rtf(1.0) == "x1.00"
    assert format_rtf(23.46) == "x23.5"
    assert format_rtf(None) == "x–"


def test_classes_have_one_definition_and_the_web_page_agrees() -> None:
    import re
    from importlib.resources import files

    import emostream
    from emostream.model import CLASSES as MODEL_CLASSES
    from emostream.timeline import CLASSES as TIMELINE_CLASSES

    assert CLASSES is emostream.CLASSES is TIMELINE_CLASSES is MODEL_CLASSES
    assert set(EMOTION_COLORS) == set(CLASSES)
    # the supervisor page cannot import Python: its own list must match, in the same order
    js = (files("emostream") / "web" / "app.js").read_text()
    listed = re.search(r"const CLASSES = \[([^\]]*)\]", js)
    assert listed and tuple(re.findall(r"'(\w+)'", listed.group(1))) == CLASSES


@pytest.mark.parametrize("finished", [False, True])
def test_dashboard_fits_an_80x24_terminal(finished: bool) -> None:
    """#42 item 10: on 80 x 24 the stereo panels stack and go compact; every line fits, nothing is
    cut (no ellipsis, at most 24 rows), the legend is whole and the change log keeps what rows are left."""
    console = Console(record=True, width=80, height=24, force_terminal=True, color_system="truecolor")
    dash = fed_dashboard(console)
    for t in range(9, 30):
        dash.update(speech("customer", float(t), ("Sad", "Angry")[t % 2], 0.7))
    if finished:
        dash.finish(SUMMARY)
    else:
        console.print(dash.render())
    lines = console.export_text().rstrip("\n").splitlines()
    assert len(lines) <= 24 and max(len(line) for line in lines) <= 80
    text = "\n".join(lines)
    assert "…" not in text and "..." not in text
    assert "customer" in text and "agent" in text and "Angry" in text and "Happy" in text
    assert "windows speech" in text  # both panels' bottom borders
    if finished:  # the summary, whole, takes the rows of the change log and of the legend
        assert "Summary" in text and "Neutral 70%" in text and "60.0s (60/80 win)" in text
    else:
        assert "■ Surprised" in text and "silence" in text  # the legend's last entries
        assert "changes" in text and "Sad → Angry" in text


def test_dashboard_keeps_full_panels_where_they_fit() -> None:
    console = Console(record=True, width=120, height=50, force_terminal=True, color_system="truecolor")
    console.print(fed_dashboard(console).render())
    text = console.export_text()
    assert text.count("Surprised") >= 3  # a bar per class in both panels, and the legend
    assert "changes" in text
