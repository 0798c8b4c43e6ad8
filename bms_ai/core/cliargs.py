"""Number types for command-line options: a value outside its range is argparse's one-line usage error.

``float("nan")`` and ``float("inf")`` parse as floats, so a plain ``type=float``
lets them through to the work (a zero-period sampler, an endless replay, a
sleep that overflows); these refuse them where the option is read.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    v = _number(text, float)
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return v


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    v = _number(text, float)
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def unit_float(text: str) -> float:
    """A number in [0, 1] (a weight or a fraction)."""
    v = _number(text, float)
    if not 0 <= v <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return v


def positive_int(text: str) -> int:
    """An integer >= 1."""
    v = _number(text, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return v


def nonneg_int(text: str) -> int:
    """An integer >= 0 (a seed)."""
    v = _number(text, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text!r}")
    return v


def port(text: str) -> int:
    """A TCP port, 0 (any free one) .. 65535."""
    v = _number(text, int)
    if not 0 <= v <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port 0..65535, got {text!r}")
    return v
