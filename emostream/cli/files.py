"""The file commands: ``classify``, ``export``, ``replay``, ``batch`` and ``report``."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from .common import (
    WEBHOOK_CLOSE_SECONDS,
    UsageError,
    alert_webhook_config,
    import_scale,
    load_command_predictor,
    require_model_files,
    vad_config,
    webhook_report,
)

PARITY_TOLERANCE = 1e-3  # export: largest accepted |logit difference| between ONNX Runtime and torch
BATCH_SKIPPED_SHOWN = 10  # batch: skipped files named on stderr (the rest counted)


def cmd_classify(args) -> int:
    from ..audio import AudioError
    from ..whole_file import LONG_FILE_SECONDS, classify_file

    vad = vad_config(args)
    predictor = load_command_predictor(args)
    failures = 0
    for path in args.paths:
        try:
            record = classify_file(path, predictor, args.positions, vad)
        except AudioError as exc:
            print(f"emostream: error: {exc}", file=sys.stderr)
            failures += 1
            continue
        if not record["speech"]:
            failures += 1
            print(
                f"emostream: {path}: no speech ({record['speech_seconds']:g} s found by --vad {args.vad}, "
                f"{vad.min_speech_seconds:g} s needed): not classified",
                file=sys.stderr,
                flush=True,
            )
        elif record["duration"] > LONG_FILE_SECONDS:
            print(
                f"emostream: note: {path} is {record['duration'] / 60:.0f} min long; one label for a whole "
                f"recording hides how it changes: 'emostream replay --fast {path} --events OUT.jsonl' or "
                f"'emostream batch' give a timeline",
                file=sys.stderr,
                flush=True,
            )
        if args.json:
            print(json.dumps(record), flush=True)
        elif record["speech"]:
            print(f"{path}\t{record['label']}\t{record['confidence']:.2f}", flush=True)
        else:
            print(f"{path}\t-\t-", flush=True)
    return 2 if failures else 0


def cmd_export(args) -> int:
    from ..audio import AudioError
    from ..loading import checkpoint_path
    from ..model import Predictor
    from ..onnx_model import OnnxExportError, OnnxPredictor, calibration_windows, export_onnx, parity_windows

    checkpoint = checkpoint_path(args.checkpoint)
    out = Path(args.onnx)
    if out.is_dir():
        raise UsageError(f"--onnx is a directory: {out}")
    if bool(args.int8) != bool(args.calibrate):
        raise UsageError("--int8 and --calibrate DIR go together (int8 ranges come from DIR's speech)")
    calibration = None
    if args.int8:
        try:
            calibration = calibration_windows(args.calibrate, args.calibration_windows)
        except (FileNotFoundError, AudioError) as exc:
            raise UsageError(f"--calibrate: {exc}") from None
    t0 = time.monotonic()
    try:
        export_onnx(checkpoint, out, calibration)
    except OnnxExportError as exc:
        raise UsageError(str(exc)) from None
    seconds = time.monotonic() - t0
    windows = parity_windows()
    torch_model = Predictor.from_checkpoint(checkpoint, device="cpu", mixed_precision=False)
    exported = OnnxPredictor.from_file(out)
    if calibration is not None:
        # int8 cannot meet the fp32 tolerance: report its agreement with fp32 torch on the parity windows
        # and on calibration-like windows (the accuracy guard on real data is bench/precision_guard.py)
        check = np.concatenate([windows[:1], calibration_windows(args.calibrate, 16, seed=1)])
        ref, got = torch_model.predict(check), exported.predict(check)
        print(
            f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB, int8) in {seconds:.1f} s; against torch fp32 on "
            f"{len(check)} windows: same label on {np.mean(ref.argmax(1) == got.argmax(1)):.0%}, max |probability "
            f"difference| {np.abs(ref - got).max():.3f}",
            flush=True,
        )
        return 0
    diff = float(np.abs(exported.logits(windows) - torch_model.logits(windows).numpy()).max())
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB) in {seconds:.1f} s; max |logit difference| "
        f"against torch fp32 on {len(windows)} windows: {diff:.2e}",
        flush=True,
    )
    if diff > PARITY_TOLERANCE:
        print(f"emostream: error: the ONNX model differs from torch by more than {PARITY_TOLERANCE}", file=sys.stderr)
        return 1
    return 0


def show_alert(display):
    """An alert sink that logs raised and cleared alerts on the display."""

    def show(alert: dict) -> None:
        verb = "ALERT" if alert["state"] == "raised" else "alert cleared"
        display.log(f"{verb}: {alert['channel']} {alert['rule']} at {alert['t']:.1f} s")

    return show


def cmd_replay(args) -> int:
    from ..analyzer import AnalyzerConfig
    from ..audio import SAMPLE_RATE, audio_info, channel_names, is_silent, stream_audio
    from ..compliance import ChannelSelectionError, analysed_channels
    from ..dashboard import DashboardInfo
    from ..display import make_display
    from ..model_files import model_identity
    from ..pipeline import REPLAY_CHUNK_SECONDS, CallPipeline
    from ..stream import StreamConfig
    from ..timeline import FILE_START_FROM, JsonlWriter, file_start_time
    from ..webhook import AlertWebhook

    try:
        stream_cfg = StreamConfig(hop_seconds=args.hop, min_seconds=args.min_seconds)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    webhook_config = alert_webhook_config(args)
    info = audio_info(args.file)
    if info.frames == 0 or is_silent(args.file):
        raise UsageError(f"audio is empty or silent: {args.file}")
    n_channels = info.channels
    try:
        names = channel_names(args.channel_names, n_channels)
    except ValueError:
        raise UsageError(
            f"--channel-names needs {n_channels} names for {args.file}, got {','.join(args.channel_names)!r}"
        ) from None
    try:
        keep = analysed_channels(names, args.analyse)
    except ChannelSelectionError as exc:
        raise UsageError(str(exc)) from None
    names = tuple(names[i] for i in keep)  # the rest is never analysed
    predictor = load_command_predictor(args)
    stream = args.stream or Path(args.file).stem
    writer = JsonlWriter(args.events) if args.events else None
    webhook = AlertWebhook(webhook_config) if webhook_config else None
    info = DashboardInfo(
        source=f"replay {args.file}", stream=stream, channels=names, device=str(predictor.device), hop_seconds=args.hop
    )
    display = make_display(info, enabled=not args.no_dashboard)
    sinks = [display.update] + ([writer.write] if writer else [])
    alert_sinks = (
        [show_alert(display)] + ([writer.write] if writer else []) + ([webhook.send] if webhook is not None else [])
    )
    pipeline = CallPipeline(
        predictor.predict,
        stream,
        names,
        stream_config=stream_cfg,
        analyzer_config=AnalyzerConfig(smooth=args.smooth, vad=vad_config(args)),
        sinks=sinks,
        alert_rules=args.alert,
        alert_sinks=alert_sinks,
    )
    chunk = int(REPLAY_CHUNK_SECONDS * SAMPLE_RATE)
    interrupted = False
    with display:
        t0 = time.monotonic()
        try:
            pos = 0
            for block in stream_audio(args.file):  # decoded block by block: memory bounded however long
                block = block[list(keep)]
                for start in range(0, block.shape[1], chunk):
                    if not args.fast:
                        wait = t0 + pos / SAMPLE_RATE / args.speed - time.monotonic()
                        if wait > 0:
                            time.sleep(wait)
                    piece = block[:, start : start + chunk]
                    pipeline.push(piece)
                    pos += piece.shape[1]
                    display.set_clock(pipeline.seconds, time.monotonic() - t0)
            pipeline.flush()
            display.set_clock(pipeline.seconds, time.monotonic() - t0)
        except KeyboardInterrupt:
            interrupted = True
            display.log("interrupted: summary of the audio so far")
        summary = pipeline.summary()
        summary.update(
            model=model_identity(args.checkpoint, args.onnx),
            started_at=file_start_time(args.file, pipeline.seconds),
            started_at_from=FILE_START_FROM,
        )
        if writer:
            writer.write(summary)
            writer.close()
        display.finish(summary)
    if webhook is not None:
        webhook.close(WEBHOOK_CLOSE_SECONDS)
        webhook_report(webhook)
    return 130 if interrupted else 0


def cmd_batch(args) -> int:
    import os
    from importlib.util import find_spec

    from ..batch import BatchConfig, BatchError, find_inputs
    from ..batch_run import run_batch
    from ..webhook import AlertWebhook
    from ..worker import ModelSpec

    # checked, not imported: pyarrow is loaded for the summary table once the model is gone (issue #42)
    if find_spec("pyarrow") is None:
        raise UsageError("batch writes its summary table with pyarrow: pip install 'emostream[scale]'")
    if args.plots == "png" and find_spec("matplotlib") is None:
        raise UsageError("--plots png needs matplotlib: pip install 'emostream[report]' (or use --plots html)")
    try:
        config = BatchConfig(
            hop_seconds=args.hop,
            min_seconds=args.min_seconds,
            smooth=args.smooth,
            vad=vad_config(args),
            channel_names=args.channel_names,
            analyse=args.analyse,
            alerts=tuple(args.alert),
        )
        skipped: list[tuple[str, str]] = []
        calls = find_inputs(args.input, skipped)
    except (ValueError, BatchError) as exc:
        raise UsageError(str(exc)) from None
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out is not a directory: {out}")
    webhook_config = alert_webhook_config(args)
    spec = ModelSpec.from_args(args)
    started = False
    if args.ray is not None:
        scale = import_scale()
        gpu = args.ray_gpus > 0
        spec = ModelSpec(
            **{
                **spec.__dict__,
                "device": args.device if args.device != "auto" else ("cuda" if gpu else "cpu"),
                "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
                "onnx": str(Path(args.onnx).resolve()) if args.onnx else None,
                "threads": None if gpu else max(1, int(args.ray_cpus)),
            }
        )
        require_model_files(spec)
        try:
            started = scale.connect(args.ray)
        except scale.ScaleError as exc:
            raise UsageError(str(exc)) from None
    elif args.workers > 1:
        spec = ModelSpec(**{**spec.__dict__, "threads": max(1, (os.cpu_count() or 1) // args.workers)})
        require_model_files(spec)
    if skipped:
        shown = ", ".join(f"{path} ({why})" for path, why in skipped[:BATCH_SKIPPED_SHOWN])
        more = f" and {len(skipped) - BATCH_SKIPPED_SHOWN} more" if len(skipped) > BATCH_SKIPPED_SHOWN else ""
        print(f"emostream: batch: skipped {len(skipped)} file(s): {shown}{more}", file=sys.stderr, flush=True)
    webhook = AlertWebhook(webhook_config) if webhook_config else None
    show = BatchProgress(len(calls), args.quiet)
    try:
        with show:
            report = run_batch(
                calls,
                out,
                spec,
                config,
                workers=args.workers,
                use_ray=args.ray is not None,
                cpus_per_worker=args.ray_cpus,
                gpus_per_worker=args.ray_gpus,
                plots=args.plots,
                webhook=webhook,
                progress=show.update,
            )
    finally:
        if started:
            from ..scale import shutdown

            shutdown(started, serve_used=False)
        if webhook is not None:
            webhook.close(WEBHOOK_CLOSE_SECONDS)
    analysed = report.ok
    speed = report.audio_seconds / report.wall_seconds if report.wall_seconds else 0.0
    print(
        f"batch: {report.total} call(s): {analysed} analysed ({report.audio_seconds:.1f} s of audio in "
        f"{report.wall_seconds:.1f} s, {speed:.1f} s of audio per second), {report.skipped} already done, "
        f"{len(report.failed)} failed; {report.table} ({report.rows} rows)",
        flush=True,
    )
    if webhook is not None:
        webhook_report(webhook)
    return 2 if report.failed else 0


class BatchProgress:
    """A progress bar on a terminal (stderr), else one line per call; failures always on stderr."""

    def __init__(self, total: int, quiet: bool):
        from rich.console import Console

        self.console = Console(stderr=True)
        self.bar = None
        if not quiet and self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bar = Progress(
                TextColumn("batch"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.bar.add_task("", total=total)
        self.quiet = quiet
        self.audio = 0.0
        self.failed = 0

    def __enter__(self):
        if self.bar is not None:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.__exit__(*exc)

    def update(self, result) -> None:
        if result.ok:
            self.audio += result.audio_seconds
        else:
            self.failed += 1
            line = f"emostream: error: {result.call_id}: {result.error}"
            if self.bar is not None:  # above the live bar, not through it
                self.console.print(line, markup=False, highlight=False, soft_wrap=True)
            else:
                print(line, file=sys.stderr, flush=True)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, description=f"{self.audio:.0f} s of audio, {self.failed} failed")
        elif not self.quiet and result.ok:
            summary = result.lines[-1]
            dominant = ", ".join(f"{ch} {c['dominant'] or '-'}" for ch, c in summary["channels"].items())
            alerts = len(summary.get("alerts", []))
            print(f"{result.call_id}\t{result.audio_seconds:.1f} s\t{dominant}\t{alerts} alert(s)", flush=True)


def cmd_report(args) -> int:
    from ..report import ReportError, write_report

    try:
        out, notes = write_report(args.jsonl, args.out)
    except ReportError as exc:
        raise UsageError(str(exc)) from None
    except OSError as exc:  # the output cannot be written
        raise UsageError(f"cannot write {args.out}: {exc.strerror or exc}") from None
    for note in notes:
        print(f"emostream: note: {note}", file=sys.stderr, flush=True)
    print(f"wrote {out}", flush=True)
    return 0
