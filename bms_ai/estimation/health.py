"""SOH (capacity, R0) from field data, and RUL with a 90 % interval. Slow-rate, classical.

- R0 per cell from current steps: dV/dI over one sample when |dI| is large
  (the RC branch cannot move in 0.1 s, so the step sees R0 only).
- Capacity per cell from partial charges/discharges: regression of SOC on
  accumulated Ah over a sliding window (SOC from the NN measurement, which
  does not use the capacity, so the estimate is not pulled to the design
  value); accepted only when the window spans enough SOC.
- RUL: capacity-fade law SOH = 1 - k * sqrt(EFC) fitted to the SOH history
  (equivalent full cycles); 90 % interval from the fit's k uncertainty.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np


@dataclass
class HealthParams:
    step_min_c: float = 0.3          # |dI| (C-rate) that counts as a current step
    r0_alpha: float = 0.05           # EMA weight per accepted step
    window_s: float = 1800.0         # capacity regression window
    min_soc_span: float = 0.15       # accept a capacity estimate only over this SOC span
    q_alpha: float = 0.2             # EMA weight per accepted capacity estimate
    eol_soh: float = 0.8


@dataclass
class HealthOutput:
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


class HealthEstimator:
    def __init__(self, n_cells: int, design_capacity_ah: float, params: HealthParams | None = None,
                 efc0: float = 0.0, soh_history: list[tuple[float, float]] | None = None) -> None:
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
        if t >= self._t_next:
            self._t_next = t + 1.0
            self._win.append((t, self.ah, np.asarray(soc_meas, dtype=np.float64).copy()))
            while self._win and self._win[0][0] < t - self.p.window_s:
                self._win.popleft()

    def estimate_capacity(self) -> bool:
        """Slow rate: regress SOC on Ah over the window; True if an estimate was accepted."""
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
        if not ok.any():
            return False
        self.cell_q[ok] += self.p.q_alpha * (q[ok] - self.cell_q[ok])
        self.q_updates += 1
        self._win.clear()   # next estimate from fresh data (independent windows)
        self.history.append((self.efc, float(np.min(self.cell_q) / self.q_design)))
        return True

    def rul(self) -> tuple[float, float, float]:
        """Remaining EFC to EOL with a 90 % interval from the fade-law fit (NaN if too little history)."""
        h = np.array(self.history, dtype=np.float64)
        if len(h) < 3 or np.ptp(h[:, 0]) <= 0:
            return float("nan"), float("nan"), float("nan")
        x = np.sqrt(np.maximum(h[:, 0], 0.0))
        y = 1.0 - h[:, 1]
        k = float(np.sum(x * y) / max(np.sum(x * x), 1e-12))
        resid = y - k * x
        se = float(np.sqrt(np.sum(resid ** 2) / max(len(h) - 1, 1) / max(np.sum(x * x), 1e-12)))
        lim = 1.0 - self.p.eol_soh

        def remaining(kk: float) -> float:
            return float("inf") if kk <= 0 else max((lim / kk) ** 2 - self.efc, 0.0)

        return remaining(k), remaining(k + 1.645 * se), remaining(max(k - 1.645 * se, 0.0))

    def output(self) -> HealthOutput:
        soh_c = self.cell_q / self.q_design
        rul, lo, hi = self.rul()
        return HealthOutput(soh=float(np.min(soh_c)), cell_soh=soh_c.copy(), capacity_ah=float(np.min(self.cell_q)),
                            r0=float(np.nanmean(self.cell_r0)) if np.isfinite(self.cell_r0).any() else float("nan"),
                            cell_r0=self.cell_r0.copy(), rul_efc=rul, rul_lo=lo, rul_hi=hi, efc=self.efc,
                            capacity_updates=self.q_updates, r0_updates=self.r0_updates)
