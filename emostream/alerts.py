"""Escalation alerts on a live timeline: rules like ``Angry>=0.7 for 10s``, per channel.

A rule holds on a channel from the end of the first window in an unbroken run of speech windows whose
probability of the emotion is at or above the threshold; it is **raised** once the run has lasted the
rule's duration (window ends ``t_end - run_start >= seconds``; ``for 0s`` or no ``for`` raises on the
first such window) and **cleared** by the first window that breaks the run: a lower probability or a
window without speech (silence is not anger). Each raise and clear is one message::

    {"type": "alert", "stream": ..., "call_id": ..., "channel": "customer", "rule": "Angry>=0.7 for 10s",
     "label": "Angry", "threshold": 0.7, "seconds": 10.0, "state": "raised" | "cleared",
     "t": 23.0, "since": 13.0}

``t`` is the end of the window that raised or cleared it, ``since`` the start of the run, both in
seconds of the stream.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from .timeline import CLASSES

_RULE = re.compile(r"^\s*([A-Za-z]+)\s*(>=|>)\s*([0-9]*\.?[0-9]+)\s*(?:for\s+([0-9]*\.?[0-9]+)\s*s?)?\s*$")


@dataclass(frozen=True)
class AlertRule:
    """``label`` probability ``>=`` (or ``>``) ``threshold`` for ``seconds``."""

    label: str
    threshold: float
    seconds: float = 0.0
    strict: bool = False  # ">" instead of ">="

    @classmethod
    def parse(cls, text: str) -> "AlertRule":
        """``"Angry>=0.7 for 10s"``; the label is matched case-insensitively to the seven classes."""
        m = _RULE.match(text)
        if not m:
            raise ValueError(f"alert rule {text!r} is not of the form 'Angry>=0.7 for 10s'")
        names = {c.lower(): c for c in CLASSES}
        label = names.get(m.group(1).lower())
        if label is None:
            raise ValueError(f"alert rule {text!r}: unknown emotion {m.group(1)!r} (one of {', '.join(CLASSES)})")
        threshold = float(m.group(3))
        if not 0 <= threshold <= 1:
            raise ValueError(f"alert rule {text!r}: threshold must be a probability in [0, 1]")
        return cls(label, threshold, float(m.group(4) or 0.0), m.group(2) == ">")

    @property
    def name(self) -> str:
        op = ">" if self.strict else ">="
        return f"{self.label}{op}{self.threshold:g} for {self.seconds:g}s"

    def holds(self, event: dict) -> bool:
        """Whether one window's event meets the threshold (silence never does)."""
        probs = event.get("probabilities")
        if not event.get("speech", probs is not None) or not probs:
            return False
        p = float(probs.get(self.label, 0.0))
        return p > self.threshold if self.strict else p >= self.threshold


class AlertTracker:
    """Feeds a stream's events through every rule; returns the alert messages they cause."""

    def __init__(self, rules: tuple[AlertRule, ...] | list[AlertRule], stream: str):
        self.rules = tuple(rules)
        self.stream = stream
        self._since: dict[tuple[int, str], float] = {}  # (rule index, channel) -> run start
        self._raised: set[tuple[int, str]] = set()
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
        channel = event["channel"]
        for i, rule in enumerate(self.rules):
            key = (i, channel)
            if rule.holds(event):
                since = self._since.setdefault(key, float(event["t_end"]))
                if key not in self._raised and event["t_end"] - since >= rule.seconds - 1e-9:
                    self._raised.add(key)
                    out.append(self._message(rule, channel, "raised", event["t_end"], since))
            else:
                since = self._since.pop(key, None)
                if key in self._raised:
                    self._raised.discard(key)
                    out.append(self._message(rule, channel, "cleared", event["t_end"], since))
        self.history += out
        return out

    def _message(self, rule: AlertRule, channel: str, state: str, t: float, since: float | None) -> dict:
        return {"type": "alert", "stream": self.stream, "call_id": self.stream, "channel": channel,
                "rule": rule.name, "label": rule.label, "threshold": rule.threshold, "seconds": rule.seconds,
                "state": state, "t": round(float(t), 6), "since": None if since is None else round(float(since), 6)}
