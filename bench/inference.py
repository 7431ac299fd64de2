"""Model throughput: windows per second against batch size, and the compute rate that reaches.

Times the full inference path of :class:`emostream.model.Predictor` (mel front end + ResNet50 +
softmax) on random 6 s windows, for fp32 and for mixed precision as ``emostream`` runs it (fp16
autocast on CUDA; bf16 autocast + channels_last on a CPU with fast bf16 kernels, fp32 on one
without: :func:`emostream.model.mixed_precision_dtype`; each row names what ran), optionally bf16
forced on such a CPU (``--forced-bf16``: the cost that choice avoids), optionally the default path
compiled by ``torch.compile`` (``--backends torch-compile``: inductor, weights frozen into the graph
on a CPU, one graph per batch size; each row has its compile time and its largest logit difference
from eager), and optionally the same pipeline exported to ONNX on ONNX Runtime (fp32, and int8 from
``emostream export --int8``: ``--int8 PATH``, its rate compared with ONNX Runtime's own int8 matmul
rate, ``MatMulInteger``). The work per window is counted with ``torch.utils.flop_counter`` (GMAC =
1e9 multiply-accumulates = FLOPs / 2); the achieved GMAC/s is compared with the best dense matmul
rate torch reaches on this machine in the same precision (the measured matmul peak: the practical
compute limit; on CPUs whose BLAS does not use every vector unit, the model's oneDNN convolutions
can exceed it: see BENCHMARKS.md).

    python bench/inference.py [--device cpu|cuda] [--batches 1,4,8,16,32] [--seconds 10]
                              [--backends torch,torch-compile,onnx,onnx-int8] [--onnx MODEL.onnx]
                              [--int8 INT8.onnx] [--compile-mode default|max-autotune|reduce-overhead]
                              [--tuned-layout]
                              [--forced-bf16] [--json OUT] [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import emostream.model
from emostream.audio import WINDOW_SAMPLES
from emostream.model import DEFAULT_CHECKPOINT, Predictor, select_device


def gmac_per_window(predictor: Predictor) -> float:
    """Multiply-accumulates of one window through front end + backbone, in units of 1e9."""
    x = torch.zeros(1, WINDOW_SAMPLES, device=predictor.device)
    with (
        FlopCounterMode(display=False) as counter,
        torch.inference_mode(),
        emostream.model.autocast_for(predictor.device, predictor.mixed_precision),
    ):
        predictor.model(x)  # under the predictor's autocast: its weights may be stored in bf16
    return counter.get_total_flops() / 2 / 1e9


class CompiledPredictor:
    """``predictor`` with its model compiled by ``torch.compile`` (inductor; on a CPU the weights are
    frozen into the graph as constants, which lets oneDNN pre-pack them). ``dynamic=False``: one graph
    per batch size, compiled on its first call (:attr:`compile_seconds`)."""

    def __init__(self, predictor: Predictor, mode: str = "default", tuned_layout: bool = False):
        import torch._inductor.config as inductor_config

        inductor_config.freezing = predictor.device.type == "cpu"
        if tuned_layout:  # channels_last on any device (emostream uses it on a CPU only) + cuDNN's autotuner
            predictor.model.to(memory_format=torch.channels_last)
            predictor.model.backbone_input = lambda spec: spec.contiguous(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        self.eager = predictor
        self.compiled = Predictor(
            model=torch.compile(predictor.model, dynamic=False, mode=None if mode == "default" else mode),
            device=predictor.device,
            mixed_precision=predictor.mixed_precision,
        )
        self.compile_seconds: dict[int, float] = {}

    def predict(self, windows: np.ndarray) -> np.ndarray:
        if len(windows) not in self.compile_seconds:
            t0 = time.perf_counter()
            self.compiled.logits(windows)
            self.compile_seconds[len(windows)] = time.perf_counter() - t0
        return self.compiled.predict(windows)

    def max_logit_difference(self, windows: np.ndarray) -> float:
        """Largest |logit difference| between the compiled and the eager model on ``windows``."""
        self.predict(windows)
        return float((self.compiled.logits(windows) - self.eager.logits(windows)).abs().max())


@contextlib.contextmanager
def forced_cpu_bf16():
    """Mixed precision on the CPU autocasts to bf16 inside this block, whether or not the CPU has
    fast bf16 kernels (to measure what :func:`emostream.model.mixed_precision_dtype` avoids): the
    CPU check answers yes meanwhile."""
    detected = emostream.model.cpu_has_fast_bf16
    emostream.model.cpu_has_fast_bf16 = lambda: True
    try:
        yield
    finally:
        emostream.model.cpu_has_fast_bf16 = detected


def matmul_peak_gflops(
    device: torch.device, precision: str, seconds: float = 2.0, sizes: tuple[int, ...] = (1024, 2048, 4096)
) -> float:
    """Best measured dense-matmul throughput (GFLOP/s) in the precision the model runs in, over
    square sizes 1024-4096 (the machine's practical compute limit for this precision)."""
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        c = torch.empty(n, n, device=device, dtype=dtype)
        torch.matmul(a, b, out=c)
        if device.type == "cuda":
            torch.cuda.synchronize()
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            torch.matmul(a, b, out=c)
            runs += 1
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - t0) / 1e9)
    return best


def windows_per_second(predictor, batch: int, seconds: float) -> tuple[float, float]:
    """(windows/s, ms per batch) for ``predict`` at one batch size; one warm-up call first."""
    rng = np.random.default_rng(0)
    x = (0.1 * rng.standard_normal((batch, WINDOW_SAMPLES))).astype(np.float32)
    predictor.predict(x)
    calls, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or calls < 3:
        predictor.predict(x)
        calls += 1
    elapsed = time.perf_counter() - t0
    return batch * calls / elapsed, 1000 * elapsed / calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    p.add_argument("--batches", default="1,4,8,16,32")
    p.add_argument("--seconds", type=float, default=10.0, help="timing budget per batch size")
    p.add_argument(
        "--backends",
        default="torch",
        help="torch (fp32 and mixed precision), torch-compile (mixed precision, torch.compile), "
        "onnx (ONNX Runtime fp32), onnx-int8 (needs --int8)",
    )
    p.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "max-autotune", "reduce-overhead"),
        help="torch.compile mode of the torch-compile rows (reduce-overhead: CUDA graphs)",
    )
    p.add_argument(
        "--tuned-layout",
        action="store_true",
        help="the torch-compile rows also run channels_last and set cuDNN's benchmark mode (for a GPU: issue "
        "#43; the torch rows before them stay as emostream runs them)",
    )
    p.add_argument("--onnx", default=None, help="exported model for the onnx backend (default: export one now)")
    p.add_argument("--int8", default=None, help="int8 export for the onnx-int8 backend (emostream export --int8)")
    p.add_argument(
        "--forced-bf16",
        action="store_true",
        help="on a CPU without fast bf16 kernels (where mixed precision runs fp32), also time bf16 autocast",
    )
    p.add_argument("--json", dest="json_out", default=None)
    p.add_argument("--quick", action="store_true", help="batches 1 and 2, short timings (< 30 s)")
    args = p.parse_args(argv)
    gemm_seconds, gemm_sizes = 2.0, (1024, 2048, 4096)
    if args.quick:
        args.batches, args.seconds, gemm_seconds, gemm_sizes = "1,2", 0.5, 0.3, (1024,)
    batches = [int(b) for b in args.batches.split(",")]
    backends = args.backends.split(",")
    # (backend, mixed precision, bf16 forced)
    variants = [("torch", False, False), ("torch", True, False)] if "torch" in backends else []
    if (
        args.forced_bf16
        and "torch" in backends
        and emostream.model.precision_name(select_device(args.device)) == "fp32"
    ):
        variants.append(("torch", True, True))
    variants += [("torch-compile", True, False)] if "torch-compile" in backends else []
    variants += [("onnx", False, False)] if "onnx" in backends else []
    if "onnx-int8" in backends:
        if not args.int8:
            p.error("--backends onnx-int8 needs --int8 INT8.onnx (emostream export --onnx ... --int8 --calibrate DIR)")
        variants.append(("onnx-int8", False, False))
    rows, peaks = [], {}
    for backend, mixed, forced in variants:
        predictor = Predictor.from_checkpoint(args.checkpoint, device=args.device, mixed_precision=mixed)
        gmac = gmac_per_window(predictor)
        precision = "bf16" if forced else ("int8" if backend == "onnx-int8" else predictor.precision)
        if precision == "int8" and (predictor.device.type, precision) not in peaks:
            peaks[predictor.device.type, precision] = onnx_int8_matmul_peak(gemm_seconds, gemm_sizes)
        if (predictor.device.type, precision) not in peaks:
            # bf16 matmul without fast kernels runs at ~1 GFLOP/s: one 4096^3 product would take minutes
            sizes = gemm_sizes[:1] if forced else gemm_sizes
            peaks[predictor.device.type, precision] = matmul_peak_gflops(
                predictor.device, precision, gemm_seconds, sizes
            )
        peak = peaks[predictor.device.type, precision]
        runner = predictor
        if backend == "onnx":
            runner = onnx_predictor(args.checkpoint, args.onnx, predictor.device.type)
        elif backend == "onnx-int8":
            runner = onnx_predictor(args.checkpoint, args.int8, predictor.device.type)
        elif backend == "torch-compile":
            runner = CompiledPredictor(predictor, args.compile_mode, args.tuned_layout)
        for batch in batches:
            with forced_cpu_bf16() if forced else contextlib.nullcontext():
                wps, ms = windows_per_second(runner, batch, args.seconds)
            achieved = gmac * wps  # GMAC/s
            extra = {}
            if backend == "torch-compile":
                check = (0.1 * np.random.default_rng(1).standard_normal((batch, WINDOW_SAMPLES))).astype(np.float32)
                extra = {
                    "compile_s": round(runner.compile_seconds[batch], 1),
                    "compile_mode": args.compile_mode,
                    "tuned_layout": args.tuned_layout,
                    "max_logit_difference": float(f"{runner.max_logit_difference(check):.3g}"),
                }
            rows.append(
                {
                    "backend": backend,
                    "mixed": mixed,
                    "precision": precision,
                    "forced": forced,
                    "batch": batch,
                    "windows_per_s": round(wps, 2),
                    "ms_per_batch": round(ms, 1),
                    "gmac_per_window": round(gmac, 3),
                    "achieved_gmacs": round(achieved, 2),
                    "peak_gmacs": round(peak / 2, 3),
                    "fraction_of_peak": round(2 * achieved / peak, 3),
                    # the same in FLOP units (earlier versions of this script)
                    "achieved_gflops": round(2 * achieved, 1),
                    "gemm_gflops": round(peak, 3),
                    **extra,
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    device = str(predictor.device)
    machine = (
        torch.cuda.get_device_name()
        if device.startswith("cuda")
        else f"{cpu_name()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    )
    print(f"\nmachine: {machine}; torch {torch.__version__}\n")
    print(
        "| backend | precision | batch | windows/s | ms/batch | GMAC/window | achieved GMAC/s "
        "| matmul peak GMAC/s | of peak |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        label = (
            f"{r['precision']} (forced)"
            if r["forced"]
            else (f"mixed: {r['precision']}" if r["mixed"] else r["precision"])
        )
        print(
            f"| {r['backend']} | {label} | {r['batch']} | {r['windows_per_s']:.1f} | {r['ms_per_batch']:.1f} | "
            f"{r['gmac_per_window']:.2f} | {r['achieved_gmacs']:.0f} | {r['peak_gmacs']:.3g} | "
            f"{100 * r['fraction_of_peak']:.0f}% |"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"machine": machine, "device": device, "rows": rows}, indent=2))
    return 0


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def onnx_int8_matmul_peak(seconds: float, sizes: tuple[int, ...]) -> float:
    """Best int8 matmul rate (GOP/s, 2 per multiply-add) ONNX Runtime's CPU kernels reach here:
    ``MatMulInteger`` of uint8 by int8 square matrices (the kernel family of the int8 convolutions)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    best = 0.0
    for n in sizes:
        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
            "int8_matmul",
            [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
            [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])],
            [helper.make_tensor("b", TensorProto.INT8, [n, n], np.ones(n * n, dtype=np.int8).tolist())],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        a = np.ones((n, n), dtype=np.uint8)
        session.run(None, {"a": a})
        runs, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            session.run(None, {"a": a})
            runs += 1
        best = max(best, 2 * n**3 * runs / (time.perf_counter() - t0) / 1e9)
    return best


def onnx_predictor(checkpoint: str, path: str | None, device: str):
    """ONNX Runtime predictor of ``path``, or of a fresh export of ``checkpoint`` in a temp dir."""
    from emostream.onnx_model import OnnxPredictor, export_onnx

    if path is None:
        import atexit
        import tempfile

        tmp = tempfile.TemporaryDirectory()
        atexit.register(tmp.cleanup)
        path = str(export_onnx(checkpoint, Path(tmp.name) / "emostream.onnx"))
    return OnnxPredictor.from_file(path, device=device)


if __name__ == "__main__":
    sys.exit(main())
