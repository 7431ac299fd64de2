"""Whisper's encoder in PyTorch, read from a CTranslate2 ``model.bin``, exposing every layer's output.

CTranslate2 (the runtime of the cached teacher, :mod:`train.teacher`) returns only the encoder's last
layer. Speech-emotion studies of self-supervised and Whisper encoders often find paralinguistic
information peaking in the middle layers, so this module rebuilds the same encoder from the same
weights (no download, no new dependency: the ``model.bin`` layout is CTranslate2's documented
serialisation) and returns all of its hidden states. Training only; ``emostream`` never imports it.

Checked against CTranslate2's own ``encode`` in ``tests/test_whisper_layers.py``.
"""
from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# CTranslate2's DataType enum, as written in model.bin
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_CT2_BINARY_VERSION = 6


class ModelFileError(ValueError):
    """A model.bin this reader cannot use (names the file and the reason)."""


def read_ct2_variables(path: str | Path, prefix: str = "encoder/") -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` whose names start with ``prefix`` (float32/int)."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        with path.open("rb") as f:
            def read(fmt: str):
                size = struct.calcsize(fmt)
                data = f.read(size)
                if len(data) != size:
                    raise ModelFileError(f"{path}: truncated")
                return struct.unpack(fmt, data)

            def string() -> str:
                (n,) = read("<H")
                return f.read(n)[:-1].decode("utf-8")

            (version,) = read("<I")
            if version != _CT2_BINARY_VERSION:
                raise ModelFileError(f"{path}: CTranslate2 binary version {version}, expected {_CT2_BINARY_VERSION}")
            spec = string()
            if spec != "WhisperSpec":
                raise ModelFileError(f"{path}: a {spec}, not a Whisper model")
            read("<I")  # spec revision
            (count,) = read("<I")
            for _ in range(count):
                name = string()
                (rank,) = read("<B")
                shape = read("<" + "I" * rank) if rank else ()
                (dtype_id,) = read("<B")
                (nbytes,) = read("<I")
                if not name.startswith(prefix):
                    f.seek(nbytes, 1)
                    continue
                if dtype_id not in _CT2_DTYPES:
                    raise ModelFileError(f"{path}: {name} has CTranslate2 type {dtype_id} (quantised?), "
                                         "only float16/float32 weights are supported")
                data = np.frombuffer(f.read(nbytes), dtype=_CT2_DTYPES[dtype_id]).reshape(shape)
                out[name[len(prefix):]] = data.astype(np.float32) if data.dtype.kind == "f" else data.copy()
    except OSError as exc:
        raise ModelFileError(f"{path}: {exc.strerror or exc}") from None
    return out


class WhisperEncoderLayers(torch.nn.Module):
    """Whisper's audio encoder (conv stem, sinusoidal positions, pre-norm transformer blocks).

    ``forward`` returns the hidden states ``(layers + 1, batch, frames, d_model)``: index 0 after the
    stem and positions, index k after block k; the last one passes through the final layer norm, as
    the encoder's output does (so index ``-1`` equals CTranslate2's ``encode``).
    """

    def __init__(self, variables: dict[str, np.ndarray]):
        super().__init__()
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in variables.items() if v.dtype.kind == "f"}
        self.n_heads = int(variables["num_heads"])
        self.n_layers = sum(1 for k in variables if k.endswith("self_attention/linear_0/weight"))
        self.params = torch.nn.ParameterDict({k.replace("/", "__"): torch.nn.Parameter(v, requires_grad=False)
                                              for k, v in t.items()})

    def _p(self, name: str) -> torch.Tensor:
        return self.params[name.replace("/", "__")]

    def _ln(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(x, x.shape[-1:], self._p(f"{name}/gamma"), self._p(f"{name}/beta"), eps=1e-5)

    def _linear(self, x: torch.Tensor, name: str) -> torch.Tensor:
        return F.linear(x, self._p(f"{name}/weight"), self._p(f"{name}/bias"))

    @torch.no_grad()
    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """``mel`` (batch, 80, mel frames) -> hidden states (layers + 1, batch, mel frames // 2, d_model)."""
        x = F.gelu(F.conv1d(mel, self._p("conv1/weight"), self._p("conv1/bias"), padding=1))
        x = F.gelu(F.conv1d(x, self._p("conv2/weight"), self._p("conv2/bias"), stride=2, padding=1))
        x = x.transpose(1, 2)
        x = x + self._p("position_encodings/encodings")[: x.shape[1]]
        states = [x]
        b, n, d = x.shape
        for k in range(self.n_layers):
            pre = f"layer_{k}"
            h = self._ln(x, f"{pre}/self_attention/layer_norm")
            q, key, v = self._linear(h, f"{pre}/self_attention/linear_0").split(d, dim=-1)
            q, key, v = (z.view(b, n, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, key, v))
            a = F.scaled_dot_product_attention(q, key, v).transpose(1, 2).reshape(b, n, d)
            x = x + self._linear(a, f"{pre}/self_attention/linear_1")
            h = self._ln(x, f"{pre}/ffn/layer_norm")
            x = x + self._linear(F.gelu(self._linear(h, f"{pre}/ffn/linear_0")), f"{pre}/ffn/linear_1")
            states.append(x)
        states[-1] = self._ln(x, "layer_norm")
        return torch.stack(states)


def load_encoder_layers(teacher_dir: str | Path) -> WhisperEncoderLayers:
    """The encoder of the faster-whisper directory ``teacher_dir`` with all its layers exposed."""
    from .teacher import check_teacher_dir

    return WhisperEncoderLayers(read_ct2_variables(check_teacher_dir(teacher_dir) / "model.bin")).eval()
