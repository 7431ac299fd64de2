import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from emostream.audio import SAMPLE_RATE, WINDOW_SAMPLES
from emostream.stream import (
    ChannelWindower,
    RingBuffer,
    StreamConfig,
    StreamWindower,
    fixed_chunks,
    placed_windows,
)


def ramp(n: int, start: int = 0) -> np.ndarray:
    """Samples whose value encodes their absolute index (exact in float32 up to 2**24)."""
    return np.arange(start, start + n, dtype=np.float32)


def test_ring_buffer_wraparound_and_clock():
    rb = RingBuffer(10)
    rb.append(ramp(7))
    rb.append(ramp(6, 7))
    assert rb.total == 13 and rb.oldest == 3
    assert np.array_equal(rb.read(3, 13), ramp(10, 3))
    with pytest.raises(IndexError):
        rb.read(2, 5)
    with pytest.raises(IndexError):
        rb.read(5, 14)


def test_ring_buffer_chunk_larger_than_capacity():
    rb = RingBuffer(8)
    rb.append(ramp(3))
    rb.append(ramp(20, 3))
    assert rb.total == 23
    assert np.array_equal(rb.read(15, 23), ramp(8, 15))


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 50), st.lists(st.integers(0, 120), min_size=1, max_size=40))
def test_ring_buffer_matches_reference(capacity, chunks):
    rb, pos = RingBuffer(capacity), 0
    for n in chunks:
        rb.append(ramp(n, pos))
        pos += n
        assert rb.total == pos
        lo = rb.oldest
        assert np.array_equal(rb.read(lo, pos), ramp(pos - lo, lo))


def window_ends(cfg: StreamConfig, total: int, chunks) -> list:
    w = ChannelWindower("a", cfg)
    out, pos = [], 0
    for n in chunks:
        n = min(n, total - pos)
        out += w.push(ramp(n, pos))
        pos += n
        if pos >= total:
            break
    if pos < total:
        out += w.push(ramp(total - pos, pos))
    return out + w.flush()


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 40000), min_size=1, max_size=30),
    st.sampled_from([0.5, 1.0, 0.25]),
    st.integers(SAMPLE_RATE // 2, 15 * SAMPLE_RATE),
)
def test_windows_independent_of_chunking(chunks, hop, total):
    cfg = StreamConfig(hop_seconds=hop, min_seconds=1.0)
    got = window_ends(cfg, total, chunks)
    ref = window_ends(cfg, total, [total])
    assert [(w.start, w.end, w.final) for w in got] == [(w.start, w.end, w.final) for w in ref]
    for w in got:
        assert w.samples.shape == (WINDOW_SAMPLES,)
        n = w.end - w.start
        assert np.array_equal(w.samples[:n], ramp(n, w.start))  # exact samples of [start, end)
        assert not w.samples[n:].any()  # zero padding after


def test_window_schedule_exact_times():
    cfg = StreamConfig(hop_seconds=1.0, min_seconds=1.0)
    total = int(9.5 * SAMPLE_RATE)
    windows = window_ends(cfg, total, [1234] * 200)
    ends = [w.t_end for w in windows]
    assert ends == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 9.5]
    starts = [w.t_start for w in windows]
    assert starts == [0, 0, 0, 0, 0, 0, 1.0, 2.0, 3.0, 3.5]
    assert windows[-1].final and not any(w.final for w in windows[:-1])


def test_min_seconds_and_half_second_hop():
    cfg = StreamConfig(hop_seconds=0.5, min_seconds=2.2)
    windows = window_ends(cfg, 4 * SAMPLE_RATE, [SAMPLE_RATE])
    assert [w.t_end for w in windows] == [2.5, 3.0, 3.5, 4.0]  # no final window: audio ends on a hop


def test_short_stream_gets_one_final_window():
    windows = window_ends(StreamConfig(min_seconds=1.0), 8000, [8000])
    assert len(windows) == 1 and windows[0].final and windows[0].t_end == 0.5


def test_empty_stream_has_no_window():
    assert ChannelWindower("a").flush() == []


def test_bad_config():
    for kwargs in ({"hop_seconds": 0}, {"hop_seconds": -1}, {"min_seconds": 7}, {"min_seconds": 0}):
        with pytest.raises(ValueError):
            StreamConfig(**kwargs)


def test_stream_windower_stereo_channels_and_order():
    sw = StreamWindower("call", ("agent", "customer"), StreamConfig())
    frames = np.stack([ramp(3 * SAMPLE_RATE), -ramp(3 * SAMPLE_RATE)])
    windows = sw.push_frames(frames) + sw.flush()
    assert [(w.channel, w.t_end) for w in windows] == [
        ("agent", 1.0),
        ("customer", 1.0),
        ("agent", 2.0),
        ("customer", 2.0),
        ("agent", 3.0),
        ("customer", 3.0),
    ]
    assert windows[1].samples[5] == -5
    with pytest.raises(ValueError):
        sw.push_frames(np.zeros((3, 10)))
    with pytest.raises(ValueError):
        StreamWindower("x", ("a", "a"))


def test_fixed_chunks_pad_last():
    x = ramp(WINDOW_SAMPLES + 100)
    chunks = fixed_chunks(x)
    assert chunks.shape == (2, WINDOW_SAMPLES)
    assert chunks[1, 99] == WINDOW_SAMPLES + 99 and chunks[1, 100] == 0
    assert fixed_chunks(np.zeros(10)).shape == (1, WINDOW_SAMPLES)


def test_placed_windows_one_position_is_the_recipe():
    for n in (10, WINDOW_SAMPLES, WINDOW_SAMPLES + 100):
        np.testing.assert_array_equal(placed_windows(ramp(n), 1), fixed_chunks(ramp(n)))
    with pytest.raises(ValueError, match="positions"):
        placed_windows(ramp(10), 0)


def test_placed_windows_move_a_short_clip_across_the_window():
    x = ramp(2 * SAMPLE_RATE) + 1  # no zeros in the clip
    w = placed_windows(x, 5)
    assert w.shape == (5, WINDOW_SAMPLES)
    starts = [int(np.flatnonzero(row)[0]) for row in w]
    spare = WINDOW_SAMPLES - len(x)
    assert starts == [0, spare // 4, spare // 2, 3 * spare // 4, spare]
    for row, s in zip(w, starts):  # the whole clip, unchanged, and silence around it
        np.testing.assert_array_equal(row[s : s + len(x)], x)
        assert not row[:s].any() and not row[s + len(x) :].any()


def test_placed_windows_read_a_long_clip_from_inside():
    x = ramp(14 * SAMPLE_RATE)
    w = placed_windows(x, 5)
    starts = [int(row[0]) for row in w]
    assert starts[0] == 0 and starts[-1] == len(x) - WINDOW_SAMPLES
    assert np.diff(starts).max() <= WINDOW_SAMPLES / 4 and len(w) >= 5
    for row, s in zip(w, starts):  # every window lies wholly inside the clip
        np.testing.assert_array_equal(row, x[s : s + WINDOW_SAMPLES])


def test_skip_collapses_a_gap_and_restarts_the_schedule():
    """Issue 40: a long gap costs O(1): the audio before it gets its final window, then windows end at
    gap_end + k * hop and never reach back before gap_end."""
    sr = SAMPLE_RATE
    w = ChannelWindower("ch", StreamConfig())
    assert [x.end for x in w.push(np.ones(int(2.5 * sr), np.float32))] == [sr, 2 * sr]
    final = w.skip(3600 * sr)
    assert [(x.end, x.final) for x in final] == [(int(2.5 * sr), True)]
    origin = int(2.5 * sr) + 3600 * sr
    after = w.push(np.full(int(2.5 * sr), 0.5, np.float32))
    assert [x.end - origin for x in after] == [sr, 2 * sr]
    assert all(x.start == origin for x in after) and all(np.all(x.samples[: x.end - x.start] == 0.5) for x in after)
    assert [x.end - origin for x in w.flush()] == [int(2.5 * sr)]
    assert w.skip(10 * sr) == []  # nothing after the last window: no final window
