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

import numpy as np

from bms_ai.pack import PackSample


def amax(a: np.ndarray) -> float:
    """``float(a.max())`` of a non-empty 1-D array: argmax and the element (the method costs several times more).

    A NaN or a zero (whose sign the reduction may pick differently) falls back to the reduction.
    """
    if a.ndim != 1:
        return float(a.max())
    x = a[a.argmax()]
    return float(x) if x != 0.0 and x == x else float(a.max())


def amin(a: np.ndarray) -> float:
    """``float(a.min())`` of a non-empty 1-D array (see :func:`amax`)."""
    if a.ndim != 1:
        return float(a.min())
    x = a[a.argmin()]
    return float(x) if x != 0.0 and x == x else float(a.min())


_add = np.add.reduce


def median(a: np.ndarray, buf: np.ndarray | None = None) -> float:
    """``float(np.median(a))`` of a 1-D float array, NaN if any value is NaN, in a reusable buffer.

    An in-place sort of the copy is the cheapest order numpy offers at pack
    sizes (a third of a partition with numpy's kth). The middle values it finds
    are those of numpy's partition whenever they are not zero (equal non-zero
    floats are the same bits); a zero in the middle may be -0.0 or +0.0 and
    takes numpy's own partition, so even the sign of the median is numpy's.
    ``buf`` (same size as ``a``) avoids the copy's allocation.
    """
    n = a.size
    if n == 0:
        return math.nan
    b = buf if buf is not None and buf.size == n else np.empty(n)
    b[:] = a
    b.sort()
    if math.isnan(b.item(-1)):  # sorted last, as in numpy's partition: the median is NaN
        return math.nan
    h = n // 2
    lo, hi = b.item(h - 1 if n % 2 == 0 else h), b.item(h)
    if lo == 0.0 or hi == 0.0:
        return _median_signed(a, b)
    return (lo + hi) / 2 if n % 2 == 0 else hi  # np.mean of the middle: their sum over the count


def _median_signed(a: np.ndarray, b: np.ndarray) -> float:
    """The median as numpy finds it (same partition, same kth, same input): the sign of a zero included."""
    np.copyto(b, a)
    n = a.size
    h = n // 2
    if n % 2:
        b.partition((h, -1))
        m = _add(b[h:h + 1]) / 1            # np.mean of the middle: its sum (signed zeros included), / count
    else:
        b.partition((h - 1, h, -1))
        m = _add(b[h - 1:h + 1]) / 2
    return math.nan if math.isnan(b[-1]) else float(m)


_PLACES: dict[int, np.ndarray] = {}


def _places(n: int) -> np.ndarray:
    """Where a sorted group of ``n`` holds its minimum, the two middle values (one twice if odd), its maximum."""
    idx = _PLACES.get(n)
    if idx is None:
        h = n // 2
        idx = _PLACES[n] = np.array([0, h - 1 if n % 2 == 0 else h, h, n - 1], dtype=np.intp)
    return idx


class _Group:
    """One group of readings (cell voltages or temperature sensors) reduced once."""

    __slots__ = ("values", "_finite", "all_finite", "any_finite", "mostly_valid", "max", "min", "argmax", "argmin",
                 "median")

    def __init__(self, values: np.ndarray, finite: np.ndarray | None, all_finite: bool, any_finite: bool,
                 mostly_valid: bool, vmax: float, vmin: float, argmax: int, argmin: int, med: float) -> None:
        self.values, self._finite = values, finite
        self.all_finite, self.any_finite = all_finite, any_finite
        self.mostly_valid = mostly_valid  # at least half valid: only then are single invalid members faults
        self.max, self.min, self.argmax, self.argmin, self.median = vmax, vmin, argmax, argmin, med

    @property
    def finite(self) -> np.ndarray:
        """Which readings are valid (built on first use: a complete group rarely needs it)."""
        if self._finite is None:
            self._finite = np.isfinite(self.values)
        return self._finite


def _group(a: np.ndarray, buf: np.ndarray | None) -> _Group:
    """Extremes, median and completeness of one group; NaN / -1 where nothing is finite.

    A complete group takes its extremes and middle values from one sorted copy
    in one read (``take`` of the four places, as a list): the values of
    argmax / argmin and of :func:`median` (equal non-zero floats are the same
    bits; a zero extreme or middle takes numpy's own reduction, as there).
    """
    n = a.size
    if n:
        b = buf if buf is not None and buf.size == n else np.empty(n)
        b[:] = a
        b.sort()  # a NaN sorts last
        vmin, lo, hi, vmax = b.take(_places(n)).tolist()
        if math.isfinite(vmax) and math.isfinite(vmin):
            imax, imin = int(a.argmax()), int(a.argmin())
            if lo == 0.0 or hi == 0.0:
                med = _median_signed(a, b)
            else:
                med = (lo + hi) / 2 if n % 2 == 0 else hi  # np.mean of the middle: their sum over the count
            return _Group(a, None, True, True, True, amax(a) if vmax == 0.0 else vmax,
                          amin(a) if vmin == 0.0 else vmin, imax, imin, med)
    finite = np.isfinite(a)
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
        return cls.of_arrays(np.asarray(s.cell_voltages, dtype=float), np.asarray(s.cell_temperatures, dtype=float),
                             buffers)

    @classmethod
    def of_arrays(cls, v: np.ndarray, temps: np.ndarray,
                  buffers: tuple[np.ndarray, np.ndarray] | None = None) -> SampleStats:
        """:meth:`of` on a sample's float arrays the caller already converted (and checked)."""
        bv, bt = buffers if buffers is not None else (None, None)
        gv = _group(v, bv)
        sum_v = float(_add(v)) if gv.all_finite else math.nan  # v.sum() without the method's wrapper
        return cls(gv, _group(temps, bt), sum_v)
