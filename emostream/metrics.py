"""Prometheus metrics of ``emostream serve`` (``GET /metrics``), on a registry of the server's own.

Counters and histograms are updated where things happen (calls, windows, batches, events, rejected
connections); gauges that mirror live state (calls by protocol, queue depth, subscribers, readiness)
are read at scrape time by :class:`_LiveState`, so they can never drift from the server.

In a fleet (``serve --workers N``) each front end is a process: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` for all of them, so counters and histograms are prometheus-client's
multiprocess values and any front end's ``/metrics`` sums every front end's (dead ones included:
totals never go down); the live gauges are the fleet's, from the statuses the front ends exchange
through the fleet registry (:meth:`emostream.fleet.FleetLink.fleet_state`).
"""

from __future__ import annotations

import os
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest, multiprocess
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from . import __version__

PROTOCOLS = ("pcm", "twilio", "audiohook")
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
INFERENCE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
REJECT_REASONS = (
    "unknown_path",
    "unauthorized",
    "at_capacity",
    "too_many_subscribers",
    "bad_ticket",
    "method_not_allowed",
    "too_many_unstarted",
    "start_timeout",
)
CALL_OUTCOMES = ("completed", "error", "disconnected", "idle_timeout", "stopped", "not_analysed", "other")
WEBHOOK_OUTCOMES = ("delivered", "retried", "failed", "dropped")
CONTENT_TYPE = CONTENT_TYPE_LATEST


def call_outcome(reason: str) -> str:
    """The ``outcome`` label of a finished call, from its end reason."""
    if reason == "completed":
        return "completed"
    if reason.startswith("error") or reason.startswith("server closed"):
        return "error"
    if reason.startswith("peer closed"):
        return "disconnected"
    return {"peer disconnected": "disconnected", "idle timeout": "idle_timeout", "server stopped": "stopped"}.get(
        reason, "other"
    )


class _LiveState:
    """Collector of the gauges that are read from the server when scraped."""

    def __init__(self, read: Callable[[], dict], info: dict[str, str]):
        self.read = read
        self.info = info

    def describe(self):
        return []  # collected lazily: no duplicate-name checks against live state

    def collect(self):
        state = self.read()
        live = GaugeMetricFamily("emostream_live_calls", "Calls streaming now", labels=["protocol"])
        for protocol in PROTOCOLS:
            live.add_metric([protocol], state["live_calls"].get(protocol, 0))
        yield live
        yield GaugeMetricFamily(
            "emostream_inference_queue_windows",
            "Windows waiting for or in the running model batch",
            value=state["queue"],
        )
        yield GaugeMetricFamily(
            "emostream_event_subscribers", "Connected /v1/events subscribers", value=state["subscribers"]
        )
        yield CounterMetricFamily(
            "emostream_windows_dropped",
            "Windows refused by the overloaded inference worker (their call is closed)",
            value=state["dropped"],
        )
        yield GaugeMetricFamily("emostream_ready", "1 once the model is loaded and warmed up", value=state["ready"])
        if "front_ends" in state:
            yield GaugeMetricFamily(
                "emostream_front_ends", "Front ends of the fleet reporting (serve --workers)", value=state["front_ends"]
            )
        yield InfoMetricFamily("emostream_build", "Package and model versions", value=self.info)


class ServerMetrics:
    """All metrics of one server, on a registry of its own (several servers can share a process)."""

    def __init__(self, read_state: Callable[[], dict], model: dict[str, str] | None = None):
        self.registry = CollectorRegistry(auto_describe=False)
        r = self.registry
        self.calls = Counter(
            "emostream_calls", "Calls finished, by protocol and outcome", ["protocol", "outcome"], registry=r
        )
        self.windows = Counter(
            "emostream_windows",
            "Windows analysed: classified by the model or skipped as silence",
            ["result"],
            registry=r,
        )
        self.late = Counter(
            "emostream_windows_late", "Events sent more than one hop after their window ended", registry=r
        )
        self.batch_size = Histogram(
            "emostream_inference_batch_size", "Windows per model call", buckets=BATCH_BUCKETS, registry=r
        )
        self.inference_seconds = Histogram(
            "emostream_inference_seconds", "Duration of one model call", buckets=INFERENCE_BUCKETS, registry=r
        )
        self.event_latency = Histogram(
            "emostream_event_latency_seconds",
            "From a window's last audio frame arriving to its event being sent",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "emostream_rejected_connections", "Connections refused, by reason", ["reason"], registry=r
        )
        self.alerts = Counter("emostream_alerts", "Escalation alerts raised, by rule", ["rule"], registry=r)
        self.webhook = Counter(
            "emostream_alert_webhook",
            "Alert webhook POSTs: delivered, retried (attempts after "
            "the first), failed (given up) or dropped (queue full)",
            ["outcome"],
            registry=r,
        )
        for outcome in WEBHOOK_OUTCOMES:
            self.webhook.labels(outcome)
        for reason in REJECT_REASONS:  # every series exists from the start (alerts on rate() need it)
            self.rejected.labels(reason)
        for result in ("classified", "silence"):
            self.windows.labels(result)
        for protocol in PROTOCOLS:
            for outcome in CALL_OUTCOMES:
                self.calls.labels(protocol, outcome)
        info = {"version": __version__, **{f"model_{k}": str(v) for k, v in (model or {}).items()}}
        self.live = _LiveState(read_state, info)
        r.register(self.live)
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR")

    def observe_batch(self, size: int, seconds: float) -> None:
        """One model call of ``size`` windows that took ``seconds``."""
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def count_webhook(self, outcome: str) -> None:
        """One outcome of the alert webhook (its ``retry`` counts as ``retried``)."""
        self.webhook.labels("retried" if outcome == "retry" else outcome).inc()

    def count_event(self, event: dict) -> None:
        """One window's event, as the analyser emits it (classified or silence)."""
        self.windows.labels("classified" if event.get("speech") else "silence").inc()

    def observe_latency(self, events: int, latency: float, hop_seconds: float) -> None:
        """``events`` events sent ``latency`` seconds after their audio arrived."""
        for _ in range(events):
            self.event_latency.observe(latency)
        if latency > hop_seconds:
            self.late.inc(events)

    def render(self) -> bytes:
        """The Prometheus text exposition (a fleet's counters and histograms summed over its
        processes in multiprocess mode)."""
        if not self.multiprocess_dir:
            return generate_latest(self.registry)
        registry = CollectorRegistry(auto_describe=False)
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)
        registry.register(self.live)
        return generate_latest(registry)
