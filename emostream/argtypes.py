"""argparse value types shared by the command lines (``emostream`` and ``python -m train``)."""

from __future__ import annotations

import argparse
from typing import Callable, TypeVar

Number = TypeVar("Number", int, float)


def positive(kind: Callable[[str], Number]) -> Callable[[str], Number]:
    """An argparse type: ``kind(text)`` that must be > 0 (one-line errors)."""

    def parse(text: str) -> Number:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0: {text!r}")
        return value

    return parse


def fraction(text: str) -> float:
    """An argparse type: a number in (0, 1] (the EMA weight of ``--smooth``)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]: {text!r}")
    return value


def name_list(text: str) -> tuple[str, ...]:
    """An argparse type: comma-separated names (``agent,customer``), stripped, distinct and non-empty."""
    names = tuple(n.strip() for n in text.split(","))
    if len(set(names)) != len(names) or not all(names):
        raise argparse.ArgumentTypeError(f"need distinct non-empty names, comma-separated: {text!r}")
    return names
