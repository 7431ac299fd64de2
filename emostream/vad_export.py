"""Build the speech gate's Silero VAD graphs (``emostream/vad_models/``) from the silero-vad package.

The gate runs Silero VAD (MIT licence, https://github.com/snakers4/silero-vad) as one ONNX call per
block of frames with the LSTM state carried in and out, like the package's own
``silero_vad_16k_sequence.onnx``. That file exists only for 16 kHz, and ONNX Runtime spends most of
its time there in convolutions over 1-4 time steps. The graphs built here compute the same network
from the same weights (read from the package's TorchScript model, which holds both the 16 kHz and
the 8 kHz networks) with each convolution written as one matrix product over all frames of the
block (the STFT as two half-kernel products, each encoder layer as im2col + MatMul), and the LSTM as
one ONNX ``LSTM`` node. Per-frame probabilities equal the TorchScript model streamed frame by frame
within 1e-5 (``tests/test_vad.py``); on a 2-core AMD EPYC (Zen 3) they take 0.75-0.99 ms of CPU per
second of 16 kHz audio against 1.84-2.86 ms for the package's sequence graph, and 0.50-0.69 ms at
8 kHz (``bench/silero_graphs.py``, BENCHMARKS.md).

Inputs ``input`` ``(frames, context + frame)`` (each frame prefixed with the last ``context``
samples of the previous one: 64 + 512 at 16 kHz, 32 + 256 at 8 kHz), ``h``, ``c`` ``(1, 1, 128)``;
outputs ``speech_probs`` ``(frames,)``, ``hn``, ``cn``.

Needs torch and onnx (``pip install emostream[onnx]``); run it again when silero-vad's weights
change::

    python -m emostream.vad_export [OUT_DIR]
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from .vad import SILERO_RATES, VAD_MODELS, silero_graph_name

HIDDEN = 128
ENCODER_STRIDES = (1, 2, 2, 1)


def silero_package_file(name: str) -> Path | None:
    """A model file of the installed silero-vad package (``silero_vad/data/NAME``), found without
    importing the package; None when the package or the file is missing."""
    import importlib.util

    spec = importlib.util.find_spec("silero_vad")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / name
    return path if path.is_file() else None


def silero_weights(rate: int) -> dict[str, np.ndarray]:
    """The Silero VAD network for ``rate`` (8000 or 16000) as numpy arrays, from the installed
    silero-vad package's TorchScript model."""
    import torch

    jit = silero_package_file("silero_vad.jit")
    if jit is None:
        raise RuntimeError("needs the silero-vad package (pip install emostream[onnx])")
    prefix = {16000: "_model.", 8000: "_model_8k."}[rate]
    state = torch.jit.load(str(jit), map_location="cpu").state_dict()
    return {k[len(prefix) :]: v.float().numpy() for k, v in state.items() if k.startswith(prefix)}


def build_graph(rate: int):
    """The sequence graph of the ``rate`` network (an ``onnx.ModelProto``)."""
    import onnx
    from onnx import TensorProto
    from onnx import helper as oh
    from onnx import numpy_helper as nh

    frame, context = SILERO_RATES[rate]
    w = silero_weights(rate)
    basis = w["stft.forward_basis_buffer"][:, 0, :]  # (2 * bins, n_fft): real and imaginary kernels
    n_fft = basis.shape[1]
    stride, pad, bins = n_fft // 2, n_fft // 4, n_fft // 2 + 1
    padded = context + frame + pad
    blocks = padded // stride  # the STFT's 4 frames are pairs of consecutive half-kernel blocks
    steps = blocks - 1
    inits, nodes, count = [], [], [0]

    def const(array) -> str:
        name = f"c{count[0]}"
        count[0] += 1
        inits.append(nh.from_array(np.ascontiguousarray(array), name))
        return name

    def ints(*values) -> str:
        return const(np.array(values, np.int64))

    def node(op: str, inputs: list[str], **attrs) -> str:
        name = f"n{count[0]}"
        count[0] += 1
        nodes.append(oh.make_node(op, inputs, [name], **attrs))
        return name

    x = node("Pad", ["input", ints(0, 0, 0, pad)], mode="reflect")  # as the network pads on the right
    x = node("Reshape", [x, ints(0, blocks, stride)])
    halves = np.concatenate([basis[:, :stride].T, basis[:, stride:].T], axis=1)  # (stride, 4 * bins)
    p = node("MatMul", [x, const(halves)])
    first = node("Slice", [p, ints(0, 0), ints(steps, 2 * bins), ints(1, 2)])
    second = node("Slice", [p, ints(1, 2 * bins), ints(blocks, 4 * bins), ints(1, 2)])
    spec = node("Add", [first, second])  # (frames, steps, 2 * bins)
    re = node("Slice", [spec, ints(0), ints(bins), ints(2)])
    im = node("Slice", [spec, ints(bins), ints(2 * bins), ints(2)])
    x = node("Sqrt", [node("Add", [node("Mul", [re, re]), node("Mul", [im, im])])])  # (frames, steps, bins)
    t = steps
    for i, s in enumerate(ENCODER_STRIDES):  # conv1d (kernel 3, padding 1) + ReLU, time-major
        kernel, bias = w[f"encoder.{i}.reparam_conv.weight"], w[f"encoder.{i}.reparam_conv.bias"]
        xp = node("Pad", [x, ints(0, 1, 0, 0, 1, 0)])
        t_out = (t - 1) // s + 1
        taps = [node("Slice", [xp, ints(j), ints(j + s * (t_out - 1) + 1), ints(1), ints(s)]) for j in range(3)]
        columns = node("Concat", taps, axis=2)
        matrix = np.concatenate([kernel[:, :, j].T for j in range(3)], axis=0)  # (3 * in, out)
        x = node("Relu", [node("Add", [node("MatMul", [columns, const(matrix)]), const(bias)])])
        t = t_out
    assert t == 1, "the encoder ends with one time step"

    def onnx_gates(m: np.ndarray) -> np.ndarray:  # torch orders the gates i, f, g, o; ONNX i, o, f, c
        i, f, g, o = np.split(m, 4, axis=0)
        return np.concatenate([i, o, f, g], axis=0)

    lstm_inputs = [
        x,  # (frames, 1, 128): the sequence of one stream
        const(onnx_gates(w["decoder.rnn.weight_ih"])[None]),
        const(onnx_gates(w["decoder.rnn.weight_hh"])[None]),
        const(np.concatenate([onnx_gates(w["decoder.rnn.bias_ih"]), onnx_gates(w["decoder.rnn.bias_hh"])])[None]),
        "",
        "h",
        "c",
    ]
    nodes.append(oh.make_node("LSTM", lstm_inputs, ["y", "hn", "cn"], hidden_size=HIDDEN))
    y = node("Relu", [node("Reshape", ["y", ints(-1, HIDDEN)])])
    head = w["decoder.decoder.2.weight"].reshape(1, HIDDEN).T
    logit = node("Add", [node("MatMul", [y, const(head)]), const(w["decoder.decoder.2.bias"])])
    nodes.append(oh.make_node("Reshape", [node("Sigmoid", [logit]), ints(-1)], ["speech_probs"]))
    state = [1, 1, HIDDEN]
    graph = oh.make_graph(
        nodes,
        f"silero_vad_{rate // 1000}k_sequence",
        [
            oh.make_tensor_value_info("input", TensorProto.FLOAT, ["frames", context + frame]),
            oh.make_tensor_value_info("h", TensorProto.FLOAT, state),
            oh.make_tensor_value_info("c", TensorProto.FLOAT, state),
        ],
        [
            oh.make_tensor_value_info("speech_probs", TensorProto.FLOAT, ["frames"]),
            oh.make_tensor_value_info("hn", TensorProto.FLOAT, state),
            oh.make_tensor_value_info("cn", TensorProto.FLOAT, state),
        ],
        inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], producer_name="emostream.vad_export")
    model.ir_version = 8  # loads in onnxruntime >= 1.17
    model.doc_string = "Silero VAD (MIT, snakers4/silero-vad) as a sequence graph; built by emostream.vad_export"
    onnx.checker.check_model(model)
    return model


def main(argv: list[str] | None = None) -> int:
    import onnx

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else VAD_MODELS
    out.mkdir(parents=True, exist_ok=True)
    for rate in SILERO_RATES:
        path = out / silero_graph_name(rate)
        onnx.save(build_graph(rate), str(path))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
