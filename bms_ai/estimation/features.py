"""THE feature pipeline of the overpotential model: one implementation for training and inference.

The learned model predicts a cell's overpotential, eta = v - OCV(SOC): what
the current history, temperature, SOC and hysteresis add to the equilibrium
voltage. It never sees the voltage itself, so it cannot memorise one cell's
OCV curve: the curve comes from the OCV model (the user's cell, or a
chemistry prior learned in the field) and the filter weighs the two by their
honest uncertainty. Inputs are what the estimator has live: time, pack current
(in C of the design capacity, so one model serves different cell sizes), cell
temperatures and the filter's SOC. Training runs the same streaming
``EtaFeatures.update`` over whole drives (``eta_features_table``), so there is
no training/serving skew. Bump FEATURE_VERSION on any change: the runtime
refuses a model built for another version.
"""

from __future__ import annotations

import math

import numpy as np

FEATURE_VERSION = "eta-cell-v2"

# (name, unit) per feature, last axis of the model input.
ETA_FEATURES: list[tuple[str, str]] = [
    ("i", "C"),
    ("i_ema5", "C"),
    ("i_ema30", "C"),
    ("i_ema120", "C"),
    ("i_ema600", "C"),
    ("i_ema1800", "C"),
    ("abs_i_ema600", "C"),
    ("temp", "degC"),
    ("soc", "1"),
    ("hysteresis", "1"),
    ("ah_since_reversal", "1"),
    ("log_rest_s", "1"),
]
N_FEATURES = len(ETA_FEATURES)
TAUS = np.array([5.0, 30.0, 120.0, 600.0, 1800.0])
REST_C = 0.01            # |I| below this (C) counts as rest
WAKE_REST_C = 0.05       # ... and at the first sample after a long park (a key-on auxiliary load still reads the rest OCV)
REVERSAL_C = 0.02        # a current sign change only counts beyond this deadband (C)
MAX_GAP_S = 30.0         # a longer gap between samples is a restart (history unknown)
DEFAULT_HYSTERESIS_RATE = 25.0   # one-state hysteresis: 1/(fraction of capacity) to swing fully


def hysteresis_rate_for(chemistry: str) -> float:
    """The hysteresis rate the pipeline runs for a chemistry (registry value; the default where it has none)."""
    from bms_ai.chemistry.registry import get_chemistry

    return get_chemistry(chemistry).hysteresis_rate or DEFAULT_HYSTERESIS_RATE


def cell_sensor_map(n_cells: int, n_temps: int) -> np.ndarray:
    """Temperature sensor index per cell (sensors spread evenly along the string)."""
    if n_temps <= 0:
        return np.zeros(n_cells, dtype=np.int64)
    return (np.arange(n_cells) * n_temps) // max(n_cells, 1)


class EtaFeatures:
    """Streaming per-cell features; state: a few current EMAs, hysteresis, rest time.

    Current-derived features are shared by every cell of the series string (one
    current sensor); temperature and SOC are per cell.
    """

    def __init__(self, n_cells: int, n_temps: int, capacity_ah: float,
                 hysteresis_rate: float = DEFAULT_HYSTERESIS_RATE) -> None:
        if not capacity_ah > 0:
            raise ValueError("capacity_ah must be > 0")
        self.n = n_cells
        self.capacity_ah = float(capacity_ah)
        self.hysteresis_rate = float(hysteresis_rate)
        self.sensor_of_cell = cell_sensor_map(n_cells, n_temps)
        self.out = np.zeros((n_cells, N_FEATURES), dtype=np.float32)
        self._alpha_dt, self._alpha = math.nan, np.zeros(len(TAUS))
        self._shared = np.zeros(N_FEATURES)
        self.reset()

    def reset(self) -> None:
        """Forget the history (start, or a gap longer than MAX_GAP_S)."""
        self.t_last = math.nan
        self.i_ema = np.full(len(TAUS), math.nan)
        self.abs_ema = math.nan
        self.temp = np.full(self.n, 25.0)
        self.hyst = 0.0          # one-state hysteresis, -1 (after discharge) .. +1 (after charge)
        self.ah_rev = 0.0        # Ah since the last current reversal, in capacities
        self.sign = 0
        self.rest_s = 0.0

    def state(self) -> dict:
        """What must survive a power cycle (the hysteresis state and rest time; EMAs restart at rest)."""
        return {"hysteresis": self.hyst, "ah_since_reversal": self.ah_rev, "sign": self.sign,
                "rest_s": self.rest_s, "t": self.t_last}

    def restore(self, d: dict, t_now: float) -> None:
        """Continue after a power cycle: a park is rest, so it adds to the rest time."""
        self.hyst = float(np.clip(d.get("hysteresis", 0.0), -1.0, 1.0))
        self.ah_rev = float(max(d.get("ah_since_reversal", 0.0), 0.0))
        self.sign = int(np.sign(d.get("sign", 0)))
        t_saved = float(d.get("t", math.nan))
        gap = t_now - t_saved if math.isfinite(t_saved) and math.isfinite(t_now) else 0.0
        self.rest_s = float(max(d.get("rest_s", 0.0), 0.0)) + max(gap, 0.0)

    def _current(self, i_c: float, dt: float) -> None:
        if dt <= 0:  # (re)start: assume steady state at the present current
            self.i_ema[:] = i_c
            self.abs_ema = abs(i_c)
            return
        if dt != self._alpha_dt:   # samples come at a fixed rate: the decay factors rarely change
            self._alpha_dt, self._alpha = dt, 1.0 - np.exp(-dt / TAUS)
        alpha = self._alpha
        self.i_ema += alpha * (i_c - self.i_ema)
        self.abs_ema += float(alpha[3]) * (abs(i_c) - self.abs_ema)
        dq = i_c * dt / 3600.0  # in capacities
        # one-state hysteresis (Plett): moves towards sign(I) at a rate proportional to |charge|
        rate = min(self.hysteresis_rate * abs(dq), 1.0)
        self.hyst += (math.copysign(1.0, i_c) - self.hyst) * rate if i_c != 0.0 else 0.0
        s = 1 if i_c > REVERSAL_C else -1 if i_c < -REVERSAL_C else 0
        if s and s != self.sign:
            self.sign, self.ah_rev = s, 0.0
        self.ah_rev = min(self.ah_rev + abs(dq), 1.0)
        self.rest_s = self.rest_s + dt if abs(i_c) < REST_C else 0.0

    def _temperature(self, cell_t: np.ndarray) -> None:
        ct = np.asarray(cell_t, dtype=np.float64)
        if not ct.size:
            return
        tc = ct[self.sensor_of_cell]   # a new array: kept as it is when every reading is finite (the usual case)
        finite = np.isfinite(tc)
        if np.logical_and.reduce(finite):
            self.temp = tc
            return
        fill = np.nanmean(ct) if np.isfinite(ct).any() else np.nan
        tc = np.where(finite, tc, fill)
        self.temp = np.where(np.isfinite(tc), tc, self.temp)

    def update(self, t: float, current: float, cell_t: np.ndarray, soc: np.ndarray) -> np.ndarray:
        """Advance to time t; features (n_cells, N_FEATURES). A NaN current holds the current history."""
        dt = t - self.t_last if math.isfinite(self.t_last) else math.nan
        if not (dt > 0) or dt > MAX_GAP_S:
            rest = self.rest_s
            hyst, ah_rev, sign = self.hyst, self.ah_rev, self.sign
            self.reset()
            self.rest_s, self.hyst, self.ah_rev, self.sign = rest, hyst, ah_rev, sign  # physical memory stays
            dt = 0.0
        self.t_last = t
        if math.isfinite(current):
            self._current(float(current) / self.capacity_ah, dt)
        self._temperature(cell_t)
        o = self.out
        i_now = float(current) / self.capacity_ah if math.isfinite(current) else float(self.i_ema[0])
        shared = self._shared   # the features every cell of the string has in common, written in one pass
        shared[0] = i_now
        shared[1:6] = self.i_ema
        shared[6] = self.abs_ema
        shared[9] = self.hyst
        shared[10] = self.ah_rev
        shared[11] = math.log1p(self.rest_s) / 10.0
        o[:] = shared
        o[:, 7] = self.temp
        o[:, 8] = soc  # the filter's SOC, already within 0..1
        return o


def eta_features_table(t: np.ndarray, current: np.ndarray, cell_t: np.ndarray, soc: np.ndarray,
                       capacity_ah: float, hysteresis_rate: float = DEFAULT_HYSTERESIS_RATE,
                       session: np.ndarray | None = None, stride: int = 1) -> np.ndarray:
    """Features for a whole drive (T', n, F), via the same streaming code as inference.

    ``soc`` is what the filter would feed (training passes the truth plus
    noise); ``session`` restarts the history at power cycles like the vehicle
    does (rest time and hysteresis carried over); ``stride`` keeps every k-th row.
    """
    soc = np.asarray(soc, dtype=np.float64)
    if soc.ndim == 1:
        soc = soc[:, None]
    cell_t = np.asarray(cell_t, dtype=np.float64)
    if cell_t.ndim == 1:
        cell_t = cell_t[:, None]
    fx = EtaFeatures(soc.shape[1], cell_t.shape[1], capacity_ah, hysteresis_rate)
    keep = range(0, len(t), stride)
    out = np.empty((len(keep), soc.shape[1], N_FEATURES), dtype=np.float32)
    j = 0
    for k in range(len(t)):
        if session is not None and k and session[k] != session[k - 1]:
            saved = fx.state()
            fx.reset()
            fx.restore(saved, float(t[k]))
        f = fx.update(float(t[k]), float(current[k]), cell_t[k], soc[k])
        if k % stride == 0:
            out[j] = f
            j += 1
    return out


def domain_limits(lo: np.ndarray, hi: np.ndarray, margin: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The training range widened by margin*range (per feature): what counts as inside the model's domain."""
    span = np.maximum(hi - lo, 1e-6)
    return lo - margin * span, hi + margin * span

