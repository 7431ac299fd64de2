"""CallPipeline: the held frames of the server's path give the windows of the eager path."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from emostream.audio import StreamResampler
from emostream.pipeline import CallPipeline
from emostream.stream import StreamConfig


def constant(windows: np.ndarray) -> np.ndarray:
    return np.full((len(windows), 7), 1 / 7, np.float32)


@pytest.mark.parametrize("rate", [8000, 16000, 44100])
@pytest.mark.parametrize("hop", [1.0, 0.5])
def test_channel_windows_hold_frames_and_give_the_same_windows(rate, hop):
    """Frames held until a window is due (channel_windows) against every frame resampled and windowed
    on arrival (frame_windows): the same windows with the same samples, none returned later."""
    rng = np.random.default_rng(rate)
    x = (0.1 * rng.standard_normal(int(9.3 * rate))).astype(np.float32)
    config = StreamConfig(hop_seconds=hop)
    held = CallPipeline(constant, "s", ("a",), stream_config=config, sample_rate=rate)
    eager = CallPipeline(constant, "s", ("a",), stream_config=config, sample_rate=rate)
    releases = []
    release = held._release
    held._release = lambda ch: releases.append(ch) or release(ch)  # counts the resampler runs
    got, ref, pos, k = [], [], 0, 0
    while pos < len(x):
        n = int(rng.integers(1, int(0.05 * rate)))  # frames of up to 50 ms
        got += [(k, w) for w in held.channel_windows(0, x[pos : pos + n])]
        ref += [(k, w) for w in eager.frame_windows(x[pos : pos + n])]
        pos, k = pos + n, k + 1
    got += [(k, w) for w in held.final_windows()]
    ref += [(k, w) for w in eager.final_windows()]
    assert [(w.start, w.end, w.final) for _, w in got] == [(w.start, w.end, w.final) for _, w in ref]
    assert len(got) >= int(9.3 / hop) - 6
    for (k_got, a), (k_ref, b) in zip(got, ref):
        np.testing.assert_allclose(a.samples, b.samples, atol=1e-6)  # BLAS sums blocks in its own order
        assert k_got <= k_ref
    assert len(releases) <= len(got) + 1 < k / 4  # frames are resampled about once a window, not each


@pytest.mark.parametrize("orig", [8000, 11025, 44100, 48000])
def test_resampler_input_needed_is_the_least_input_that_gives_the_output(orig):
    rng = np.random.default_rng(orig)
    r = StreamResampler(orig, 16000)
    for _ in range(20):
        r.push((0.1 * rng.standard_normal(int(rng.integers(0, 3000)))).astype(np.float32))
        want = int(rng.integers(1, 20000))
        n = r.input_needed(want)
        more = (0.1 * rng.standard_normal(n)).astype(np.float32)
        assert len(copy.deepcopy(r).push(more)) >= want
        if n > 0:
            assert len(copy.deepcopy(r).push(more[:-1])) < want
    assert StreamResampler(16000, 16000).input_needed(123) == 123
