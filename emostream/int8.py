"""The int8 model a CPU runs by default (issue #43): built from the checkpoint at first use, cached.

On a CPU, ONNX Runtime's static int8 graph (``emostream export --int8``: every convolution but the
first in int8, the mel front end, stem, classifier and softmax in float) is the fastest path that
passes the accuracy guard (BENCHMARKS.md): 1.7x the torch path's windows/s and 3x its real-time calls.
A wheel cannot carry calibration speech, so a checkpoint carries the calibration's result instead:
``int8_ranges.json``, the activation ranges (min, max per tensor) taken from 256 windows of the
training corpora, half of them through the G.712 telephone channel. At first use the checkpoint is
exported to ONNX with the installed torch, quantised with those ranges (no audio needed), checked
against torch fp32 on fixed windows, and kept in ``$EMOSTREAM_CACHE`` (default
``~/.cache/emostream``) under a name that holds the weights' and ranges' hashes, the torch and
ONNX Runtime versions and the CPU's int8 range: ~25 s once, then a load like any ONNX file.
``python -m emostream.int8`` builds it ahead (a container image, a read-only home at run time).

Where that cannot be done (no ranges in the checkpoint, the ``onnx`` packages missing, another
torch naming the graph's tensors differently, an ONNX Runtime without calibration caches, a build
that fails its check), :class:`Int8Unavailable` says why in one line and the caller runs torch.
"""

from __future__ import annotations

import fcntl
import hashlib
import inspect
import json
import os
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import Iterator

import numpy as np

from .model_files import model_identity

RANGES_FILE = "int8_ranges.json"
RANGES_FORMAT = "emostream-int8-ranges/1"
CACHE_ENV = "EMOSTREAM_CACHE"
# the build's check against torch fp32 on onnx_model.parity_windows(): int8 moves probabilities by a
# few hundredths (tests/test_onnx.py); a graph quantised with ranges of other tensors moves them by far more
MAX_PARITY_DIFFERENCE = 0.1


class Int8Unavailable(RuntimeError):
    """The int8 model cannot be built or loaded here; the message (one line) says why."""


def cache_dir() -> Path:
    """Where built models are kept: ``$EMOSTREAM_CACHE``, else ``$XDG_CACHE_HOME/emostream``, else
    ``~/.cache/emostream``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "emostream"


def ranges_path(checkpoint: str | Path) -> Path:
    """The checkpoint's int8 calibration ranges (written by ``emostream export --int8 --calibrate DIR
    --save-ranges``)."""
    return Path(checkpoint) / RANGES_FILE


def write_ranges(checkpoint: str | Path, ort_cache: str | Path, windows: int) -> Path:
    """Store ONNX Runtime's calibration cache ``ort_cache`` (a ``quantize_static`` calibration_cache_path
    file) in the checkpoint as :data:`RANGES_FILE`, with what it was made with."""
    import onnxruntime
    import torch

    out = ranges_path(checkpoint)
    payload = {
        "format": RANGES_FORMAT,
        "weights_sha256": model_identity(checkpoint)["sha256"],
        "windows": windows,
        "made_with": {"torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "ort_calibration_cache": json.loads(Path(ort_cache).read_text()),
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def _read_ranges(checkpoint: Path) -> dict:
    path = ranges_path(checkpoint)
    if not path.is_file():
        raise Int8Unavailable(f"{checkpoint.name} has no int8 calibration ranges ({RANGES_FILE})")
    try:
        ranges = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise Int8Unavailable(f"cannot read {path}: {exc}") from None
    if not isinstance(ranges, dict) or ranges.get("format") != RANGES_FORMAT:
        raise Int8Unavailable(f"{path} is not an emostream int8 ranges file")
    if ranges.get("weights_sha256") != model_identity(checkpoint)["sha256"]:
        raise Int8Unavailable(f"{path} was taken for other weights than {checkpoint.name}'s")
    return ranges


def built_model_path(checkpoint: str | Path) -> Path:
    """Where the int8 model of ``checkpoint`` is (or will be) cached for this torch, ONNX Runtime and CPU."""
    import onnxruntime

    from .onnx_model import cpu_has_vnni

    checkpoint = Path(checkpoint)
    identity = model_identity(checkpoint)
    ranges = hashlib.sha256(ranges_path(checkpoint).read_bytes()).hexdigest()[:8]
    torch_version = version("torch").split("+")[0]  # not imported: a cached model runs without torch
    bits = "u8" if cpu_has_vnni() else "u7"  # onnx_model.quantize_int8's reduce_range
    name = f"{identity['name']}-{identity['sha256']}-r{ranges}-torch{torch_version}-ort{onnxruntime.__version__}-{bits}"
    return cache_dir() / "int8" / f"{name}.onnx"


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """One process builds while the others (serve's workers, batch's processes) wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def int8_predictor(
    checkpoint: str | Path, notify: Callable[[str], None] = lambda message: None, threads: int | None = None
):
    """``checkpoint``'s int8 model opened on ONNX Runtime (:class:`~emostream.onnx_model.OnnxPredictor`,
    ``threads`` intra-op threads), built and cached at first use (``notify`` is told before a build
    starts). Raises :class:`Int8Unavailable` when it cannot be had here."""
    from .onnx_model import OnnxPredictor

    checkpoint = Path(checkpoint)
    _read_ranges(checkpoint)
    try:
        path = built_model_path(checkpoint)
        with _locked(path):
            predictor = _loads(path, threads)
            if predictor is None:
                notify(
                    f"building the int8 model of {checkpoint.name} for this CPU (once, ~25 s; kept in {path.parent})"
                )
                build_int8(checkpoint, path)
                predictor = OnnxPredictor.from_file(path, threads=threads)
    except OSError as exc:  # an unwritable cache: say where
        raise Int8Unavailable(f"cannot build the int8 model in {cache_dir()}: {exc.strerror or exc}") from None
    return predictor


def int8_model(checkpoint: str | Path, notify: Callable[[str], None] = lambda message: None) -> Path:
    """The path of ``checkpoint``'s int8 ONNX model (:func:`int8_predictor`'s file)."""
    return int8_predictor(checkpoint, notify).path


def _loads(path: Path, threads: int | None = None):
    """The cached model opened as an emostream model, or None (missing; a damaged one is removed)."""
    if not path.is_file():
        return None
    from .model_files import CheckpointError
    from .onnx_model import OnnxPredictor

    try:
        return OnnxPredictor.from_file(path, threads=threads)
    except CheckpointError:
        path.unlink(missing_ok=True)
        return None


def build_int8(checkpoint: str | Path, out: str | Path) -> Path:
    """Export ``checkpoint`` and quantise it with its shipped ranges into ``out``; check it against
    torch fp32. Raises :class:`Int8Unavailable` (one line) when any step is not possible."""
    from onnxruntime.quantization import quantize_static

    from .onnx_model import OnnxExportError, export_onnx, quantize_int8

    checkpoint, out = Path(checkpoint), Path(out)
    if "calibration_cache_path" not in inspect.signature(quantize_static).parameters:
        import onnxruntime

        raise Int8Unavailable(f"onnxruntime {onnxruntime.__version__} cannot quantise from stored ranges")
    ranges = _read_ranges(checkpoint)
    with tempfile.TemporaryDirectory(prefix="emostream-int8-", dir=out.parent) as tmp:
        fp32, cache = Path(tmp) / "fp32.onnx", Path(tmp) / "ranges.json"
        cache.write_text(json.dumps(ranges["ort_calibration_cache"]))
        try:
            export_onnx(checkpoint, fp32)
        except OnnxExportError as exc:
            raise Int8Unavailable(str(exc)) from None
        except Exception as exc:  # torch.onnx's exporter fails in many ways (another torch, another model)
            raise Int8Unavailable(f"ONNX export failed: {_first_line(exc)}") from None
        _check_names(fp32, ranges["ort_calibration_cache"].get("data", {}))
        built = Path(tmp) / out.name
        try:
            quantize_int8(fp32, built, ranges=cache)
        except Exception as exc:  # onnxruntime.quantization raises plain exceptions of many kinds
            raise Int8Unavailable(f"int8 quantisation failed: {_first_line(exc)}") from None
        _check(checkpoint, built)
        os.replace(built, out)
    return out


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def _check_names(exported: Path, ranges: dict) -> None:
    """The ranges name the input of every convolution but the stem in this export's graph."""
    import onnx

    convs = [n for n in onnx.load(str(exported)).graph.node if n.op_type == "Conv"]
    missing = {n.input[0] for n in convs[1:]} - set(ranges)
    if missing:
        raise Int8Unavailable(
            f"the int8 ranges do not name this torch's graph tensors ({len(missing)} of {len(convs) - 1} "
            f"convolution inputs missing, e.g. {sorted(missing)[0]}): they were taken with another torch"
        )


def _check(checkpoint: Path, built: Path) -> None:
    """Every convolution but the stem reads int8 (ranges named after this graph's tensors), and the
    built model is within :data:`MAX_PARITY_DIFFERENCE` of torch fp32 on the fixed parity windows."""
    import onnx

    from .model import Predictor
    from .onnx_model import OnnxPredictor, parity_windows

    graph = onnx.load(str(built)).graph
    dequantized = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    if sum(n.input[0] in dequantized for n in convs) < len(convs) - 1:
        raise Int8Unavailable("the int8 model built here leaves convolutions in float: its ranges do not fit")

    windows = parity_windows()[:3]
    ref = Predictor.from_checkpoint(checkpoint, device="cpu", mixed_precision=False).predict(windows)
    got = OnnxPredictor.from_file(built).predict(windows)
    difference = float(np.abs(np.asarray(ref) - got).max())
    if difference > MAX_PARITY_DIFFERENCE:
        raise Int8Unavailable(
            f"the int8 model built here differs from torch fp32 by {difference:.2f} in probability (more than "
            f"{MAX_PARITY_DIFFERENCE}): its ranges do not fit this torch's graph"
        )


def main(argv: list[str] | None = None) -> int:
    """``python -m emostream.int8 [CHECKPOINT]``: build the int8 model into the cache now (a container
    image, a read-only home at run time) and print its path."""
    import argparse
    import sys

    from .model_files import default_checkpoint

    parser = argparse.ArgumentParser(prog="python -m emostream.int8", description=main.__doc__)
    parser.add_argument("checkpoint", nargs="?", default=None, help="checkpoint directory (default: the shipped model)")
    args = parser.parse_args(argv)
    checkpoint = Path(args.checkpoint) if args.checkpoint else default_checkpoint()
    try:
        print(int8_model(checkpoint, lambda message: print(message, file=sys.stderr, flush=True)))
    except (Int8Unavailable, OSError) as exc:
        print(f"emostream: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
