"""OCV-SOC curves per chemistry (tables generated from PyBaMM parameter sets, see data/make_ocv.py)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent / "data"
CHEMISTRIES = ("nmc", "lfp")


class OCVCurve:
    """Monotone OCV(SOC) table with derivative and inverse; all vectorised."""

    def __init__(self, soc: np.ndarray, ocv: np.ndarray, chemistry: str = "") -> None:
        soc = np.asarray(soc, dtype=np.float64)
        ocv = np.asarray(ocv, dtype=np.float64)
        if soc.ndim != 1 or soc.shape != ocv.shape or soc.size < 3:
            raise ValueError("OCV table needs matching 1-D soc/ocv arrays with >= 3 points")
        self.chemistry = chemistry
        self.soc = soc
        # Strictly increasing OCV keeps the inverse and the EKF Jacobian well defined.
        self.ocv = np.maximum.accumulate(ocv + np.arange(ocv.size) * 1e-7)
        d = np.gradient(self.ocv, self.soc)
        # A floor on dOCV/dSOC avoids a zero Jacobian on the LFP plateau.
        self.docv_tab = np.maximum(d, 1e-3)
        self.v_min = float(self.ocv[0])
        self.v_max = float(self.ocv[-1])

    def __call__(self, soc: np.ndarray | float) -> np.ndarray:
        return np.interp(soc, self.soc, self.ocv)

    def slope(self, soc: np.ndarray | float) -> np.ndarray:
        return np.interp(soc, self.soc, self.docv_tab)

    def inverse(self, v: np.ndarray | float) -> np.ndarray:
        return np.interp(v, self.ocv, self.soc)


@lru_cache(maxsize=8)
def load_ocv(chemistry: str) -> OCVCurve:
    chem = chemistry.lower()
    path = DATA / f"ocv_{chem}.csv"
    if not path.exists():
        raise ValueError(f"no OCV table for chemistry {chemistry!r} (have: {', '.join(CHEMISTRIES)})")
    tab = np.loadtxt(path, delimiter=",", comments="#")
    return OCVCurve(tab[:, 0], tab[:, 1], chem)
