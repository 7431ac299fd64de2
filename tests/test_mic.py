"""``emostream mic``: the callback path with a fake stream, device selection, errors, and a smoke
test of the real PortAudio path on an ALSA file/null virtual device when available."""

import argparse
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

from emostream import mic
from emostream.analyzer import AnalyzerConfig
from emostream.cli import main
from emostream.vad import VadConfig
from emostream.worker import constant_predictor

from .conftest import ROOT, speechlike
from .live_util import expected_ends


class FakeStream:
    """Stands in for ``sounddevice.InputStream``: calls the callback from its own thread."""

    def __init__(self, device, channels, samplerate, dtype, blocksize, callback, audio=None):
        assert dtype == "float32"
        self.callback, self.blocksize, self.channels = callback, blocksize, channels
        self.audio = audio if audio is not None else speechlike(4.0, samplerate)
        self.started = self.closed = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stop = threading.Event()

    def _run(self):
        for pos in range(0, len(self.audio), self.blocksize):
            if self._stop.is_set():
                return
            block = self.audio[pos : pos + self.blocksize]
            self.callback(np.repeat(block[:, None], self.channels, axis=1), len(block), None, None)
            self._stop.wait(0.002)

    def start(self):
        self.started = True
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join(5)

    def close(self):
        self.closed = True


class FakePredictor:
    device = "cpu"
    predict = staticmethod(constant_predictor())


def mic_options(tmp_path, **kw):
    base = dict(
        rate=44100,
        seconds=3.3,
        analyzer=AnalyzerConfig(vad=VadConfig.named("energy")),  # the test tone is sound, not a voice
        events=str(tmp_path / "mic.jsonl"),
        dashboard=False,
    )
    base.update(kw)
    return mic.MicOptions(**base)


def test_callback_path_resamples_and_windows(tmp_path, capsys):
    streams = []

    def open_stream(**kw):
        streams.append(FakeStream(**kw))
        return streams[-1]

    rc = mic.run_mic(mic_options(tmp_path), FakePredictor, open_stream)
    assert rc == 0 and streams[0].started and streams[0].closed
    assert streams[0].blocksize == 4410  # 0.1 s blocks at the device rate
    lines = [json.loads(line) for line in (tmp_path / "mic.jsonl").read_text().splitlines()]
    events, summary = lines[:-1], lines[-1]
    assert [e["t_end"] for e in events] == pytest.approx(expected_ends(3.3), abs=1e-3)
    assert summary["type"] == "summary" and summary["channels"]["mic"]["windows"] == len(events)
    assert "[mic] mic  0.0-1.0s  Neutral" in capsys.readouterr().out


def test_stereo_capture_names_channels(tmp_path):
    rc = mic.run_mic(
        mic_options(tmp_path, channels=2, rate=16000, seconds=1.5),
        FakePredictor,
        lambda **kw: FakeStream(**kw),
    )
    assert rc == 0
    lines = [json.loads(line) for line in (tmp_path / "mic.jsonl").read_text().splitlines()]
    assert set(lines[-1]["channels"]) == {"left", "right"}


def test_full_queue_drops_are_counted():
    capture = mic.MicCapture(lambda **kw: None, mic.MicConfig(sample_rate=16000, max_queue_seconds=0.3))
    for _ in range(10):
        capture.callback(np.zeros((1600, 1), np.float32), 1600, None, None)
    assert capture.dropped_blocks == 7  # 0.3 s of 0.1 s blocks fit
    assert capture.read(0.01).shape == (1600, 1)


class FakeSd:
    def __init__(self, devices, default=0):
        self._devices = devices
        self.default = argparse.Namespace(device=[default, default])
        self.InputStream = lambda **kw: FakeStream(**kw)

    def query_devices(self):
        return self._devices


DEVICES = [
    {"name": "Speakers", "max_input_channels": 0, "default_samplerate": 48000.0},
    {"name": "USB Headset Mic", "max_input_channels": 1, "default_samplerate": 48000.0},
    {"name": "Built-in Microphone", "max_input_channels": 2, "default_samplerate": 44100.0},
]


def test_device_selection():
    sd = FakeSd(DEVICES, default=2)
    assert mic.resolve_device(sd, None)["name"] == "Built-in Microphone"
    assert mic.resolve_device(sd, "1")["name"] == "USB Headset Mic"
    assert mic.resolve_device(sd, "headset")["index"] == 1
    with pytest.raises(mic.MicError, match="no input device matches 'hdmi'; input devices: 1: USB Headset Mic"):
        mic.resolve_device(sd, "hdmi")
    with pytest.raises(mic.MicError, match="more than one"):
        mic.resolve_device(sd, "mic")
    with pytest.raises(mic.MicError, match="no audio input device found"):
        mic.resolve_device(FakeSd(DEVICES[:1]), None)


def test_missing_sounddevice_or_portaudio_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails as if not installed
    assert main(["mic", "--list-devices"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'emostream[mic]'" in err[0]

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name == "sounddevice":
                raise OSError("PortAudio library not found")

    monkeypatch.delitem(sys.modules, "sounddevice")
    monkeypatch.setattr(sys, "meta_path", [Broken()] + sys.meta_path)
    assert main(["mic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "libportaudio2" in err[0]


def test_no_input_device_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(mic, "import_sounddevice", lambda: FakeSd(DEVICES[:1]))
    assert main(["mic", "--list-devices"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no audio input device found" in err[0]
    monkeypatch.setattr(mic, "import_sounddevice", lambda: FakeSd(DEVICES))
    assert main(["mic", "--input-device", "nothing-like-this"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "input devices: 1: USB Headset Mic (1 ch, 48000 Hz); 2: Built-in Microphone" in err[0]


ASOUNDRC = """
pcm.emostream_raw {{
    type file
    slave.pcm "null"
    file "/dev/null"
    infile "{infile}"
    format "raw"
}}
pcm.emostream_test {{
    type plug
    slave {{ pcm "emostream_raw" format S16_LE rate 16000 channels 1 }}
    hint {{ show on description "emostream test input" }}
}}
"""


def test_real_portaudio_path_on_alsa_virtual_device(tmp_path, shipped_checkpoint):
    """PortAudio through ALSA's file plugin (reading a raw file, clocked by the null device)."""
    try:
        import sounddevice  # noqa: F401
    except (ImportError, OSError):
        pytest.skip("sounddevice / PortAudio not installed")
    infile = tmp_path / "in.raw"
    infile.write_bytes((speechlike(3.0) * 20000).astype("<i2").tobytes())
    (tmp_path / ".asoundrc").write_text(ASOUNDRC.format(infile=infile))
    env = {**os.environ, "HOME": str(tmp_path)}
    listed = subprocess.run(
        [sys.executable, "-m", "emostream", "mic", "--list-devices"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "emostream_test" not in listed.stdout:
        pytest.skip(f"ALSA virtual device not available: {listed.stdout or listed.stderr}")
    out = tmp_path / "mic.jsonl"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "emostream",
            "mic",
            "--input-device",
            "emostream_test",
            "--seconds",
            "2.5",
            "--no-dashboard",
            "--events",
            str(out),
            "--device",
            "cpu",
            "--vad",
            "energy",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["t_end"] for e in lines[:-1]] == [1.0, 2.0, 2.5]
    assert lines[-1]["type"] == "summary" and lines[-1]["channels"]["mic"]["speech_windows"] == 3


def test_cli_flags_reach_the_capture(monkeypatch, tmp_path, shipped_checkpoint):
    """``emostream mic`` through a fake sound card: device, rate, seconds, events and the model's identity."""
    monkeypatch.setattr(mic, "import_sounddevice", lambda: FakeSd(DEVICES))
    out = tmp_path / "mic.jsonl"
    args = ["mic", "--input-device", "headset", "--seconds", "1.5", "--no-dashboard", "--events", str(out)]
    assert main(args + ["--device", "cpu", "--vad", "energy", "--hop", "0.5"]) == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [e["t_end"] for e in lines[:-1]] == [1.0, 1.5]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["model"]["name"] == "emostream-resnet50"
    assert set(summary["channels"]) == {"mic"} and summary["started_at_from"] == "capture start"
