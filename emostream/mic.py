"""``emostream mic``: live analysis of an audio input device through ``sounddevice`` (PortAudio).

The PortAudio callback only copies each block into a bounded queue; the main thread resamples from
the device rate to 16 kHz, cuts windows and runs the model, so a slow model never blocks capture.
If the model falls behind by more than ``max_queue_seconds`` of audio, blocks are dropped and
counted (reported in the dashboard log and at the end), never silently. ``sounddevice`` is imported
only inside functions of this module.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .analyzer import AnalyzerConfig
from .audio import SAMPLE_RATE
from .stream import StreamConfig

MIC_BLOCK_SECONDS = 0.1
MAX_QUEUE_SECONDS = 10.0
READ_TIMEOUT = 0.5  # seconds the consumer waits for a block before checking for stop
STALL_TIMEOUT = 5.0  # no block for this long: the device stopped delivering audio


class MicError(Exception):
    """The microphone cannot be used (one-line message: what to install or which devices exist)."""


def import_sounddevice():
    """``sounddevice``, or a :class:`MicError` saying what to install."""
    try:
        import sounddevice
    except ImportError:
        raise MicError("the mic command needs the sounddevice package: pip install 'emostream[mic]'") from None
    except OSError:
        raise MicError(
            "PortAudio library not found: install it (Debian/Ubuntu: apt-get install libportaudio2; "
            "macOS: brew install portaudio)"
        ) from None
    return sounddevice


def input_devices(sd) -> list[dict]:
    """Input devices: ``index``, ``name``, ``channels``, ``rate`` (default sample rate)."""
    try:
        devices = sd.query_devices()
    except Exception as exc:
        raise MicError(f"cannot list audio devices: {exc}") from None
    return [
        {"index": i, "name": d["name"], "channels": int(d["max_input_channels"]), "rate": int(d["default_samplerate"])}
        for i, d in enumerate(devices)
        if int(d["max_input_channels"]) > 0
    ]


def describe_devices(devices: list[dict]) -> str:
    return "; ".join(f"{d['index']}: {d['name']} ({d['channels']} ch, {d['rate']} Hz)" for d in devices)


def resolve_device(sd, spec: str | None) -> dict:
    """The input device for ``--device`` (index or part of the name; ``None`` = system default)."""
    devices = input_devices(sd)
    if not devices:
        raise MicError("no audio input device found (check the microphone, or the ALSA/PulseAudio setup)")
    if spec is None:
        try:
            default = sd.default.device[0]
        except Exception:
            default = -1
        match = [d for d in devices if d["index"] == default]
        return match[0] if match else devices[0]
    if spec.strip().isdigit():
        match = [d for d in devices if d["index"] == int(spec)]
    else:
        match = [d for d in devices if spec.lower() in d["name"].lower()]
    if len(match) != 1:
        what = "no" if not match else "more than one"
        raise MicError(f"{what} input device matches {spec!r}; input devices: {describe_devices(devices)}")
    return match[0]


@dataclass(frozen=True)
class MicConfig:
    """What to open."""

    device: int | str | None = None
    sample_rate: int = SAMPLE_RATE
    channels: int = 1
    block_seconds: float = MIC_BLOCK_SECONDS
    max_queue_seconds: float = MAX_QUEUE_SECONDS


class MicCapture:
    """An input stream whose callback feeds a bounded queue.

    ``open_stream`` is ``sounddevice.InputStream`` (or anything with that signature whose result
    has ``start``/``stop``/``close``: tests pass a fake).
    """

    def __init__(self, open_stream: Callable[..., Any], config: MicConfig):
        self.config = config
        self.open_stream = open_stream
        self.blocksize = max(1, int(config.block_seconds * config.sample_rate))
        self._queue: queue.Queue[np.ndarray] = queue.Queue(
            max(1, round(config.max_queue_seconds / config.block_seconds))
        )
        self.dropped_blocks = 0
        self.status_flags: list[str] = []
        self._stream = None

    def callback(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        """PortAudio callback (its own thread): copy the block, never block."""
        if status:
            self.status_flags.append(str(status))
        try:
            self._queue.put_nowait(np.array(indata, dtype=np.float32, copy=True).reshape(frames, -1))
        except queue.Full:
            self.dropped_blocks += 1

    def __enter__(self) -> "MicCapture":
        try:
            self._stream = self.open_stream(
                device=self.config.device,
                channels=self.config.channels,
                samplerate=self.config.sample_rate,
                dtype="float32",
                blocksize=self.blocksize,
                callback=self.callback,
            )
            self._stream.start()
        except MicError:
            raise
        except Exception as exc:
            raise MicError(f"cannot open input device {self.config.device!r}: {str(exc).splitlines()[0]}") from None
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stream is not None:
            try:
                self._stream.stop()
            finally:
                self._stream.close()
                self._stream = None

    def read(self, timeout: float = READ_TIMEOUT) -> np.ndarray | None:
        """The next block ``(frames, channels)``, or ``None`` after ``timeout`` seconds."""
        try:
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None


def run_capture(
    capture: MicCapture,
    pipeline,
    display=None,
    max_seconds: float | None = None,
    stop: Callable[[], bool] = lambda: False,
) -> dict:
    """Consume ``capture`` until ``max_seconds`` of audio, ``stop()`` or a stalled device; returns the
    summary. Blocks go to ``pipeline`` (a :class:`~emostream.pipeline.CallPipeline` at the capture rate)."""
    received, dropped_seen = 0, 0
    t0 = last = time.monotonic()
    limit = None if max_seconds is None else int(max_seconds * capture.config.sample_rate)
    while not stop() and (limit is None or received < limit):
        block = capture.read()
        now = time.monotonic()
        if block is None:
            if now - last > STALL_TIMEOUT:
                if display is not None:
                    display.log(f"no audio from the device for {STALL_TIMEOUT:g} s: stopping")
                break
            continue
        last = now
        if limit is not None:
            block = block[: limit - received]
        received += len(block)
        pipeline.push(
            np.stack([block[:, ch] if block.shape[1] > ch else block[:, 0] for ch in range(len(pipeline.channels))])
        )
        if display is not None:
            display.set_clock(pipeline.seconds, now - t0)
            if capture.dropped_blocks > dropped_seen:
                dropped_seen = capture.dropped_blocks
                display.log(f"model behind real time: {dropped_seen} audio blocks dropped")
    pipeline.flush()
    summary = pipeline.summary()
    summary["dropped_seconds"] = round(capture.dropped_blocks * capture.config.block_seconds, 3)
    return summary


@dataclass(frozen=True)
class MicOptions:
    """What ``emostream mic`` does: which input, how much, and where events go."""

    input_device: str | None = None  # index or part of the name; None: the system default input
    rate: int | None = None  # capture rate; None: the device's own
    channels: int = 1
    seconds: float | None = None  # stop after this much audio; None: until Ctrl-C or a stalled device
    stream: StreamConfig = StreamConfig()
    analyzer: AnalyzerConfig = AnalyzerConfig()
    events: str | None = None  # JSONL file of events and the summary
    dashboard: bool = True
    model: dict[str, str] | None = None  # the summary's model identity (name, sha256)


def list_input_devices(sd=None) -> list[dict]:
    """The input devices ``emostream mic --list-devices`` prints (MicError when there is none)."""
    devices = input_devices(sd or import_sounddevice())
    if not devices:
        raise MicError("no audio input device found (check the microphone, or the ALSA/PulseAudio setup)")
    return devices


def run_mic(
    options: MicOptions, load_predictor: Callable[[], Any], open_stream: Callable[..., Any] | None = None
) -> int:
    """Capture from a sound card through the dashboard until Ctrl-C, ``options.seconds`` of audio or a
    stalled device; the exit status (130 after Ctrl-C). ``open_stream``: ``sounddevice.InputStream``
    by default (tests pass a fake, then ``input_device`` is handed to it as is)."""
    import sys

    from .dashboard import DashboardInfo
    from .display import make_display
    from .pipeline import CallPipeline
    from .timeline import JsonlWriter, iso_utc

    if open_stream is None:
        sd = import_sounddevice()
        device = resolve_device(sd, options.input_device)
        if options.channels > device["channels"]:
            raise MicError(
                f"device {device['name']!r} has {device['channels']} input channel(s), asked for {options.channels}"
            )
        config = MicConfig(device["index"], options.rate or device["rate"], options.channels)
        open_stream, source = sd.InputStream, f"mic: {device['name']}"
    else:
        config = MicConfig(options.input_device, options.rate or SAMPLE_RATE, options.channels)
        source = f"mic: {options.input_device or 'default'}"
    predictor = load_predictor()
    names = ("mic",) if options.channels == 1 else ("left", "right")
    writer = JsonlWriter(options.events) if options.events else None
    info = DashboardInfo(
        source=source,
        stream="mic",
        channels=names,
        device=str(predictor.device),
        hop_seconds=options.stream.hop_seconds,
    )
    display = make_display(info, enabled=options.dashboard)
    pipeline = CallPipeline(
        predictor.predict,
        "mic",
        names,
        stream_config=options.stream,
        analyzer_config=options.analyzer,
        sinks=[display.update] + ([writer.write] if writer else []),
        sample_rate=config.sample_rate,
    )
    interrupted = False
    started = time.time()
    with display:
        try:
            with MicCapture(open_stream, config) as capture:
                try:
                    summary = run_capture(capture, pipeline, display, options.seconds)
                except KeyboardInterrupt:
                    interrupted = True
                    summary = pipeline.summary()
        except KeyboardInterrupt:
            interrupted = True
            summary = pipeline.summary()
        if options.model is not None:
            summary["model"] = options.model
        summary.update(started_at=iso_utc(started), started_at_from="capture start")
        if writer:
            writer.write(summary)
            writer.close()
        display.finish(summary)
    if summary.get("dropped_seconds"):
        print(
            f"emostream: warning: {summary['dropped_seconds']} s of audio dropped (model slower than real time)",
            file=sys.stderr,
        )
    return 130 if interrupted else 0
