"""The mel front end: per-window (utterance) normalisation, VTLP (training only)."""

import pytest
import torch

from emostream.features import UTTERANCE_FLOOR_DB, FeatureConfig, MelFrontEnd, normalize_utterance
from train.forward import vtlp_filterbanks


def _speechlike(seed: int = 0, seconds: float = 6.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    env = 0.5 * (1 + torch.sin(2 * torch.pi * 3 * t))
    return (0.1 * env * torch.sin(2 * torch.pi * 180 * t) + 0.01 * torch.randn(n, generator=g)).float()


def test_utterance_normalisation_is_gain_invariant_and_standardised():
    fe = MelFrontEnd(FeatureConfig(normalize="utterance"))
    x = _speechlike()
    a = fe(x[None])
    b = fe((x * 0.01)[None])  # 40 dB quieter
    assert torch.allclose(a, b, atol=1e-3)
    assert abs(float(a.mean())) < 1e-4 and abs(float(a.std()) - 1) < 1e-3


def test_utterance_normalisation_uses_no_batch_statistics():
    fe = MelFrontEnd(FeatureConfig(normalize="utterance"))
    x, y = _speechlike(1), 0.3 * _speechlike(2)
    both = fe(torch.stack([x, y]))
    assert torch.allclose(both[0], fe(x[None])[0], atol=1e-5)
    assert torch.allclose(both[1], fe(y[None])[0], atol=1e-5)


def test_floor_below_peak():
    spec = torch.tensor([[[0.0, -200.0], [-10.0, -50.0]]])
    out = normalize_utterance(spec)
    floored = torch.tensor([[[0.0, -UTTERANCE_FLOOR_DB], [-10.0, -50.0]]])
    expected = (floored - floored.mean()) / (floored.std() + 1e-5)
    assert torch.allclose(out, expected)


def test_default_is_the_recipe_and_bad_value_rejected():
    assert FeatureConfig().normalize == "none"
    with pytest.raises(ValueError, match="normalize"):
        FeatureConfig(normalize="global")


def _band_hz(config: FeatureConfig) -> torch.Tensor:
    """Centre frequency of each mel band (HTK mel scale, as torchaudio's default)."""
    mel = lambda f: 2595 * torch.log10(1 + f / 700)  # noqa: E731
    pts = torch.linspace(
        float(mel(torch.tensor(config.f_min))), float(mel(torch.tensor(config.f_max))), config.n_mels + 2
    )
    return (700 * (10 ** (pts / 2595) - 1))[1:-1]


def test_vtlp_factor_one_is_the_plain_front_end():
    fe = MelFrontEnd(FeatureConfig(normalize="utterance"))
    x = torch.stack([_speechlike(0), _speechlike(1)])
    assert torch.equal(vtlp_filterbanks(fe.mel.mel_scale.fb, torch.ones(3))[1], fe.mel.mel_scale.fb)
    assert torch.allclose(fe(x, filterbanks=vtlp_filterbanks(fe.mel.mel_scale.fb, torch.ones(2))), fe(x), atol=1e-5)


@pytest.mark.parametrize("alpha", [0.9, 1.1])
def test_vtlp_moves_a_tone_by_its_factor_and_keeps_the_band_filled(alpha):
    config = FeatureConfig()
    fe = MelFrontEnd(config)
    t = torch.arange(96000) / 16000
    tones = torch.stack([torch.sin(2 * torch.pi * 1000 * t), torch.sin(2 * torch.pi * 7500 * t)])
    out = fe(tones, filterbanks=vtlp_filterbanks(fe.mel.mel_scale.fb, torch.full((2,), alpha)))[:, 0].mean(
        -1
    )  # (2, mels)
    hz = _band_hz(config)
    assert abs(float(hz[out[0].argmax()]) / (1000 * alpha) - 1) < 0.03
    # above the knee the warp maps the rest of the band onto the rest of the band: a tone near
    # Nyquist stays inside it, and every mel band still receives energy from some linear bin
    assert 6000 < float(hz[out[1].argmax()]) < 8000
    banks = vtlp_filterbanks(fe.mel.mel_scale.fb, torch.tensor([alpha]))[0]
    assert bool((banks.sum(0) > 0).all())
    assert abs(float(banks.sum() / fe.mel.mel_scale.fb.sum()) - 1) < 0.05


def test_vtlp_warps_each_item_alone():
    fe = MelFrontEnd(FeatureConfig(normalize="utterance"))
    x = torch.stack([_speechlike(0), _speechlike(1)])

    def warped(waves, alphas):
        return fe(waves, filterbanks=vtlp_filterbanks(fe.mel.mel_scale.fb, torch.tensor(alphas)))

    both = warped(x, [0.9, 1.0])
    assert torch.allclose(both[0], warped(x[:1], [0.9])[0], atol=1e-5)
    assert torch.allclose(both[1], fe(x[1:])[0], atol=1e-5)
    assert not torch.allclose(both[0], fe(x[:1])[0], atol=1e-2)


def test_matmul_spectrogram_equals_torchaudio():
    """The export's matrix-product STFT (issue #43) is torchaudio's power spectrogram: same shape,
    centring, reflect padding and window, to float32 rounding, for odd lengths, silence and a 2 s clip."""
    import torchaudio

    from emostream.features import MatmulSpectrogram

    torch.manual_seed(0)
    x = 0.1 * torch.randn(3, 96000)
    x[1, 32000:] = 0
    x[2] = 0
    for length in (96000, 30001):
        ref = torchaudio.transforms.Spectrogram(n_fft=2048, hop_length=512, power=2.0)(x[:, :length])
        got = MatmulSpectrogram(2048, 512)(x[:, :length])
        assert got.shape == ref.shape
        assert (got - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert MatmulSpectrogram(512, 128)(x[:1]).shape == (1, 257, 751)
    with pytest.raises(ValueError, match="multiple"):
        MatmulSpectrogram(2048, 500)
