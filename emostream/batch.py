"""``emostream batch``: score a folder of recorded calls, on this machine or on Ray Data.

Every call goes through the windowed timeline of ``replay --fast`` (same windows, same speech gate,
same model, same smoothing and alert rules), in three steps that both engines share:

1. :func:`prepare_call`: decode and resample the file block by block, pick the analysed channels, cut the windows
   and run the speech gate, yielding :class:`Chunk` s of at most ``chunk_windows`` windows (bounded
   memory, however long the call);
2. :func:`classify_chunk`: the model on a chunk's speech windows;
3. :func:`assemble_call`: the chunks in order -> events (smoothing), alerts and the summary, i.e. the
   lines ``replay --events`` would write.

Locally (:func:`emostream.batch_run.run_local`) the steps run in this process, or in ``workers``
processes with a model each; on Ray (:func:`emostream.batch_run.run_ray`) files are read with
``read_binary_files`` and steps 1-2 run in a pool of model actors, step 3 in the driver as the
chunks stream back. The driver writes one ``OUT/<call_id>.jsonl`` per call (written to
``.jsonl.part`` and renamed when complete, so a call is done exactly when its ``.jsonl`` exists:
that is what resuming skips) and, at the end, the table of per-call summaries
``OUT/summary.parquet`` built from every finished call in ``OUT`` plus one row per call that failed
in this run. A file that cannot be read or analysed becomes such a row; it never stops the batch.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .alerts import AlertRule
from .analyzer import AnalyzerConfig
from .audio import (
    AUDIO_SUFFIXES,
    SAMPLE_RATE,
    STEREO_NAMES,
    WINDOW_SAMPLES,
    AudioError,
    audio_info,
    channel_names,
    stream_audio,
)
from .compliance import ANALYSE_CHOICES, ChannelSelectionError, analysed_channels
from .pipeline import CallPipeline
from .stream import StreamConfig, Window
from .timeline import CLASSES, FILE_START_FROM, JsonlWriter, file_start_time
from .vad import VadConfig
from .worker import ModelSpec, PredictFn

log = logging.getLogger("emostream.batch")

SUMMARY_FILE = "summary.parquet"


class BatchError(ValueError):
    """Bad batch input as a whole (nothing to read, bad output folder): one line, exit code 2."""


@dataclass(frozen=True)
class BatchConfig:
    """How every call of a batch is analysed (the options of ``replay --fast``)."""

    hop_seconds: float = 1.0
    min_seconds: float = 1.0
    smooth: float = 1.0
    vad: VadConfig = VadConfig()
    channel_names: tuple[str, ...] | None = None  # default: ch0 for mono, agent,customer for stereo
    analyse: str = "all"
    alerts: tuple[AlertRule, ...] = ()
    chunk_windows: int = 32  # windows per chunk (its speech windows are one model request)
    max_batch: int = 16  # windows per model call (32: +65 MB of activations, no faster; issue #42)

    def __post_init__(self):
        StreamConfig(hop_seconds=self.hop_seconds, min_seconds=self.min_seconds)  # validates
        if self.analyse not in ANALYSE_CHOICES:
            raise ValueError(f"analyse must be one of {', '.join(ANALYSE_CHOICES)}, got {self.analyse!r}")
        if self.channel_names is not None:
            channel_names(self.channel_names, len(self.channel_names))  # distinct and non-empty, or ValueError
        if self.chunk_windows < 2 or self.max_batch < 1:
            raise ValueError("chunk windows must be >= 2 and max batch >= 1")


@dataclass(frozen=True)
class CallInput:
    """One recording and the id its outputs are named by."""

    call_id: str
    path: str


@dataclass
class Chunk:
    """Consecutive windows of one call (time order, as replay meets them) and the speech ones' samples.

    ``windows`` rows are ``(channel index, start, end, final, speech)``; ``samples`` holds the speech
    windows only, ``probs`` their model output once classified. A call that could not be prepared is
    one chunk with ``error`` set and no windows.
    """

    call_id: str
    path: str
    index: int
    last: bool
    channels: tuple[str, ...] = ()
    windows: list[tuple[int, int, int, bool, bool]] = field(default_factory=list)
    samples: np.ndarray = field(default_factory=lambda: np.zeros((0, WINDOW_SAMPLES), np.float32))
    probs: np.ndarray | None = None
    error: str | None = None
    audio_seconds: float = 0.0

    def to_row(self) -> dict:
        """A flat row (for Ray Data): arrays as bytes, lists as JSON."""
        return {
            "call_id": self.call_id,
            "path": self.path,
            "index": self.index,
            "last": self.last,
            "channels": json.dumps(list(self.channels)),
            "windows": json.dumps(self.windows),
            "samples": np.ascontiguousarray(self.samples, np.float32).tobytes(),
            "probs": b"" if self.probs is None else np.ascontiguousarray(self.probs, np.float32).tobytes(),
            "error": self.error or "",
            "audio_seconds": float(self.audio_seconds),
        }

    @classmethod
    def from_row(cls, row: dict) -> "Chunk":
        probs = np.frombuffer(row["probs"], np.float32).reshape(-1, len(CLASSES)) if len(row["probs"]) else None
        return cls(
            str(row["call_id"]),
            str(row["path"]),
            int(row["index"]),
            bool(row["last"]),
            tuple(json.loads(row["channels"])),
            [tuple(w) for w in json.loads(row["windows"])],
            np.frombuffer(row["samples"], np.float32).reshape(-1, WINDOW_SAMPLES),
            probs,
            str(row["error"]) or None,
            float(row["audio_seconds"]),
        )


@dataclass
class CallResult:
    """A finished call: the lines of its JSONL (events, alerts, summary last), or why it failed."""

    call_id: str
    path: str
    lines: list[dict] = field(default_factory=list)
    error: str | None = None
    audio_seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


# --- inputs ---------------------------------------------------------------------------------


def find_inputs(spec: str, skipped: list[tuple[str, str]] | None = None) -> list[CallInput]:
    """The recordings of ``INPUT_DIR_OR_GLOB``: a folder (searched recursively for the formats of
    ``AUDIO_SUFFIXES``, the ones classify and replay read), a glob pattern (``**`` allowed) or one
    file. Call ids are the paths relative to the folder (or the pattern's fixed part) without the
    suffix, ``/`` written as ``__``; two files that would share an id keep their suffix. The files of
    a folder left out are appended to ``skipped`` as ``(path, why)``."""
    root = Path(spec)
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))
        paths = [p for p in files if p.suffix.lower() in AUDIO_SUFFIXES]
        if skipped is not None:
            skipped += [
                (str(p), f"not an audio format ({p.suffix or 'no suffix'})")
                for p in files
                if p.suffix.lower() not in AUDIO_SUFFIXES
            ]
        base = root
    elif glob.has_magic(spec):
        paths = sorted(Path(p) for p in glob.glob(spec, recursive=True) if Path(p).is_file())
        parts = Path(spec).parts
        fixed = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        base = Path(*parts[:fixed]) if fixed else Path(".")
    elif root.is_file():
        paths, base = [root], root.parent
    else:
        raise BatchError(f"no such file or folder: {spec}")
    if not paths:
        raise BatchError(f"no audio files ({', '.join(s[1:] for s in AUDIO_SUFFIXES)}) in {spec}")
    ids = [Path(os.path.relpath(p, base)).with_suffix("").as_posix().replace("/", "__") for p in paths]
    counts = {i: ids.count(i) for i in ids}
    return [CallInput(i + p.suffix if counts[i] > 1 else i, str(p)) for i, p in zip(ids, paths)]


def file_channel_names(n_channels: int, given: tuple[str, ...] | None, name: str) -> tuple[str, ...]:
    """Names of a file's channels: ``given``, else ``ch0`` for mono and ``agent,customer`` for stereo."""
    try:
        return channel_names(given, n_channels, stereo=STEREO_NAMES)
    except ValueError:
        raise AudioError(f"{name} has {n_channels} channel(s) but --channel-names gives {len(given or ())}") from None


# --- the three steps ------------------------------------------------------------------------


def prepare_call(call: CallInput, config: BatchConfig, source: str | bytes | None = None) -> Iterator[Chunk]:
    """Decode, window and gate one call (``source``: the file's bytes, default: read ``call.path``),
    block by block: memory does not grow with the call's length. A silent file, or one that fails
    to decode part way, ends with an error chunk (the call fails as a whole)."""
    source = call.path if source is None else source
    try:
        info = audio_info(source, call.path)
        names = file_channel_names(info.channels, config.channel_names, call.path)
        keep = analysed_channels(names, config.analyse)
        if info.frames == 0:
            raise AudioError(f"audio file is empty: {call.path}")
    except (AudioError, ChannelSelectionError) as exc:
        yield Chunk(call.call_id, call.path, 0, True, error=str(exc))
        return
    except Exception as exc:  # anything a decoder throws: this call fails, the batch goes on
        yield Chunk(call.call_id, call.path, 0, True, error=f"cannot analyse {call.path}: {type(exc).__name__}: {exc}")
        return
    names = tuple(names[i] for i in keep)
    seconds = info.frames_at(SAMPLE_RATE) / SAMPLE_RATE
    stream_config = StreamConfig(config.hop_seconds, config.min_seconds)
    pipeline = CallPipeline(
        None, call.call_id, names, stream_config=stream_config, analyzer_config=AnalyzerConfig(vad=config.vad)
    )
    hop = stream_config.hop_samples
    index, pending = 0, []

    def chunk(windows: list[Window], last: bool) -> Chunk:
        picked = set(pipeline.speech_indices(windows))
        rows = [(names.index(w.channel), w.start, w.end, w.final, i in picked) for i, w in enumerate(windows)]
        samples = (
            np.stack([windows[i].samples for i in sorted(picked)])
            if picked
            else np.zeros((0, WINDOW_SAMPLES), np.float32)
        )
        return Chunk(call.call_id, call.path, index, last, names, rows, samples, audio_seconds=seconds)

    # The gate must see each channel's windows in order, exactly once: it runs per block of windows
    # as they complete; a chunk closes when the next block could take it past chunk_windows.
    sound = False
    try:
        for block in stream_audio(source, call.path):
            audio = block[list(keep)]
            sound = sound or bool(np.any(block))
            for pos in range(0, audio.shape[1], hop):
                windows = pipeline.frame_windows(audio[:, pos : pos + hop])
                if not windows:
                    continue
                if pending and len(pending) + len(windows) > config.chunk_windows:
                    yield chunk(pending, False)
                    index, pending = index + 1, []
                pending += windows
    except Exception as exc:  # a decoder failing part way: the call fails, the batch goes on
        error = str(exc) if isinstance(exc, AudioError) else f"cannot analyse {call.path}: {type(exc).__name__}: {exc}"
        yield Chunk(call.call_id, call.path, index, True, error=error)
        return
    if not sound:
        yield Chunk(call.call_id, call.path, index, True, error=f"audio is empty or silent: {call.path}")
        return
    pending += pipeline.final_windows()
    yield chunk(pending, True)


def classify_chunk(chunk: Chunk, predict: PredictFn, max_batch: int = 32) -> Chunk:
    """The model's probabilities for the chunk's speech windows (in slices of ``max_batch``)."""
    n = len(chunk.samples)
    if n:
        chunk.probs = np.concatenate(
            [np.asarray(predict(chunk.samples[i : i + max_batch]), np.float32) for i in range(0, n, max_batch)]
        )
    else:
        chunk.probs = np.zeros((0, len(CLASSES)), np.float32)
    return chunk


def assemble_call(chunks: list[Chunk], config: BatchConfig) -> CallResult:
    """Events, alerts and the summary of one call from its classified chunks (any order)."""
    chunks = sorted(chunks, key=lambda c: c.index)
    first = chunks[0]
    error = next((c.error for c in chunks if c.error), None)
    if error:
        return CallResult(first.call_id, first.path, error=error)
    names = first.channels
    lines: list[dict] = []
    pipeline = CallPipeline(
        None,
        first.call_id,
        names,
        stream_config=StreamConfig(config.hop_seconds, config.min_seconds),
        analyzer_config=AnalyzerConfig(smooth=config.smooth, vad=VadConfig.named("off")),
        sinks=[lines.append],
        alert_rules=config.alerts,
        alert_sinks=[lines.append],
    )
    for c in chunks:
        windows = [
            Window(names[ch], start, end, np.zeros(0, np.float32), final) for ch, start, end, final, _ in c.windows
        ]
        speech = [i for i, row in enumerate(c.windows) if row[4]]
        pipeline.emit(windows, dict(zip(speech, c.probs if c.probs is not None else [])))
    summary = pipeline.summary()
    summary.update(
        call_id=first.call_id,
        path=first.path,
        alerts=[a for a in pipeline.alerts.history if a["state"] == "raised"],
        started_at=file_start_time(first.path, first.audio_seconds),
        started_at_from=FILE_START_FROM,
    )
    lines.append(summary)
    return CallResult(first.call_id, first.path, lines, audio_seconds=first.audio_seconds)


def analyse_call(call: CallInput, predict: PredictFn, config: BatchConfig) -> CallResult:
    """All three steps for one call in this process."""
    chunks = []
    for c in prepare_call(call, config):
        if not c.error:
            classify_chunk(c, predict, config.max_batch)
            c.samples = np.zeros((0, WINDOW_SAMPLES), np.float32)  # only the probabilities are kept
        chunks.append(c)
    return assemble_call(chunks, config)


# --- outputs ---------------------------------------------------------------------------------


def done_calls(out_dir: Path, calls: Iterable[CallInput]) -> set[str]:
    """Ids of the calls whose timeline is complete in ``out_dir`` (resume skips them)."""
    return {c.call_id for c in calls if (out_dir / f"{c.call_id}.jsonl").is_file()}


def write_call(out_dir: Path, result: CallResult) -> Path:
    """``OUT/<call_id>.jsonl``, flushed per line into ``.jsonl.part`` and renamed when complete."""
    path = out_dir / f"{result.call_id}.jsonl"
    part = path.with_name(path.name + ".part")
    with JsonlWriter(part) as writer:
        for line in result.lines:
            writer.write(line)
    os.replace(part, path)
    return path


def read_summary(path: Path) -> dict | None:
    """The summary line (the last line) of a finished timeline, or None."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        block = b""
        pos = size
        while pos > 0 and block.count(b"\n") < 2:
            step = min(65536, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step) + block
    lines = [x for x in block.splitlines() if x.strip()]
    if not lines:
        return None
    try:
        obj = json.loads(lines[-1])
    except json.JSONDecodeError:
        return None
    return obj if obj.get("type") == "summary" else None


def _schema():
    import pyarrow as pa

    peak = pa.struct(
        [("label", pa.string()), ("confidence", pa.float64()), ("t_start", pa.float64()), ("t_end", pa.float64())]
    )
    alert = pa.struct([("rule", pa.string()), ("t", pa.float64()), ("since", pa.float64())])
    return pa.schema(
        [
            ("call_id", pa.string()),
            ("path", pa.string()),
            ("status", pa.string()),
            ("error", pa.string()),
            ("started_at", pa.string()),
            ("model", pa.string()),
            ("model_sha256", pa.string()),
            ("channel", pa.string()),
            ("duration", pa.float64()),
            ("speech_seconds", pa.float64()),
            ("windows", pa.int32()),
            ("speech_windows", pa.int32()),
            ("dominant", pa.string()),
        ]
        + [(f"share_{c}", pa.float64()) for c in CLASSES]
        + [("peaks", pa.list_(peak)), ("alerts_raised", pa.int32()), ("alerts", pa.list_(alert))]
    )


def summary_rows(summary: dict) -> list[dict]:
    """One table row per analysed channel of a finished call's summary line. A channel without
    speech has null shares (NaN in pandas), not 0."""
    rows = []
    model = summary.get("model") or {}
    for channel, s in summary.get("channels", {}).items():
        alerts = [
            {"rule": a["rule"], "t": a["t"], "since": a["since"]}
            for a in summary.get("alerts", [])
            if a.get("channel") == channel
        ]
        speech = bool(s["speech_seconds"])
        rows.append(
            {
                "call_id": summary.get("call_id", summary.get("stream")),
                "path": summary.get("path"),
                "status": "ok",
                "error": None,
                "started_at": summary.get("started_at"),
                "model": model.get("name"),
                "model_sha256": model.get("sha256"),
                "channel": channel,
                "duration": summary.get("duration"),
                "speech_seconds": s["speech_seconds"],
                "windows": s["windows"],
                "speech_windows": s["speech_windows"],
                "dominant": s["dominant"],
                **{f"share_{c}": s["shares"].get(c, 0.0) if speech else None for c in CLASSES},
                "peaks": s["peaks"],
                "alerts_raised": len(alerts),
                "alerts": alerts,
            }
        )
    return rows


def error_row(result: CallResult, model: dict | None = None) -> dict:
    """The row of a call that failed: no channel, no windows (0, so the column stays integer)."""
    model = model or {}
    return {
        "call_id": result.call_id,
        "path": result.path,
        "status": "error",
        "error": result.error,
        "started_at": None,
        "model": model.get("name"),
        "model_sha256": model.get("sha256"),
        "channel": None,
        "duration": None,
        "speech_seconds": None,
        "windows": 0,
        "speech_windows": 0,
        "dominant": None,
        **{f"share_{c}": None for c in CLASSES},
        "peaks": [],
        "alerts_raised": 0,
        "alerts": [],
    }


def spec_identity(spec: ModelSpec) -> dict[str, str]:
    """The model a batch runs, as timelines and the table name it (``model_identity``)."""
    from .model_files import model_identity

    if spec.backend == "constant":
        return {"name": "none", "sha256": ""}
    try:
        return model_identity(spec.checkpoint, spec.onnx if spec.backend == "onnx" else None)
    except OSError:
        return {}


def write_summary_table(out_dir: Path, failed: list[CallResult], model: dict | None = None) -> tuple[Path, int]:
    """``OUT/summary.parquet``: a row per channel of every finished call in ``out_dir`` (this run's
    and earlier runs'), then a row per call that failed in this run, by call id. Returns (path, rows)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for path in sorted(out_dir.glob("*.jsonl")):
        summary = read_summary(path)
        if summary is not None:
            rows += summary_rows(summary)
    rows += [error_row(r, model) for r in sorted(failed, key=lambda r: r.call_id)]  # workers finish in any order
    table = pa.Table.from_pylist(rows, schema=_schema())
    target = out_dir / SUMMARY_FILE
    part = target.with_name(target.name + ".part")
    pq.write_table(table, part)
    os.replace(part, target)
    return target, len(rows)
