"""THE feature pipeline: one implementation for training and inference (no skew).

Inputs are PackSample-like measurements only (time, pack current, cell
voltages, cell temperatures), so features computed from a decoded CAN log for
training are exactly what the estimator computes live. Training calls
``soc_features_table`` which runs the same streaming ``SocFeatures.update`` over
a whole drive. Bump FEATURE_VERSION on any change; models record it in the
manifest and the runtime refuses a model built for another version.
"""

from __future__ import annotations

import numpy as np

FEATURE_VERSION = "soc-cell-v1"

# (name, unit) per feature, last axis of the model input.
SOC_FEATURES: list[tuple[str, str]] = [
    ("v", "V"),
    ("v_ema10", "V"),
    ("v_ema60", "V"),
    ("v_ema300", "V"),
    ("i", "C"),
    ("i_ema10", "C"),
    ("i_ema60", "C"),
    ("i_ema300", "C"),
    ("abs_i_ema300", "C"),
    ("temp", "degC"),
]
N_SOC_FEATURES = len(SOC_FEATURES)
_TAUS = np.array([10.0, 60.0, 300.0])


def cell_sensor_map(n_cells: int, n_temps: int) -> np.ndarray:
    """Temperature sensor index per cell (sensors spread evenly along the string)."""
    if n_temps <= 0:
        return np.zeros(n_cells, dtype=np.int64)
    return (np.arange(n_cells) * n_temps) // max(n_cells, 1)


class SocFeatures:
    """Streaming per-cell SOC features; state is a few EMAs per cell.

    Current is normalised to C-rate with the design capacity so one model
    serves different cell sizes of a chemistry.
    """

    def __init__(self, n_cells: int, n_temps: int, capacity_ah: float) -> None:
        if capacity_ah <= 0:
            raise ValueError("capacity_ah must be > 0")
        self.n = n_cells
        self.capacity_ah = float(capacity_ah)
        self.sensor_of_cell = cell_sensor_map(n_cells, n_temps)
        self.reset()

    def reset(self) -> None:
        """Forget the history: the next update starts the EMAs from its own values."""
        self.t_last = float("nan")
        self.v_ema = np.full((3, self.n), np.nan)
        self.i_ema = np.full(3, np.nan)
        self.abs_i_ema = float("nan")
        self.temp = np.full(self.n, 25.0)
        self.out = np.zeros((self.n, N_SOC_FEATURES), dtype=np.float32)

    def update(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """Advance to time t and return features (n_cells, N_SOC_FEATURES); NaN rows = unusable cell."""
        i_c = float(current) / self.capacity_ah
        v = np.asarray(cell_v, dtype=np.float64)
        dt = t - self.t_last if np.isfinite(self.t_last) else float("nan")
        if not np.isfinite(dt) or dt <= 0 or dt > 30.0:
            # (re)start: history unknown -> assume steady state at the present values
            if np.isfinite(i_c):
                self.i_ema[:] = i_c
                self.abs_i_ema = abs(i_c)
            self.v_ema[:] = v
        else:
            alpha = 1.0 - np.exp(-dt / _TAUS)
            if np.isfinite(i_c):
                self.i_ema += alpha * (i_c - self.i_ema)
                self.abs_i_ema += alpha[2] * (abs(i_c) - self.abs_i_ema)
            ok = np.isfinite(v)
            fresh = ok & ~np.isfinite(self.v_ema[0])
            self.v_ema[:, fresh] = v[fresh]
            self.v_ema[:, ok] += alpha[:, None] * (v[ok] - self.v_ema[:, ok])
        self.t_last = t
        ct = np.asarray(cell_t, dtype=np.float64)
        if ct.size:
            tc = ct[self.sensor_of_cell]
            bad = ~np.isfinite(tc)
            if bad.any():
                fill = np.nanmean(ct) if np.isfinite(ct).any() else np.nan
                tc = np.where(bad, fill, tc)
            self.temp = np.where(np.isfinite(tc), tc, self.temp)
        o = self.out
        o[:, 0] = v
        o[:, 1:4] = self.v_ema.T
        o[:, 4] = i_c
        o[:, 5:8] = self.i_ema
        o[:, 8] = self.abs_i_ema
        o[:, 9] = self.temp
        return o


def soc_features_table(t: np.ndarray, current: np.ndarray, cell_v: np.ndarray, cell_t: np.ndarray,
                       capacity_ah: float) -> np.ndarray:
    """Features for a whole drive (T, n_cells, F), via the same streaming code as inference."""
    cell_v = np.asarray(cell_v, dtype=np.float64)
    if cell_v.ndim == 1:
        cell_v = cell_v[:, None]
    cell_t = np.asarray(cell_t, dtype=np.float64)
    if cell_t.ndim == 1:
        cell_t = cell_t[:, None]
    fx = SocFeatures(cell_v.shape[1], cell_t.shape[1], capacity_ah)
    out = np.empty((len(t), cell_v.shape[1], N_SOC_FEATURES), dtype=np.float32)
    for k in range(len(t)):
        out[k] = fx.update(float(t[k]), float(current[k]), cell_v[k], cell_t[k])
    return out


def in_domain(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, margin: float = 0.1) -> np.ndarray:
    """Rows of x inside the training range widened by margin*range (per feature)."""
    span = np.maximum(hi - lo, 1e-6)
    return np.all((x >= lo - margin * span) & (x <= hi + margin * span), axis=-1)
