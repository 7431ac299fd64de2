"""ONNX Runtime backend: export of the whole pipeline to one ``.onnx`` file, and its predictor.

The exported graph is the complete inference path of :class:`emostream.model.Predictor`: raw
16 kHz waveform windows ``(batch, 96000)`` in (the batch dimension is dynamic), then the STFT (the
ONNX ``STFT`` operator, opset 18+), mel filterbank, dB, the per-window utterance normalisation when
the checkpoint uses it, ResNet50, and out come ``logits`` ``(batch, 7)`` and calibrated
``probabilities`` (softmax of logits / the checkpoint's temperature). Classes, temperature, sample
rate and window length travel as ONNX metadata, so the file is all a runtime needs.

    emostream export --onnx emostream.onnx
    emostream replay call.flac --backend onnx --onnx emostream.onnx

Export needs ``torch.onnx.export(dynamo=True)`` and thus the ``onnx``/``onnxscript`` packages
(dependencies of emostream: a CPU's default int8 model is exported at first use, :mod:`emostream.int8`);
running needs only ``onnxruntime``. The graph runs in fp32, or,
exported with ``--int8 --calibrate DIR``, with its convolutions in int8 (static post-training
quantisation calibrated on windows of DIR's audio; the mel front end stays float):

    emostream export --onnx emostream-int8.onnx --int8 --calibrate ../shared/data/emotion-speech
"""

from __future__ import annotations

import io
import json
import os
import warnings
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import CLASSES
from .audio import AUDIO_SUFFIXES, SAMPLE_RATE, WINDOW_SAMPLES, load_mono
from .model_files import CheckpointError, default_checkpoint

METADATA_PREFIX = "emostream."
FORMAT = "emostream-onnx/1"
INPUT_NAME = "waveform"
OUTPUT_NAMES = ("logits", "probabilities")
MAX_EXPORT_BATCH = 4096
OPSET = 20


class OnnxExportError(RuntimeError):
    """Export is not possible here (missing packages) or produced a wrong graph."""


def _exportable(model, temperature: float):
    import torch

    class Pipeline(torch.nn.Module):
        """Waveforms -> (logits, calibrated probabilities), the exported graph."""

        def __init__(self):
            super().__init__()
            self.model = model
            self.inv_temperature = 1.0 / float(temperature)

        def forward(self, waveform):
            logits = self.model(waveform)
            return logits, torch.softmax(logits * self.inv_temperature, dim=-1)

    return Pipeline().eval()


def export_onnx(
    checkpoint: str | Path | None = None,
    out: str | Path = "emostream.onnx",
    calibration: np.ndarray | None = None,
    ranges: str | Path | None = None,
) -> Path:
    """Export the checkpoint's full pipeline (front end included) to a single ``.onnx`` file; with
    ``calibration`` windows, its convolutions quantised to int8 (:func:`quantize_int8`, which writes the
    ranges it took to ``ranges`` when given)."""
    try:
        import onnx  # noqa: F401  (torch.onnx's dynamo exporter needs both)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise OnnxExportError(
            f"ONNX export needs the onnx and onnxscript packages ({exc.name} is missing): pip install onnx onnxscript"
        ) from None
    import torch

    from .features import MatmulSpectrogram
    from .model import load_checkpoint

    out = Path(out)
    if not out.parent.is_dir():
        raise FileNotFoundError(f"directory for the ONNX file does not exist: {out.parent}")
    checkpoint = default_checkpoint() if checkpoint is None else checkpoint
    model = load_checkpoint(checkpoint, "cpu")
    features = model.feature_config
    # the same power spectrogram from matrix products: ONNX Runtime's STFT kernel took ~40 % of a
    # window's time (issue #43); the export's parity check holds it to torch's FFT
    model.frontend.mel.spectrogram = MatmulSpectrogram(features.n_fft, features.hop_length)
    wrapper = _exportable(model, model.model_config.temperature)
    example = torch.zeros(2, WINDOW_SAMPLES)
    batch = torch.export.Dim("batch", min=1, max=MAX_EXPORT_BATCH)
    chatter = io.StringIO()  # the exporter prints progress lines; keep the command's output clean
    with warnings.catch_warnings(), torch.no_grad(), redirect_stdout(chatter), redirect_stderr(chatter):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=list(OUTPUT_NAMES),
            dynamic_shapes=({0: batch},),
            optimize=True,
            verbose=False,
        )
    meta = getattr(model, "metadata", {})
    props = {
        "format": FORMAT,
        "classes": json.dumps(list(CLASSES)),
        "temperature": repr(float(model.model_config.temperature)),
        "clip_temperature": repr(model.model_config.clip_temperature),  # "None" when not fitted
        "sample_rate": str(SAMPLE_RATE),
        "window_samples": str(WINDOW_SAMPLES),
        "features": json.dumps(model.feature_config.to_dict()),
        "checkpoint": str(Path(checkpoint).name),
        "code_version": str(meta.get("code_version", "")),
    }
    program.model.metadata_props.update({METADATA_PREFIX + k: v for k, v in props.items()})
    tmp = out.with_name(out.name + ".tmp")
    program.save(tmp, external_data=False)
    if calibration is not None:
        try:
            quantize_int8(tmp, tmp, calibration, ranges=ranges)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, out)
    return out


def quantize_int8(
    source: str | Path,
    out: str | Path,
    calibration: np.ndarray | None = None,
    batch: int = 8,
    ranges: str | Path | None = None,
) -> Path:
    """Post-training static int8 quantisation (ONNX Runtime, QDQ) of an exported model's convolutions
    but the first: weights per output channel (int8), activations per tensor (uint8, 7-bit range where
    the CPU lacks VNNI), min-max ranges from ``calibration`` windows ``(n, WINDOW_SAMPLES)``. The mel
    front end, the stem convolution, the classifier and the softmax stay float32 (BENCHMARKS.md, issue
    #43: with the stem in int8, or from 64 windows, 4-8 % of the example calls' windows change label).
    ``ranges``: ONNX Runtime's calibration cache (JSON); read instead of calibrating when it exists
    (:mod:`emostream.int8`), written after calibrating when it does not. ``out`` keeps ``source``'s
    metadata."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    source, out = Path(source), Path(out)
    props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    props[METADATA_PREFIX + "precision"] = "int8"
    if calibration is None and not (ranges and Path(ranges).is_file()):
        raise ValueError("int8 quantisation needs calibration windows or a calibration cache")
    windows = np.ascontiguousarray(calibration if calibration is not None else [], dtype=np.float32)

    class Windows(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{INPUT_NAME: windows[i : i + batch]} for i in range(0, len(windows), batch)])

        def get_next(self):
            return next(self.batches, None)

    cache = {"calibration_cache_path": str(ranges)} if ranges else {}

    prepared = out.with_name(out.name + ".prep.onnx")
    chatter = io.StringIO()
    try:
        with warnings.catch_warnings(), redirect_stdout(chatter), redirect_stderr(chatter):
            warnings.simplefilter("ignore")
            quant_pre_process(str(source), str(prepared), skip_symbolic_shape=True)
            stem = next(n.name for n in onnx.load(str(prepared)).graph.node if n.op_type == "Conv")
            quantize_static(
                str(prepared),
                str(out),
                Windows() if calibration is not None else None,
                quant_format=QuantFormat.QDQ,
                op_types_to_quantize=["Conv"],
                nodes_to_exclude=[stem],  # the first convolution reads the spectrogram: int8 there flips labels
                per_channel=True,
                reduce_range=not cpu_has_vnni(),
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                **cache,
            )
    finally:
        prepared.unlink(missing_ok=True)
    model = onnx.load(str(out))
    del model.metadata_props[:]
    model.metadata_props.extend(onnx.StringStringEntryProto(key=k, value=v) for k, v in props.items())
    onnx.save(model, str(out))
    return out


def cpu_has_vnni() -> bool:
    """Whether this CPU has VNNI dot products (AVX512-VNNI or AVX-VNNI): int8 kernels then use the full
    8-bit range; without, ONNX Runtime's AVX2 kernels can saturate and want 7-bit weights."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


def calibration_windows(folder: str | Path, count: int = 256, seed: int = 0) -> np.ndarray:
    """``count`` windows ``(count, WINDOW_SAMPLES)`` for int8 calibration from the audio files under
    ``folder`` (recursively): files drawn with ``seed``, one window each, placed as ``classify`` places
    them; every second window goes through the G.712 telephone channel, as most calls arrive."""
    from .channel import g712_telephone
    from .stream import placed_windows

    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES) if folder.is_dir() else []
    if not files:
        raise FileNotFoundError(f"no audio files ({', '.join(s[1:] for s in AUDIO_SUFFIXES)}) under {folder}")
    rng = np.random.default_rng(seed)
    picked = [files[i] for i in rng.choice(len(files), size=count, replace=len(files) < count)]
    out = np.zeros((count, WINDOW_SAMPLES), dtype=np.float32)
    for k, path in enumerate(picked):
        samples = load_mono(path)
        if k % 2:
            samples = g712_telephone(samples)
        placed = placed_windows(samples, positions=5)
        out[k] = placed[rng.integers(len(placed))]
    return out


def parity_windows(seed: int = 0) -> np.ndarray:
    """Four deterministic test windows ``(4, 96000)``: a voiced harmonic signal with pauses, the same
    6 dB quieter and only 2 s long (zero-padded like a stream's first window), noise at -40 dBFS, and
    digital silence (the utterance normalisation's degenerate case)."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW_SAMPLES) / SAMPLE_RATE
    phase = 2 * np.pi * np.cumsum(140 * (1 + 0.08 * np.sin(2 * np.pi * 2.5 * t))) / SAMPLE_RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 9)) * np.clip(np.sin(2 * np.pi * 0.7 * t), 0, None)
    voiced = 0.2 * voiced + 0.003 * rng.standard_normal(WINDOW_SAMPLES)
    short = np.zeros(WINDOW_SAMPLES)
    short[: 2 * SAMPLE_RATE] = 0.5 * voiced[: 2 * SAMPLE_RATE]
    noise = 0.01 * rng.standard_normal(WINDOW_SAMPLES)
    return np.stack([voiced, short, noise, np.zeros(WINDOW_SAMPLES)]).astype(np.float32)


@dataclass
class OnnxPredictor:
    """The :class:`emostream.model.Predictor` interface on ONNX Runtime (``predict``, ``logits``)."""

    session: object
    path: Path
    temperature: float
    clip_temperature: float | None = None  # for the mean logit of several placements (classify)
    device: str = "cpu (onnxruntime)"
    precision: str = "fp32"  # "int8": convolutions quantised at export (--int8)

    @classmethod
    def from_file(cls, path: str | Path, device: str | None = None, threads: int | None = None) -> "OnnxPredictor":
        """Open an exported model; bad or foreign files raise :class:`CheckpointError` (one line)."""
        try:
            import onnxruntime as ort
        except ImportError:
            raise CheckpointError("the onnx backend needs onnxruntime: pip install onnxruntime") from None
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"no ONNX model at {path} (make one with: emostream export --onnx {path})")
        providers = ["CPUExecutionProvider"]
        label = "cpu (onnxruntime)"
        if device and device.startswith("cuda"):
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise CheckpointError(
                    "--device cuda with --backend onnx needs onnxruntime-gpu (CUDAExecutionProvider is not available)"
                )
            providers, label = ["CUDAExecutionProvider", "CPUExecutionProvider"], "cuda (onnxruntime)"
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # onnxruntime's errors are plain Exceptions (InvalidProtobuf, Fail, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"cannot load ONNX model {path}: {first[:200]}") from None
        props = session.get_modelmeta().custom_metadata_map
        get = lambda key: props.get(METADATA_PREFIX + key)  # noqa: E731
        if get("format") != FORMAT:
            raise CheckpointError(f"{path} is not an emostream ONNX export (made by emostream export --onnx)")
        if (
            json.loads(get("classes") or "[]") != list(CLASSES)
            or get("sample_rate") != str(SAMPLE_RATE)
            or get("window_samples") != str(WINDOW_SAMPLES)
        ):
            raise CheckpointError(f"{path} was exported for other classes, rate or window length")
        names = [o.name for o in session.get_outputs()]
        if [i.name for i in session.get_inputs()] != [INPUT_NAME] or names[:2] != list(OUTPUT_NAMES):
            raise CheckpointError(f"{path} has unexpected inputs/outputs")
        clip_t = get("clip_temperature")  # absent in exports made before it existed
        return cls(
            session=session,
            path=path,
            temperature=float(get("temperature")),
            clip_temperature=float(clip_t) if clip_t not in (None, "None") else None,
            device=label,
            precision=get("precision") or "fp32",
        )

    def _run(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(np.asarray(windows, dtype=np.float32))
        if x.ndim == 1:
            x = x[None]
        if x.shape[1:] != (WINDOW_SAMPLES,):
            raise ValueError(f"windows must be (batch, {WINDOW_SAMPLES}) samples, got {x.shape}")
        logits, probs = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
        return logits, probs

    def logits(self, windows: np.ndarray) -> np.ndarray:
        """Logits ``(batch, 7)`` for float32 windows ``(batch, samples)``."""
        return self._run(windows)[0]

    def predict(self, windows: np.ndarray) -> np.ndarray:
        """Class probabilities ``(batch, 7)``, rows sum to 1 (temperature inside the graph)."""
        return self._run(windows)[1]
