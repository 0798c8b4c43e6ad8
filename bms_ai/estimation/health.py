"""SOH (capacity, R0) from field data, and RUL with a 90 % interval. Slow-rate, classical.

- R0 per cell from current steps: dV/dI over one sample when |dI| is large
  (the RC branch cannot move in 0.1 s, so the step sees R0 only).
- Capacity per cell from partial charges/discharges: regression of SOC on
  accumulated Ah over a sliding window (SOC from the NN measurement, which
  does not use the capacity, so the estimate is not pulled to the design
  value); accepted only when the window spans enough SOC.
- Capacity per cell from rests (preferred when an OCV curve is given): SOC from
  OCV at the end of each rest >= ``rest_min_s``; two rests ``min_soc_span`` apart
  give Q = dAh / dSOC, independent of any SOC model's bias. Estimates are
  combined as an inverse-variance weighted mean (variance from the OCV slope:
  pairs on a flat plateau are rejected) (the first one replaces the design value,
  no slow EMA from design, which biased aged packs to ~100 %).
- RUL: ``bms_ai.estimation.rul.RulEstimator`` (Bayesian fade-law fit with a
  conformal-calibrated 90 % interval) on the SOH history vs equivalent full cycles.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.estimation.rul import RulEstimator


@dataclass
class HealthParams:
    """Tuning of the classical SOH estimator (steps for R0, windows and rests for capacity)."""

    step_min_c: float = 0.3          # |dI| (C-rate) that counts as a current step
    r0_alpha: float = 0.05           # EMA weight per accepted step
    window_s: float = 1800.0         # capacity regression window
    min_soc_span: float = 0.15       # accept a capacity estimate only over this SOC span
    q_alpha: float = 0.2             # EMA weight per accepted capacity estimate
    rest_max_c: float = 0.02         # |I| below this C-rate counts as rest
    rest_min_s: float = 600.0        # rest length before the voltage is taken as OCV
    ocv_sigma_v: float = 0.003       # OCV error at a rest end (noise, quantisation, incomplete relaxation)
    relax_max_v: float = 0.0         # cap on the rest-relaxation extrapolation (0 = off: no gain measured)
    max_rel_sd: float = 0.03         # reject a rest pair whose capacity would be worse than this (1 sigma)


@dataclass
class HealthOutput:
    """SOH, capacity, R0 and RUL as reported (pack values are the weakest cell's)."""

    soh: float                      # pack (min over cells) capacity SOH
    cell_soh: np.ndarray
    capacity_ah: float
    r0: float                       # mean cell R0 (Ohm)
    cell_r0: np.ndarray
    rul_efc: float
    rul_lo: float
    rul_hi: float
    efc: float
    capacity_updates: int
    r0_updates: int


def rest_ocv(chemistry: str) -> OCVCurve | None:
    """OCV curve for rest-based capacity, or None for a chemistry with OCV hysteresis.

    LFP's hysteresis and flat plateau make the charge-side rest read tens of mV
    off the table (measured -9 % SOH bias), so it keeps the SOC-regression method.
    """
    return None if get_chemistry(chemistry).hysteresis_gap_v > 0 else load_ocv(chemistry)


class HealthEstimator:
    """Capacity and R0 per cell from field data (no lab test), plus the RUL from the SOH history."""

    def __init__(self, n_cells: int, design_capacity_ah: float, params: HealthParams | None = None,
                 efc0: float = 0.0, soh_history: list[tuple[float, float]] | None = None,
                 ocv=None, rul: RulEstimator | None = None) -> None:
        self.n = n_cells
        self.q_design = float(design_capacity_ah)
        self.p = params or HealthParams()
        self.cell_q = np.full(n_cells, self.q_design)
        self.cell_r0 = np.full(n_cells, np.nan)
        self.efc = float(efc0)
        self.ah = 0.0
        self._last: tuple[float, float, np.ndarray] | None = None
        self._win: deque = deque()
        self._t_next = -np.inf
        self.q_updates = 0
        self.r0_updates = 0
        self.history: list[tuple[float, float]] = list(soh_history or [])
        self.ocv = ocv                      # OCVCurve (inverse: V -> SOC) or None
        self.rul_est = rul or RulEstimator()
        self._rest_t0: float | None = None
        self._rest_t_prev: float | None = None
        self._rest_v: list[tuple[float, np.ndarray]] = []
        self._i_avg_5s = 0.0
        self._rest_point: tuple | None = None   # (Ah, SOC_ocv, SOC sd) of the current rest
        self._prev_rest: tuple | None = None
        self._rest_weight = np.zeros(n_cells)       # summed dSOC weights of rest-based estimates
        self._rest_weighted_q = np.zeros(n_cells)
        self.rest_updates = 0

    def update(self, t: float, current: float, cell_v: np.ndarray, soc_meas: np.ndarray) -> None:
        """Every sample: R0 steps and Ah; at 1 Hz: the capacity regression window."""
        v = np.asarray(cell_v, dtype=np.float64)
        if not np.isfinite(current):
            self._last = None
            return
        if self._last is not None:
            t0, i0, v0 = self._last
            dt = t - t0
            if 0 < dt <= 1.0:
                self.ah += 0.5 * (current + i0) * dt / 3600.0
                self.efc += abs(0.5 * (current + i0)) * dt / 3600.0 / (2 * self.q_design)
                di = current - i0
                if abs(di) >= self.p.step_min_c * self.q_design and dt <= 0.25:
                    r = (v - v0) / di
                    ok = np.isfinite(r) & (r > 0) & (r < 1.0)
                    first = ok & ~np.isfinite(self.cell_r0)
                    self.cell_r0[first] = r[first]
                    upd = ok & ~first
                    self.cell_r0[upd] += self.p.r0_alpha * (r[upd] - self.cell_r0[upd])
                    self.r0_updates += int(ok.any())
        self._last = (t, float(current), v)
        if self.ocv is not None:
            self._rest(t, float(current), v)
        if t >= self._t_next:
            self._t_next = t + 1.0
            self._win.append((t, self.ah, np.asarray(soc_meas, dtype=np.float64).copy()))
            while self._win and self._win[0][0] < t - self.p.window_s:
                self._win.popleft()

    def _rest(self, t: float, current: float, v: np.ndarray) -> None:
        # 5 s current average: single noisy samples must not end a rest
        dt = 0.1 if self._rest_t_prev is None else min(max(t - self._rest_t_prev, 0.0), 5.0)
        self._rest_t_prev = t
        self._i_avg_5s += min(dt / 5.0, 1.0) * (current - self._i_avg_5s)
        thr = self.p.rest_max_c * self.q_design
        if abs(self._i_avg_5s) > thr or abs(current) > 3.0 * thr:
            if self._rest_point is not None:
                self._close_rest()
            self._rest_t0 = None
            return
        if self._rest_t0 is None:
            self._rest_t0 = t
            self._rest_v = []
            return
        tr = t - self._rest_t0
        if abs(current) > thr or not np.isfinite(v).all():
            return
        if not self._rest_v or tr - self._rest_v[-1][0] >= 5.0:
            self._rest_v.append((tr, v.copy()))
        if tr >= self.p.rest_min_s:
            soc = np.asarray(self.ocv.inverse(self._relaxed(tr, v)), dtype=np.float64)   # latest = most relaxed
            sd = self.p.ocv_sigma_v / np.maximum(np.abs(np.asarray(self.ocv.slope(soc), dtype=np.float64)), 1e-4)
            self._rest_point = (self.ah, soc, sd)

    def _relaxed(self, tr: float, v: np.ndarray) -> np.ndarray:
        """OCV estimate: Aitken extrapolation of the slowest exponential through V(T/3), V(2T/3), V(T).

        A rest of 10-15 min after a charge is still ~5 mV above OCV (+1..3 % SOH); the correction is
        capped at ``relax_max_v`` and skipped where the three points are not monotone.
        """
        if self.p.relax_max_v <= 0 or len(self._rest_v) < 3:
            return v
        ts = np.array([x[0] for x in self._rest_v])
        v1 = self._rest_v[int(np.argmin(np.abs(ts - tr / 3.0)))][1]
        v2 = self._rest_v[int(np.argmin(np.abs(ts - 2.0 * tr / 3.0)))][1]
        d1, d2 = v2 - v1, v - v2
        ok = (d1 * d2 > 0) & (np.abs(d2) < np.abs(d1))
        corr = np.where(ok, -d2 * d2 / np.where(ok, d1 - d2, 1.0), 0.0)     # V_inf - V(T)
        return v + np.clip(corr, -self.p.relax_max_v, self.p.relax_max_v)

    def _close_rest(self) -> None:
        pt, self._rest_point = self._rest_point, None
        prev, self._prev_rest = self._prev_rest, pt
        if prev is None:
            return
        dsoc = pt[1] - prev[1]
        dah = pt[0] - prev[0]
        # flat OCV (LFP plateau): a few mV are many % SOC -> reject imprecise pairs, weight the rest
        rel_sd = np.hypot(pt[2], prev[2]) / np.maximum(np.abs(dsoc), 1e-6)
        ok = (np.abs(dsoc) >= self.p.min_soc_span) & (rel_sd <= self.p.max_rel_sd)
        q = np.where(ok, dah / np.where(ok, dsoc, 1.0), np.nan)
        ok &= np.isfinite(q) & (q > 0.3 * self.q_design) & (q < 1.5 * self.q_design)
        if not ok.any():
            return
        w = 1.0 / np.maximum(rel_sd, 1e-3) ** 2
        self._rest_weighted_q[ok] += w[ok] * q[ok]
        self._rest_weight[ok] += w[ok]
        self.cell_q[ok] = self._rest_weighted_q[ok] / self._rest_weight[ok]
        self.rest_updates += 1
        self.q_updates += 1
        self.history.append((self.efc, float(np.min(self.cell_q) / self.q_design)))

    def flush_rest(self) -> None:
        """End of data while resting: use the current rest point (e.g. end of a drive log)."""
        if self._rest_point is not None:
            self._close_rest()

    def estimate_capacity(self) -> bool:
        """Slow rate: regress SOC on Ah over the window; True if an estimate was accepted.

        Skipped for cells that already have a rest-based (OCV) estimate: those are unbiased.
        """
        if len(self._win) < 60:
            return False
        ah = np.array([w[1] for w in self._win])
        soc = np.stack([w[2] for w in self._win])
        span = np.nanmax(soc, axis=0) - np.nanmin(soc, axis=0)
        ah_c = ah - ah.mean()
        var = float(np.sum(ah_c ** 2))
        if var <= 0:
            return False
        slope = np.sum(ah_c[:, None] * (soc - soc.mean(axis=0)), axis=0) / var    # 1/Q per cell
        q = 1.0 / np.where(slope > 1e-6, slope, np.nan)
        ok = (span >= self.p.min_soc_span) & np.isfinite(q) & (q > 0.3 * self.q_design) & (q < 1.5 * self.q_design)
        ok &= self._rest_weight <= 0
        if not ok.any():
            return False
        self.cell_q[ok] += self.p.q_alpha * (q[ok] - self.cell_q[ok])
        self.q_updates += 1
        self._win.clear()   # next estimate from fresh data (independent windows)
        self.history.append((self.efc, float(np.min(self.cell_q) / self.q_design)))
        return True

    def rul(self) -> tuple[float, float, float]:
        """Remaining EFC to EOL with a 90 % interval (NaN if too little history)."""
        if not self.history:
            return float("nan"), float("nan"), float("nan")
        h = np.array(self.history, dtype=np.float64)
        return self.rul_est.predict(h[:, 0], h[:, 1])

    def output(self) -> HealthOutput:
        """The current estimate (runs the RUL forecast, so call it at the slow rate)."""
        soh_c = self.cell_q / self.q_design
        rul, lo, hi = self.rul()
        return HealthOutput(soh=float(np.min(soh_c)), cell_soh=soh_c.copy(), capacity_ah=float(np.min(self.cell_q)),
                            r0=float(np.nanmean(self.cell_r0)) if np.isfinite(self.cell_r0).any() else float("nan"),
                            cell_r0=self.cell_r0.copy(), rul_efc=rul, rul_lo=lo, rul_hi=hi, efc=self.efc,
                            capacity_updates=self.q_updates, r0_updates=self.r0_updates)
