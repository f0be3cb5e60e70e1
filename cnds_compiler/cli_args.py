"""argparse types shared by the command-line tools: a bad value is a usage error (one line, exit 2)."""

from __future__ import annotations

import argparse
import math

from .ir import MAX_SEED


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None


def count_argument(minimum: int):
    """An integer >= ``minimum`` (epochs, batch sizes, workers, steps)."""

    def parse(text: str) -> int:
        value = _integer(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def seed_argument(text: str) -> int:
    """``--seed``: an integer in the range a spec's ``seed`` takes (0 .. :data:`~cnds_compiler.ir.MAX_SEED`),
    so every RNG seeded from it (Python, numpy: below 2**32; torch) accepts it."""
    value = _integer(text)
    if not 0 <= value <= MAX_SEED:
        shown = value if value.bit_length() <= 64 else f"a {len(str(abs(value)))}-digit number"
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED}, got {shown}")
    return value


def _number(text: str, what: str = "a number") -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None


def fraction_argument(text: str) -> float:
    """``--val-split``: a fraction strictly between 0 and 1."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be a fraction between 0 and 1 (exclusive), got {text}")
    return value


def gib_argument(text: str) -> float:
    """``--memory-budget``: a positive, finite number of GiB."""
    value = _number(text, "a number of GiB")
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of GiB, got {text}")
    return value
