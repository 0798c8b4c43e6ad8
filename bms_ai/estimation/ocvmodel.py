"""The OCV the filter believes, with how much it believes it, learned further in the field.

Sources, most specific first:
- the user's cell: a table (or a low-rate charge/discharge measurement, see
  ``ocv_from_low_rate``) given in the pack config, trusted to a few mV;
- the chemistry's reference curve, trusted only as far as cells of that
  family agree (a band, tens of mV in the middle of an NMC curve): with
  such a prior the filter leans on Coulomb counting and anchors;
- field learning: at the end of a rest the filter's estimate of the OCV-curve
  error (its ``e_ocv`` state, informed by Coulomb counting from other anchors)
  is committed into a correction curve on fixed SOC knots; the band shrinks
  where the pack has rested, and the correction persists across power cycles.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve

KNOTS = np.linspace(0.0, 1.0, 21)


@dataclass
class OcvTerms:
    """OCV, its slope and its uncertainty at each cell's SOC."""

    ocv: np.ndarray
    docv: np.ndarray
    sigma: np.ndarray


@dataclass
class OcvModel:
    """A curve, a band (sigma [V] on KNOTS) and a learned correction (V on KNOTS, with its variance)."""

    curve: OCVCurve
    band: np.ndarray
    source: str = "chemistry"
    correction: np.ndarray = field(default_factory=lambda: np.zeros(len(KNOTS)))
    corr_var: np.ndarray | None = None
    commits: int = 0

    def __post_init__(self) -> None:
        self.band = np.broadcast_to(np.asarray(self.band, dtype=np.float64), KNOTS.shape).copy()
        if self.corr_var is None:
            self.corr_var = self.band ** 2
        self._tabulate()

    def _tabulate(self) -> None:
        """Fine tables of corrected OCV, slope and sigma (rebuilt only when the correction changes)."""
        grid = np.linspace(0.0, 1.0, 1001)
        self._grid = grid
        self._ocv = self.curve(grid) + np.interp(grid, KNOTS, self.correction)
        self._slope = self.curve.slope(grid) + np.interp(grid, KNOTS[:-1] + 0.5 * (KNOTS[1] - KNOTS[0]),
                                                         np.diff(self.correction) / np.diff(KNOTS))
        self._sigma = np.sqrt(np.interp(grid, KNOTS, self.corr_var))

    @classmethod
    def from_curve(cls, curve: OCVCurve, sigma_v: float | np.ndarray, source: str) -> OcvModel:
        """A curve trusted to ``sigma_v`` (scalar, or per knot)."""
        return cls(curve, np.broadcast_to(np.asarray(sigma_v, dtype=np.float64), KNOTS.shape).copy(), source)

    def terms(self, soc: np.ndarray) -> OcvTerms:
        """OCV (with the learned correction), slope and remaining uncertainty at ``soc``."""
        g = self._grid  # np.interp clamps outside [0, 1]
        return OcvTerms(np.interp(soc, g, self._ocv), np.interp(soc, g, self._slope), np.interp(soc, g, self._sigma))

    def rest_soc_sigma(self, lo: float = 0.2, hi: float = 0.95) -> float:
        """The SOC error a relaxed rest takes from this curve: band over slope, the median over ``lo..hi``.

        It is the curve's own error, the same at every rest near that SOC, so it does not
        average down over rests the way sensor noise does.
        """
        k = (self._grid >= lo) & (self._grid <= hi)
        return float(np.median(self._sigma[k] / np.maximum(np.abs(self._slope[k]), 1e-4)))

    def inverse(self, v: float | np.ndarray) -> np.ndarray:
        """SOC whose corrected OCV is ``v`` (first use: the raw curve plus the mean correction)."""
        return self.curve.inverse(np.asarray(v) - float(np.mean(self.correction)))

    def commit(self, soc: float, error_v: float, error_var: float) -> None:
        """Fold an estimate of the curve error at ``soc`` (V, variance) into the two knots around it."""
        if not (np.isfinite(soc) and np.isfinite(error_v) and error_var > 0):
            return
        s = float(np.clip(soc, 0.0, 1.0))
        j = min(int(s / (KNOTS[1] - KNOTS[0])), len(KNOTS) - 2)
        w = (s - KNOTS[j]) / (KNOTS[j + 1] - KNOTS[j])
        for k, wk in ((j, 1.0 - w), (j + 1, w)):
            if wk < 1e-3:
                continue
            var_k = self.corr_var[k]
            # the observation speaks for knot k with weight wk: inflate its variance accordingly
            gain = var_k / (var_k + error_var / (wk * wk))
            self.correction[k] += gain * (error_v - self.correction[k])
            self.corr_var[k] = (1.0 - gain) * var_k
        self.commits += 1
        self._tabulate()

    def state(self) -> dict:
        """The learned part (persists across power cycles)."""
        return {"source": self.source, "correction": self.correction.tolist(), "corr_var": self.corr_var.tolist(),
                "commits": self.commits}

    def restore(self, d: dict) -> str:
        """Continue learning from ``state()`` output of the same source; '' or why not."""
        if d.get("source") != self.source:
            return f"learned OCV correction was for '{d.get('source')}', now '{self.source}': starting over"
        corr = np.asarray(d.get("correction", []), dtype=np.float64)
        var = np.asarray(d.get("corr_var", []), dtype=np.float64)
        if corr.shape != KNOTS.shape or var.shape != KNOTS.shape or not (np.isfinite(corr).all()
                                                                           and (var > 0).all()):
            return "learned OCV correction malformed: starting over"
        self.correction, self.corr_var = corr, np.minimum(var, self.band ** 2)
        self.commits = int(d.get("commits", 0))
        self._tabulate()
        return ""


def ocv_from_low_rate(charge: np.ndarray, discharge: np.ndarray) -> tuple[OCVCurve, float]:
    """OCV and half hysteresis gap from a low-rate (<= C/20) charge and discharge, each (K, 2) [soc, V].

    The equilibrium curve lies between the two branches: their mean is the OCV,
    half their distance the hysteresis plus the small remaining overpotential.
    """
    grid = np.linspace(0.0, 1.0, 101)
    c = np.interp(grid, charge[:, 0], charge[:, 1])
    d = np.interp(grid, discharge[:, 0], discharge[:, 1])
    if np.any(c < d - 0.01):
        raise ValueError("low-rate OCV: the charge branch lies below the discharge branch (swapped files?)")
    return OCVCurve(grid, 0.5 * (c + d), "measured"), float(np.median(0.5 * (c - d)))


def ocv_model_from_file(path: str | Path, sigma_v: float) -> OcvModel:
    """The user's cell: a csv of (soc 0..1, volts) rows, trusted to ``sigma_v``; one-line ValueError if unusable."""
    p = Path(path)
    try:
        tab = np.loadtxt(p, delimiter=",", comments="#", ndmin=2)
    except (OSError, ValueError) as exc:
        raise ValueError(f"OCV table {p}: {exc}") from None
    if tab.shape[1] < 2 or tab.shape[0] < 3 or not np.isfinite(tab[:, :2]).all():
        raise ValueError(f"OCV table {p}: need >= 3 rows of 'soc, volts'")
    order = np.argsort(tab[:, 0])
    soc, volts = tab[order, 0], tab[order, 1]
    if soc[0] < -1e-6 or soc[-1] > 1 + 1e-6 or np.any(np.diff(soc) <= 0):
        raise ValueError(f"OCV table {p}: soc must rise strictly within 0..1")
    return OcvModel.from_curve(OCVCurve(soc, volts, "user"), sigma_v, f"file:{p.name}")


FLEET_OCV_KEY = "ocv_curves"   # a SOC model entry's ``extra`` key: cell type -> fleet-learned OCV curve


def ocv_model_from_entry(extra: dict, cell_type: str, label: str = "") -> OcvModel | None:
    """The fleet-learned OCV curve of ``cell_type`` carried in a model entry's ``extra``, None if it has none.

    The fleet loop learns a cell type's curve from many vehicles' relaxed rests and ships it
    inside the SOC model's signed entry: ``{"soc": [...], "v": [...], "band_v": [21 knots]}``.
    A malformed curve is treated as absent (the family prior stays), never as an error at run time.
    """
    if not cell_type or not isinstance(extra, dict):
        return None
    c = (extra.get(FLEET_OCV_KEY) or {}).get(cell_type)
    try:
        soc = np.asarray(c["soc"], dtype=np.float64)
        v = np.asarray(c["v"], dtype=np.float64)
        band = np.asarray(c["band_v"], dtype=np.float64)
    except (KeyError, TypeError, ValueError):
        return None
    ok = (soc.ndim == 1 and soc.shape == v.shape and soc.size >= 3 and band.shape == KNOTS.shape
          and np.isfinite(soc).all() and np.isfinite(v).all() and np.isfinite(band).all() and (band > 0).all()
          and np.all(np.diff(soc) > 0) and np.all(np.diff(v) >= 0) and soc[0] >= 0.0 and soc[-1] <= 1.0)
    if not ok:
        return None
    return OcvModel(OCVCurve(soc, v, "fleet"), band, f"fleet:{cell_type}@{label}" if label else f"fleet:{cell_type}")
