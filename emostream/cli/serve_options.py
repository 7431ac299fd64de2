"""What ``serve`` is told, shared by the one-process server (:mod:`emostream.cli.live`) and the
fleet's front ends (:mod:`emostream.cli.fleet`): the server configuration, the logs, the Ray Serve
deployment of the model."""

from __future__ import annotations

import sys
from pathlib import Path

from .common import (
    UsageError,
    alert_webhook_config,
    env_default,
    import_scale,
    require_model_files,
    vad_config,
)


def serve_config(args):
    """The :class:`~emostream.server_config.ServerConfig` of ``serve``'s options (UsageError if invalid)."""
    from ..auth import AudioHookKey
    from ..server import ServerConfig
    from ..worker import WorkerConfig

    try:
        keys = tuple(AudioHookKey.parse(k) for k in args.audiohook_key)
        config = ServerConfig(
            host=args.host,
            port=args.port,
            token=env_default(args.token, "EMOSTREAM_TOKEN"),
            max_calls=args.max_calls,
            events_dir=Path(args.events_dir) if args.events_dir else None,
            hop_seconds=args.hop,
            min_seconds=args.min_seconds,
            smooth=args.smooth,
            vad=vad_config(args),
            idle_timeout=args.idle_timeout,
            start_timeout=args.start_timeout,
            max_unstarted=args.max_unstarted,
            max_call_seconds=args.max_call_minutes * 60,
            max_message_bytes=args.max_message_kb * 1024,
            twilio_auth_token=env_default(args.twilio_auth_token, "TWILIO_AUTH_TOKEN"),
            public_url=args.public_url,
            audiohook_keys=keys,
            worker=WorkerConfig(
                max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_pending=max(4096, args.max_batch)
            ),
            warm_up=args.warm_up,
            analyse=args.analyse,
            record_dir=Path(args.record) if args.record else None,
            events_retention_days=args.events_retention_days,
            record_retention_days=args.record_retention_days,
            alerts=tuple(args.alert),
            alert_webhook=alert_webhook_config(args),
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    for flag, directory in (("--events-dir", config.events_dir), ("--record", config.record_dir)):
        if directory is not None and directory.exists() and not directory.is_dir():
            raise UsageError(f"{flag} is not a directory: {directory}")
    return config


def configure_serve_logs(args) -> None:
    """JSON logs are for a log pipeline: everything at INFO. Text logs stay quiet unless --verbose."""
    import logging

    from ..logs import configure as configure_logs

    configure_logs(args.log_format, logging.INFO if args.verbose or args.log_format == "json" else logging.WARNING)


def ray_deploy(args, connect: bool = True):
    """Join Ray (unless ``connect`` is False: joined already) and start or reuse the Serve deployment
    of ``serve``'s model options. Returns ``(handle, model description, started a local Ray)``."""
    from ..worker import ModelSpec

    scale = import_scale()
    try:
        low, high = scale.parse_replicas(args.ray_replicas)
        serve_config = scale.ServeConfig(
            app_name=args.ray_app,
            min_replicas=low,
            max_replicas=high,
            target_ongoing_requests=args.ray_target_requests,
            cpus=args.ray_cpus,
            gpus=args.ray_gpus,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            warm_up=args.warm_up,
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    device = args.device if args.device != "auto" else ("cuda" if args.ray_gpus > 0 else "cpu")
    spec = ModelSpec.from_args(args)
    spec = ModelSpec(
        **{
            **spec.__dict__,
            "device": device,
            "checkpoint": str(Path(args.checkpoint).resolve()) if args.checkpoint else None,
            "onnx": str(Path(args.onnx).resolve()) if args.onnx else None,
            "threads": max(1, int(args.ray_cpus)) if args.ray_gpus == 0 else None,
        }
    )
    if spec.backend != "constant":
        require_model_files(spec)
    started = False
    try:
        if connect:
            started = scale.connect(args.ray)
        handle, info, deployed = scale.deploy(spec, serve_config, args.ray_redeploy)
    except scale.ScaleError as exc:
        if started:
            scale.shutdown(started)
        raise UsageError(str(exc)) from None
    if deployed:
        print(
            f"emostream serve: deployed Ray Serve application {serve_config.app_name!r} ({args.ray_replicas} "
            f"replica(s), {serve_config.cpus:g} CPU / {serve_config.gpus:g} GPU each, model on {info.get('device')})",
            file=sys.stderr,
            flush=True,
        )
    else:
        print(
            f"emostream serve: using the running Ray Serve application {serve_config.app_name!r} (model on "
            f"{info.get('device')}; its replica settings stay as deployed, --ray-redeploy replaces them)",
            file=sys.stderr,
            flush=True,
        )
    return handle, info, started
