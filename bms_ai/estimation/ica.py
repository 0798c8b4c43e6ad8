"""Differential-voltage features of low-rate constant-current charges (ICA / DVA).

On the flat OCV of an LFP cell the voltage carries almost no SOC
information, but the graphite's staging transitions still show as peaks of
dV/dQ while the cell charges slowly (AC charging, 0.05-0.5 C). A peak sits at a
fixed stoichiometry of the graphite, so its position in Ah is an anchor
(``estimation.capacity`` explains how it enters the capacity filter).

Method (Bloom et al., "Differential voltage analyses of high-power lithium-ion
cells. 1. Technique and application", J. Power Sources 139 (2005) 295-303;
Dubarry & Ansean, "Best practices for incremental capacity analysis", Front.
Energy Res. 10 (2022) 1023555):

- a charge segment is a stretch of steady charging current (within
  ``steady_tol`` of its start value, between ``min_rate_c`` and ``max_rate_c``);
- cell voltages are averaged in bins of equal charge (Ah, not time: the
  derivative is then a plain finite difference, and a pause costs nothing);
- the binned voltage is smoothed and differentiated with a Savitzky-Golay
  filter (local quadratic regression over ``window_c`` of charge);
- the reference features are the dV/dSOC peaks of the cell type's OCV curve;
  a measured peak is matched to a reference feature near the SOC where the
  current estimate expects it and located to sub-bin precision by a parabola
  through its three highest bins;
- a segment whose voltage is too noisy for its peaks (prominence below
  ``min_prominence`` of the reference peak) gives no feature; the start of a
  segment (charge-transfer and hysteresis transients) is skipped.

Under current the graphite surface leads its average, so a peak appears a
little early on charge; the shift grows with the C-rate and falls with
temperature. ``shift_per_c`` removes the mean of it and its spread goes into
the feature's sigma.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy.signal import find_peaks, savgol_filter


@dataclass
class IcaParams:
    """Segment detection, binning, smoothing and acceptance of charging features."""

    min_rate_c: float = 0.04        # steady charging between these C-rates
    max_rate_c: float = 0.5
    steady_tol: float = 0.1         # relative deviation from the segment's current that ends it
    bin_c: float = 0.0025           # charge per bin (fraction of design capacity)
    settle_c: float = 0.03          # charge skipped after a segment starts (transients, hysteresis)
    window_c: float = 0.04          # Savitzky-Golay window (fraction of design capacity)
    min_prominence: float = 0.3     # measured peak prominence >= this x the reference peak's
    match_soc: float = 0.15         # a measured peak within this SOC of where it is expected
    loc_sd: float = 0.01            # location sigma of a peak (reference SOC units)
    shift_per_c: float = 0.0        # mean early shift of a peak per C of charging (reference SOC units)
    shift_sd_per_c: float = 0.1     # spread of that shift per C
    min_feature_prominence: float = 0.05   # reference dV/dSOC peaks smaller than this (V) are not used
    soc_range: tuple[float, float] = (0.15, 0.92)   # reference features outside this SOC are not used


@dataclass
class RefFeature:
    """A dV/dSOC peak of the reference OCV curve."""

    soc: float                      # position on the reference curve
    height: float                   # dV/dSOC at the peak [V]
    prominence: float               # [V]


@dataclass
class FeatureEvent:
    """One reference feature found in a charge segment: where (Ah counter) in each cell."""

    feature: RefFeature
    ah: np.ndarray                  # (n,) Ah counter at the feature (NaN where not found)
    ok: np.ndarray                  # (n,) found and accepted
    rate_c: float                   # mean charging C-rate of the segment
    prominence: np.ndarray          # (n,) measured prominence [V per unit SOC of design]


def reference_features(soc: np.ndarray, ocv: np.ndarray, params: IcaParams | None = None) -> list[RefFeature]:
    """The dV/dSOC peaks of an OCV table inside ``soc_range`` (the features a charge can show)."""
    p = params or IcaParams()
    grid = np.linspace(0.0, 1.0, 801)
    v = np.interp(grid, soc, ocv)
    dv = savgol_filter(v, 9, 2, deriv=1, delta=grid[1] - grid[0])
    idx, props = find_peaks(dv, prominence=p.min_feature_prominence)
    lo, hi = p.soc_range
    return [RefFeature(float(grid[i]), float(dv[i]), float(pr)) for i, pr in zip(idx, props["prominences"])
            if lo <= grid[i] <= hi]


@dataclass
class _Segment:
    current: float                  # reference (start) current [A]
    ah0: float                      # Ah counter at the start
    sum_v: list = field(default_factory=list)
    sum_s: list = field(default_factory=list)
    count: list = field(default_factory=list)
    sum_i: float = 0.0
    n_i: int = 0


class FeatureFinder:
    """Collects steady charging segments sample by sample; returns the features of each closed segment."""

    def __init__(self, n_cells: int, design_capacity_ah: float, features: list[RefFeature],
                 params: IcaParams | None = None) -> None:
        self.n = int(n_cells)
        self.design = float(design_capacity_ah)
        self.features = list(features)
        self.p = params or IcaParams()
        self.seg: _Segment | None = None
        self._i_avg = 0.0
        self.segments = 0
        self.rejected = 0

    def update(self, dt: float, ah: float, current: float, v: np.ndarray, soc: np.ndarray,
               expected_soc) -> list[FeatureEvent]:
        """One sample (``ah`` = Ah counter, ``current`` offset-corrected, + = charge).

        ``expected_soc(feature)`` gives the (n,) SOC at which each cell should show it.
        """
        p = self.p
        self._i_avg += min(max(dt, 0.0) / 5.0, 1.0) * (current - self._i_avg)
        rate = self._i_avg / self.design
        steady = p.min_rate_c <= rate <= p.max_rate_c
        seg = self.seg
        if seg is not None and (not steady or abs(self._i_avg - seg.current) > p.steady_tol * seg.current):
            return self.close(expected_soc)
        if seg is None:
            if steady and abs(current - self._i_avg) <= p.steady_tol * self._i_avg:
                self.seg = _Segment(float(self._i_avg), float(ah))
            return []
        if not np.isfinite(v).all():
            return []
        b = int((ah - seg.ah0) / (p.bin_c * self.design))
        if b < 0:
            return []
        while len(seg.count) <= b:
            seg.sum_v.append(np.zeros(self.n))
            seg.sum_s.append(np.zeros(self.n))
            seg.count.append(0)
        seg.sum_v[b] += v
        seg.sum_s[b] += soc
        seg.count[b] += 1
        seg.sum_i += current
        seg.n_i += 1
        return []

    def close(self, expected_soc) -> list[FeatureEvent]:
        """End the open segment (charge stopped, current changed, session end); its features."""
        seg, self.seg = self.seg, None
        if seg is None:
            return []
        self.segments += 1
        cnt = np.asarray(seg.count, dtype=np.float64)
        p = self.p
        skip = int(round(p.settle_c / p.bin_c))
        w = max(5, int(round(p.window_c / p.bin_c)) | 1)
        if len(cnt) - skip < 2 * w or seg.n_i == 0:
            return []
        full = cnt > 0
        v = np.stack(seg.sum_v)[skip:] / np.maximum(cnt[skip:], 1)[:, None]
        s = np.stack(seg.sum_s)[skip:] / np.maximum(cnt[skip:], 1)[:, None]
        full = full[skip:]
        if not full.all():          # a missing bin (data gap): fill by interpolation in charge
            k = np.arange(len(full))
            v = np.column_stack([np.interp(k, k[full], v[full, c]) for c in range(self.n)])
            s = np.column_stack([np.interp(k, k[full], s[full, c]) for c in range(self.n)])
        bin_ah = p.bin_c * self.design
        dvdq = savgol_filter(v, w, 2, deriv=1, delta=p.bin_c, axis=0)   # V per unit SOC of design
        ah_bins = seg.ah0 + (np.arange(len(v)) + skip + 0.5) * bin_ah
        rate = seg.sum_i / seg.n_i / self.design
        return [ev for f in self.features if (ev := self._find(f, dvdq, s, ah_bins, w, rate, expected_soc)).ok.any()]

    def _find(self, f: RefFeature, dvdq: np.ndarray, s: np.ndarray, ah_bins: np.ndarray, w: int, rate: float,
              expected_soc) -> FeatureEvent:
        p = self.p
        exp = np.asarray(expected_soc(f), dtype=np.float64)
        ah = np.full(self.n, np.nan)
        prom = np.zeros(self.n)
        half = w // 2
        for c in range(self.n):
            idx, props = find_peaks(dvdq[:, c], prominence=p.min_prominence * f.prominence)
            keep = (idx >= half) & (idx < len(dvdq) - half) & (np.abs(s[idx, c] - exp[c]) <= p.match_soc)
            if not keep.any():
                continue
            j = int(np.argmin(np.where(keep, np.abs(s[idx, c] - exp[c]), np.inf)))
            k = int(idx[j])
            y0, y1, y2 = dvdq[k - 1, c], dvdq[k, c], dvdq[k + 1, c]
            den = y0 - 2.0 * y1 + y2
            frac = float(np.clip(0.5 * (y0 - y2) / den, -0.5, 0.5)) if den < 0 else 0.0
            ah[c] = ah_bins[k] + frac * (ah_bins[1] - ah_bins[0])
            prom[c] = props["prominences"][j]
        ok = np.isfinite(ah)
        self.rejected += int(self.n - ok.sum())
        return FeatureEvent(f, ah, ok, rate, prom)

    def state(self) -> dict:
        """Counters only: an open segment does not survive a power cycle (it is closed at the session end)."""
        return {"segments": self.segments, "rejected": self.rejected}

    def restore(self, d: dict) -> None:
        """Counters from ``state()``."""
        self.segments = int(d.get("segments", 0))
        self.rejected = int(d.get("rejected", 0))
