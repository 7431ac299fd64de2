"""Whisper's encoder in PyTorch, read from a CTranslate2 ``model.bin``, exposing every layer's output.

CTranslate2 (the runtime of the cached teacher, :mod:`train.teacher`) returns only the encoder's last
layer. Speech-emotion studies of self-supervised and Whisper encoders often find paralinguistic
information peaking in the middle layers, so this module rebuilds the same encoder from the same
weights (no download, no new dependency: the ``model.bin`` layout is CTranslate2's documented
serialisation) and returns all of its hidden states. Training only; ``emostream`` never imports it.

Checked against CTranslate2's own ``encode`` in ``tests/test_whisper_layers.py``.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .teacher_dir import check_teacher_dir

# CTranslate2's DataType enum, as written in model.bin
_CT2_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}
_CT2_BINARY_VERSION = 6


class ModelFileError(ValueError):
    """A model.bin this reader cannot use (names the file and the reason)."""


def _ct2_records(path: Path):
    """``(version, spec, revision, records)`` of a CTranslate2 ``model.bin``, where ``records`` yields
    ``(name, shape, dtype_id, raw_header, read_data)`` per variable: ``raw_header`` is the record's bytes
    before its data, and ``read_data()`` returns the data (or skips it when not called)."""
    f = path.open("rb")

    def read(fmt: str):
        size = struct.calcsize(fmt)
        data = f.read(size)
        if len(data) != size:
            raise ModelFileError(f"{path}: truncated")
        return struct.unpack(fmt, data)

    def string() -> tuple[str, bytes]:
        (n,) = read("<H")
        raw = f.read(n)
        if len(raw) != n:
            raise ModelFileError(f"{path}: truncated")
        return raw[:-1].decode("utf-8"), struct.pack("<H", n) + raw

    (version,) = read("<I")
    if version != _CT2_BINARY_VERSION:
        f.close()
        raise ModelFileError(f"{path}: CTranslate2 binary version {version}, expected {_CT2_BINARY_VERSION}")
    spec, _ = string()
    if spec != "WhisperSpec":
        f.close()
        raise ModelFileError(f"{path}: a {spec}, not a Whisper model")
    (revision,) = read("<I")

    def records():
        with f:
            (count,) = read("<I")
            for _ in range(count):
                name, raw_name = string()
                (rank,) = read("<B")
                shape = read("<" + "I" * rank) if rank else ()
                (dtype_id,) = read("<B")
                (nbytes,) = read("<I")
                header = (
                    raw_name
                    + struct.pack("<B", rank)
                    + struct.pack("<" + "I" * rank, *shape)
                    + struct.pack("<BI", dtype_id, nbytes)
                )
                taken = []

                def read_data(n=nbytes, taken=taken) -> bytes:
                    data = f.read(n)
                    if len(data) != n:
                        raise ModelFileError(f"{path}: truncated")
                    taken.append(True)
                    return data

                yield name, tuple(shape), dtype_id, header, read_data
                if not taken:
                    f.seek(nbytes, 1)

    return version, spec, revision, records()


def read_ct2_variables(path: str | Path, prefix: str = "encoder/") -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` whose names start with ``prefix`` (float32/int)."""
    path = Path(path)
    out: dict[str, np.ndarray] = {}
    try:
        _, _, _, records = _ct2_records(path)
        for name, shape, dtype_id, _, read_data in records:
            if not name.startswith(prefix):
                continue
            if dtype_id not in _CT2_DTYPES:
                raise ModelFileError(
                    f"{path}: {name} has CTranslate2 type {dtype_id} (quantised?), "
                    "only float16/float32 weights are supported"
                )
            data = np.frombuffer(read_data(), dtype=_CT2_DTYPES[dtype_id]).reshape(shape)
            out[name[len(prefix) :]] = data.astype(np.float32) if data.dtype.kind == "f" else data.copy()
    except OSError as exc:
        raise ModelFileError(f"{path}: {exc.strerror or exc}") from None
    return out


def encoder_blocks_needed(layers: tuple[int, ...]) -> int:
    """Transformer blocks to keep for hidden states ``layers`` (state k is the output of block k)."""
    return max(layers)


def write_encoder_subset(src: str | Path, dst: str | Path, blocks: int) -> Path:
    """Write ``dst/model.bin`` + ``dst/config.json``: the encoder of the faster-whisper directory ``src``
    cut after ``blocks`` transformer blocks (the stem, positions and blocks ``0..blocks-1``, copied byte
    for byte; no decoder, and no final layer norm unless every block is kept), for
    :func:`load_encoder_layers` only.

    Hidden states ``0..blocks`` of the cut encoder equal the full encoder's. It is a compact teacher to
    carry where the full model cannot go (Whisper base: 22 MB for 3 blocks against 145 MB); CTranslate2
    itself cannot load it (no decoder).
    """
    src, dst = check_teacher_dir(src), Path(dst)
    if blocks < 1:
        raise ValueError("blocks must be at least 1")
    keep = ("encoder/conv1/", "encoder/conv2/", "encoder/position_encodings/", "encoder/num_heads")
    kept, final_norm, found = [], [], set()
    try:
        version, spec, revision, records = _ct2_records(src / "model.bin")
        for name, _, _, header, read_data in records:
            if block := re.match(r"encoder/layer_(\d+)/", name):
                k = int(block.group(1))
                found.add(k)
                if k < blocks:
                    kept.append(header + read_data())
            elif name.startswith(keep):
                kept.append(header + read_data())
            elif name.startswith("encoder/layer_norm/"):
                final_norm.append(header + read_data())
    except OSError as exc:
        raise ModelFileError(f"{src / 'model.bin'}: {exc.strerror or exc}") from None
    if blocks > len(found):
        raise ModelFileError(f"{src / 'model.bin'}: {blocks} blocks asked for, the encoder has {len(found)}")
    if blocks == len(found):
        kept += final_norm  # the whole encoder: its last state keeps the final layer norm
    dst.mkdir(parents=True, exist_ok=True)
    spec_bytes = spec.encode() + b"\0"
    with (dst / "model.bin").open("wb") as f:
        f.write(
            struct.pack("<I", version)
            + struct.pack("<H", len(spec_bytes))
            + spec_bytes
            + struct.pack("<II", revision, len(kept))
        )
        for record in kept:
            f.write(record)
        f.write(struct.pack("<I", 0))  # no aliases
    config = json.loads((src / "config.json").read_text())
    config["emostream_encoder_subset"] = {"source": src.name, "blocks": blocks}
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return dst


class WhisperEncoderLayers(torch.nn.Module):
    """Whisper's audio encoder (conv stem, sinusoidal positions, pre-norm transformer blocks).

    ``forward`` returns the hidden states ``(layers + 1, batch, frames, d_model)``: index 0 after the
    stem and positions, index k after block k; the last one passes through the final layer norm, as
    the encoder's output does (so index ``-1`` equals CTranslate2's ``encode``), unless the encoder is
    a cut one without it (:func:`write_encoder_subset`).
    """

    def __init__(self, variables: dict[str, np.ndarray]):
        super().__init__()
        t = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in variables.items() if v.dtype.kind == "f"}
        self.n_heads = int(variables["num_heads"])
        self.n_layers = sum(1 for k in variables if k.endswith("self_attention/linear_0/weight"))
        self.params = torch.nn.ParameterDict(
            {k.replace("/", "__"): torch.nn.Parameter(v, requires_grad=False) for k, v in t.items()}
        )

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
        if "layer_norm__gamma" in self.params:  # a cut encoder (write_encoder_subset) has none
            states[-1] = self._ln(x, "layer_norm")
        return torch.stack(states)


def load_encoder_layers(teacher_dir: str | Path, blocks: int | None = None) -> WhisperEncoderLayers:
    """The encoder of the faster-whisper directory ``teacher_dir`` with all its layers exposed; with
    ``blocks``, only its first ``blocks`` transformer blocks (as :func:`write_encoder_subset` cuts it,
    in memory: hidden states ``0..blocks`` equal the full encoder's, at a fraction of its cost)."""
    variables = read_ct2_variables(check_teacher_dir(teacher_dir) / "model.bin")
    n_blocks = sum(1 for k in variables if k.endswith("self_attention/linear_0/weight"))
    if blocks is not None and blocks < n_blocks:
        if blocks < 1:
            raise ValueError("blocks must be at least 1")
        variables = {
            k: v
            for k, v in variables.items()
            if not k.startswith("layer_norm/")
            and not ((m := re.match(r"layer_(\d+)/", k)) and int(m.group(1)) >= blocks)
        }
    return WhisperEncoderLayers(variables).eval()
