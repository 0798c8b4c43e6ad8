"""Per-sample reductions the rules and detectors share, computed once per tick.

Every check of a tick looks at the same cell voltages and temperatures: their
extremes (where, how far), their medians, whether they are complete. At 10 Hz
on a 96-cell pack the numpy call overhead of recomputing these per check was
most of the monitor's cost, so :class:`SampleStats` computes each once and
hands it to every rule and detector. The values are exactly those of the
NaN-aware helpers and ``np.median`` they replace (same operations on the same
data), so the verdicts do not change by a bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bms_ai.pack import PackSample


def median(a: np.ndarray, buf: np.ndarray | None = None) -> float:
    """``float(np.median(a))`` of a 1-D float array, NaN if any value is NaN, in a reusable buffer.

    The same partition numpy's median makes (same kth, same input), without its
    per-call dispatch; ``buf`` (same size as ``a``) avoids the copy's allocation.
    """
    n = a.size
    if n == 0:
        return math.nan
    b = buf if buf is not None and buf.size == n else np.empty(n)
    np.copyto(b, a)
    h = n // 2
    if n % 2:
        b.partition((h, -1))
        m = b[h] / 1
    else:
        b.partition((h - 1, h, -1))
        m = (b[h - 1] + b[h]) / 2
    return math.nan if math.isnan(b[-1]) else float(m)


@dataclass
class _Group:
    """One group of readings (cell voltages or temperature sensors) reduced once."""

    values: np.ndarray
    finite: np.ndarray
    all_finite: bool
    any_finite: bool
    mostly_valid: bool   # at least half valid: only then are single invalid members faults of their own
    max: float
    min: float
    argmax: int
    argmin: int
    median: float


def _group(a: np.ndarray, buf: np.ndarray | None) -> _Group:
    """Extremes, median and completeness of one group; NaN / -1 where nothing is finite."""
    finite = np.isfinite(a)
    n = a.size
    if n and finite.all():
        return _Group(a, finite, True, True, True, float(a.max()), float(a.min()), int(a.argmax()),
                      int(a.argmin()), median(a, buf))
    count = int(finite.sum())
    if not count:
        return _Group(a, finite, n == 0, False, False, math.nan, math.nan, -1, -1, math.nan)
    return _Group(a, finite, False, True, 2 * count >= n, float(np.nanmax(a)), float(np.nanmin(a)),
                  int(np.nanargmax(a)), int(np.nanargmin(a)), float(np.median(a[finite])))


class SampleStats:
    """The shared reductions of one sample: cells (``v``), temperature sensors (``t``), sum of cells.

    Build with :meth:`of` once per tick and pass it to ``RuleEngine.step`` and
    ``DetectorBank.step``; each builds its own when given none. The median
    buffers come from ``buffers`` (one pair per pack, reused every tick).
    """

    __slots__ = ("v", "t", "sum_v")

    def __init__(self, v: _Group, t: _Group, sum_v: float) -> None:
        self.v, self.t, self.sum_v = v, t, sum_v

    @classmethod
    def of(cls, s: PackSample, buffers: tuple[np.ndarray, np.ndarray] | None = None) -> SampleStats:
        """Reduce a sample's cell voltages and temperatures (``buffers``: scratch for the two medians)."""
        v = np.asarray(s.cell_voltages, dtype=float)
        temps = np.asarray(s.cell_temperatures, dtype=float)
        bv, bt = buffers if buffers is not None else (None, None)
        gv = _group(v, bv)
        sum_v = float(v.sum()) if gv.all_finite else math.nan
        return cls(gv, _group(temps, bt), sum_v)
