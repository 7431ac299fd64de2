import json

import numpy as np
import pytest
import torch

from emostream.audio import WINDOW_SAMPLES
from emostream.features import FeatureConfig, MelFrontEnd
from emostream.model import (
    CLASSES,
    CheckpointError,
    EmotionNet,
    Predictor,
    load_checkpoint,
    load_pretrained_backbone,
    save_checkpoint,
    select_device,
)

from .conftest import speechlike


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return EmotionNet().eval()


def test_frontend_shape_and_recipe_parameters():
    fe = MelFrontEnd()
    cfg = fe.config
    assert (cfg.sample_rate, cfg.n_fft, cfg.hop_length, cfg.n_mels, cfg.f_min, cfg.f_max) == (
        16000,
        2048,
        512,
        128,
        50,
        8000,
    )
    spec = fe(torch.zeros(2, WINDOW_SAMPLES) + 0.01)
    assert spec.shape == (2, 1, 128, cfg.frames()) == (2, 1, 128, 188)


def test_frontend_matches_torchaudio_reference():
    import torchaudio

    x = torch.from_numpy(speechlike(2.0))[None]
    ref = torchaudio.transforms.AmplitudeToDB()(
        torchaudio.transforms.MelSpectrogram(16000, n_fft=2048, hop_length=512, n_mels=128, f_min=50, f_max=8000)(x)
    )
    assert torch.allclose(MelFrontEnd()(x)[:, 0], ref, atol=1e-4)


def test_model_outputs_seven_logits(net):
    with torch.inference_mode():
        out = net(torch.zeros(3, WINDOW_SAMPLES))
    assert out.shape == (3, len(CLASSES)) and out.dtype == torch.float32
    assert CLASSES == ("Angry", "Disgusted", "Fearful", "Happy", "Neutral", "Sad", "Surprised")


def test_drop_path_is_stochastic_in_training_and_off_in_eval(net, tmp_path):
    """Stochastic depth (``ModelConfig.drop_path``) skips residual blocks per sample while training
    only: in eval mode the same weights give the plain network's logits, so a checkpoint trained
    with it streams exactly like one without; ``model.json`` records it and loads back."""
    from emostream.model import ModelConfig

    plain, deep = EmotionNet(), EmotionNet(ModelConfig(drop_path=0.5))
    state = net.state_dict()
    for name in state:  # timm zero-initialises each block's last BN scale: give the residual branches a voice
        if name.endswith("bn3.weight"):
            state[name] = torch.ones_like(state[name])
    plain.load_state_dict(state)
    deep.load_state_dict(state)
    x = torch.from_numpy(np.stack([speechlike(2.0, seed=s) for s in range(2)]))
    with torch.no_grad():
        assert torch.equal(deep.eval()(x), plain.eval()(x))
        deep.train()
        torch.manual_seed(1)
        a = deep(x)
        torch.manual_seed(2)
        b = deep(x)
        torch.manual_seed(1)
        assert not torch.allclose(a, b) and torch.equal(a, deep(x))
    save_checkpoint(deep.eval(), tmp_path / "ck", {}, half=False)
    assert load_checkpoint(tmp_path / "ck", "cpu").model_config.drop_path == 0.5


def test_checkpoint_roundtrip_fp32_exact(net, tmp_path):
    save_checkpoint(net, tmp_path / "ck", {"metrics": {"ua": 0.5}}, half=False)
    meta = json.loads((tmp_path / "ck" / "model.json").read_text())
    assert meta["classes"] == list(CLASSES) and meta["features"]["f_max"] == 8000 and meta["metrics"]["ua"] == 0.5
    assert "code_version" in meta
    loaded = load_checkpoint(tmp_path / "ck", "cpu")
    x = torch.from_numpy(np.stack([speechlike(6.0, seed=s) for s in range(2)]))
    with torch.inference_mode():
        assert torch.equal(loaded(x), net(x))


def test_checkpoint_fp16_is_compact_and_close(net, tmp_path):
    save_checkpoint(net, tmp_path / "ck")
    size_mb = (tmp_path / "ck" / "model.safetensors").stat().st_size / 1e6
    assert 40 < size_mb < 55
    p = Predictor.from_checkpoint(tmp_path / "ck", device="cpu", mixed_precision=False)
    x = np.stack([speechlike(6.0, seed=3)])
    with torch.inference_mode():
        ref = torch.softmax(net(torch.from_numpy(x)), -1).numpy()
    assert np.abs(p.predict(x) - ref).max() < 0.02
    probs = p.predict(np.zeros((4, WINDOW_SAMPLES), np.float32))
    assert probs.shape == (4, 7) and np.allclose(probs.sum(1), 1, atol=1e-5)


def test_bf16_autocast_predict_close_to_fp32(net, tmp_path, monkeypatch):
    import emostream.model

    monkeypatch.setattr(emostream.model, "cpu_has_fast_bf16", lambda: True)  # bf16 even on a CPU without fast kernels
    save_checkpoint(net, tmp_path / "ck", half=False)
    x = np.stack([speechlike(6.0, seed=s) for s in range(2)])
    fp32 = Predictor.from_checkpoint(tmp_path / "ck", device="cpu", mixed_precision=False).logits(x)
    mixed = Predictor.from_checkpoint(tmp_path / "ck", device="cpu", mixed_precision=True)
    assert mixed.precision == "bf16"
    bf16 = mixed.logits(x)
    assert not torch.equal(fp32, bf16)  # bf16 really ran
    assert torch.allclose(fp32, bf16, atol=0.25 * fp32.abs().max().item() + 0.05)


def test_bf16_predictor_stores_the_weights_autocast_would_cast(net, tmp_path, monkeypatch):
    """On a bf16 CPU the predictor keeps conv/linear weights in bf16 (half the memory, no per-call
    copies) and gives exactly what autocast over fp32 weights gives; batch norms stay fp32."""
    import copy

    import emostream.model
    from emostream.model import autocast_for, cast_autocast_weights

    monkeypatch.setattr(emostream.model, "cpu_has_fast_bf16", lambda: True)
    save_checkpoint(net, tmp_path / "ck", half=False)
    p = Predictor.from_checkpoint(tmp_path / "ck", device="cpu")
    backbone = p.model.backbone
    assert backbone.conv1.weight.dtype == torch.bfloat16 and backbone.fc.weight.dtype == torch.bfloat16
    assert backbone.bn1.weight.dtype == torch.float32 and backbone.bn1.running_var.dtype == torch.float32
    x = np.stack([speechlike(6.0, seed=s) for s in range(3)])
    reference = copy.deepcopy(net).to(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_for(torch.device("cpu")):
        want = reference(torch.from_numpy(x)).float()
    assert torch.equal(p.logits(x), want)
    assert cast_autocast_weights(copy.deepcopy(net).backbone, torch.bfloat16) == 54  # ResNet50: 53 convs + fc
    fp32 = Predictor.from_checkpoint(tmp_path / "ck", device="cpu", mixed_precision=False)
    assert fp32.model.backbone.conv1.weight.dtype == torch.float32


def test_mixed_precision_follows_the_cpu(net, monkeypatch):
    """Mixed precision is fp16 on CUDA and bf16 on a CPU only where oneDNN has fast bf16 kernels; on
    a CPU without them (AVX2 only) bf16 autocast is several times slower than fp32, so it stays off."""
    import emostream.model as m

    cpu = torch.device("cpu")
    assert isinstance(m.cpu_has_fast_bf16(), bool)  # oneDNN's own answer for this machine
    assert m.mixed_precision_dtype(torch.device("cuda")) == torch.float16
    monkeypatch.setattr(m, "cpu_has_fast_bf16", lambda: False)
    assert m.mixed_precision_dtype(cpu) is None and m.precision_name(cpu) == "fp32"
    assert Predictor(model=net, device=cpu).precision == "fp32"
    with m.autocast_for(cpu):
        assert not torch.is_autocast_enabled("cpu")
    monkeypatch.setattr(m, "cpu_has_fast_bf16", lambda: True)
    assert m.precision_name(cpu) == "bf16" and m.precision_name(cpu, mixed_precision=False) == "fp32"
    assert Predictor(model=net, device=cpu, mixed_precision=False).precision == "fp32"
    with m.autocast_for(cpu):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    with m.autocast_for(cpu, enabled=False):
        assert not torch.is_autocast_enabled("cpu")


def test_checkpoint_errors(tmp_path, net):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nothing")
    save_checkpoint(net, tmp_path / "ck")
    meta_path = tmp_path / "ck" / "model.json"
    meta = json.loads(meta_path.read_text())
    meta["classes"] = ["a", "b"]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="classes"):
        load_checkpoint(tmp_path / "ck")


def test_checkpoint_with_other_shapes_or_names_is_refused(tmp_path, net):
    from safetensors.torch import load_file, save_file

    save_checkpoint(net, tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    state = load_file(str(weights))
    state["backbone.fc.weight"] = state["backbone.fc.weight"][:3]
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match=r"backbone.fc.weight is \(3, 2048\)"):
        load_checkpoint(tmp_path / "ck")
    del state["backbone.fc.weight"]
    state["backbone.extra"] = torch.zeros(1)
    save_file(state, str(weights))
    with pytest.raises(CheckpointError, match="missing \\['backbone.fc.weight'\\], unexpected \\['backbone.extra'\\]"):
        load_checkpoint(tmp_path / "ck")


def test_pretrained_loader_adapts_conv1_and_drops_head(tmp_path):
    import timm

    rgb = timm.create_model("resnet50", pretrained=False, num_classes=1000)
    torch.save(rgb.state_dict(), tmp_path / "resnet50.pth")
    net = EmotionNet()
    load_pretrained_backbone(net, tmp_path / "resnet50.pth")
    assert torch.allclose(net.backbone.conv1.weight, rgb.conv1.weight.sum(1, keepdim=True))
    assert net.backbone.fc.out_features == 7
    torch.save({"bogus.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError):
        load_pretrained_backbone(EmotionNet(), tmp_path / "bad.pth")


def test_pretrained_emostream_checkpoint_starts_every_weight(tmp_path):
    """Fine-tuning: an emostream checkpoint directory loads every weight, head included, and one
    trained with other features is refused."""
    torch.manual_seed(1)
    source = EmotionNet().eval()
    save_checkpoint(source, tmp_path / "ck", half=False)
    net = EmotionNet().eval()
    assert not torch.equal(net.backbone.fc.weight, source.backbone.fc.weight)
    load_pretrained_backbone(net, tmp_path / "ck")
    for (name, a), b in zip(source.state_dict().items(), net.state_dict().values()):
        assert torch.equal(a, b), name
    other = EmotionNet(feature_config=FeatureConfig(n_mels=64))
    with pytest.raises(CheckpointError, match="other features"):
        load_pretrained_backbone(other, tmp_path / "ck")


def test_device_selection():
    assert select_device("cpu").type == "cpu"
    assert select_device().type == ("cuda" if torch.cuda.is_available() else "cpu")
