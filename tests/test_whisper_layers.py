"""Whisper's encoder rebuilt in PyTorch from model.bin: the same output as CTranslate2, every layer
exposed, the layer cache and its config key, and clear errors for files it cannot read."""

import json
import struct

import numpy as np
import pytest
import torch

from train.config import ConfigError, load_config
from train.whisper_layers import ModelFileError, WhisperEncoderLayers, read_ct2_variables

from .test_teacher import CONFIGS, TEACHER_DIR, requires_teacher


def _string(s: str) -> bytes:
    b = s.encode() + b"\0"
    return struct.pack("<H", len(b)) + b


def _model_bin(path, variables: dict[str, np.ndarray], spec: str = "WhisperSpec", version: int = 6) -> None:
    """A CTranslate2 model.bin in the layout the converter writes (float16 weights, int16 scalars)."""
    ids = {np.dtype(np.float16): 4, np.dtype(np.float32): 0, np.dtype(np.int16): 2}
    out = struct.pack("<I", version) + _string(spec) + struct.pack("<I", 3) + struct.pack("<I", len(variables))
    for name, v in variables.items():
        out += _string(name) + struct.pack("<B", v.ndim) + b"".join(struct.pack("<I", d) for d in v.shape)
        out += struct.pack("<B", ids[v.dtype]) + struct.pack("<I", v.nbytes) + v.tobytes()
    path.write_bytes(out + struct.pack("<I", 0))


def _tiny_encoder_variables(d: int = 8, n_mels: int = 80, layers: int = 2, frames: int = 20, heads: int = 2):
    rng = np.random.default_rng(0)
    w = lambda *s: (rng.standard_normal(s) * 0.2).astype(np.float16)  # noqa: E731
    v = {
        "encoder/conv1/weight": w(d, n_mels, 3),
        "encoder/conv1/bias": w(d),
        "encoder/conv2/weight": w(d, d, 3),
        "encoder/conv2/bias": w(d),
        "encoder/position_encodings/encodings": w(frames, d),
        "encoder/num_heads": np.array(heads, np.int16),
        "encoder/layer_norm/gamma": w(d) + 1,
        "encoder/layer_norm/beta": w(d),
        "decoder/embeddings/weight": w(4, d),
    }
    for k in range(layers):
        p = f"encoder/layer_{k}"
        v |= {
            f"{p}/self_attention/layer_norm/gamma": w(d) + 1,
            f"{p}/self_attention/layer_norm/beta": w(d),
            f"{p}/self_attention/linear_0/weight": w(3 * d, d),
            f"{p}/self_attention/linear_0/bias": w(3 * d),
            f"{p}/self_attention/linear_1/weight": w(d, d),
            f"{p}/self_attention/linear_1/bias": w(d),
            f"{p}/ffn/layer_norm/gamma": w(d) + 1,
            f"{p}/ffn/layer_norm/beta": w(d),
            f"{p}/ffn/linear_0/weight": w(4 * d, d),
            f"{p}/ffn/linear_0/bias": w(4 * d),
            f"{p}/ffn/linear_1/weight": w(d, 4 * d),
            f"{p}/ffn/linear_1/bias": w(d),
        }
    return v


def _reference_encoder(v: dict[str, np.ndarray], mel: torch.Tensor) -> list[torch.Tensor]:
    """Whisper's AudioEncoder written out with torch.nn layers (openai/whisper's model.py), for comparison."""
    t = {
        k[len("encoder/") :]: torch.from_numpy(x.astype(np.float32))
        for k, x in v.items()
        if k.startswith("encoder/") and x.dtype.kind == "f"
    }
    d = t["conv1/bias"].shape[0]
    heads = int(v["encoder/num_heads"])
    x = torch.nn.functional.gelu(torch.nn.functional.conv1d(mel, t["conv1/weight"], t["conv1/bias"], padding=1))
    x = torch.nn.functional.gelu(torch.nn.functional.conv1d(x, t["conv2/weight"], t["conv2/bias"], stride=2, padding=1))
    x = x.permute(0, 2, 1) + t["position_encodings/encodings"][: x.shape[-1]]
    out = [x]
    k = 0
    while f"layer_{k}/ffn/linear_0/weight" in t:
        attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        attn.in_proj_weight.data, attn.in_proj_bias.data = (
            t[f"layer_{k}/self_attention/linear_0/weight"],
            t[f"layer_{k}/self_attention/linear_0/bias"],
        )
        attn.out_proj.weight.data, attn.out_proj.bias.data = (
            t[f"layer_{k}/self_attention/linear_1/weight"],
            t[f"layer_{k}/self_attention/linear_1/bias"],
        )
        ln1 = torch.nn.LayerNorm(d)
        ln1.weight.data, ln1.bias.data = (
            t[f"layer_{k}/self_attention/layer_norm/gamma"],
            t[f"layer_{k}/self_attention/layer_norm/beta"],
        )
        ln2 = torch.nn.LayerNorm(d)
        ln2.weight.data, ln2.bias.data = t[f"layer_{k}/ffn/layer_norm/gamma"], t[f"layer_{k}/ffn/layer_norm/beta"]
        h = ln1(x)
        x = x + attn(h, h, h, need_weights=False)[0]
        h = torch.nn.functional.linear(ln2(x), t[f"layer_{k}/ffn/linear_0/weight"], t[f"layer_{k}/ffn/linear_0/bias"])
        x = x + torch.nn.functional.linear(
            torch.nn.functional.gelu(h), t[f"layer_{k}/ffn/linear_1/weight"], t[f"layer_{k}/ffn/linear_1/bias"]
        )
        out.append(x)
        k += 1
    out[-1] = torch.nn.functional.layer_norm(x, (d,), t["layer_norm/gamma"], t["layer_norm/beta"])
    return out


def test_reads_the_encoder_of_a_model_bin_and_matches_whispers_encoder(tmp_path):
    v = _tiny_encoder_variables()
    _model_bin(tmp_path / "model.bin", v)
    read = read_ct2_variables(tmp_path / "model.bin")
    assert "decoder/embeddings/weight" not in read and "embeddings/weight" not in read  # the decoder is skipped
    assert read["conv1/weight"].dtype == np.float32 and read["conv1/weight"].shape == (8, 80, 3)
    assert int(read["num_heads"]) == 2
    enc = WhisperEncoderLayers(read)
    assert enc.n_layers == 2
    mel = torch.randn(2, 80, 40)
    states = enc(mel)
    assert states.shape == (3, 2, 20, 8)
    with torch.no_grad():
        ref = _reference_encoder(v, mel)
    for k in range(3):
        assert torch.allclose(states[k], ref[k], atol=1e-4), k


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(version=5), "binary version 5"),
        (dict(spec="TransformerSpec"), "not a Whisper model"),
    ],
)
def test_unreadable_model_bin_is_a_clear_error_naming_the_file(tmp_path, change, message):
    _model_bin(tmp_path / "model.bin", _tiny_encoder_variables(), **change)
    with pytest.raises(ModelFileError, match=message) as err:
        read_ct2_variables(tmp_path / "model.bin")
    assert str(tmp_path / "model.bin") in str(err.value)


def test_truncated_or_missing_model_bin_is_a_clear_error(tmp_path):
    _model_bin(tmp_path / "model.bin", _tiny_encoder_variables())
    data = (tmp_path / "model.bin").read_bytes()
    (tmp_path / "model.bin").write_bytes(data[:30])
    with pytest.raises(ModelFileError, match="truncated"):
        read_ct2_variables(tmp_path / "model.bin")
    with pytest.raises(ModelFileError, match="nope"):
        read_ct2_variables(tmp_path / "nope" / "model.bin")


def test_layer_config_key_is_checked(tmp_path):
    assert load_config(CONFIGS / "distill.yaml").distill.layers == ()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"base: {CONFIGS / 'distill.yaml'}\nemostream:\n  distill:\n    layers: [4, 3]\n")
    assert load_config(cfg).distill.layers == (3, 4)
    for bad in ("3", "[3, 3]", "[-1]", "[true]"):
        cfg.write_text(f"base: {CONFIGS / 'distill.yaml'}\nemostream:\n  distill:\n    layers: {bad}\n")
        with pytest.raises(ConfigError, match="emostream.distill.layers"):
            load_config(cfg)


@requires_teacher
def test_output_layer_equals_ctranslate2_encode_on_the_shipped_teacher():
    ct2 = pytest.importorskip("ctranslate2")
    from faster_whisper.feature_extractor import FeatureExtractor

    from train.teacher import CONTEXT_FRAMES, CONTEXT_SAMPLES
    from train.whisper_layers import load_encoder_layers

    from .conftest import speechlike

    audio = np.zeros(CONTEXT_SAMPLES, np.float32)
    audio[:32000] = speechlike(2.0, seed=3)
    mel = FeatureExtractor()(audio, padding=0)[:, : CONTEXT_FRAMES * 2]
    model = ct2.models.Whisper(str(TEACHER_DIR), device="cpu", compute_type="float32")
    ref = np.asarray(model.encode(ct2.StorageView.from_array(np.ascontiguousarray(mel[None], dtype=np.float32))))
    states = load_encoder_layers(TEACHER_DIR)(torch.from_numpy(mel[None]))
    assert states.shape == (7, 1, CONTEXT_FRAMES, 512)
    assert np.abs(states[-1].numpy() - ref).max() < 1e-2 * np.abs(ref).max()
    assert not torch.allclose(states[3], states[-1])


@requires_teacher
def test_layer_cache_averages_the_chosen_hidden_states(tmp_path):
    pytest.importorskip("ctranslate2")
    import pandas as pd
    import soundfile as sf

    from train.data import build_cache, load_dataset
    from train.teacher import TeacherError, build_teacher_cache, clip_frames

    from .conftest import speechlike

    rows = []
    for k in range(3):
        sf.write(tmp_path / f"c{k}.wav", speechlike(0.5 + k, seed=k), 16000)
        rows.append({"path": f"c{k}.wav", "label": "Angry", "speaker": f"s{k}", "corpus": "tiny"})
    pd.DataFrame(rows).to_csv(tmp_path / "manifest.csv", index=False)
    cache = build_cache(load_dataset(tmp_path), tmp_path / "cache")
    three = build_teacher_cache(cache, TEACHER_DIR, tmp_path / "cache", layers=(3,))
    four = build_teacher_cache(cache, TEACHER_DIR, tmp_path / "cache", layers=(4,))
    both = build_teacher_cache(cache, TEACHER_DIR, tmp_path / "cache", layers=(3, 4))
    assert three.frames.shape == (sum(clip_frames(cache.clip_length(i)) for i in range(3)), 512)
    assert np.allclose(
        both.frames.astype(np.float32),
        (three.frames.astype(np.float32) + four.frames.astype(np.float32)) / 2,
        atol=2e-2,
    )
    assert list(both.offsets) == list(three.offsets)
    assert len(list((tmp_path / "cache").glob("teacher-*-L*.npy"))) == 3  # one derived file per choice
    with pytest.raises(TeacherError, match="layer 9 does not exist"):
        build_teacher_cache(cache, TEACHER_DIR, tmp_path / "cache", layers=(9,))


def test_teacher_layers_argument_is_checked(capsys):
    from train.__main__ import main

    with pytest.raises(SystemExit) as exc:
        main(["teacher", "--config", str(CONFIGS / "distill.yaml"), "--layers", "3,x"])
    assert exc.value.code == 2 and "expected layer numbers" in capsys.readouterr().err


@requires_teacher
def test_teacher_cli_compares_layer_choices(tmp_path):
    pytest.importorskip("ctranslate2")
    import json

    from train.__main__ import main

    from .test_teacher import write_tiny_set

    write_tiny_set(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"base: {CONFIGS / 'distill.yaml'}\ndataset:\n  folds: ['2']\nemostream:\n  distill:\n    inner_folds: 2\n"
    )
    out = tmp_path / "out"
    assert (
        main(
            [
                "teacher",
                "--config",
                str(cfg),
                "--data",
                str(tmp_path),
                "--teacher",
                str(TEACHER_DIR),
                "--cache",
                str(tmp_path / "cache"),
                "--out",
                str(out),
                "--layers",
                "3",
                "4,3",
            ]
        )
        == 0
    )
    table = (out / "teacher_layers.md").read_text()
    assert "| 3 |" in table and "| 3, 4 |" in table
    results = json.loads((out / "teacher_layers.json").read_text())
    assert set(results) == {"3", "3-4", "nested"} and 0 <= results["3"]["ua"]["mean"] <= 1
    report = json.loads((out / "layers_3-4" / "teacher_report.json").read_text())
    assert "encoder hidden states 3, 4 (mean)" in report["protocol"] and len(report["folds"]) == 2
    # the choice made inside each fold's training speakers, scored by the same head as its report
    assert "Chosen inside each fold's training speakers" in table and "| nested CV |" in table
    for pick in results["nested"]:
        chosen = json.loads((out / f"layers_{pick['chosen']}" / "teacher_report.json").read_text())
        assert pick["ua"] == pytest.approx(chosen["folds"][pick["fold"]]["overall"]["ua"])


def _teacher_dir(path, **kw):
    """A faster-whisper-like directory holding a tiny synthetic encoder (no decoder to speak of)."""
    import json

    path.mkdir(parents=True, exist_ok=True)
    _model_bin(path / "model.bin", _tiny_encoder_variables(**kw))
    (path / "config.json").write_text(json.dumps({"alignment_heads": [], "lang_ids": []}))
    return path


def test_encoder_subset_keeps_the_hidden_states_up_to_its_last_block_exactly(tmp_path):
    from train.whisper_layers import encoder_blocks_needed, load_encoder_layers, write_encoder_subset

    full_dir = _teacher_dir(tmp_path / "full", layers=3)
    full = load_encoder_layers(full_dir)
    mel = torch.randn(1, 80, 40)
    states = full(mel)
    assert encoder_blocks_needed((2,)) == 2 and encoder_blocks_needed((1, 3)) == 3
    cut_dir = write_encoder_subset(full_dir, tmp_path / "cut", 2)
    assert (cut_dir / "model.bin").stat().st_size < (full_dir / "model.bin").stat().st_size
    assert json.loads((cut_dir / "config.json").read_text())["emostream_encoder_subset"] == {
        "source": "full",
        "blocks": 2,
    }
    read = read_ct2_variables(cut_dir / "model.bin")
    assert not any(k.startswith(("layer_2/", "layer_norm/")) for k in read)
    assert read_ct2_variables(cut_dir / "model.bin", prefix="decoder/") == {}
    cut = load_encoder_layers(cut_dir)
    assert cut.n_layers == 2
    # states 0..2 are the full encoder's, byte-identical weights: the last one is block 2's output as it
    # is, not passed through the final layer norm that only the encoder's output gets
    assert torch.equal(cut(mel), states[:3])
    # every block kept: the final layer norm too, so the output equals the full encoder's
    whole = load_encoder_layers(write_encoder_subset(full_dir, tmp_path / "whole", 3))
    assert torch.equal(whole(mel), states)
    with pytest.raises(ModelFileError, match="4 blocks asked for, the encoder has 3"):
        write_encoder_subset(full_dir, tmp_path / "more", 4)


@requires_teacher
def test_encoder_subset_of_the_shipped_teacher_gives_block_3_exactly(tmp_path):
    from train.whisper_layers import load_encoder_layers, write_encoder_subset

    cut_dir = write_encoder_subset(TEACHER_DIR, tmp_path / "cut", 3)
    assert (cut_dir / "model.bin").stat().st_size < 24e6  # carried to a GPU machine in one part
    mel = torch.randn(1, 80, 200)
    assert torch.equal(load_encoder_layers(cut_dir)(mel)[3], load_encoder_layers(TEACHER_DIR)(mel)[3])


def test_feature_extractor_loads_without_ctranslate2_or_av(tmp_path, monkeypatch):
    """On a GPU machine that carries faster-whisper's wheel alone, its package __init__ fails on
    CTranslate2 / PyAV: the NumPy log-mel extractor is loaded from its own file."""
    import shutil
    import sys

    fw = pytest.importorskip("faster_whisper.feature_extractor")
    from train.teacher import whisper_feature_extractor

    fake = tmp_path / "faster_whisper"
    fake.mkdir()
    (fake / "__init__.py").write_text("import ctranslate2_not_installed_here\n")
    shutil.copy(fw.__file__, fake / "feature_extractor.py")
    for name in [m for m in sys.modules if m == "faster_whisper" or m.startswith("faster_whisper.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(tmp_path))
    extractor = whisper_feature_extractor()
    assert type(extractor).__module__ == "_faster_whisper_feature_extractor"
    audio = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    assert np.array_equal(extractor(audio, padding=0), fw.FeatureExtractor()(audio, padding=0))


def test_encoder_cut_in_memory_gives_the_same_states_as_the_full_one(tmp_path):
    """``load_encoder_layers(dir, blocks)`` runs only the first blocks: states 0..blocks exactly the
    full encoder's (the last one without the final layer norm), as the cut file gives them."""
    from train.whisper_layers import load_encoder_layers, write_encoder_subset

    full_dir = _teacher_dir(tmp_path / "full", layers=3)
    mel = torch.randn(1, 80, 40)
    states = load_encoder_layers(full_dir)(mel)
    cut = load_encoder_layers(full_dir, blocks=2)
    assert cut.n_layers == 2 and "layer_norm__gamma" not in cut.params
    assert torch.equal(cut(mel), states[:3])
    assert torch.equal(cut(mel), load_encoder_layers(write_encoder_subset(full_dir, tmp_path / "cut", 2))(mel))
    assert torch.equal(load_encoder_layers(full_dir, blocks=3)(mel), states)  # every block: the encoder itself
    with pytest.raises(ValueError, match="at least 1"):
        load_encoder_layers(full_dir, blocks=0)
