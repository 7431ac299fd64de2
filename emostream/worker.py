"""One shared inference worker: micro-batches windows of all live calls into model calls.

Calls ``await worker.infer(windows)`` from the event loop; the worker collects requests until
``max_batch`` windows are waiting or the first one has waited ``max_wait_ms``, runs the model in a
single background thread (so a slow batch never blocks socket I/O), and hands each caller its rows.
Pending work is bounded: a request that would exceed ``max_pending`` windows is refused with
:class:`WorkerOverloaded` and counted, never silently dropped.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from .audio import WINDOW_SAMPLES
from .timeline import CLASSES

PredictFn = Callable[[np.ndarray], np.ndarray]


class WorkerOverloaded(RuntimeError):
    """More windows are waiting than the worker accepts; the caller should shed load."""


class WorkerStopped(RuntimeError):
    """The worker was stopped while a request was waiting."""


@dataclass(frozen=True)
class WorkerConfig:
    """Micro-batching limits."""

    max_batch: int = 32  # windows per model call
    max_wait_ms: float = 10.0  # how long the first waiting window may wait for company
    max_pending: int = 4096  # windows queued or running before requests are refused

    def __post_init__(self):
        if self.max_batch < 1:
            raise ValueError(f"max batch must be >= 1, got {self.max_batch}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max wait must be >= 0 ms, got {self.max_wait_ms}")
        if self.max_pending < self.max_batch:
            raise ValueError("max pending must be at least max batch")


@dataclass
class WorkerStats:
    """Counters for monitoring and tests."""

    batches: int = 0
    windows: int = 0
    refused: int = 0
    largest_batch: int = 0
    busy_seconds: float = 0.0
    batch_sizes: list[int] = field(default_factory=list)  # the last few, newest last

    def as_dict(self) -> dict:
        return {
            "batches": self.batches,
            "windows": self.windows,
            "refused": self.refused,
            "largest_batch": self.largest_batch,
            "busy_seconds": round(self.busy_seconds, 3),
        }


@dataclass
class _Job:
    windows: np.ndarray
    future: asyncio.Future


class InferenceWorker:
    """Micro-batching front of a ``predict(windows (B, N) float32) -> (B, 7)`` callable."""

    KEEP_BATCH_SIZES = 64

    def __init__(self, predict: PredictFn, config: WorkerConfig = WorkerConfig()):
        self.predict = predict
        self.config = config
        self.stats = WorkerStats()
        self.batch_observers: list[Callable[[int, float], None]] = []  # (windows, seconds) per batch
        self._queue: asyncio.Queue[_Job] | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._pending = 0

    async def start(self) -> None:
        """Start the batching loop on the running event loop."""
        if self._task is not None:
            return
        self._queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="emostream-infer")
        self._task = asyncio.create_task(self._run(), name="emostream-inference")

    async def stop(self) -> None:
        """Stop the loop; waiting requests fail with :class:`WorkerStopped`."""
        if self._task is None:
            return
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None
        while self._queue is not None and not self._queue.empty():
            job = self._queue.get_nowait()
            if not job.future.done():
                job.future.set_exception(WorkerStopped("inference worker stopped"))
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def warm_up(self, sizes: Iterable[int] | None = None) -> float:
        """Run the model once per batch size (default 1..max_batch) on silent windows, in the worker
        thread, so that the first real batches of each size are not slow (oneDNN builds kernels per
        shape: a first call costs about three later ones). Returns the seconds it took."""
        if self._executor is None:
            raise WorkerStopped("inference worker is not running")
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        for n in range(1, self.config.max_batch + 1) if sizes is None else sizes:
            await loop.run_in_executor(self._executor, self.predict, np.zeros((n, WINDOW_SAMPLES), np.float32))
        return time.perf_counter() - t0

    @property
    def pending(self) -> int:
        """Windows queued or in the running batch."""
        return self._pending

    async def infer(self, windows: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, 7)`` for windows ``(n, samples)``, batched with other callers."""
        windows = np.asarray(windows, dtype=np.float32)
        n = len(windows)
        if n == 0:
            return np.zeros((0, len(CLASSES)), dtype=np.float32)
        if self._task is None or self._queue is None:
            raise WorkerStopped("inference worker is not running")
        if self._pending + n > self.config.max_pending:
            self.stats.refused += n
            raise WorkerOverloaded(f"inference queue full ({self._pending} windows waiting)")
        self._pending += n
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(windows, future))
        try:
            return await future
        finally:
            self._pending -= n

    async def _collect(self) -> list[_Job]:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        jobs = [await self._queue.get()]
        count = len(jobs[0].windows)
        deadline = loop.time() + self.config.max_wait_ms / 1000
        while count < self.config.max_batch:
            try:
                job = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    job = await asyncio.wait_for(self._queue.get(), timeout)
                except asyncio.TimeoutError:
                    break
            jobs.append(job)
            count += len(job.windows)
        return jobs

    def _predict_batches(self, windows: np.ndarray) -> tuple[np.ndarray, float]:
        t0 = time.perf_counter()
        step = self.config.max_batch
        out = [np.asarray(self.predict(windows[i : i + step])) for i in range(0, len(windows), step)]
        return np.concatenate(out), time.perf_counter() - t0

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [j for j in await self._collect() if not j.future.done()]
            if not jobs:
                continue
            batch = np.concatenate([j.windows for j in jobs])
            try:
                probs, seconds = await loop.run_in_executor(self._executor, self._predict_batches, batch)
            except asyncio.CancelledError:
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(WorkerStopped("inference worker stopped"))
                raise
            except Exception as exc:  # the model failed: every caller of this batch hears why
                for j in jobs:
                    if not j.future.done():
                        j.future.set_exception(RuntimeError(f"inference failed: {exc}"))
                continue
            self.stats.batches += 1
            self.stats.windows += len(batch)
            self.stats.busy_seconds += seconds
            self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
            self.stats.batch_sizes = (self.stats.batch_sizes + [len(batch)])[-self.KEEP_BATCH_SIZES :]
            for observe in self.batch_observers:
                observe(len(batch), seconds)
            pos = 0
            for j in jobs:
                n = len(j.windows)
                if not j.future.done():
                    j.future.set_result(probs[pos : pos + n])
                pos += n


def constant_predictor(probabilities: np.ndarray | list[float] | None = None) -> PredictFn:
    """A cheap deterministic ``predict``: the same probabilities for every window.

    Useful to run the server without a model (protocol checks, load tests); default is 0.7 Neutral.
    """
    if probabilities is None:
        probabilities = [0.05, 0.05, 0.05, 0.05, 0.7, 0.05, 0.05]
    row = np.asarray(probabilities, dtype=np.float32)
    if row.shape != (len(CLASSES),) or not np.isclose(row.sum(), 1.0, atol=1e-3):
        raise ValueError(f"need {len(CLASSES)} probabilities summing to 1")

    def predict(windows: np.ndarray) -> np.ndarray:
        return np.tile(row, (len(windows), 1))

    return predict


@dataclass(frozen=True)
class ModelSpec:
    """Which model to load, as a small picklable value: what a worker process, a Ray Data actor or a
    Ray Serve replica needs to load the same model as the command that started it."""

    checkpoint: str | None = None  # checkpoint directory; None = the shipped model
    device: str = "auto"  # auto | cpu | cuda[:N]
    fp32: bool = False  # no bf16/fp16 autocast
    backend: str = "auto"  # auto (int8 on a CPU: emostream.int8) | torch | onnx | constant (the fixed Neutral answer)
    onnx: str | None = None  # the ONNX file for backend onnx
    threads: int | None = None  # intra-op threads (torch and ONNX Runtime) in the loading process (None: all cores)

    @classmethod
    def from_args(cls, args, threads: int | None = None) -> "ModelSpec":
        """From the command line's model options (``--no-model`` gives the constant predictor)."""
        if getattr(args, "no_model", False):
            return cls(backend="constant", threads=threads)
        backend = getattr(args, "backend", None) or ("onnx" if getattr(args, "onnx", None) else "auto")
        return cls(
            checkpoint=args.checkpoint,
            device=args.device,
            fp32=args.fp32,
            backend=backend,
            onnx=getattr(args, "onnx", None),
            threads=threads,
        )

    def load(self) -> tuple[PredictFn, str, dict[str, str]]:
        """``(predict, device name, model info for /metrics)``; raises :class:`~emostream.loading.ModelOptionsError`
        or :class:`~emostream.model.CheckpointError` (one-line messages)."""
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)
        if self.backend == "constant":
            return constant_predictor(), "none (--no-model)", {"name": "none"}
        from .loading import load_predictor, model_info

        predictor = load_predictor(
            self.checkpoint,
            device=self.device,
            fp32=self.fp32,
            backend=self.backend,
            onnx=self.onnx,
            threads=self.threads,
        )
        return (
            predictor.predict,
            str(predictor.device),
            model_info(predictor, checkpoint=self.checkpoint, onnx=self.onnx),
        )
