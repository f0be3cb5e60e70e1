"""argparse types shared by the command-line tools: a bad value is a usage error (one line, exit 2)."""

from __future__ import annotations

import argparse

from .ir import MAX_SEED


def seed_argument(text: str) -> int:
    """``--seed``: an integer in the range a spec's ``seed`` takes (0 .. :data:`~cnds_compiler.ir.MAX_SEED`),
    so every RNG seeded from it (Python, numpy: below 2**32; torch) accepts it."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if not 0 <= value <= MAX_SEED:
        shown = value if value.bit_length() <= 64 else f"a {len(str(abs(value)))}-digit number"
        raise argparse.ArgumentTypeError(f"must be in 0..{MAX_SEED}, got {shown}")
    return value
