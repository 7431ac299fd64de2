"""One live call on the server: :class:`LiveCall` (the channels chosen by ``analyse`` -> the call
pipeline of every source, :class:`~emostream.pipeline.CallPipeline`: per-channel streaming resampler
-> windower -> speech gate and model, here through the shared worker -> sinks: the call's JSONL
file, the :class:`~emostream.hub.EventsHub`, metrics, alerts) and :class:`EndedCall`,
what the page keeps of it once it has ended."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable

import numpy as np

from .analyzer import AnalyzerConfig
from .compliance import CallRecorder, analysed_channels
from .hub import EventsHub
from .metrics import ServerMetrics, call_outcome
from .pipeline import CallPipeline
from .protocols import CLOSE_POLICY, ProtocolError, Start
from .server_config import ServerConfig
from .stream import StreamConfig
from .timeline import JsonlWriter, iso_utc
from .webhook import AlertWebhook
from .worker import InferenceWorker

log = logging.getLogger("emostream.server")

SILENCE_CHUNK_SECONDS = 1.0  # silence gaps are fed in pieces of this length
GAP_FILL_SECONDS = 6.0  # gaps up to this (one window) are filled with silence; longer ones are
# collapsed into one ``gap`` record and the window schedule restarts after them


@dataclass(frozen=True)
class EndedCall:
    """What the page still gets of an ended call (``GET /v1/calls`` and ``/v1/calls/<id>``): a snapshot
    taken when it ended, so its pipeline (ring buffers, resamplers, speech gate) is freed at once."""

    call_id: str
    ended_at: float | None
    hub: EventsHub | None
    snapshot: dict  # LiveCall.detail() at the end

    @classmethod
    def of(cls, call: "LiveCall") -> "EndedCall":
        return cls(call.call_id, call.ended_at, call.hub, call.detail())

    def listing(self) -> dict:
        return self.snapshot["call"]

    def detail(self) -> dict:
        return self.snapshot


class LiveCall:
    """One call's pipeline: pick analysed channels -> resample -> window -> classify (shared worker) -> sinks."""

    def __init__(
        self,
        start: Start,
        protocol: str,
        worker: InferenceWorker,
        hub: EventsHub | None,
        config: ServerConfig,
        metrics: ServerMetrics | None = None,
        webhook: AlertWebhook | None = None,
        model: dict[str, str] | None = None,
        front_end: int | None = None,
    ):
        """``front_end``: this server's number in a fleet (``serve --workers``), named in the call's
        ``call_started`` message and listing."""
        self.call_id = start.call_id
        self.front_end = front_end
        self.model = {k: v for k, v in (model or {}).items() if k in ("name", "sha256")}  # named in the summary
        self.protocol = protocol
        self.channels = start.channels
        # Raises ChannelSelectionError before anything is opened: no file, no hub entry.
        analysed = analysed_channels(start.channels, config.analyse, protocol)
        self.analysed = tuple(start.channels[i] for i in analysed)
        self._local = {ch: k for k, ch in enumerate(analysed)}  # protocol channel -> analysed index
        self.worker = worker
        self.hub = hub
        self.metrics = metrics
        self.webhook = webhook
        self.hop_seconds = config.hop_seconds
        self.started_at = time.time()
        self.ended_at: float | None = None
        self.end_reason: str | None = None
        self.finished = False
        self.max_seconds = config.max_call_seconds
        self.summary: dict | None = None
        self.tail_events: list[dict] = []  # events of the final windows (sent before the summary)
        self.info = start.info
        self._file: IO[str] | None = None
        self._writer: JsonlWriter | None = None
        self.recorder: CallRecorder | None = None
        if config.events_dir is not None and start.persist:
            path = Path(config.events_dir) / f"{start.call_id}.jsonl"
            self._file = open(path, "a", encoding="utf-8")
            self._writer = JsonlWriter(self._file)
        self.path = Path(config.events_dir) / f"{start.call_id}.jsonl" if self._writer else None
        if config.record_dir is not None and start.persist:
            self.recorder = CallRecorder(
                Path(config.record_dir) / f"{start.call_id}.wav", start.sample_rate, len(start.channels)
            )
        sinks: list[Callable[[dict], None]] = []
        if self._writer:
            sinks.append(self._writer.write)
        if hub is not None:
            sinks.append(lambda e: hub.publish({"type": "event", **e}))
        if metrics is not None:
            sinks.append(metrics.count_event)
        self.pipeline = CallPipeline(
            worker.infer,
            start.call_id,
            self.analysed,
            stream_config=StreamConfig(hop_seconds=config.hop_seconds, min_seconds=config.min_seconds),
            analyzer_config=AnalyzerConfig(smooth=config.smooth, vad=config.vad),
            sinks=sinks,
            alert_rules=config.alerts,
            alert_sinks=[self._on_alert],
            sample_rate=start.sample_rate,
            source_channels=dict(zip(start.channels, start.source_channels)),
        )
        self.pipeline.timeline.max_events = config.max_events_kept  # memory: the file has every event
        self._input = [0] * len(analysed)  # samples per analysed channel at the protocol rate, gaps included
        if hub is not None:
            hub.publish(self.started_message())

    def started_message(self) -> dict:
        """The ``call_started`` message of this call (also the base of its ``/v1/calls`` entry)."""
        return {
            "type": "call_started",
            "call_id": self.call_id,
            "protocol": self.protocol,
            "channels": list(self.channels),
            "analysed": list(self.analysed),
            "hop_seconds": self.hop_seconds,
            "started_at": round(self.started_at, 3),
            "info": self.info,
            **({} if self.front_end is None else {"worker": self.front_end}),
        }

    def listing(self) -> dict:
        """This call as ``GET /v1/calls`` lists it."""
        return {
            **self.started_message(),
            "ended_at": None if self.ended_at is None else round(self.ended_at, 3),
            "end_reason": self.end_reason,
        }

    def detail(self) -> dict:
        """Everything of this call so far, for ``GET /v1/calls/<id>``."""
        return {
            "call": self.listing(),
            "events": self.pipeline.timeline.ordered_events(),
            "alerts": list(self.pipeline.alerts.history),
            "summary": self.summary,
        }

    def _on_alert(self, alert: dict) -> None:
        """A raised or cleared alert: logged, counted, and to the file, the hub and the webhook."""
        log.info("alert %s on %s: %s at %.1f s", alert["state"], alert["channel"], alert["rule"], alert["t"])
        if self.metrics is not None and alert["state"] == "raised":
            self.metrics.alerts.labels(alert["rule"]).inc()
        if self._writer:
            self._writer.write(alert)
        if self.hub is not None:
            self.hub.publish(alert)
        if self.webhook is not None:  # queued: never waits for the endpoint
            self.webhook.send(alert)

    def _order(self, window) -> tuple[float, int]:
        return window.end, self.analysed.index(window.channel)

    async def push(self, audio: list[tuple[int, np.ndarray]]) -> list[dict]:
        """``(channel, samples)`` pieces at the protocol's rate (one frame of every channel);
        the windows they complete are classified in one request. Returns their events."""
        rate = self.pipeline.sample_rate
        self._check_length(max(len(samples) for _, samples in audio) / rate)
        windows = []
        for channel, samples in audio:
            if self.recorder is not None:
                self.recorder.write(channel, samples)
            local = self._local.get(channel)
            if local is None:  # not analysed: dropped here, never resampled, windowed or classified
                continue
            self._input[local] += len(samples)
            windows += self.pipeline.channel_windows(local, samples)
        if not windows:  # most frames: held until a hop completes a window
            return []
        if len(windows) > 1:
            windows.sort(key=self._order)
        return await self.pipeline.classify_async(windows, self.worker.infer)

    async def silence(self, channel: int | None, samples: int) -> list[dict]:
        """A gap of ``samples`` (protocol rate) on one or every channel: up to ``GAP_FILL_SECONDS``
        fed as silence in short pieces, a longer one collapsed (:meth:`_collapse_gap`)."""
        if channel is None:
            channels = list(range(len(self.analysed)))
        else:
            channels = [self._local[channel]] if channel in self._local else []
        rate = self.pipeline.sample_rate
        self._check_length(samples / rate)
        if self.recorder is not None:
            self.recorder.silence(channel, samples)
        if samples > GAP_FILL_SECONDS * rate:
            return await self._collapse_gap(channels, samples)
        for ch in channels:
            self._input[ch] += samples
        piece = int(SILENCE_CHUNK_SECONDS * rate)
        events: list[dict] = []
        for pos in range(0, samples, piece) if channels else ():
            n = min(piece, samples - pos)
            windows = []
            for ch in channels:
                windows += self.pipeline.channel_windows(ch, np.zeros(n, dtype=np.float32))
            windows.sort(key=self._order)
            events += await self.pipeline.classify_async(windows, self.worker.infer)
        return events

    async def _collapse_gap(self, channels: list[int], samples: int) -> list[dict]:
        """A long gap in O(1): each channel's audio before it gets its final window (as at the end of a
        stream), one ``gap`` record per channel goes to the timeline file and ``/v1/events``, and the
        window schedule restarts at the gap's end (on the same clock). Returns the final windows' events."""
        windows, records = [], []
        for ch in channels:
            self._input[ch] += samples
            final, gap_start, gap_end = self.pipeline.collapse_gap(ch, self._input[ch])
            windows += final
            records.append(
                {
                    "type": "gap",
                    "stream": self.call_id,
                    "channel": self.analysed[ch],
                    "t_start": round(gap_start, 6),
                    "t_end": round(gap_end, 6),
                }
            )
        windows.sort(key=self._order)
        events = await self.pipeline.classify_async(windows, self.worker.infer)
        for record in records:
            log.info(
                "call %s: gap of %.1f s on %s collapsed",
                self.call_id,
                record["t_end"] - record["t_start"],
                record["channel"],
            )
            if self._writer:
                self._writer.write(record)
            if self.hub is not None:
                self.hub.publish(record)
        return events

    def _check_length(self, more_seconds: float) -> None:
        if max(self._input, default=0) / self.pipeline.sample_rate + more_seconds > self.max_seconds:
            raise ProtocolError(f"call longer than the limit of {self.max_seconds:g} s", CLOSE_POLICY)

    async def finish(self, reason: str) -> dict:
        """End of the call: last windows, summary to the file and the hub; idempotent."""
        if self.finished:
            return self.summary or self.pipeline.summary()
        self.finished = True
        self.ended_at = time.time()
        self.end_reason = reason
        if self.recorder is not None:
            try:
                self.recorder.close()
            except Exception as exc:
                log.error("call %s: recording not completed: %s", self.call_id, exc)
        events: list[dict] = []
        try:
            windows = self.pipeline.final_windows()
            windows.sort(key=self._order)
            events = await self.pipeline.classify_async(windows, self.worker.infer)
        except Exception as exc:  # the summary of what we have still gets written
            log.warning("call %s: last windows not classified: %s", self.call_id, exc)
        self.tail_events = events
        if self.metrics is not None:
            self.metrics.calls.labels(self.protocol, call_outcome(reason)).inc()
        summary = self.pipeline.summary()
        summary["call_id"] = self.call_id
        summary["protocol"] = self.protocol
        summary["end_reason"] = reason
        summary.update(model=self.model, started_at=iso_utc(self.started_at), started_at_from="connection")
        self.summary = summary
        if self._writer:
            try:
                self._writer.write(summary)
            finally:
                self._file.close()
        if self.hub is not None:
            self.hub.publish(summary)
            self.hub.publish(
                {"type": "call_ended", "call_id": self.call_id, "reason": reason, "ended_at": round(self.ended_at, 3)}
            )
        return summary
