"""Keepalive pings that a busy connection does not fail.

websockets' keepalive sends a ping every ``ping_interval`` and closes with 1011 "keepalive ping
timeout" when no pong comes within ``ping_timeout``. Control frames travel in order with the data:
when the receiving end reads slower than the sender writes (a ``send --fast`` call while the model
is the bottleneck, or any call while the CPU is saturated), the peer's pong waits in the kernel's
socket buffers behind seconds of audio that this end has not read yet, because this end paused
reading (its frame queue was full) or still holds unsent audio in its own write buffer. The peer is
alive, the delay is ours, and the stock keepalive cut every such call at the same instant (issue 40,
item 6: 10 concurrent fast calls closed together, 28-64 windows lost each).

These connection classes keep websockets' pings but count the timeout only while nothing shows the
pong is merely late: the wait is extended while reading is paused or frames wait for the handler
(the pong is behind data this end has not read), while this end's write buffer is not empty (the
ping is behind data this end has not sent), and while bytes keep arriving from the peer (it is
alive and sending: a ``send --fast`` client whose ping waits in the server's socket buffers behind
its own audio, while the server's events keep coming; neither write buffer shows that backlog, the
kernel holds it). A peer that vanished without a TCP reset still fails: once the backlog is read
and nothing more arrives, ``ping_timeout`` applies (and the server's idle timeout closes a call
whose audio stopped).
"""

from __future__ import annotations

import asyncio
import time

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.frames import CloseCode


class _BacklogAwareKeepalive:
    """Mixin for websockets asyncio connections (see the module docstring)."""

    last_data_at = float("-inf")  # time.monotonic() of the last bytes received from the peer

    def data_received(self, data: bytes) -> None:  # asyncio.Protocol: every byte from the peer
        self.last_data_at = time.monotonic()
        super().data_received(data)

    def holding_pong_up(self) -> bool:
        """Whether a missing pong may just be late: frames wait for the handler (reading paused or
        not), our own writes wait for the kernel, or the peer sent bytes within ``ping_timeout``."""
        assembler = getattr(self, "recv_messages", None)
        if assembler is not None and (assembler.paused or len(assembler.frames) > 0):
            return True
        transport = getattr(self, "transport", None)
        if transport is not None and transport.get_write_buffer_size() > 0:
            return True
        return time.monotonic() - self.last_data_at < (self.ping_timeout or 0.0)

    async def keepalive(self) -> None:  # overrides websockets' Connection.keepalive
        assert self.ping_interval is not None
        latency = 0.0
        try:
            while True:
                await asyncio.sleep(self.ping_interval - latency)
                pong_received = await self.ping()
                if self.ping_timeout is None:
                    continue
                while True:
                    try:
                        async with asyncio.timeout(self.ping_timeout):
                            latency = await asyncio.shield(pong_received)
                        break
                    except asyncio.TimeoutError:
                        if self.holding_pong_up():
                            continue  # the pong is behind data this end has not read or written yet
                        async with self.send_context():
                            self.protocol.fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
                        raise AssertionError(
                            "send_context() should wait for connection_lost(), which cancels keepalive()"
                        )
        except Exception:
            self.logger.error("keepalive ping failed", exc_info=True)


class KeepaliveServerConnection(_BacklogAwareKeepalive, ServerConnection):
    """``serve(..., create_connection=KeepaliveServerConnection)``."""


class KeepaliveClientConnection(_BacklogAwareKeepalive, ClientConnection):
    """``connect(..., create_connection=KeepaliveClientConnection)``."""
