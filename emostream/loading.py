"""Model loading: which runtime (torch or ONNX Runtime) runs which model file, and what to report about it.

Every entry point that needs a model (the CLI, the server, batch workers, Ray replicas, the Python
API) loads it through :func:`load_predictor`, so a model option means the same thing everywhere.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .model_files import default_checkpoint, missing_model_message

# auto: on a CPU the checkpoint's int8 ONNX model (emostream.int8, built at first use), else torch
BACKENDS = ("auto", "torch", "onnx")
log = logging.getLogger("emostream.model")
GPU_DEVICE_NODES = ("/dev/nvidiactl", "/dev/kfd", "/dev/dxg")  # NVIDIA, AMD ROCm, WSL: torch.cuda may find a GPU


class ModelOptionsError(ValueError):
    """Model options that do not fit together (one-line message naming the options)."""


def resolve_backend(backend: str | None, onnx: str | Path | None) -> str:
    """The runtime for these options: ``backend`` when given, else onnx when an ONNX file is named, else auto."""
    if backend is None:
        return "onnx" if onnx else "auto"
    if backend not in BACKENDS:
        raise ModelOptionsError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return backend


def checkpoint_path(checkpoint: str | Path | None) -> Path:
    """The checkpoint directory for ``checkpoint`` (None: the shipped model,
    :func:`emostream.model_files.default_checkpoint`)."""
    return Path(checkpoint) if checkpoint else default_checkpoint()


def load_predictor(
    checkpoint: str | Path | None = None,
    *,
    device: str = "auto",
    fp32: bool = False,
    backend: str | None = None,
    onnx: str | Path | None = None,
    notify: Callable[[str], None] = log.warning,
    threads: int | None = None,
):
    """A loaded predictor (:class:`~emostream.model.Predictor` or :class:`~emostream.onnx_model.OnnxPredictor`).

    ``checkpoint``: a checkpoint directory (None: the shipped model); ``device``: auto (CUDA when
    present), cpu or cuda[:N]; ``fp32``: no reduced precision (torch fp32); ``backend``: auto (None,
    the default: on a CPU the checkpoint's int8 model, :mod:`emostream.int8`, else torch), torch or
    onnx (None with ``onnx`` naming a file); ``onnx``: the file made by ``emostream export --onnx``;
    ``notify``: told when the int8 model is built or cannot be had (torch runs then); ``threads``:
    ONNX Runtime's intra-op threads (None: one per core; torch's are set by the caller).
    Raises :class:`ModelOptionsError` for options that do not fit and
    :class:`~emostream.model.CheckpointError` for a missing or foreign model.
    """
    from .model_files import CheckpointError

    backend = resolve_backend(backend, onnx)
    requested = None if device == "auto" else device
    if backend == "onnx":
        from .onnx_model import OnnxPredictor

        if not onnx:
            raise ModelOptionsError(
                "--backend onnx needs --onnx MODEL.onnx (make one with: emostream export --onnx MODEL.onnx)"
            )
        if checkpoint:
            raise ModelOptionsError("--checkpoint does not apply to --backend onnx: the ONNX file holds the model")
        return OnnxPredictor.from_file(onnx, device=requested, threads=threads)
    if onnx:
        raise ModelOptionsError("--onnx is only used with --backend onnx")
    path = checkpoint_path(checkpoint)
    if checkpoint is None and not (path / "model.safetensors").is_file():
        raise CheckpointError(missing_model_message(path))
    if backend == "auto" and not fp32 and _runs_on_cpu(requested) and (path / "model.safetensors").is_file():
        predictor = _int8_predictor(path, notify, threads)  # torch is not imported when it is cached
        if predictor is not None:
            return predictor
    import torch

    if requested and requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelOptionsError(f"--device {requested}: no CUDA device is available")
    from .model import Predictor

    return Predictor.from_checkpoint(path, device=requested, mixed_precision=not fp32)


def _runs_on_cpu(requested: str | None) -> bool:
    """Whether the model runs on the CPU: ``--device cpu``, or auto without a GPU (no GPU device node
    here: decided without importing torch, which would cost a CPU process ~0.5 GB)."""
    if requested:
        return requested == "cpu"
    if not any(Path(node).exists() for node in GPU_DEVICE_NODES):
        return True
    import torch

    return not torch.cuda.is_available()


def _int8_predictor(checkpoint: Path, notify: Callable[[str], None], threads: int | None = None):
    """The checkpoint's int8 ONNX model (built at first use), or None (``notify`` says why) where it
    cannot be had here: then torch runs."""
    from .int8 import Int8Unavailable, int8_predictor, ranges_path
    from .model_files import CheckpointError

    try:
        return int8_predictor(checkpoint, notify, threads)
    except (Int8Unavailable, CheckpointError, ImportError) as exc:
        if ranges_path(checkpoint).is_file():  # a checkpoint without ranges runs torch, as it always did
            notify(f"running the torch model instead of int8: {exc}")
        return None


def model_info(
    predictor: Any, *, checkpoint: str | Path | None = None, onnx: str | Path | None = None
) -> dict[str, str]:
    """What ``/metrics`` reports as the model: checkpoint name, experiment, backbone, backend, the
    precision it runs in here (mixed precision depends on the CPU: :func:`emostream.model.precision_name`),
    the softmax temperature live windows are calibrated with, and the first 12 hex digits of the
    weights' SHA-256 (the identity to compare between replicas)."""
    from .model_files import model_identity

    meta = getattr(getattr(predictor, "model", None), "metadata", None) or {}
    if not meta and not onnx:  # the int8 model of a checkpoint: its metadata is the checkpoint's
        from .model_files import META_FILE

        with contextlib.suppress(OSError, ValueError):
            meta = json.loads((checkpoint_path(checkpoint) / META_FILE).read_text())
    config = (meta.get("training") or {}).get("config") or {}
    return {
        **model_identity(None if onnx else checkpoint_path(checkpoint), onnx),
        "experiment": str(config.get("experiment_name", "")),
        "backbone": str((meta.get("model") or {}).get("backbone", "")),
        "backend": "onnx" if hasattr(predictor, "session") else "torch",
        "precision": getattr(predictor, "precision", "fp32"),
        "temperature": f"{float(predictor.temperature):g}",
    }


def check_model_files(*, backend: str, checkpoint: str | Path | None = None, onnx: str | Path | None = None) -> None:
    """The checkpoint/ONNX file exists here (replicas on other nodes need the same path); raises
    :class:`ModelOptionsError` naming what is missing."""
    if backend == "onnx":
        if not onnx:
            raise ModelOptionsError(
                "--backend onnx needs --onnx MODEL.onnx (make one with: emostream export --onnx MODEL.onnx)"
            )
        if not Path(onnx).is_file():
            raise ModelOptionsError(f"no such ONNX file: {onnx}")
        return
    path = checkpoint_path(checkpoint)
    if not (path / "model.safetensors").is_file():
        raise ModelOptionsError(
            missing_model_message(path)
            if checkpoint is None
            else f"no checkpoint at {path} (model.safetensors missing)"
        )
