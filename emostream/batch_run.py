"""The engines of ``emostream batch`` (:mod:`emostream.batch` has the steps they share): in this
process or a process pool (:func:`run_local`), or on Ray Data (:func:`run_ray`); :func:`run_batch`
drives either, writes each finished call and, at the end, the summary table."""

from __future__ import annotations

import logging
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .audio import WINDOW_SAMPLES
from .batch import (
    BatchConfig,
    BatchError,
    CallInput,
    CallResult,
    Chunk,
    analyse_call,
    assemble_call,
    classify_chunk,
    done_calls,
    prepare_call,
    spec_identity,
    write_call,
    write_summary_table,
)
from .worker import ModelSpec, PredictFn

log = logging.getLogger("emostream.batch")

ResultFn = Callable[[CallResult], None]
_PROCESS_STATE: dict = {}


def _init_process(spec: ModelSpec, config: BatchConfig) -> None:
    try:
        _PROCESS_STATE.update(predict=spec.load()[0], config=config)
    except Exception as exc:  # every call of this worker reports it (rather than a dead pool)
        _PROCESS_STATE.update(error=f"the model did not load: {exc}")


def _process_call(call: CallInput) -> CallResult:
    if "error" in _PROCESS_STATE:
        return CallResult(call.call_id, call.path, error=_PROCESS_STATE["error"])
    try:
        return analyse_call(call, _PROCESS_STATE["predict"], _PROCESS_STATE["config"])
    except Exception as exc:  # an unforeseen failure fails this call only
        return CallResult(call.call_id, call.path, error=f"{type(exc).__name__}: {exc}")


def run_local(
    calls: list[CallInput],
    spec: ModelSpec,
    config: BatchConfig,
    workers: int,
    on_result: ResultFn,
    predict: PredictFn | None = None,
) -> None:
    """Analyse ``calls`` here: in this process (``workers`` 1) or in ``workers`` processes, each
    with its own model and ``cores / workers`` torch threads. A worker process that dies (a decoder
    crash) is replaced; the files it held are retried one at a time, and the one that kills a worker
    on its own is reported as failed."""
    if workers <= 1:
        if predict is None:
            predict = spec.load()[0]
        for call in calls:
            try:
                result = analyse_call(call, predict, config)
            except Exception as exc:
                result = CallResult(call.call_id, call.path, error=f"{type(exc).__name__}: {exc}")
            on_result(result)
        return
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = list(calls)  # not tried yet
    retry: list[CallInput] = []  # in flight when a worker died: each is retried on its own
    while queue or retry:
        pool = ProcessPoolExecutor(workers, mp_context=context, initializer=_init_process, initargs=(spec, config))
        running: dict = {}
        alone: CallInput | None = None  # the retried call running on its own
        lost: list[CallInput] = []
        try:
            while (queue or retry or running) and not lost:
                if retry and not running:
                    alone = retry.pop(0)
                    running[pool.submit(_process_call, alone)] = alone
                while queue and not retry and len(running) < 2 * workers:
                    call = queue.pop(0)
                    running[pool.submit(_process_call, call)] = call
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    call = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        lost.append(call)
                        continue
                    on_result(result)
            lost += list(running.values())
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        if lost == [alone] and alone is not None:
            on_result(
                CallResult(alone.call_id, alone.path, error=f"the worker process died while analysing {alone.path}")
            )
        elif lost:
            log.warning("a batch worker process died; retrying its %d call(s) one at a time", len(lost))
            retry = lost + [c for c in retry if c not in lost]


class _PrepareAndClassify:
    """Ray Data actor: loads the model once, then turns files' bytes into classified chunks."""

    def __init__(self, spec: ModelSpec, config: BatchConfig, calls: dict[str, CallInput]):
        self.predict = spec.load()[0]
        self.config = config
        self.calls = calls

    def __call__(self, batch: dict) -> Iterator[dict]:
        for path, data in zip(batch["path"], batch["bytes"]):
            call = self.calls.get(_key(path)) or CallInput(Path(str(path)).stem, str(path))
            for chunk in prepare_call(call, self.config, bytes(data)):
                if not chunk.error:
                    try:
                        classify_chunk(chunk, self.predict, self.config.max_batch)
                    except Exception as exc:  # this call fails; the actor and the batch go on
                        chunk = Chunk(
                            chunk.call_id,
                            chunk.path,
                            chunk.index,
                            chunk.last,
                            error=f"inference failed: {type(exc).__name__}: {exc}",
                        )
                chunk.samples = np.zeros((0, WINDOW_SAMPLES), np.float32)  # the driver needs probabilities only
                row = chunk.to_row()
                yield {k: np.array([v], dtype=object if isinstance(v, (bytes, str)) else None) for k, v in row.items()}


def run_ray(
    calls: list[CallInput],
    spec: ModelSpec,
    config: BatchConfig,
    workers: int,
    on_result: ResultFn,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
) -> None:
    """Analyse ``calls`` on the connected Ray cluster with Ray Data: ``read_binary_files`` (the paths
    must be readable where the read tasks run: a shared file system, or the same path on every node)
    -> a pool of ``workers`` actors that decode, window, gate and classify -> the chunks stream back
    here, where each call is assembled as soon as all its chunks are in."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the batch command shows its own
    ctx.execution_options.preserve_order = False
    by_path = {_key(c.path): c for c in calls}
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    ds = ray.data.read_binary_files(
        [c.path for c in calls], include_paths=True, num_cpus=0
    )  # reading is I/O: it never waits for the actors' CPUs
    ds = ds.map_batches(
        _PrepareAndClassify,
        fn_constructor_args=(spec, config, by_path),
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=workers),
        num_cpus=cpus_per_worker,
        num_gpus=gpus_per_worker or None,
        batch_format="numpy",
    )
    partial: dict[str, dict[int, Chunk]] = {}
    last: dict[str, int] = {}
    for row in ds.iter_rows():
        chunk = Chunk.from_row(row)
        got = partial.setdefault(chunk.call_id, {})
        got[chunk.index] = chunk
        if chunk.last:
            last[chunk.call_id] = chunk.index
        if chunk.call_id in last and len(got) == last[chunk.call_id] + 1:
            del partial[chunk.call_id], last[chunk.call_id]
            on_result(assemble_call(list(got.values()), config))
    for call_id in partial:  # cannot happen unless rows were lost: say so rather than hide it
        path = next(iter(partial[call_id].values())).path
        on_result(CallResult(call_id, path, error="incomplete: not every chunk came back from Ray"))


def _key(path) -> str:
    return str(Path(str(path)).resolve())


@dataclass
class BatchReport:
    """What a batch run did."""

    total: int = 0
    skipped: int = 0  # already done in OUT (resume)
    ok: int = 0
    failed: list[CallResult] = field(default_factory=list)
    audio_seconds: float = 0.0  # audio analysed in this run (all channels of a call count once)
    wall_seconds: float = 0.0
    table: Path | None = None
    rows: int = 0


def run_batch(
    calls: list[CallInput],
    out_dir: Path,
    spec: ModelSpec,
    config: BatchConfig,
    *,
    workers: int = 1,
    use_ray: bool = False,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    plots: str | None = None,
    webhook=None,
    progress: Callable[[CallResult], None] | None = None,
    predict: PredictFn | None = None,
) -> BatchReport:
    """Analyse every call of ``calls`` not yet done in ``out_dir``, write its timeline (and report
    with ``plots`` html|png), POST its alerts to ``webhook``, then write the summary table."""
    import time

    t0 = time.monotonic()
    out_dir.mkdir(parents=True, exist_ok=True)
    done = done_calls(out_dir, calls)
    todo = [c for c in calls if c.call_id not in done]
    report = BatchReport(total=len(calls), skipped=len(done))
    reported: set[str] = set()
    model = spec_identity(spec)

    def on_result(result: CallResult) -> None:
        reported.add(result.call_id)
        if result.ok:
            result.lines[-1]["model"] = model  # the summary line names the model that ran
            try:
                path = write_call(out_dir, result)
                if plots:
                    _plot(path, plots)
            except OSError as exc:
                result = CallResult(result.call_id, result.path, error=f"cannot write its timeline: {exc}")
        if result.ok:
            report.ok += 1
            report.audio_seconds += result.audio_seconds
            if webhook is not None:
                for line in result.lines:
                    if line.get("type") == "alert":
                        webhook.send(line)
        else:
            report.failed.append(result)
        if progress is not None:
            progress(result)

    engine_error = None
    if todo:
        try:
            if use_ray:
                run_ray(todo, spec, config, workers, on_result, cpus_per_worker, gpus_per_worker)
            else:
                run_local(todo, spec, config, workers, on_result, predict)
        except (KeyboardInterrupt, BatchError):
            raise
        except Exception as exc:  # the engine itself failed: what finished stays; the rest is reported
            if type(exc).__name__ in ("UsageError", "ModelOptionsError", "CheckpointError", "VadUnavailable"):
                raise
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            engine_error = f"{'Ray Data' if use_ray else 'the batch'} run failed: {type(exc).__name__}: {first}"[:500]
            log.error("%s", engine_error)
    for call in todo:
        if call.call_id not in reported:
            on_result(
                CallResult(
                    call.call_id,
                    call.path,
                    error=f"not analysed: {engine_error or 'the engine returned nothing for it'}",
                )
            )
    if plots:
        for call in calls:
            if call.call_id in done and not (out_dir / f"{call.call_id}.{plots}").exists():
                _plot(out_dir / f"{call.call_id}.jsonl", plots)
    report.table, report.rows = write_summary_table(out_dir, report.failed, model)
    report.wall_seconds = time.monotonic() - t0
    return report


def _plot(jsonl: Path, kind: str) -> None:
    from .report import write_report

    try:
        write_report(jsonl, jsonl.with_suffix(f".{kind}"))
    except Exception as exc:  # a report that cannot be drawn does not fail the call
        log.warning("no %s report for %s: %s", kind, jsonl.stem, exc)
