"""Extended Kalman filter on a first-order RC equivalent circuit, batched over cells.

State per cell: x = [SOC, v1] (v1: RC-branch voltage). With current I (>0 charging):
    SOC' = SOC + I dt / (3600 Q)
    v1'  = a v1 + R1 (1 - a) I,   a = exp(-dt / tau)
    V    = OCV(SOC) + v1 + R0 I
All 2x2 algebra is written out element-wise so 96 cells cost a handful of numpy ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv

if TYPE_CHECKING:
    from bms_ai.models.runtime import LoadedModel


@dataclass
class ECMParams:
    """Cell-level ECM parameters (defaults: identified on the sim training drives, see docs/estimation.md)."""

    capacity_ah: float = 5.0
    r0: float = 0.03
    r1: float = 0.015
    tau: float = 30.0
    q_soc: float = 1e-10   # process noise SOC (per s)
    q_v1: float = 1e-7     # process noise v1 (V^2 per s)
    r_v: float = 1e-4      # measurement noise (V^2)
    sigma_soc0: float = 0.3

    @classmethod
    def from_dict(cls, d: dict) -> ECMParams:
        """From a manifest's ``extra.ecm``; keys that are not parameters are ignored."""
        known = {k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def ecm_for(model: LoadedModel | None, capacity_ah: float) -> ECMParams:
    """The EKF's ECM for a cell of ``capacity_ah``: identified with the SOC model when there is one.

    Resistances identified on the training cells are scaled to this cell's
    capacity (parallel cells: R ~ 1/capacity); without a model, the defaults.
    """
    d = dict(model.entry.extra.get("ecm", {})) if model is not None else {}
    p = ECMParams.from_dict(d) if d else ECMParams()
    if d:
        k = float(d.get("capacity_ah", capacity_ah)) / capacity_ah
        p.r0, p.r1 = p.r0 * k, p.r1 * k
    p.capacity_ah = capacity_ah
    return p


DEFAULT_ECM = {
    "nmc": ECMParams(capacity_ah=5.0, r0=0.025, r1=0.012, tau=30.0),
    "lfp": ECMParams(capacity_ah=2.3, r0=0.02, r1=0.01, tau=30.0, r_v=4e-5),
}


class BatchedEKF:
    """EKF SOC estimator for n cells in parallel."""

    def __init__(self, n: int, chemistry: str, params: ECMParams | None = None,
                 soc0: float | np.ndarray = 0.5, ocv: OCVCurve | None = None) -> None:
        self.n = n
        self.ocv = ocv or load_ocv(chemistry)
        self.p = params or DEFAULT_ECM.get(chemistry, ECMParams())
        self.soc = np.broadcast_to(np.asarray(soc0, dtype=np.float64), (n,)).copy()
        self.v1 = np.zeros(n)
        s0 = self.p.sigma_soc0 ** 2
        self.P00 = np.full(n, s0)
        self.P01 = np.zeros(n)
        self.P11 = np.full(n, 1e-4)

    @property
    def sigma(self) -> np.ndarray:
        """SOC standard deviation per cell."""
        return np.sqrt(np.maximum(self.P00, 0.0))

    def step(self, current: float, voltage: np.ndarray, dt: float) -> np.ndarray:
        """Predict over ``dt`` with ``current``, update on the cells whose voltage is known; returns SOC per cell."""
        p = self.p
        if not np.isfinite(current) or not np.isfinite(dt) or dt <= 0:
            return self.soc
        a = np.exp(-dt / p.tau)
        b = dt / (3600.0 * p.capacity_ah)
        # predict (F = diag(1, a))
        self.soc = self.soc + b * current
        self.v1 = a * self.v1 + p.r1 * (1.0 - a) * current
        self.P00 = self.P00 + p.q_soc * dt
        self.P01 = a * self.P01
        self.P11 = a * a * self.P11 + p.q_v1 * dt
        # update where a voltage is available
        v = np.asarray(voltage, dtype=np.float64)
        ok = np.isfinite(v)
        soc_c = np.clip(self.soc, 0.0, 1.0)
        h0 = self.ocv.slope(soc_c)
        vhat = self.ocv(soc_c) + self.v1 + p.r0 * current
        y = np.where(ok, v - vhat, 0.0)
        ph0 = self.P00 * h0 + self.P01          # P H^T, row 0
        ph1 = self.P01 * h0 + self.P11          # row 1
        s = h0 * ph0 + ph1 + p.r_v
        k0 = np.where(ok, ph0 / s, 0.0)
        k1 = np.where(ok, ph1 / s, 0.0)
        self.soc = np.clip(self.soc + k0 * y, 0.0, 1.0)
        self.v1 = self.v1 + k1 * y
        # Joseph-free update is fine here: P - K S K^T keeps symmetry by construction.
        self.P00 = self.P00 - k0 * k0 * s
        self.P01 = self.P01 - k0 * k1 * s
        self.P11 = self.P11 - k1 * k1 * s
        return self.soc
