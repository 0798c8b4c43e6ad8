"""OCV-SOC curves per chemistry (tables generated from PyBaMM parameter sets, see data/make_ocv.py)."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from bms_ai.chemistry.registry import CHEMISTRIES, get_chemistry


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
        """OCV [V] at ``soc``."""
        return np.interp(soc, self.soc, self.ocv)

    def slope(self, soc: np.ndarray | float) -> np.ndarray:
        """dOCV/dSOC [V] at ``soc`` (floored: the EKF needs a non-zero Jacobian)."""
        return np.interp(soc, self.soc, self.docv_tab)

    def inverse(self, v: np.ndarray | float) -> np.ndarray:
        """SOC whose OCV is ``v`` (clamped to the table)."""
        return np.interp(v, self.ocv, self.soc)


@lru_cache(maxsize=8)
def load_ocv(chemistry: str) -> OCVCurve:
    """The OCV curve of a registered chemistry; ValueError naming the known ones otherwise."""
    chem = chemistry.lower()
    if chem not in CHEMISTRIES:
        raise ValueError(f"no OCV table for chemistry {chemistry!r}; known: {', '.join(CHEMISTRIES.names())}")
    tab = np.loadtxt(get_chemistry(chem).ocv_table_path, delimiter=",", comments="#")
    return OCVCurve(tab[:, 0], tab[:, 1], chem)


def ocv_or_none(chemistry: str) -> OCVCurve | None:
    """The chemistry's OCV curve, or None for one without a table (checks that can do without it then do)."""
    try:
        return load_ocv(chemistry)
    except (ValueError, OSError, KeyError):
        return None
