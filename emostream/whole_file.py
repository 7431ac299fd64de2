"""Whole-file emotion (``emostream classify``): one label per file, in memory bounded however long
the file is.

The file is decoded block by block (:func:`~emostream.audio.stream_audio`, mixed to mono); the
windows of :func:`~emostream.stream.placed_windows` are cut as their samples arrive and scored in
batches, their logits summed (:func:`~emostream.model.clip_probabilities`); the same audio goes
through the speech gate's detector. A file with less speech than one window of a stream needs
(:attr:`~emostream.vad.SpeechCounter.has_speech`) gets ``"speech": false`` and no label.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .audio import SAMPLE_RATE, WINDOW_SAMPLES, audio_info, stream_audio
from .stream import window_placements
from .timeline import CLASSES
from .vad import SpeechCounter, VadConfig

CLASSIFY_BATCH = 16  # windows per model call
LONG_FILE_SECONDS = 120.0  # longer files get a hint: a timeline (replay, batch) shows what one label hides


def cut_windows(blocks: Iterable[np.ndarray], n_samples: int, positions: int, on_block=None) -> Iterator[np.ndarray]:
    """Batches ``(<= CLASSIFY_BATCH, WINDOW_SAMPLES)`` of the placed windows of a clip of
    ``n_samples`` whose samples arrive as mono ``blocks``; only the samples a window still needs are
    kept. ``on_block(block)`` sees every block (the speech counter). A clip shorter than announced is
    zero-padded; samples past ``n_samples`` are not scored."""
    plan = window_placements(n_samples, positions)
    buf, buf_start, k, batch = np.zeros(0, np.float32), 0, 0, []

    def ready(final: bool) -> Iterator[np.ndarray]:
        nonlocal k, batch
        while k < len(plan):
            src, dst = plan[k]
            end = min(src + WINDOW_SAMPLES - dst, n_samples)
            if not final and end > buf_start + len(buf):
                break
            window = np.zeros(WINDOW_SAMPLES, np.float32)
            piece = buf[max(0, src - buf_start) : max(0, end - buf_start)]
            window[dst : dst + len(piece)] = piece
            batch.append(window)
            k += 1
            if len(batch) == CLASSIFY_BATCH:
                yield np.stack(batch)
                batch = []

    for block in blocks:
        if on_block is not None:
            on_block(block)
        buf = np.concatenate([buf, block])
        yield from ready(final=False)
        keep_from = plan[k][0] if k < len(plan) else buf_start + len(buf)
        drop = max(0, keep_from - buf_start)
        buf, buf_start = buf[drop:], buf_start + drop
    yield from ready(final=True)
    if batch:
        yield np.stack(batch)


def classify_file(path: str | Path, predictor, positions: int, vad: VadConfig) -> dict:
    """The ``classify --json`` record of one file (``speech`` false: no label, no probabilities)."""
    from .scoring import clip_probabilities

    n_samples = audio_info(path).frames_at(SAMPLE_RATE)
    counter = SpeechCounter(vad)
    blocks = (b[0] for b in stream_audio(path, mono=True))
    probs = clip_probabilities(predictor, cut_windows(blocks, n_samples, positions, counter.feed), positions)
    record = {
        "path": str(path),
        "speech": counter.has_speech,
        "label": None,
        "confidence": None,
        "probabilities": None,
        "duration": round(counter.samples / SAMPLE_RATE, 3),
        "speech_seconds": round(counter.seconds, 3),
    }
    if counter.has_speech:
        k = int(np.argmax(probs))
        record.update(
            label=CLASSES[k],
            confidence=round(float(probs[k]), 4),
            probabilities={c: round(float(p), 4) for c, p in zip(CLASSES, probs)},
        )
    return record
