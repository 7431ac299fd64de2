"""The mel front end: per-window (utterance) normalisation."""
import pytest
import torch

from emostream.features import FeatureConfig, MelFrontEnd, UTTERANCE_FLOOR_DB, normalize_utterance


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
