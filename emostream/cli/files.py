"""The file commands: ``classify``, ``export`` and ``replay`` (``batch`` and ``report``: :mod:`.batch`)."""

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
    load_command_predictor,
    vad_config,
    webhook_report,
)

PARITY_TOLERANCE = 1e-3  # export: largest accepted |logit difference| between ONNX Runtime and torch


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
    if not out.parent.is_dir():
        raise UsageError(f"directory for the ONNX file does not exist: {out.parent}")
    if args.calibrate and not args.int8:
        raise UsageError("--calibrate DIR is for --int8 (int8 ranges come from DIR's speech)")
    if args.save_ranges and not args.calibrate:
        raise UsageError("--save-ranges keeps the ranges that --calibrate DIR takes")
    if args.int8 and not args.calibrate:
        return _export_int8_from_ranges(checkpoint, out)
    calibration = None
    if args.int8:
        try:
            calibration = calibration_windows(args.calibrate, args.calibration_windows)
        except (FileNotFoundError, AudioError) as exc:
            raise UsageError(f"--calibrate: {exc}") from None
    t0 = time.monotonic()
    ranges = out.with_name(out.name + ".ranges.json") if args.save_ranges else None
    if ranges:
        ranges.unlink(missing_ok=True)  # onnxruntime would read a stale one instead of calibrating
    try:
        export_onnx(checkpoint, out, calibration, ranges=ranges)
        if ranges:
            from ..int8 import write_ranges

            print(f"kept the int8 ranges in {write_ranges(checkpoint, ranges, len(calibration))}", flush=True)
    except OnnxExportError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if ranges:
            ranges.unlink(missing_ok=True)
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


def _export_int8_from_ranges(checkpoint: Path, out: Path) -> int:
    """``export --int8`` without --calibrate: a copy of the model a CPU runs by default, built into the
    cache first where it is not there yet (:mod:`emostream.int8`)."""
    import shutil

    from ..int8 import Int8Unavailable, int8_model
    from ..loading import check_model_files

    check_model_files(backend="torch", checkpoint=checkpoint)  # a missing checkpoint: one line
    t0 = time.monotonic()
    try:
        built = int8_model(checkpoint, lambda message: print(message, file=sys.stderr, flush=True))
    except Int8Unavailable as exc:
        raise UsageError(f"{exc} (give --calibrate DIR to calibrate on speech)") from None
    tmp = out.with_name(out.name + ".tmp")
    shutil.copyfile(built, tmp)
    tmp.replace(out)
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.0f} MiB, int8 from {checkpoint.name}'s ranges, the model a CPU "
        f"runs by default: {built}) in {time.monotonic() - t0:.1f} s",
        flush=True,
    )
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
