"""Number types for command-line options: a value outside its range is argparse's one-line usage error.

``float("nan")`` and ``float("inf")`` parse as floats, so a plain ``type=float``
lets them through to the work (a zero-period sampler, an endless replay, a
sleep that overflows); these refuse them where the option is read.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any


def _number(text: str, kind: type) -> float | int:
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
    return value


def _ranged(kind: type, ok: Callable[[Any], bool], says: str, name: str) -> Callable[[str], Any]:
    """A ``type=`` for argparse: ``kind`` parsed (finite if a float) and ``ok``, else 'must be <says>'."""
    def parse(text: str) -> Any:
        value = _number(text, kind)
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {says}, got {text!r}")
        return value

    parse.__name__ = parse.__qualname__ = name
    return parse


positive_float = _ranged(float, lambda v: v > 0, "> 0", "positive_float")
nonneg_float = _ranged(float, lambda v: v >= 0, ">= 0", "nonneg_float")
unit_float = _ranged(float, lambda v: 0 <= v <= 1, "between 0 and 1", "unit_float")   # a weight, a fraction
positive_int = _ranged(int, lambda v: v >= 1, ">= 1", "positive_int")
nonneg_int = _ranged(int, lambda v: v >= 0, ">= 0", "nonneg_int")                      # a seed
# a replay slower than this is no replay (1e-308 x real time: a 3-minute log in 1e302 years)
MIN_REPLAY_SPEED = 0.01
replay_speed = _ranged(float, lambda v: v == 0 or v >= MIN_REPLAY_SPEED,
                       f"0 (as fast as possible) or >= {MIN_REPLAY_SPEED:g}", "replay_speed")
port = _ranged(int, lambda v: 0 <= v <= 65535, "a port 0..65535", "port")              # 0: any free one


def out_dir(text: str) -> str:
    """A ``type=`` for an output directory: '' (or blanks) would write into the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"must name a directory, got {text!r}")
    return text
