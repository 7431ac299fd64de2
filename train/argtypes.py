"""The argument types of ``python -m train`` and of its probes (:mod:`train.probes`)."""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_CACHE = Path(".cache/emostream")  # the decoded-audio (and teacher) cache directory


def fold_list(text: str) -> list[int]:
    """``--folds 1,3`` as a list of fold numbers."""
    try:
        return [int(k) for k in text.split(",") if k.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected fold numbers separated by commas, got {text!r}") from None


def channel_list(text: str) -> list[str]:
    """``--channels full,g712,grid`` as channel names (``grid``: every codec this build encodes)."""
    from emostream.channel import CODECS, available_codecs

    names: list[str] = []
    for name in (t.strip() for t in text.split(",") if t.strip()):
        expanded = list(available_codecs()) if name == "grid" else [name]
        for n in expanded:
            if n not in ("full", "g712", "mulaw", *CODECS):
                raise argparse.ArgumentTypeError(
                    f"unknown channel {n!r}: full, g712, mulaw, grid or one of {', '.join(CODECS)}"
                )
            if n not in names:
                names.append(n)
    if not names:
        raise argparse.ArgumentTypeError("expected channel names separated by commas")
    return names


def layer_list(text: str) -> tuple[int, ...]:
    """``--layers 3,4`` as a sorted tuple of distinct hidden-state indices."""
    try:
        layers = tuple(sorted({int(k) for k in text.split(",") if k.strip()}))
    except ValueError:
        layers = ()
    if not layers or min(layers) < 0:
        raise argparse.ArgumentTypeError(f"expected layer numbers >= 0 separated by commas, got {text!r}")
    return layers
