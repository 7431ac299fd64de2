"""``emostream serve --workers N``: N front-end processes on one port, one model, one view.

The supervisor (this process) joins Ray (a local instance it starts, or ``--ray ADDRESS``), deploys
the model once as the Ray Serve application of ``serve --ray`` (none with ``--no-model``), starts
the fleet registry (:class:`emostream.fleet.FleetRegistry`, a named actor, shared by every front end
that joins the same cluster and application name) and spawns N front ends. Each is a full
:class:`~emostream.server.EmoServer` bound with SO_REUSEPORT to the same port (the kernel spreads new
connections over them), whose model calls go to the Serve deployment and whose calls, events and
statuses go through the registry. Prometheus counters are in multiprocess mode (a directory the
supervisor makes and removes).

A front end that exits unasked (killed, crashed) is restarted; the registry ends its live calls with
a summary of every event it had sent (their clients saw the connection drop), which the supervisor
appends to each call's JSONL file. A front end that dies within ``QUICK_EXIT_SECONDS`` of starting
``QUICK_EXITS`` times in a row stops the fleet. SIGTERM or Ctrl-C stops every front end (their calls
end with summaries, as ``serve`` alone does), then the registry and the local Ray instance.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from .common import UsageError, import_scale

log = logging.getLogger("emostream.fleet")

START_TIMEOUT = 120.0  # seconds for every front end to listen
STOP_TIMEOUT = 30.0  # seconds front ends get to end their calls on SIGTERM
QUICK_EXIT_SECONDS = 10.0
QUICK_EXITS = 3
CHECK_SECONDS = 0.25


def registry_name(app: str) -> str:
    from ..fleet import REGISTRY_NAME

    return f"{REGISTRY_NAME}-{app}"


def reserve_port(host: str, port: int) -> socket.socket:
    """A socket bound (not listening) with SO_REUSEPORT to ``host:port`` (port 0: a free one): it
    checks the port is free for the front ends and keeps it while they come and go."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def front_end_main(args, worker: int, port: int, ray_address: str, ready) -> None:
    """One front end (a spawned process): ``serve``'s server on the shared port, joined to the fleet."""
    import asyncio

    import ray

    from ..fleet import NAMESPACE, FleetLink
    from ..server import EmoServer
    from ..worker import constant_predictor
    from .serve_options import configure_serve_logs, serve_config

    configure_serve_logs(args)
    try:
        config = replace(serve_config(args), port=port, reuse_port=True)
        ray.init(address=ray_address, log_to_driver=False, logging_level=logging.WARNING)
        registry = ray.get_actor(registry_name(args.ray_app), namespace=NAMESPACE)
        worker_obj = predict = None
        if args.no_model:
            predict, device, model_info = constant_predictor(), "none (--no-model)", {"name": "none"}
        else:
            from ray import serve

            from ..scale import RayWorker

            handle = serve.get_app_handle(args.ray_app)
            info = handle.describe.remote().result(timeout_s=600)
            device, model_info = f"ray:{info.get('device')}", {k: v for k, v in info.items() if k != "device"}
            worker_obj = RayWorker(handle, config.worker)
        fleet = FleetLink(registry, worker, config.max_events_kept)
        server = EmoServer(config, predict, device=device, model_info=model_info, worker=worker_obj, fleet=fleet)
    except Exception as exc:  # one line to the supervisor's stderr, exit 2
        print(
            f"emostream: error: front end {worker}: {str(exc).splitlines()[0] if str(exc) else exc!r}", file=sys.stderr
        )
        sys.exit(2)

    async def run() -> None:
        # SIGTERM from the supervisor and SIGINT from a terminal's Ctrl-C (both may come): each only
        # asks once for the stop, which is never cancelled halfway (calls end with their summaries)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await server.start()
        except OSError as exc:
            print(f"emostream: error: front end {worker}: cannot listen: {exc.strerror or exc}", file=sys.stderr)
            sys.exit(2)
        ready.set()
        await stop.wait()
        await server.stop()

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
    finally:
        ray.shutdown()


class Fleet:
    """The supervisor's front ends: start, watch (restart, end a lost one's calls), stop."""

    def __init__(self, args, config, ray_address: str, registry, model_info: dict):
        self.args = args
        self.config = config
        self.ray_address = ray_address
        self.registry = registry
        self.model_info = model_info
        self.ctx = multiprocessing.get_context("spawn")
        self.procs: dict[int, multiprocessing.Process] = {}
        self.ready: dict[int, object] = {}  # kept: a child unpickles its event after spawn returns
        self.started_at: dict[int, float] = {}
        self.quick_exits: dict[int, int] = {}
        self.lost_calls = 0

    def spawn(self, worker: int, port: int) -> tuple[multiprocessing.Process, object]:
        ready = self.ctx.Event()
        proc = self.ctx.Process(
            target=front_end_main,
            args=(self.args, worker, port, self.ray_address, ready),
            name=f"emostream-front-end-{worker}",
            daemon=False,
        )
        proc.start()
        self.procs[worker] = proc
        self.ready[worker] = ready
        self.started_at[worker] = time.monotonic()
        return proc, ready

    def wait_ready(self, pending: dict[int, tuple]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while pending:
            for worker, (proc, ready) in list(pending.items()):
                if ready.is_set():
                    del pending[worker]
                elif not proc.is_alive():
                    raise UsageError(f"front end {worker} exited while starting (exit code {proc.exitcode})")
            if time.monotonic() > deadline:
                raise UsageError(f"front ends {sorted(pending)} did not start within {START_TIMEOUT:g} s")
            time.sleep(0.05)

    def end_lost_calls(self, worker: int) -> int:
        """The registry ends the live calls of a front end that died; their summaries go to the files."""
        import ray

        from ..timeline import JsonlWriter

        try:
            summaries = ray.get(self.registry.worker_lost.remote(worker, self.model_info), timeout=30)
        except Exception as exc:
            log.error("front end %d: its calls could not be ended: %s", worker, exc)
            return 0
        if self.config.events_dir is not None:
            for summary in summaries:
                path = Path(self.config.events_dir) / f"{summary['call_id']}.jsonl"
                try:
                    with open(path, "a", encoding="utf-8") as f:
                        JsonlWriter(f).write(summary)
                except OSError as exc:
                    log.error("call %s: summary not written: %s", summary["call_id"], exc)
        return len(summaries)

    def check(self, port: int) -> None:
        """Restart front ends that exited; raises UsageError when one keeps dying at start."""
        for worker, proc in list(self.procs.items()):
            if proc.is_alive():
                continue
            lived = time.monotonic() - self.started_at[worker]
            ended = self.end_lost_calls(worker)
            self.lost_calls += ended
            print(
                f"emostream serve: front end {worker} (pid {proc.pid}) exited with code {proc.exitcode} after "
                f"{lived:.0f} s; {ended} call(s) ended with a summary; restarting it",
                file=sys.stderr,
                flush=True,
            )
            self.quick_exits[worker] = self.quick_exits.get(worker, 0) + 1 if lived < QUICK_EXIT_SECONDS else 0
            if self.quick_exits[worker] >= QUICK_EXITS:
                raise UsageError(
                    f"front end {worker} exited {QUICK_EXITS} times within {QUICK_EXIT_SECONDS:g} s of starting"
                )
            self.spawn(worker, port)

    def stop(self) -> None:
        """SIGTERM to every front end (calls end with summaries), then kill what is left."""
        for proc in self.procs.values():
            if proc.is_alive():
                try:
                    os.kill(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + STOP_TIMEOUT
        for worker, proc in self.procs.items():
            proc.join(max(0.1, deadline - time.monotonic()))
            if proc.is_alive():
                proc.kill()
                proc.join(5)
                self.end_lost_calls(worker)


def run_fleet(args, config) -> int:
    """``serve --workers N`` (N > 1): the supervisor; returns when stopped (SIGTERM, Ctrl-C)."""
    scale = import_scale("--workers")
    import ray

    from ..fleet import NAMESPACE, FleetRegistry

    workers = args.workers
    port_sock = reserve_port(config.host, config.port)
    port = port_sock.getsockname()[1]
    metrics_dir = tempfile.mkdtemp(prefix="emostream-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir  # the front ends inherit it
    started = False
    fleet = None
    stopping = False

    def stop_signal(signum, frame):
        nonlocal stopping
        stopping = True

    previous: dict = {}
    try:
        try:
            started = scale.connect(args.ray, num_cpus=None)
        except scale.ScaleError as exc:
            raise UsageError(str(exc)) from None
        # after ray.init, which installs its own SIGTERM handler in a driver
        previous = {s: signal.signal(s, stop_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        ray_address = ray.get_runtime_context().gcs_address
        if args.no_model:
            model_info, device = {"name": "none"}, "none (--no-model)"
        else:
            from .serve_options import ray_deploy

            _, info, _ = ray_deploy(args, connect=False)
            model_info = {k: v for k, v in info.items() if k != "device"}
            device = f"ray:{info.get('device')}"
        registry = (
            ray.remote(FleetRegistry)
            .options(
                name=registry_name(args.ray_app),
                namespace=NAMESPACE,
                get_if_exists=True,
                lifetime=None if started else "detached",
                num_cpus=0,
                max_concurrency=1000,
                max_restarts=-1,  # Ray starts it again if its process dies; front ends join it again
            )
            .remote(config.max_events_kept)
        )
        fleet = Fleet(args, config, ray_address, registry, model_info)
        first = ray.get(registry.claim.remote(workers), timeout=60)  # numbers unique across hosts
        fleet.wait_ready({k: fleet.spawn(k, port) for k in range(first, first + workers)})
        auth = "token required" if config.token else "no token (set --token or EMOSTREAM_TOKEN)"
        pids = ", ".join(str(p.pid) for p in fleet.procs.values())
        print(
            f"emostream serve: listening on ws://{config.host}:{port} (/v1/pcm /v1/twilio /v1/audiohook "
            f"/v1/events); {workers} front ends (pids {pids}); model on {device}; {auth}; supervisor page "
            f"http://{config.host}:{port}/",
            file=sys.stderr,
            flush=True,
        )
        while not stopping:
            time.sleep(CHECK_SECONDS)
            if not stopping:
                fleet.check(port)
        print("emostream serve: stopping the front ends", file=sys.stderr, flush=True)
        return 0
    finally:
        if fleet is not None:
            fleet.stop()
        for s, handler in previous.items():
            signal.signal(s, handler)
        port_sock.close()
        try:
            if started:
                scale.shutdown(started, serve_used=not args.no_model)
            else:
                ray.shutdown()
        finally:
            shutil.rmtree(metrics_dir, ignore_errors=True)
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        print("emostream serve: stopped", file=sys.stderr, flush=True)
