"""Escalation alerts on a live timeline: rules like ``Angry>=0.7 for 10s``, per channel, with hysteresis.

A rule is **raised** on a channel once an unbroken run of speech windows whose probability of the
emotion is at or above the threshold has lasted the rule's duration (window ends ``t_end - run_start
>= seconds``, the run starting at the end of its first window; ``for 0s`` or no ``for`` raises on the
first such window). It is **cleared** only once the probability has stayed below a lower clear
threshold for a clear duration, measured the same way: ``Sad>=0.6 for 3s clear below 0.5 for 5s``.
Windows without speech count as below (silence is not anger); a window between the two thresholds
holds the alert and restarts the clear run. Without a ``clear`` clause the clear threshold is the
raise threshold minus ``DEFAULT_CLEAR_MARGIN`` (0.1) and the clear duration ``DEFAULT_CLEAR_SECONDS``
(5 s), so one low window no longer clears an alert that is raised again a second later. Each raise and
clear is one message::

    {"type": "alert", "stream": ..., "call_id": ..., "channel": "customer", "rule": "Angry>=0.7 for 10s",
     "label": "Angry", "threshold": 0.7, "seconds": 10.0, "clear_below": 0.6, "clear_seconds": 5.0,
     "state": "raised" | "cleared", "t": 23.0, "since": 13.0}

``t`` is the end of the window that raised or cleared it, ``since`` the start of the run that raised
it, both in seconds of the stream.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .timeline import CLASSES

DEFAULT_CLEAR_MARGIN = 0.1  # probability: the default clear threshold is this far below the raise threshold
DEFAULT_CLEAR_SECONDS = 5.0  # seconds below the clear threshold before an alert is cleared, by default
_NUM = r"([0-9]*\.?[0-9]+)"
_RULE = re.compile(
    rf"^\s*([A-Za-z]+)\s*(>=|>)\s*{_NUM}\s*(?:for\s+{_NUM}\s*s?)?"
    rf"\s*(?:,?\s*clear\s+(?:below|<)\s*{_NUM}\s*(?:for\s+{_NUM}\s*s?)?)?\s*$",
    re.IGNORECASE,
)
_FORM = "'Angry>=0.7 for 10s' (optionally followed by 'clear below 0.6 for 5s')"


@dataclass(frozen=True)
class AlertRule:
    """``label`` probability ``>=`` (or ``>``) ``threshold`` for ``seconds``; cleared below
    ``clear_below`` for ``clear_seconds`` (None: the defaults, see the module docstring)."""

    label: str
    threshold: float
    seconds: float = 0.0
    strict: bool = False  # ">" instead of ">="
    clear_below: float | None = None
    clear_seconds: float | None = None

    def __post_init__(self):
        if self.clear_below is not None and not 0 <= self.clear_below <= self.threshold:
            raise ValueError(f"alert rule {self.name!r}: the clear threshold must be in [0, {self.threshold:g}]")

    @classmethod
    def parse(cls, text: str) -> "AlertRule":
        """``"Angry>=0.7 for 10s"`` or ``"Angry>=0.7 for 10s clear below 0.6 for 5s"``; the label is
        matched case-insensitively to the seven classes."""
        m = _RULE.match(text)
        if not m:
            raise ValueError(f"alert rule {text!r} is not of the form {_FORM}")
        names = {c.lower(): c for c in CLASSES}
        label = names.get(m.group(1).lower())
        if label is None:
            raise ValueError(f"alert rule {text!r}: unknown emotion {m.group(1)!r} (one of {', '.join(CLASSES)})")
        threshold = float(m.group(3))
        if not 0 <= threshold <= 1:
            raise ValueError(f"alert rule {text!r}: threshold must be a probability in [0, 1]")
        clear_below = float(m.group(5)) if m.group(5) is not None else None
        clear_seconds = float(m.group(6)) if m.group(6) is not None else (0.0 if clear_below is not None else None)
        if clear_below is not None and not 0 <= clear_below <= threshold:
            raise ValueError(f"alert rule {text!r}: the clear threshold must be in [0, {threshold:g}]")
        return cls(label, threshold, float(m.group(4) or 0.0), m.group(2) == ">", clear_below, clear_seconds)

    @property
    def clear_threshold(self) -> float:
        return self.clear_below if self.clear_below is not None else max(0.0, self.threshold - DEFAULT_CLEAR_MARGIN)

    @property
    def clear_after(self) -> float:
        return self.clear_seconds if self.clear_seconds is not None else DEFAULT_CLEAR_SECONDS

    @property
    def name(self) -> str:
        op = ">" if self.strict else ">="
        base = f"{self.label}{op}{self.threshold:g} for {self.seconds:g}s"
        if self.clear_below is None and self.clear_seconds is None:
            return base
        return f"{base} clear below {self.clear_threshold:g} for {self.clear_after:g}s"

    def _probability(self, event: dict) -> float | None:
        probs = event.get("probabilities")
        if not event.get("speech", probs is not None) or not probs:
            return None
        return float(probs.get(self.label, 0.0))

    def holds(self, event: dict) -> bool:
        """Whether one window's event meets the threshold (silence never does)."""
        p = self._probability(event)
        if p is None:
            return False
        return p > self.threshold if self.strict else p >= self.threshold

    def below(self, event: dict) -> bool:
        """Whether one window counts towards clearing: below the clear threshold, or no speech."""
        p = self._probability(event)
        return p is None or p < self.clear_threshold


class AlertTracker:
    """Feeds a stream's events through every rule; returns the alert messages they cause."""

    def __init__(self, rules: tuple[AlertRule, ...] | list[AlertRule], stream: str):
        self.rules = tuple(rules)
        self.stream = stream
        self._since: dict[tuple[int, str], float] = {}  # (rule index, channel) -> run start
        self._raised: set[tuple[int, str]] = set()
        self._below: dict[tuple[int, str], float] = {}  # (rule index, channel) -> start of the run below
        self.history: list[dict] = []

    @property
    def active(self) -> list[dict]:
        """The latest ``raised`` message of every alert that is raised now."""
        latest = {}
        for msg in self.history:
            latest[(msg["rule"], msg["channel"])] = msg
        return [m for m in latest.values() if m["state"] == "raised"]

    def update(self, event: dict) -> list[dict]:
        """Alert messages (raised or cleared) caused by one window's event."""
        out = []
        channel, t = event["channel"], float(event["t_end"])
        for i, rule in enumerate(self.rules):
            key = (i, channel)
            if key in self._raised:  # raised: wait for a long enough run below the clear threshold
                if not rule.below(event):
                    self._below.pop(key, None)
                elif t - self._below.setdefault(key, t) >= rule.clear_after - 1e-9:
                    self._raised.discard(key)
                    self._below.pop(key, None)
                    out.append(self._message(rule, channel, "cleared", t, self._since.pop(key, None)))
            elif rule.holds(event):
                since = self._since.setdefault(key, t)
                if t - since >= rule.seconds - 1e-9:
                    self._raised.add(key)
                    out.append(self._message(rule, channel, "raised", t, since))
            else:
                self._since.pop(key, None)
        self.history += out
        return out

    def _message(self, rule: AlertRule, channel: str, state: str, t: float, since: float | None) -> dict:
        return {
            "type": "alert",
            "stream": self.stream,
            "call_id": self.stream,
            "channel": channel,
            "rule": rule.name,
            "label": rule.label,
            "threshold": rule.threshold,
            "seconds": rule.seconds,
            "clear_below": rule.clear_threshold,
            "clear_seconds": rule.clear_after,
            "state": state,
            "t": round(float(t), 6),
            "since": None if since is None else round(float(since), 6),
        }
