"""The server's fan-out of live calls: lifecycle messages, events, alerts and summaries to every
``/v1/events`` subscriber (the supervisor page, ``emostream watch``) and in-process listeners (the
``serve --dashboard`` view)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from .protocols import CLOSE_POLICY, CLOSE_TRY_LATER

log = logging.getLogger("emostream.server")

SUBSCRIBER_QUEUE = 2000  # messages buffered per /v1/events subscriber before it is dropped


class EventsHub:
    """Fan-out of call lifecycle messages and events to ``/v1/events`` subscribers and listeners.

    ``publish`` never blocks: each subscriber has a bounded queue, and one that falls behind is
    disconnected (close 1013) rather than silently losing messages.
    """

    def __init__(self):
        self.calls: dict[str, dict] = {}
        self._queues: dict[asyncio.Queue, str | None] = {}
        self.listeners: list[Callable[[dict], None]] = []
        self.forward: Callable[[dict], None] | None = None  # this server's own messages, to the fleet
        self.dropped_subscribers = 0

    def subscribe(self, call_id: str | None = None) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue(SUBSCRIBER_QUEUE)
        self._queues[queue] = call_id
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._queues.pop(queue, None)

    @property
    def subscribers(self) -> int:
        return len(self._queues)

    def publish(self, message: dict, local: bool = True) -> None:
        """One message to every subscriber and listener; ``local`` (a call of this server) also to
        the fleet (``forward``, see :mod:`emostream.fleet`)."""
        call = message.get("call_id") or message.get("stream")
        if message.get("type") == "call_started":
            self.calls[call] = message
        elif message.get("type") == "call_ended":
            self.calls.pop(call, None)
        if local and self.forward is not None:
            self.forward(message)
        for listener in self.listeners:
            try:
                listener(message)
            except Exception:  # a display must not break calls
                log.exception("events listener failed")
        for queue, wanted in list(self._queues.items()):
            if wanted is not None and wanted != call:
                continue
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.dropped_subscribers += 1
                self._queues.pop(queue, None)
                while not queue.empty():
                    queue.get_nowait()
                queue.put_nowait(None)  # tells the subscriber's task to close: too slow


async def serve_subscriber(hub: EventsHub, ws: ServerConnection, device: str, worker: int | None = None) -> None:
    """One ``/v1/events`` connection: a ``hello`` with the live calls (``?call_id=`` picks one), then
    every message of the hub until the peer leaves or falls behind (close 1013). Read-only: anything
    the peer sends closes it (1008). In a fleet the hello names the front end (``worker``) and lists
    every front end's calls."""
    wanted = parse_qs(urlsplit(ws.request.path).query).get("call_id", [None])[0]
    queue = hub.subscribe(wanted)

    async def reader() -> None:
        try:
            await ws.recv()
        except ConnectionClosed:
            return
        await ws.close(CLOSE_POLICY, "read-only endpoint")

    read_task = asyncio.create_task(reader())
    try:
        calls = [c for c in hub.calls.values() if wanted is None or c["call_id"] == wanted]
        hello = {"type": "hello", "calls": calls, "device": device}
        if worker is not None:
            hello["worker"] = worker
        await ws.send(json.dumps(hello))
        while not read_task.done():
            get = asyncio.create_task(queue.get())
            done, _ = await asyncio.wait({get, read_task}, return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                break
            message = get.result()
            if message is None:
                await ws.close(CLOSE_TRY_LATER, "subscriber too slow")
                break
            await ws.send(json.dumps(message, separators=(",", ":")))
    except ConnectionClosed:
        pass
    finally:
        hub.unsubscribe(queue)
        read_task.cancel()
