"""Coulomb counting: the classical baseline and the process model of every SOC filter."""

from __future__ import annotations

import numpy as np


class CoulombCounter:
    """Batched Coulomb counter (one SOC per cell; series cells share the pack current).

    Current is positive when charging (BatteryState convention).
    """

    def __init__(self, capacity_ah: float | np.ndarray, soc0: float | np.ndarray, n: int = 1,
                 efficiency: float = 1.0) -> None:
        self.capacity_ah = np.broadcast_to(np.asarray(capacity_ah, dtype=np.float64), (n,)).copy()
        self.soc = np.broadcast_to(np.asarray(soc0, dtype=np.float64), (n,)).copy()
        self.efficiency = efficiency

    def step(self, current: float | np.ndarray, dt: float) -> np.ndarray:
        """Integrate ``current`` over ``dt``; SOC per cell, held when current or dt is unusable."""
        i = np.asarray(current, dtype=np.float64)
        if not np.all(np.isfinite(i)) or not np.isfinite(dt) or dt < 0:
            return self.soc  # hold: an unknown current must not move the SOC
        eta = np.where(i > 0, self.efficiency, 1.0)
        self.soc = np.clip(self.soc + eta * i * dt / (3600.0 * self.capacity_ah), 0.0, 1.0)
        return self.soc


def soc_increments(t: np.ndarray, current: np.ndarray, capacity_ah: float | np.ndarray,
                   t_prev: float = float("nan")) -> np.ndarray:
    """(T, n) SOC change per sample as ``CoulombCounter.step`` makes it: I_k (t_k - t_k-1) / 3600 Q.

    The first sample counts from ``t_prev`` (NaN: nothing, no time has passed); an unusable
    current or time step adds nothing (the counter holds), exactly like the stepping counter.
    """
    t = np.asarray(t, dtype=np.float64)
    i = np.asarray(current, dtype=np.float64)
    dt = np.diff(t, prepend=t[:1] if not np.isfinite(t_prev) else [t_prev]) if t.size else t
    ok = np.isfinite(i) & np.isfinite(dt) & (dt >= 0)
    inc = np.where(ok, i * np.where(ok, dt, 0.0), 0.0) / 3600.0
    cap = np.atleast_1d(np.asarray(capacity_ah, dtype=np.float64))
    return inc[:, None] / cap[None, :]


def clamped_path(x0: float, inc: np.ndarray, lo: float = 0.0, hi: float = 1.0) -> np.ndarray:
    """x_k = clip(x_k-1 + inc_k, lo, hi) for a whole series without a Python loop per sample.

    Between touches of opposite bounds the clipped sum is the one-sided reflection
    (Skorokhod map) of the free sum: x = S - max(0, running max(S) - hi) while only the
    upper bound is active (mirror image for the lower one). The loop runs once per
    switch between bounds, a handful of times in a drive, so a multi-day life with
    a clipped charge every day stays O(T).
    """
    inc = np.asarray(inc, dtype=np.float64)
    out = np.empty(inc.size)
    s, val = 0, float(np.clip(x0, lo, hi))
    while s < inc.size:
        free = val + np.cumsum(inc[s:])
        over, under = np.flatnonzero(free > hi), np.flatnonzero(free < lo)
        if over.size == 0 and under.size == 0:
            out[s:] = free
            break
        if under.size == 0 or (over.size and over[0] < under[0]):
            path = free - np.maximum(np.maximum.accumulate(free) - hi, 0.0)
            bad, bound = np.flatnonzero(path < lo), lo
        else:
            path = free - np.minimum(np.minimum.accumulate(free) - lo, 0.0)
            bad, bound = np.flatnonzero(path > hi), hi
        end = bad[0] if bad.size else path.size
        out[s:s + end] = path[:end]
        if not bad.size:
            break
        out[s + end] = bound
        val, s = bound, s + end + 1
    return out
