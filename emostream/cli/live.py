"""The live commands: ``serve``, ``send``, ``watch`` and ``mic``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from .common import (
    UsageError,
    command_model_info,
    env_default,
    import_scale,
    load_command_predictor,
    vad_config,
)
from .serve_options import configure_serve_logs, ray_deploy, serve_config


def cmd_serve(args) -> int:
    import asyncio

    from ..server import EmoServer
    from ..worker import constant_predictor

    config = serve_config(args)
    configure_serve_logs(args)
    if args.workers > 1:
        if args.dashboard:
            raise UsageError("--dashboard shows one process's calls; with --workers, run emostream watch URL")
        from .fleet import run_fleet

        return run_fleet(args, config)
    ray_started, worker = False, None
    if args.ray is not None:
        worker, device, model_info, ray_started = ray_worker(args, config)
        predict = None
    elif args.no_model:
        predict, device, model_info = constant_predictor(), "none (--no-model)", {"name": "none"}
    else:
        predictor = load_command_predictor(args)
        predict, device, model_info = predictor.predict, str(predictor.device), command_model_info(predictor, args)
    server = EmoServer(config, predict, device=device, model_info=model_info, worker=worker)

    async def run() -> None:
        import signal

        # A service manager stops the server with SIGTERM: finish like Ctrl-C (calls get their summaries).
        main_task = asyncio.current_task()
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
        except (NotImplementedError, RuntimeError):  # not the main thread / no signal support
            pass
        try:
            port = await server.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {config.host}:{config.port}: {exc.strerror or exc}") from None
        auth = "token required" if config.token else "no token (set --token or EMOSTREAM_TOKEN)"
        print(
            f"emostream serve: listening on ws://{config.host}:{port} (/v1/pcm /v1/twilio /v1/audiohook "
            f"/v1/events); model on {device}; {auth}; supervisor page http://{config.host}:{port}/",
            file=sys.stderr,
            flush=True,
        )
        view = None
        if args.dashboard:
            from rich.console import Console

            from ..watch import PlainWatcher, SupervisorView

            console = Console()
            view = SupervisorView(f"serve :{port}", console) if console.is_terminal else PlainWatcher()
            server.hub.listeners.append(view.update)
            view.__enter__()
        try:
            await asyncio.Future()
        finally:
            await server.stop()
            if view is not None:
                view.__exit__(None, None, None)

    try:
        asyncio.run(run())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("emostream serve: stopped", file=sys.stderr)
    finally:
        if ray_started:
            from ..scale import shutdown

            shutdown(ray_started)
    return 0


def ray_worker(args, config):
    """``serve --ray``: join Ray, start (or reuse) the Serve deployment, and the worker that calls it."""
    scale = import_scale()
    handle, info, started = ray_deploy(args)
    model_info = {k: v for k, v in info.items() if k != "device"}
    return scale.RayWorker(handle, config.worker), f"ray:{info.get('device')}", model_info, started


def cmd_send(args) -> int:
    import asyncio

    from ..auth import AudioHookKey
    from ..client import SendError, SendOptions, endpoint_url, send_file

    try:
        endpoint_url(args.url, args.protocol)
        key = AudioHookKey.parse(args.audiohook_key) if args.audiohook_key else None
    except (SendError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    names = args.channel_names
    if not Path(args.file).exists():
        raise UsageError(f"no such file: {args.file}")
    hint = ""
    if names is None and args.protocol == "pcm":
        from ..audio import AudioError, audio_info

        try:
            if audio_info(args.file).channels == 1:
                hint = (
                    f"; {args.file} is mono, sent as channel 'ch0' and serve analyses the customer by default: "
                    "add --channel-names customer"
                )
        except AudioError:
            pass  # send_file says why the file cannot be read
    options = SendOptions(
        protocol=args.protocol,
        fast=args.fast,
        token=env_default(args.token, "EMOSTREAM_TOKEN"),
        call_id=args.call_id,
        encoding=args.encoding,
        sample_rate=args.rate,
        channel_names=names,
        audiohook_key=key,
    )

    def show(message: dict) -> None:
        if not args.quiet or message.get("type") == "summary":
            print(json.dumps(message), flush=True)

    try:
        result = asyncio.run(send_file(args.file, args.url, options, show))
    except SendError as exc:
        raise UsageError(str(exc)) from None
    if result.summary is None:
        reason = result.close_reason or "connection closed"
        errors = [m.get("message") for m in result.messages if m.get("type") == "error"]
        print(
            f"emostream: error: call ended without a summary (close {result.close_code}: "
            f"{errors[0] if errors else reason}){hint}",
            file=sys.stderr,
        )
        return 1
    return 0


def cmd_watch(args) -> int:
    import asyncio

    from websockets.exceptions import InvalidStatus

    from ..watch import PlainWatcher, SupervisorView, events_url, watch

    try:
        events_url(args.url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    from rich.console import Console

    console = Console()
    view = SupervisorView(args.url, console) if (not args.no_dashboard and console.is_terminal) else PlainWatcher()
    try:
        with view:
            closed = asyncio.run(watch(args.url, view.update, env_default(args.token, "EMOSTREAM_TOKEN"), args.call_id))
    except InvalidStatus as exc:
        raise UsageError(f"server refused the connection: HTTP {exc.response.status_code}") from None
    except (OSError, asyncio.TimeoutError) as exc:
        raise UsageError(f"cannot connect to {args.url}: {exc or type(exc).__name__}") from None
    if closed is not None:  # the server went away (stopped, restarted, or the network dropped)
        print(f"emostream: watch: the server closed the connection ({closed})", file=sys.stderr, flush=True)
        return 1
    return 0


def cmd_mic(args) -> int:
    from ..analyzer import AnalyzerConfig
    from ..mic import MicError, MicOptions, list_input_devices, run_mic
    from ..model_files import model_identity
    from ..stream import StreamConfig

    try:
        if args.list_devices:
            for d in list_input_devices():
                print(f"{d['index']}\t{d['name']}\t{d['channels']} ch\t{d['rate']} Hz")
            return 0
        try:
            stream = StreamConfig(hop_seconds=args.hop, min_seconds=args.min_seconds)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            model = model_identity(args.checkpoint, getattr(args, "onnx", None))
        except OSError:
            model = None  # no weights there: loading the model says so
        options = MicOptions(
            input_device=args.input_device,
            rate=args.rate,
            channels=args.channels,
            seconds=args.seconds,
            stream=stream,
            analyzer=AnalyzerConfig(smooth=args.smooth, vad=vad_config(args)),
            events=args.events,
            dashboard=not args.no_dashboard,
            model=model,
        )
        return run_mic(options, lambda: load_command_predictor(args))  # says why a model cannot load
    except MicError as exc:
        raise UsageError(str(exc)) from None
