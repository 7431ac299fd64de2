"""One view of a fleet of front ends (``serve --workers N``, several hosts joining one Ray cluster).

Every front end (an :class:`~emostream.server.EmoServer` process) sends the messages of its own
calls (``call_started``, ``event``, ``alert``, ``gap``, ``summary``, ``call_ended``) to one
:class:`FleetRegistry`, a named Ray actor, and long-polls it for everyone else's; what comes back
goes to its own ``/v1/events`` subscribers and page, and into a :class:`MirroredCall` per remote
call, so ``GET /v1/calls`` and ``/v1/calls/<id>`` list the fleet's calls in the shapes of the local
ones. Each front end also reports a small status (queue, subscribers, readiness) with every poll; its
``/metrics`` sums those of the fleet (:meth:`FleetLink.fleet_state`).

The registry keeps a mirror of every live call too. When a front end dies without ending its calls
(killed, out of memory), :meth:`FleetRegistry.worker_lost` ends them for it: a summary from the
mirror's running tally (the same :class:`~emostream.timeline.Timeline` as the call's own, over every
event that reached the registry) and ``call_ended``, sent to the rest of the fleet; the supervisor
appends the summary to the call's JSONL file.

The registry is restarted by Ray when its process dies (``max_restarts``), empty and with a new
``epoch``. A front end that sees the epoch change joins again with the details of its own live
calls, so the new registry lists them (and can end them with a summary) from then on; the other
front ends learn of them by their ``call_started``. Messages sent while the registry was away are
not replayed: a remote call's mirror has what reached the registry.

This module does not import Ray: the registry is a plain class that :mod:`emostream.supervisor`
turns into an actor, and :class:`FleetLink` only awaits the ``ObjectRef`` s of its handle.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from typing import Any

from .timeline import Timeline, iso_utc

log = logging.getLogger("emostream.fleet")

REGISTRY_NAME = "emostream-fleet"  # the actor's name, suffixed with the Serve application's
NAMESPACE = "emostream"
KEEP_MESSAGES = 100_000  # the registry's backlog for polls; a front end further behind resyncs
PUBLISH_SECONDS = 0.1  # a front end sends its messages in batches this often
POLL_SECONDS = 1.0  # a poll with nothing new returns after this long (also the status heartbeat)
POLL_GAP_SECONDS = 0.1  # and polls at most this often: one batch of everyone's news per 100 ms
PRUNE_SECONDS = 1.0  # ended calls are dropped from the listings at most this often
ENDED_KEEP_SECONDS = 60.0  # ended calls stay listed this long (as EmoServer's own)
WORKER_SILENT_SECONDS = 10.0  # a front end whose status is older than this is not counted
LOST_REASON = "front end lost"


class MirroredCall:
    """A call as seen from its messages: ``listing()`` and ``detail()`` in the shapes of
    :class:`~emostream.live_call.LiveCall`'s, and the running summary of every event seen."""

    hub = True  # listed, like a LiveCall with a hub (persisted calls only reach the fleet)

    def __init__(self, started: dict, max_events: int | None = None):
        self.call_id: str = started["call_id"]
        self.started = {k: v for k, v in started.items() if k != "type"}
        self.started["type"] = "call_started"
        self.worker = started.get("worker")
        self.timeline = Timeline(
            self.call_id,
            tuple(started.get("analysed", ())),
            float(started.get("hop_seconds", 1.0)),
            max_events=max_events,
        )
        self.alerts: list[dict] = []
        self.summary: dict | None = None
        self.ended_at: float | None = None
        self.end_reason: str | None = None

    @classmethod
    def from_detail(cls, detail: dict, max_events: int | None = None) -> "MirroredCall":
        """A mirror rebuilt from a ``detail()`` (a front end joining late)."""
        call = cls(detail["call"], max_events)
        for event in detail.get("events", []):
            call.timeline.add(event)
        call.alerts = list(detail.get("alerts", []))
        call.summary = detail.get("summary")
        call.ended_at = detail["call"].get("ended_at")
        call.end_reason = detail["call"].get("end_reason")
        return call

    @property
    def live(self) -> bool:
        return self.ended_at is None

    def apply(self, message: dict) -> None:
        """One message of this call (events, alerts, the summary, the end)."""
        kind = message.get("type", "event")
        if kind == "event":
            self.timeline.add(message)
        elif kind == "alert":
            self.alerts.append(message)
        elif kind == "summary":
            self.summary = message
        elif kind == "call_ended":
            self.ended_at = float(message.get("ended_at") or time.time())
            self.end_reason = message.get("reason")

    def listing(self) -> dict:
        return {
            **self.started,
            "ended_at": None if self.ended_at is None else round(self.ended_at, 3),
            "end_reason": self.end_reason,
        }

    def detail(self) -> dict:
        events = self.timeline.ordered_events()
        return {"call": self.listing(), "events": events, "alerts": list(self.alerts), "summary": self.summary}

    def lost_summary(self, model: dict | None = None) -> dict:
        """The summary of a call whose front end died: the tally of every event that reached the
        registry, with the fields :meth:`LiveCall.finish` adds."""
        summary = self.timeline.summary()
        summary.update(
            call_id=self.call_id,
            protocol=self.started.get("protocol"),
            end_reason=LOST_REASON,
            model=dict(model or {}),
            started_at=iso_utc(self.started.get("started_at")),
            started_at_from="connection",
        )
        return summary


def call_of(message: dict) -> str | None:
    return message.get("call_id") or message.get("stream")


class Mirrors(dict):
    """call id -> :class:`MirroredCall`, fed with messages; ended calls dropped after
    ``ENDED_KEEP_SECONDS`` (checked at most every ``PRUNE_SECONDS``)."""

    def __init__(self, max_events: int | None):
        super().__init__()
        self.max_events = max_events
        self._pruned = 0.0

    def apply(self, message: dict) -> None:
        call_id = call_of(message)
        if message.get("type") == "call_started":
            self[call_id] = MirroredCall(message, self.max_events)
        elif call_id in self:
            self[call_id].apply(message)

    def prune(self) -> None:
        now = time.time()
        if now - self._pruned < PRUNE_SECONDS:
            return
        self._pruned = now
        for call_id, call in list(self.items()):
            if call.ended_at is not None and now - call.ended_at > ENDED_KEEP_SECONDS:
                del self[call_id]


class FleetRegistry:
    """The fleet's registry and fan-out (a Ray actor: ``ray.remote(FleetRegistry)``; its methods are
    coroutines, so polls wait concurrently). Messages get a sequence number; a poll returns those after
    its cursor that came from other front ends."""

    def __init__(self, max_events: int | None = 900, keep: int = KEEP_MESSAGES):
        self.seq = 0
        self.log: deque[tuple[int, int, dict]] = deque(maxlen=keep)  # (seq, origin, message)
        self.calls = Mirrors(max_events)
        self.status: dict[int, tuple[float, dict]] = {}  # worker -> (time, status)
        self.max_events = max_events
        self.next_worker = 0
        self.epoch = uuid.uuid4().hex  # new on every (re)start: front ends that see it change join again
        self._new = asyncio.Event()

    async def claim(self, n: int) -> int:
        """Numbers for a supervisor's ``n`` front ends, unique in the fleet: the first of them."""
        first, self.next_worker = self.next_worker, self.next_worker + n
        return first

    def _append(self, origin: int, message: dict) -> None:
        self.seq += 1
        self.log.append((self.seq, origin, message))
        self.calls.apply(message)

    def _wake(self) -> None:
        self._new.set()
        self._new = asyncio.Event()

    async def join(self, worker: int, status: dict | None = None, own: list[dict] | None = None) -> dict:
        """A front end (re)joining: the cursor to poll from, the epoch, and every live or recently
        ended call (``detail()`` each; its own live ones it skips). ``own``: the details of the front
        end's live calls; those this registry does not know (it restarted) are taken in, and their
        ``call_started`` goes to the other front ends."""
        if status is not None:
            self.status[worker] = (time.time(), status)
        self.next_worker = max(self.next_worker, worker + 1)  # numbers stay unique after a restart
        restored = 0
        for detail in own or ():
            call = MirroredCall.from_detail(detail, self.max_events)
            if call.call_id in self.calls or not call.live:
                continue
            self.calls[call.call_id] = call
            self.seq += 1  # the others get the start, not the history (their mirrors begin there)
            started = {k: v for k, v in call.started.items() if k not in ("ended_at", "end_reason")}
            self.log.append((self.seq, worker, started))
            restored += 1
        if restored:
            self._wake()
        self.calls.prune()
        return {"cursor": self.seq, "epoch": self.epoch, "calls": [c.detail() for c in self.calls.values()]}

    async def publish(self, worker: int, messages: list[dict]) -> int:
        for message in messages:
            self._append(worker, message)
        if messages:
            self._wake()
        return self.seq

    async def poll(self, worker: int, cursor: int, timeout: float = POLL_SECONDS, status: dict | None = None) -> dict:
        """Messages of the other front ends after ``cursor`` (waits up to ``timeout`` for some), the
        new cursor and the fleet's statuses; ``resync`` when the cursor fell out of the backlog."""
        if status is not None:
            self.status[worker] = (time.time(), status)
        if self.seq <= cursor:
            new = self._new
            try:
                await asyncio.wait_for(new.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        self.calls.prune()
        if self.log and cursor < self.log[0][0] - 1:
            return {
                "resync": True,
                "epoch": self.epoch,
                "cursor": self.seq,
                "messages": [],
                "status": self.fleet_status(),
            }
        messages = []
        for seq, origin, m in reversed(self.log):  # the newest first: O(new messages), not O(backlog)
            if seq <= cursor:
                break
            if origin != worker:
                messages.append((origin, m))
        messages.reverse()
        return {
            "resync": False,
            "epoch": self.epoch,
            "cursor": self.seq,
            "messages": messages,
            "status": self.fleet_status(),
        }

    def fleet_status(self) -> dict[int, dict]:
        now = time.time()
        return {w: s for w, (t, s) in self.status.items() if now - t <= WORKER_SILENT_SECONDS}

    async def worker_lost(self, worker: int, model: dict | None = None) -> list[dict]:
        """End the live calls of a front end that died: summary + ``call_ended`` to the fleet (origin
        -1). Returns the summaries (the supervisor appends them to the calls' files)."""
        self.status.pop(worker, None)
        summaries = []
        for call in [c for c in self.calls.values() if c.worker == worker and c.live]:
            summary = call.lost_summary(model)
            summaries.append(summary)
            self._append(-1, summary)
            self._append(
                -1, {"type": "call_ended", "call_id": call.call_id, "reason": LOST_REASON, "ended_at": time.time()}
            )
        if summaries:
            self._wake()
        return summaries

    async def live_calls(self) -> dict[str, int | None]:
        """call id -> the front end holding it, for the live calls (tests, debugging)."""
        return {c.call_id: c.worker for c in self.calls.values() if c.live}


class FleetLink:
    """A front end's end of the fleet: its hub's own messages go to the registry in batches; the
    others' come back into its hub (subscribers, the page) and its mirrors (``/v1/calls``)."""

    def __init__(self, registry: Any, worker: int, max_events: int | None = 900):
        self.registry = registry
        self.worker = worker
        self.max_events = max_events
        self.remote = Mirrors(max_events)
        self.status: dict[int, dict] = {}  # the other front ends' last statuses
        self._outbox: list[dict] = []
        self._tasks: list[asyncio.Task] = []
        self._hub = None
        self._read_status = lambda: {}
        self._own_calls = lambda: []
        self.cursor = 0
        self.epoch: str | None = None
        self.errors = 0

    def forward(self, message: dict) -> None:
        """The hub's hook for its own messages (never blocks: sent by the next batch)."""
        self._outbox.append(message)

    async def start(self, hub, read_status, own_calls=None) -> None:
        """Join the registry and start sending and polling; ``read_status() -> dict`` is this
        front end's status (summed into the fleet's ``/metrics``), ``own_calls() -> list[dict]`` the
        details of its live calls (given to a registry that restarted)."""
        self._hub = hub
        self._read_status = read_status
        if own_calls is not None:
            self._own_calls = own_calls
        await self._resync()
        self._tasks = [
            asyncio.create_task(self._send_loop(), name="emostream-fleet-send"),
            asyncio.create_task(self._poll_loop(), name="emostream-fleet-poll"),
        ]

    async def _resync(self) -> None:
        joined = await self.registry.join.remote(self.worker, self._read_status(), self._own_calls())
        self.cursor = joined["cursor"]
        self.epoch = joined["epoch"]
        for call_id in [c for c in self.remote]:  # calls that ended while this front end was away
            self._drop(call_id)
        for detail in joined["calls"]:
            call = MirroredCall.from_detail(detail, self.max_events)
            if call.worker == self.worker and call.live:  # this front end's own (a resync): local
                continue
            self.remote[call.call_id] = call
            if call.live:
                self._hub.calls[call.call_id] = call.started

    def _drop(self, call_id: str) -> None:
        self.remote.pop(call_id, None)
        self._hub.calls.pop(call_id, None)

    async def flush(self) -> None:
        """Send what is waiting now."""
        if self._outbox:
            batch, self._outbox = self._outbox, []
            await self.registry.publish.remote(self.worker, batch)

    async def _send_loop(self) -> None:
        while True:
            await asyncio.sleep(PUBLISH_SECONDS)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the registry is gone or restarting: counted, retried with new messages
                self.errors += 1
                log.warning("fleet: cannot publish to the registry: %s", str(exc).splitlines()[0] if str(exc) else exc)
                await asyncio.sleep(POLL_SECONDS)

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            polled = loop.time()
            try:
                answer = await self.registry.poll.remote(self.worker, self.cursor, POLL_SECONDS, self._read_status())
                self.status = {int(w): s for w, s in answer["status"].items() if int(w) != self.worker}
                if answer["epoch"] != self.epoch:
                    log.warning("fleet: the registry restarted; joining it again with this front end's live calls")
                    await self._resync()
                    continue
                if answer["resync"]:
                    log.warning("fleet: fell behind the registry's backlog; resynchronising")
                    await self._resync()
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the registry is gone or restarting: retried
                self.errors += 1
                log.warning("fleet: cannot poll the registry: %s", str(exc).splitlines()[0] if str(exc) else exc)
                await asyncio.sleep(POLL_SECONDS)
                continue
            self.cursor = answer["cursor"]
            for _, message in answer["messages"]:
                self.receive(message)
            self.prune()
            await asyncio.sleep(max(0.0, polled + POLL_GAP_SECONDS - loop.time()))

    def receive(self, message: dict) -> None:
        """A message of another front end: into the mirror of its call and this front end's hub."""
        self.remote.apply(message)
        self._hub.publish(message, local=False)

    def prune(self) -> None:
        """Drop ended remote calls past ``ENDED_KEEP_SECONDS``."""
        self.remote.prune()

    def fleet_state(self, own: dict) -> dict:
        """This front end's metrics state plus the others' reported statuses (queue, subscribers,
        dropped windows summed; ready only when every front end is)."""
        state = {**own, "live_calls": dict(own["live_calls"])}
        for status in self.status.values():
            for protocol, n in status.get("live_calls", {}).items():
                state["live_calls"][protocol] = state["live_calls"].get(protocol, 0) + n
            for key in ("queue", "subscribers", "dropped"):
                state[key] += status.get(key, 0)
            state["ready"] = min(state["ready"], status.get("ready", 0))
        state["front_ends"] = 1 + len(self.status)
        return state

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._tasks = []
        try:
            await asyncio.wait_for(self.flush(), 5.0)
        except Exception as exc:
            log.warning("fleet: last messages not sent: %s", exc)
