"""Inference on a Ray cluster for ``emostream serve --ray``: a Ray Serve deployment of the model and
the front end's worker that calls it (``emostream[scale]``; imported only with ``--ray``).

The websocket front end stays :class:`emostream.server.EmoServer` (protocols, auth, events, metrics,
page): only its inference worker changes. :class:`RayWorker` has the interface of
:class:`emostream.worker.InferenceWorker`, but instead of batching in-process it sends each call's
windows to the Serve deployment :class:`EmotionModel` through a ``DeploymentHandle``; the replicas
batch the requests of every call of every front end with ``@serve.batch`` (``max_batch`` windows,
``max_wait_ms``), and Serve's autoscaler adds and removes replicas (``min_replicas`` to
``max_replicas``, aiming at ``target_ongoing_requests`` per replica), each with ``cpus`` CPUs and
``gpus`` GPUs. Several front ends (one per node, behind a load balancer) share the deployment.

Each replica reports the model calls it ran in the answer to the first request of each batch, so
``emostream_inference_batch_size`` and ``emostream_inference_seconds`` still count windows per
model call, summed over the front ends.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import ray
from ray import serve

from .audio import WINDOW_SAMPLES
from .timeline import CLASSES
from .worker import ModelSpec, WorkerConfig, WorkerOverloaded, WorkerStats, WorkerStopped

log = logging.getLogger("emostream.scale")

APP_NAME = "emostream"


class ScaleError(RuntimeError):
    """Ray cannot be reached or the deployment cannot start: one line for the user."""


@dataclass(frozen=True)
class ServeConfig:
    """The Ray Serve deployment of the model."""

    app_name: str = APP_NAME
    min_replicas: int = 1
    max_replicas: int = 1  # > min_replicas: autoscaling between the two
    target_ongoing_requests: float = 16.0  # autoscaling target per replica (a request = one call's windows)
    cpus: float = 1.0  # per replica
    gpus: float = 0.0  # per replica (> 0: the model runs on CUDA there)
    max_batch: int = 32  # windows per model call (@serve.batch max_batch_size, in windows)
    max_wait_ms: float = 10.0  # @serve.batch batch_wait_timeout_s
    warm_up: bool = False  # warm every batch size up in each replica (default: batch 1)

    def __post_init__(self):
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError(f"replicas must be 1 <= min <= max, got {self.min_replicas}:{self.max_replicas}")
        if self.cpus < 0 or self.gpus < 0 or (self.cpus == 0 and self.gpus == 0):
            raise ValueError("a replica needs some CPUs or GPUs")
        if self.max_batch < 1 or self.max_wait_ms < 0 or not self.target_ongoing_requests > 0:
            raise ValueError("max batch must be >= 1, max wait >= 0, target requests > 0")

    def deployment_options(self) -> dict:
        options = {
            "ray_actor_options": {"num_cpus": self.cpus, "num_gpus": self.gpus},
            "max_ongoing_requests": max(4 * self.max_batch, 2 * int(self.target_ongoing_requests) + 1),
        }
        if self.max_replicas > self.min_replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "initial_replicas": self.min_replicas,
                "target_ongoing_requests": self.target_ongoing_requests,
            }
        else:
            options["num_replicas"] = self.min_replicas
        return options


def parse_replicas(text: str) -> tuple[int, int]:
    """``"2"`` -> (2, 2); ``"1:4"`` -> (1, 4) (autoscaling)."""
    lo, _, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi or lo)
    except ValueError:
        raise ValueError(f"replicas must be N or MIN:MAX, got {text!r}") from None
    if not 1 <= low <= high:
        raise ValueError(f"replicas must be N or MIN:MAX with 1 <= MIN <= MAX, got {text!r}")
    return low, high


def connect(address: str | None, num_cpus: int | None = None) -> bool:
    """Join Ray: ``None``/``"local"`` starts a new local instance here (even when this node belongs
    to a cluster), ``"auto"`` joins the cluster this node belongs to, ``"HOST:PORT"`` a cluster's GCS,
    ``"ray://HOST:10001"`` a remote one through Ray Client. Returns True when this call started a
    new local instance (the caller shuts it down again; a cluster that was joined is left alone)."""
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": False}
    started = address in (None, "", "local")
    if started:
        address = "local"
        if num_cpus:
            kwargs["num_cpus"] = num_cpus
    try:
        ray.init(address=address, **kwargs)
    except (ConnectionError, ValueError, RuntimeError, TimeoutError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = "a new local instance" if started else address
        raise ScaleError(f"cannot connect to Ray at {where}: {first}") from None
    return started


def _windows_in(requests: list[np.ndarray]) -> int:
    """@serve.batch's batch size: windows, not requests."""
    return sum(len(r) for r in requests)


@serve.deployment(name="EmotionModel")
class EmotionModel:
    """A model replica: ``predict(windows (n, 96000)) -> (probabilities (n, 7), model calls)``."""

    def __init__(self, spec: ModelSpec, max_batch: int, max_wait_ms: float, warm_up: bool):
        self.predict_fn, self.device, self.info = spec.load()
        self.max_batch = max_batch
        self.predict.set_max_batch_size(max_batch)
        self.predict.set_batch_wait_timeout_s(max_wait_ms / 1000)
        for n in range(1, max_batch + 1) if warm_up else [1]:
            self.predict_fn(np.zeros((n, WINDOW_SAMPLES), np.float32))

    def describe(self) -> dict:
        """The model's identity and device (for ``/metrics`` and the start-up line)."""
        return {**self.info, "device": self.device}

    def _run(self, windows: np.ndarray) -> tuple[np.ndarray, list[tuple[int, float]]]:
        out, calls = [], []
        for i in range(0, len(windows), self.max_batch):
            t0 = time.perf_counter()
            out.append(np.asarray(self.predict_fn(windows[i : i + self.max_batch]), np.float32))
            calls.append((len(out[-1]), time.perf_counter() - t0))
        return np.concatenate(out), calls

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_windows_in)
    async def predict(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, list[tuple[int, float]]]]:
        """One Serve batch: every waiting request's windows in one model call (or a few)."""
        probs, calls = await asyncio.to_thread(self._run, np.concatenate(requests))
        answers, pos = [], 0
        for k, r in enumerate(requests):
            answers.append((probs[pos : pos + len(r)], calls if k == 0 else []))
            pos += len(r)
        return answers


def deploy(spec: ModelSpec, config: ServeConfig, redeploy: bool = False) -> tuple[object, dict, bool]:
    """The handle of the running deployment ``config.app_name`` (started here unless it runs already,
    or always with ``redeploy``). Returns ``(handle, model description, deployed here)``."""
    running = False
    try:
        running = config.app_name in serve.status().applications
    except Exception:  # Serve not started on this cluster yet
        running = False
    deployed = False
    try:
        if running and not redeploy:
            handle = serve.get_app_handle(config.app_name)
        else:
            serve.start(proxy_location="Disabled")  # the front ends use handles; no HTTP proxy needed
            app = EmotionModel.options(**config.deployment_options()).bind(
                spec, config.max_batch, config.max_wait_ms, config.warm_up
            )
            handle = serve.run(app, name=config.app_name, route_prefix=None)
            deployed = True
        info = handle.describe.remote().result(timeout_s=600)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ScaleError(f"Ray Serve deployment {config.app_name!r} did not start: {first}") from None
    return handle, info, deployed


def shutdown(started_ray: bool, serve_used: bool = True) -> None:
    """Stop the local Ray instance this process started, with the deployment on it. On a cluster
    the deployment is left running for the other front ends (remove it with ``serve delete``)."""
    if started_ray:
        try:
            if serve_used:
                serve.shutdown()
        finally:
            ray.shutdown()


@dataclass
class RayWorker:
    """:class:`~emostream.worker.InferenceWorker`'s interface, backed by a Serve ``DeploymentHandle``."""

    handle: object
    config: WorkerConfig = field(default_factory=WorkerConfig)
    stats: WorkerStats = field(default_factory=WorkerStats)

    KEEP_BATCH_SIZES = 64

    def __post_init__(self):
        self.batch_observers: list = []
        self._pending = 0
        self._running = False

    async def start(self) -> None:
        self._running = True

    async def stop(self) -> None:
        self._running = False

    @property
    def pending(self) -> int:
        """Windows sent to the deployment and not answered yet."""
        return self._pending

    async def warm_up(self, sizes=None) -> float:
        """One request through the deployment (its replicas warm themselves up when they start)."""
        t0 = time.perf_counter()
        await self.infer(np.zeros((1, WINDOW_SAMPLES), np.float32))
        return time.perf_counter() - t0

    async def infer(self, windows: np.ndarray) -> np.ndarray:
        """Class probabilities ``(n, 7)`` for windows ``(n, samples)``, from the deployment."""
        windows = np.asarray(windows, dtype=np.float32)
        n = len(windows)
        if n == 0:
            return np.zeros((0, len(CLASSES)), dtype=np.float32)
        if not self._running:
            raise WorkerStopped("inference worker is not running")
        if self._pending + n > self.config.max_pending:
            self.stats.refused += n
            raise WorkerOverloaded(f"inference queue full ({self._pending} windows waiting)")
        self._pending += n
        step = self.config.max_batch
        try:
            answers = await asyncio.gather(
                *[self.handle.predict.remote(windows[i : i + step]) for i in range(0, n, step)]
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a replica died, the deployment is gone, ...: this request fails
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RuntimeError(f"inference failed: {first}") from None
        finally:
            self._pending -= n
        for _, calls in answers:
            for size, seconds in calls:
                self.stats.batches += 1
                self.stats.windows += size
                self.stats.busy_seconds += seconds
                self.stats.largest_batch = max(self.stats.largest_batch, size)
                self.stats.batch_sizes = (self.stats.batch_sizes + [size])[-self.KEEP_BATCH_SIZES :]
                for observe in self.batch_observers:
                    observe(size, seconds)
        return np.concatenate([probs for probs, _ in answers])
