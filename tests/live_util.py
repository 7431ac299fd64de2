"""Helpers for the live-source tests: a server on 127.0.0.1 in a background thread, test audio."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import numpy as np
import soundfile as sf

from emostream.server import EmoServer, ServerConfig
from emostream.vad import VadConfig
from emostream.worker import constant_predictor

from .conftest import speechlike


class ServerThread:
    """``with ServerThread(config) as srv:`` -> ``srv.url`` (ws://127.0.0.1:PORT), ``srv.server``."""

    def __init__(self, config: ServerConfig | None = None, predict=None, worker=None, **kwargs):
        if config is None:
            # test tones are sound, not voices: gate on energy unless a test asks otherwise
            config = ServerConfig(**{"port": 0, "vad": VadConfig.named("energy"), "analyse": "all", **kwargs})
        self.server = EmoServer(config, predict or constant_predictor(), worker=worker)
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.port = self.loop.run_until_complete(self.server.start())
        except BaseException as exc:  # surfaced in __enter__
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self.loop.run_forever()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    def call(self, coro, timeout: float = 30):
        """Run a coroutine on the server's loop (e.g. to read state safely)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        self._ready.wait(30)
        if self._error:
            raise self._error
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.server.stop())
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __exit__(self, *exc) -> None:
        self.stop()


def write_call(path: Path, seconds: float, channels: int = 2, sr: int = 16000) -> Path:
    """A synthetic call file: one speech-like signal per channel (different pitch)."""
    data = np.stack([speechlike(seconds, sr, f0=140 + 70 * c, seed=c) for c in range(channels)], axis=1)
    sf.write(path, data, sr, subtype="PCM_16")
    return path


def expected_ends(seconds: float, hop: float = 1.0) -> list[float]:
    """Window ends for a stream of ``seconds``: every hop, plus the final partial one."""
    ends = [round(k * hop, 6) for k in range(1, int(seconds // hop) + 1)]
    if not ends or abs(ends[-1] - seconds) > 1e-6:
        ends.append(round(seconds, 6))
    return ends
