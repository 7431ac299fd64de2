"""``emostream report``: one call's timeline as a picture, from its JSONL.

Per analysed channel: the seven probabilities stacked over time (each window drawn over the newest
hop of audio it adds, as the summary counts it; windows without speech are gaps), the label strip
underneath (the dashboard's colours, silence grey) and the alerts (shaded from the start of the run
that raised them to the moment they were raised); then the summary: speech time, share per emotion,
dominant emotion, peak moments and alerts.

Two formats, chosen by the output's suffix: ``.html``, one self-contained file (inline SVG and CSS,
no script, nothing loaded from anywhere), needs nothing beyond the core package; ``.png`` needs
matplotlib (``emostream[report]``).
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from . import __version__
from .dashboard import EMOTION_COLORS
from .model_files import default_checkpoint
from .timeline import CLASSES, Timeline

AGGREGATE_AFTER_SECONDS = 15 * 60  # longer calls are drawn as per-bin averages (one window is < 1 px)
AGGREGATE_SECONDS = 60.0  # the bin of that view: one minute
SILENCE_COLOR = "#d9dce1"
ALERT_COLOR = "#ff4d4f"
FORMATS = ("html", "png")


class ReportError(ValueError):
    """The JSONL cannot be reported on (not a timeline, no events): one line."""


@dataclass
class CallTimeline:
    """What a timeline file holds: events per channel, alerts and the summary."""

    stream: str
    channels: tuple[str, ...]
    events: dict[str, list[dict]]
    alerts: list[dict] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    hop_seconds: float = 1.0
    notes: list[str] = field(default_factory=list)  # what was left out (a half-written last line)

    @property
    def duration(self) -> float:
        return max((e["t_end"] for evs in self.events.values() for e in evs), default=0.0)


def load_timeline(path: str | Path) -> CallTimeline:
    """Parse a timeline written by ``replay --events``, ``serve --events-dir`` or ``batch``.

    A last line without its newline that is not JSON is a line still being written (a live call's
    timeline): it is left out, and :attr:`CallTimeline.notes` says so."""
    path = Path(path)
    if not path.exists():
        raise ReportError(f"no such file: {path}")
    if path.is_dir():
        raise ReportError(f"is a directory, not a JSONL timeline: {path}")
    events: dict[str, list[dict]] = {}
    alerts, summaries, stream, notes = [], [], None, []
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError:
        raise ReportError(
            f"{path} is not a JSONL timeline (not text: an audio file? report reads the "
            "events of replay --events, serve --events-dir or batch)"
        ) from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # no newline after it: half-written
                notes.append(f"{path}:{number}: skipped the last line, not complete (a call in progress?)")
                continue
            raise ReportError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(obj, dict):
            raise ReportError(f"{path}:{number}: not a JSON object")
        kind = obj.get("type", "event")
        if kind == "summary":
            summaries.append(obj)
        elif kind == "alert":
            alerts.append(obj)
        elif kind == "event" and "t_end" in obj and "channel" in obj:
            events.setdefault(obj["channel"], []).append(obj)
            stream = stream or obj.get("stream")
    if not events:
        raise ReportError(f"no events in {path} (a JSONL timeline from replay --events, serve or batch)")
    for evs in events.values():
        evs.sort(key=lambda e: e["t_end"])
    channels = tuple(events)
    ends = sorted({e["t_end"] for evs in events.values() for e in evs})
    steps = [b - a for a, b in zip(ends, ends[1:]) if b - a > 1e-6]
    hop = min(steps) if steps else 1.0
    summary = summaries[-1] if len(summaries) == 1 else Timeline(stream or path.stem, channels, hop, events).summary()
    return CallTimeline(stream or path.stem, channels, events, alerts, summary, hop, notes)


def write_report(source: str | Path, out: str | Path) -> tuple[Path, list[str]]:
    """Write the report of timeline ``source`` to ``out`` (``.html`` or ``.png``); returns the path
    and the notes of :func:`load_timeline`."""
    out = Path(out)
    kind = out.suffix.lower().lstrip(".")
    if kind not in FORMATS:
        raise ReportError(f"report output must end in .html or .png, got {out.name}")
    call = load_timeline(source)
    if kind == "png":
        render_png(call, out)
    else:
        out.write_text(render_html(call), encoding="utf-8")
    return out, call.notes


def _segments(events: list[dict]) -> list[tuple[float, float, dict]]:
    """Each window with the span it stands for: its newest audio ``[max(prev end, start), end)``."""
    out, prev = [], 0.0
    for e in events:
        lo = max(prev, e["t_start"])
        if e["t_end"] > lo:
            out.append((lo, e["t_end"], e))
        prev = max(prev, e["t_end"])
    return out


def _plot_segments(call: CallTimeline, channel: str) -> list[tuple[float, float, dict]]:
    """What a channel's plot draws: each window's span (:func:`_segments`), or for a call longer than
    ``AGGREGATE_AFTER_SECONDS`` one segment per ``AGGREGATE_SECONDS`` bin holding the speech-time
    weighted mean probabilities of its speech windows and their top label (no speech: silence)."""
    segs = _segments(call.events[channel])
    if call.duration <= AGGREGATE_AFTER_SECONDS:
        return segs
    bins: dict[int, list] = {}
    for lo, hi, e in segs:
        k = int(lo // AGGREGATE_SECONDS)
        acc = bins.setdefault(k, [0.0, dict.fromkeys(CLASSES, 0.0)])
        if e.get("speech") and e.get("probabilities"):
            w = hi - lo
            acc[0] += w
            for c in CLASSES:
                acc[1][c] += w * float(e["probabilities"].get(c, 0.0))
    out = []
    for k in sorted(bins):
        lo, hi = k * AGGREGATE_SECONDS, min((k + 1) * AGGREGATE_SECONDS, call.duration)
        weight, sums = bins[k]
        if weight:
            probs = {c: v / weight for c, v in sums.items()}
            out.append((lo, hi, {"speech": True, "label": max(probs, key=probs.get), "probabilities": probs}))
        else:
            out.append((lo, hi, {"speech": False, "label": None, "probabilities": None}))
    return out


def _aggregated_note(call: CallTimeline) -> str:
    if call.duration <= AGGREGATE_AFTER_SECONDS:
        return ""
    return (
        f"Drawn as {AGGREGATE_SECONDS / 60:g}-minute averages of the speech windows (the call is longer than "
        f"{AGGREGATE_AFTER_SECONDS / 60:g} min); the JSONL holds every window."
    )


def _speech_runs(segs: list[tuple[float, float, dict]]) -> list[list[tuple[float, float, dict]]]:
    """Consecutive classified windows as ``(lo, hi, probabilities)`` runs (silence splits them)."""
    runs, run = [], []
    for lo, hi, e in segs:
        if e.get("speech") and e.get("probabilities"):
            run.append((lo, hi, e["probabilities"]))
        elif run:
            runs.append(run)
            run = []
    if run:
        runs.append(run)
    return runs


def _tick_label(seconds: float, duration: float) -> str:
    """Axis label: ``h:mm`` for calls of an hour or more, else ``m:ss``."""
    seconds = int(round(seconds))
    if duration >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


def _fmt_time(seconds: float) -> str:
    seconds = int(round(seconds))
    return (
        f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
        if seconds >= 3600
        else f"{seconds // 60}:{seconds % 60:02d}"
    )


def _tick_step(duration: float, max_ticks: int = 12) -> float:
    for step in (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600):
        if duration / step <= max_ticks:
            return float(step)
    return 7200.0


def accuracy_sentence(checkpoint: Path | None = None) -> str:
    """How often the model is right, quoted from the model card's source, the checkpoint's
    ``model.json`` (cross-validated unweighted accuracy of whole clips), so the report and the README
    cannot disagree."""
    checkpoint = Path(checkpoint) if checkpoint is not None else default_checkpoint()
    try:
        cv = json.loads((checkpoint / "model.json").read_text(encoding="utf-8"))["cv"]
        ua = float((cv.get("clip_summary") or cv["summary"])["overall"]["ua"]["mean"])
    except (OSError, ValueError, KeyError, TypeError):
        return "how often the model is right is in the README's model card"
    return (
        f"the model ({checkpoint.name}) gets the emotion right about {round(ua * 10)} times in 10 on voices it "
        f"never heard (unweighted accuracy {ua:.2f}, speaker-grouped cross-validation of full-band acted speech, "
        f"model.json; much less on phone-line audio: see the model card)"
    )


# --- HTML ------------------------------------------------------------------------------------

WIDTH, PLOT_H, STRIP_H, LEFT, RIGHT, TOP = 960, 150, 16, 44, 12, 8


def _svg_channel(call: CallTimeline, channel: str) -> str:
    duration = max(call.duration, 1e-6)
    inner = WIDTH - LEFT - RIGHT
    x = lambda t: LEFT + inner * t / duration  # noqa: E731
    y = lambda p: TOP + PLOT_H * (1 - p)  # noqa: E731
    segs = _plot_segments(call, channel)
    parts = [f'<rect x="{LEFT}" y="{TOP}" width="{inner}" height="{PLOT_H}" class="bg"/>']
    # stacked probabilities: one step polygon per class, over speech windows only (gaps = silence)
    for run in _speech_runs(segs):
        base = [0.0] * len(run)
        for c in CLASSES:
            top = [b + float(p.get(c, 0.0)) for b, (_, _, p) in zip(base, run)]
            upper = " ".join(f"{x(lo):.2f},{y(t):.2f} {x(hi):.2f},{y(t):.2f}" for (lo, hi, _), t in zip(run, top))
            lower = " ".join(
                f"{x(hi):.2f},{y(b):.2f} {x(lo):.2f},{y(b):.2f}" for (lo, hi, _), b in reversed(list(zip(run, base)))
            )
            parts.append(f'<polygon points="{upper} {lower}" fill="{EMOTION_COLORS[c]}"><title>{c}</title></polygon>')
            base = top
    # label strip, equal neighbours merged
    strip_y = TOP + PLOT_H + 4
    merged: list[list] = []
    for lo, hi, e in segs:
        label = e.get("label") if e.get("speech") else None
        if merged and merged[-1][2] == label and abs(merged[-1][1] - lo) < 1e-6:
            merged[-1][1] = hi
        else:
            merged.append([lo, hi, label])
    for lo, hi, label in merged:
        color = EMOTION_COLORS.get(label, SILENCE_COLOR) if label else SILENCE_COLOR
        parts.append(
            f'<rect x="{x(lo):.2f}" y="{strip_y}" width="{max(x(hi) - x(lo), 0.5):.2f}" height="{STRIP_H}" '
            f'fill="{color}"><title>{_fmt_time(lo)}-{_fmt_time(hi)} {label or "no speech"}</title></rect>'
        )
    # alerts: the run that raised each one, and the moment
    for a in call.alerts:
        if a.get("channel") != channel or a.get("state") != "raised":
            continue
        since = a.get("since") if a.get("since") is not None else a["t"]
        parts.append(
            f'<rect x="{x(since):.2f}" y="{TOP}" width="{max(x(a["t"]) - x(since), 1):.2f}" '
            f'height="{PLOT_H}" class="alert-run"/>'
        )
        parts.append(
            f'<line x1="{x(a["t"]):.2f}" x2="{x(a["t"]):.2f}" y1="{TOP}" y2="{strip_y + STRIP_H}" class="alert">'
            f"<title>{html.escape(a['rule'])} raised at {_fmt_time(a['t'])}</title></line>"
        )
    # axes
    step = _tick_step(duration)
    axis_y = strip_y + STRIP_H + 14
    t = 0.0
    while t <= duration + 1e-6:
        parts.append(
            f'<line x1="{x(t):.2f}" x2="{x(t):.2f}" y1="{strip_y + STRIP_H}" '
            f'y2="{strip_y + STRIP_H + 3}" class="tick"/>'
            f'<text x="{x(t):.2f}" y="{axis_y}" class="tl">{_tick_label(t, duration)}</text>'
        )
        t += step
    for p in (0.0, 0.5, 1.0):
        parts.append(f'<text x="{LEFT - 6}" y="{y(p) + 4:.2f}" class="yl">{p:g}</text>')
    height = axis_y + 6
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {WIDTH} {height}" width="100%" '
        f'role="img" aria-label="{html.escape(channel)} emotion timeline">' + "".join(parts) + "</svg>"
    )


CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d232b; margin: 24px auto;
       max-width: 1000px; padding: 0 16px; }
h1 { font-size: 20px; margin: 0 0 4px; } h2 { font-size: 16px; margin: 22px 0 6px; }
.muted { color: #6b7480; } table { border-collapse: collapse; margin: 6px 0; }
td, th { padding: 3px 10px 3px 0; text-align: left; vertical-align: top; } th { font-weight: 600; }
.sw { display: inline-block; width: 11px; height: 11px; border-radius: 2px; margin-right: 4px; vertical-align: -1px; }
.legend span { margin-right: 12px; white-space: nowrap; }
.bar { display: inline-block; height: 10px; vertical-align: 0; }
svg .bg { fill: #f4f5f7; } svg .tick { stroke: #8d97a5; }
svg .tl { font-size: 11px; fill: #6b7480; text-anchor: middle; }
svg .yl { font-size: 11px; fill: #6b7480; text-anchor: end; }
svg .alert { stroke: #ff4d4f; stroke-width: 2; } svg .alert-run { fill: #ff4d4f; fill-opacity: 0.12; }
.alerts td { color: #b3261e; }
"""


def render_html(call: CallTimeline) -> str:
    """The whole report as one HTML document (no script, no external resource)."""
    e = html.escape
    s = call.summary
    channels = s.get("channels", {})
    speech = {ch: channels.get(ch, {}).get("speech_seconds", 0.0) for ch in call.channels}
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(call.stream)}: emotion timeline</title>",
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<style>{CSS}</style></head><body>",
        f"<h1>{e(call.stream)}</h1>",
        f'<div class="muted">duration {_fmt_time(call.duration)} &middot; channels {e(", ".join(call.channels))}'
        f" &middot; {sum(len(v) for v in call.events.values())} windows &middot; "
        f"{len([a for a in call.alerts if a.get('state') == 'raised'])} alert(s) &middot; "
        f"emostream {e(__version__)}, {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC</div>",
        '<p class="legend">'
        + "".join(f'<span><i class="sw" style="background:{EMOTION_COLORS[c]}"></i>{c}</span>' for c in CLASSES)
        + f'<span><i class="sw" style="background:{SILENCE_COLOR}"></i>no speech</span>'
        f'<span><i class="sw" style="background:{ALERT_COLOR}"></i>alert</span></p>',
    ]
    for ch in call.channels:
        cs = channels.get(ch, {})
        out.append(f"<h2>{e(ch)}</h2>")
        out.append(_svg_channel(call, ch))
        shares = cs.get("shares", {})
        rows = "".join(
            f'<tr><td><i class="sw" style="background:{EMOTION_COLORS[c]}"></i>{c}</td>'
            f"<td>{100 * shares.get(c, 0.0):.0f}%</td>"
            f'<td><span class="bar" style="width:{200 * shares.get(c, 0.0):.0f}px;'
            f'background:{EMOTION_COLORS[c]}"></span></td></tr>'
            for c in CLASSES
        )
        peaks = (
            ", ".join(
                f"{p['label']} {p['confidence']:.2f} at {_fmt_time(p['t_start'])}-{_fmt_time(p['t_end'])}"
                for p in cs.get("peaks", [])
            )
            or "none"
        )
        out.append(
            f"<table><tr><th>speech</th><td colspan=2>{_fmt_time(speech[ch])} of {_fmt_time(call.duration)} "
            f"({cs.get('speech_windows', 0)} of {cs.get('windows', 0)} windows)</td></tr>"
            f"<tr><th>dominant</th><td colspan=2>{e(str(cs.get('dominant') or 'none'))}</td></tr>"
            f"<tr><th>peaks</th><td colspan=2>{e(peaks)}</td></tr></table>"
        )
        out.append(f"<table>{rows}</table>")
        alerts = [a for a in call.alerts if a.get("channel") == ch]
        if alerts:
            out.append(
                '<table class="alerts"><tr><th>alert</th><th>state</th><th>at</th><th>run since</th></tr>'
                + "".join(
                    f"<tr><td>{e(a['rule'])}</td><td>{e(a['state'])}</td><td>{_fmt_time(a['t'])}</td>"
                    f"<td>{_fmt_time(a['since']) if a.get('since') is not None else ''}</td></tr>"
                    for a in alerts
                )
                + "</table>"
            )
    out.append(
        '<p class="muted">' + e(_aggregated_note(call)) + " Shares are of speech time; each window "
        "stands for the newest hop of audio it adds. A label describes 6 s of sound, not a person: "
        + e(accuracy_sentence())
        + " (see the README's limits).</p></body></html>"
    )
    return "\n".join(out)


# --- PNG -------------------------------------------------------------------------------------


def render_png(call: CallTimeline, out: Path) -> None:
    """The same report as a PNG (matplotlib, Agg)."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("PNG reports need matplotlib: pip install 'emostream[report]' (or write .html)") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    n = len(call.channels)
    fig = plt.figure(figsize=(12, 1.2 + 2.6 * n), dpi=110)
    grid = fig.add_gridspec(2 * n, 1, height_ratios=[5, 0.6] * n, hspace=0.35)
    duration = max(call.duration, 1e-6)
    for k, ch in enumerate(call.channels):
        ax = fig.add_subplot(grid[2 * k])
        strip = fig.add_subplot(grid[2 * k + 1], sharex=ax)
        segs = _plot_segments(call, ch)
        for run in _speech_runs(segs):
            t = [v for lo, hi, _ in run for v in (lo, hi)]
            base = [0.0] * len(t)
            for c in CLASSES:
                top = [b + float(p.get(c, 0.0)) for b, p in zip(base, (p for _, _, p in run for _ in (0, 1)))]
                ax.fill_between(t, base, top, color=EMOTION_COLORS[c], linewidth=0)
                base = top
        spans: dict[str | None, list[tuple[float, float]]] = {}
        for lo, hi, e in segs:
            spans.setdefault(e.get("label") if e.get("speech") else None, []).append((lo, hi - lo))
        for label, ranges in spans.items():
            strip.broken_barh(
                ranges, (0, 1), color=EMOTION_COLORS.get(label, SILENCE_COLOR) if label else SILENCE_COLOR
            )
        for a in call.alerts:
            if a.get("channel") == ch and a.get("state") == "raised":
                since = a.get("since") if a.get("since") is not None else a["t"]
                ax.axvspan(since, a["t"], color=ALERT_COLOR, alpha=0.15, linewidth=0)
                ax.axvline(a["t"], color=ALERT_COLOR, linewidth=1.5)
        cs = call.summary.get("channels", {}).get(ch, {})
        shares = cs.get("shares", {})
        top = ", ".join(
            f"{c} {100 * shares[c]:.0f}%" for c in sorted(shares, key=shares.get, reverse=True)[:3] if shares[c] > 0
        )
        ax.set_title(
            f"{ch}: speech {_fmt_time(cs.get('speech_seconds', 0.0))}, dominant {cs.get('dominant') or 'none'}"
            f"{' (' + top + ')' if top else ''}",
            loc="left",
            fontsize=10,
        )
        ax.set_xlim(0, duration)
        ax.set_ylim(0, 1)
        ax.set_ylabel("probability")
        ax.tick_params(labelbottom=False)
        strip.set_yticks([])
        strip.xaxis.set_major_locator(MultipleLocator(_tick_step(duration)))
        strip.xaxis.set_major_formatter(FuncFormatter(lambda t, _: _tick_label(t, duration)))
        strip.tick_params(labelbottom=k == n - 1)
        strip.set_xlabel(f"time ({'h:mm' if duration >= 3600 else 'm:ss'})" if k == n - 1 else "")
    handles = [Patch(color=EMOTION_COLORS[c], label=c) for c in CLASSES] + [
        Patch(color=SILENCE_COLOR, label="no speech")
    ]
    fig.legend(handles=handles, loc="upper right", ncol=len(handles), fontsize=8, frameon=False)
    fig.suptitle(
        f"{call.stream}  ({_fmt_time(call.duration)}, "
        f"{len([a for a in call.alerts if a.get('state') == 'raised'])} alert(s))"
        + (f"  {AGGREGATE_SECONDS / 60:g}-min averages" if call.duration > AGGREGATE_AFTER_SECONDS else ""),
        x=0.01,
        y=0.995,
        ha="left",
        fontsize=11,
    )
    fig.savefig(out)
    plt.close(fig)
