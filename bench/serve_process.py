"""An `emostream serve` subprocess for the benchmarks that load the server from outside
(`capacity.py`, `soak.py`): started, its port found on its log, its stderr kept, stopped cleanly."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START_SECONDS = 300.0  # how long the server may take to listen (and, for callers, to be ready)


class ServeProcess:
    """``cmd`` (an ``emostream serve --port 0 ...`` command line) started from the repository root;
    returns once it logs the port it listens on (:attr:`port`), else stops it and raises RuntimeError."""

    stop_seconds = 60.0  # how long stop() waits after SIGTERM before it kills

    def __init__(self, cmd: list[str], timeout: float = START_SECONDS):
        self.proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, cwd=ROOT)
        self.lines: list[str] = []
        self.deadline = time.monotonic() + timeout
        port = None
        while port is None and time.monotonic() < self.deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            self.lines.append(line)
            if m := re.search(r"listening on ws://127\.0\.0\.1:(\d+)", line):
                port = int(m.group(1))
        if port is None:
            self.stop()
            raise RuntimeError("emostream serve did not start: " + "".join(self.lines[-5:]))
        self.port = port

    def keep_reading(self) -> None:
        """Collect the rest of the server's stderr into :attr:`lines` on a daemon thread."""
        threading.Thread(target=lambda: [self.lines.append(x) for x in self.proc.stderr], daemon=True).start()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_seconds)
            except subprocess.TimeoutExpired:
                self.proc.kill()
