"""What the commands share: the one-line usage error, option groups used by several commands, and
the model, speech gate and webhook built from parsed options."""

from __future__ import annotations

import argparse
import re
import sys

WEBHOOK_CLOSE_SECONDS = 30.0  # replay/batch: how long queued alert POSTs may still take at the end


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit code 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not usage + traceback
        raise UsageError(message)


def model_device(text: str) -> str:
    """``--device``: the model's device in every command (mic's sound card is ``--input-device``)."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model device: auto, cpu, cuda or cuda:N (mic's sound card is --input-device)"
        )
    return text


def backend_args(sp) -> None:
    """``--backend``/``--onnx``: which runtime runs the model."""
    sp.add_argument(
        "--backend",
        choices=("auto", "torch", "onnx"),
        default=None,
        help="auto (default: on a CPU the checkpoint's int8 model, built once at first use, else torch), "
        "torch, or onnx (the ONNX Runtime file given by --onnx)",
    )
    sp.add_argument(
        "--onnx",
        metavar="MODEL.onnx",
        default=None,
        help="ONNX model made by 'emostream export --onnx' (implies --backend onnx)",
    )


def alert_args(sp) -> None:
    """``--alert RULE``: escalation rules, and ``--alert-webhook URL`` to POST them."""
    sp.add_argument(
        "--alert",
        action="append",
        default=[],
        metavar="RULE",
        type=alert_rule,
        help='escalation rule per channel, e.g. "Angry>=0.7 for 10s" (repeatable); it clears after 5 s '
        "below the threshold minus 0.1 (silence counts as below) unless the rule says, e.g. "
        '"Angry>=0.7 for 10s clear below 0.5 for 8s"',
    )
    sp.add_argument(
        "--alert-webhook",
        metavar="URL",
        default=None,
        help="also POST every alert (raised and cleared) as JSON to this http(s) URL, in the background, "
        "retried with backoff; failures are logged and counted, never stop a call",
    )
    sp.add_argument(
        "--alert-webhook-token",
        metavar="TOKEN",
        default=None,
        help="send 'Authorization: Bearer TOKEN' with each POST (default: $EMOSTREAM_WEBHOOK_TOKEN)",
    )


def alert_webhook_config(args):
    """The :class:`~emostream.webhook.WebhookConfig` of ``--alert-webhook``, or None."""
    from ..webhook import WebhookConfig

    if not args.alert_webhook:
        return None
    if not args.alert:
        raise UsageError("--alert-webhook needs at least one --alert rule")
    token = env_default(args.alert_webhook_token, "EMOSTREAM_WEBHOOK_TOKEN")
    try:
        return WebhookConfig(args.alert_webhook, headers=(("Authorization", f"Bearer {token}"),) if token else ())
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def webhook_report(webhook) -> None:
    """One stderr line when some alert POSTs did not get through."""
    s = webhook.stats
    if s.failed or s.dropped:
        print(
            f"emostream: alert webhook: {s.delivered} delivered, {s.failed} failed, {s.dropped} dropped"
            f" (last error: {s.last_error})",
            file=sys.stderr,
            flush=True,
        )


def alert_rule(text: str):
    from ..alerts import AlertRule

    try:
        return AlertRule.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def vad_args(sp) -> None:
    """``--vad``: which windows are classified."""
    sp.add_argument(
        "--vad",
        choices=("silero", "energy", "off"),
        default="silero",
        help="speech gate: silero (neural voice activity detector, default), energy (any sound "
        "above -50 dBFS) or off (classify every window)",
    )


def port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0-65535: {text!r}")
    return value


def vad_config(args):
    from ..vad import VadConfig, VadUnavailable, silero_session

    config = VadConfig.named(args.vad)
    if config.kind == "silero":
        try:
            silero_session()
        except VadUnavailable as exc:
            raise UsageError(str(exc)) from None
    return config


def env_default(value: str | None, name: str) -> str | None:
    import os

    return value if value is not None else (os.environ.get(name) or None)


def load_command_predictor(args):
    """The model of the command's model options (:func:`emostream.loading.load_predictor`)."""
    from ..loading import ModelOptionsError, load_predictor

    try:
        return load_predictor(
            args.checkpoint,
            device=args.device,
            fp32=getattr(args, "fp32", False),
            backend=getattr(args, "backend", None),
            onnx=getattr(args, "onnx", None),
        )
    except ModelOptionsError as exc:
        raise UsageError(str(exc)) from None


def command_model_info(predictor, args) -> dict[str, str]:
    """:func:`emostream.loading.model_info` for the command's model options."""
    from ..loading import model_info

    return model_info(predictor, checkpoint=args.checkpoint, onnx=getattr(args, "onnx", None))


def import_scale(flag: str = "--ray"):
    try:
        from .. import scale
    except ImportError as exc:
        raise UsageError(f"{flag} needs emostream[scale] (pip install 'emostream[scale]'): {exc}") from None
    return scale


def require_model_files(spec) -> None:
    """The checkpoint/ONNX file exists here (:func:`emostream.loading.check_model_files`)."""
    from ..loading import ModelOptionsError, check_model_files

    try:
        check_model_files(backend=spec.backend, checkpoint=spec.checkpoint, onnx=spec.onnx)
    except ModelOptionsError as exc:
        raise UsageError(str(exc)) from None
