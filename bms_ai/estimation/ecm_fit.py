"""Identify 1-RC ECM parameters (R0, R1, tau) by least squares on drives with SOC truth.

Used so the EKF baseline is tuned on the same training data as the NN (a fair comparison).
"""

from __future__ import annotations

import numpy as np

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation.ekf import ECMParams


def _rc_filter(t: np.ndarray, i: np.ndarray, tau: float) -> np.ndarray:
    out = np.zeros_like(i)
    for k in range(1, len(i)):
        a = np.exp(-(t[k] - t[k - 1]) / tau)
        out[k] = a * out[k - 1] + (1 - a) * i[k - 1]
    return out


def fit_ecm(drives: list, chemistry: str, taus=(10.0, 20.0, 40.0, 80.0, 160.0), stride: int = 10) -> ECMParams:
    """R0, R1, tau (grid) and the voltage noise by least squares on drives with true SOC; capacity = median design."""
    ocv = load_ocv(chemistry)
    best = None
    for tau in taus:
        rows, y = [], []
        for d in drives:
            t, i = d.t[::stride], d.current[::stride]
            f = _rc_filter(t, i, tau)
            for c in range(d.n_cells):
                resid = d.cell_v[::stride, c] - ocv(np.clip(d.soc[::stride, c], 0, 1))
                ok = np.isfinite(resid) & (d.soc[::stride, c] > 0.1) & (d.soc[::stride, c] < 0.95)
                rows.append(np.column_stack([i[ok], f[ok]]))
                y.append(resid[ok])
        design, y = np.concatenate(rows), np.concatenate(y)
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(np.sum((design @ coef - y) ** 2))
        if best is None or sse < best[0]:
            best = (sse, tau, coef, len(y))
    sse, tau, (r0, r1), n = best
    cap = float(np.median([d.capacity_ah for d in drives]))
    return ECMParams(capacity_ah=cap, r0=max(float(r0), 1e-4), r1=max(float(r1), 1e-4), tau=tau,
                     r_v=max(sse / n, 1e-6))
