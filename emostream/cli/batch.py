"""The batch commands: ``batch`` (a folder or archive of recorded calls) and ``report`` (its plots)."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import (
    WEBHOOK_CLOSE_SECONDS,
    UsageError,
    alert_webhook_config,
    import_scale,
    require_model_files,
    vad_config,
    webhook_report,
)

BATCH_SKIPPED_SHOWN = 10  # batch: skipped files named on stderr (the rest counted)


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
