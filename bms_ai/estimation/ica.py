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
  each is located in the measured curve by template matching: the reference
  OCV, sampled at the segment's own bins and shifted, goes through the same
  Savitzky-Golay derivative, so smoothing distorts template and measurement
  alike (a plain peak pick on the smoothed curve is biased by the peak's
  asymmetry); gain and offset of the template are free (overpotential, a
  scale error of the expected position), the shift with the least squared
  error wins, refined by a parabola through its neighbours;
- a segment whose curve does not look like the reference around the feature
  (R^2 below ``min_r2``, gain outside ``gain_range``, best shift at the edge of
  the search) gives no feature; the start of a segment (charge-transfer and
  hysteresis transients) is skipped.

Under current the graphite surface leads its average, so a peak appears early
on charge by the charge passed in the particle's diffusion time: for a sphere
at steady flux the surface runs ahead of the average by R^2 / (15 D) times the
stoichiometry rate, i.e. the feature shows ``current x shift_s`` (Ah) early,
with shift_s = R^2 / (15 D) of the graphite (about 550 s for the A123-type
cell: 5 um particles, D = 3e-15 m^2/s; measured 0.030-0.053 of SOC at
0.22-0.26 C on aged PyBaMM cells, where this predicts 0.030-0.040). The
capacity filter carries that time per cell as a state (``capacity.TAU``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve


@dataclass
class IcaParams:
    """Segment detection, binning, smoothing and acceptance of charging features."""

    min_rate_c: float = 0.04        # steady charging between these C-rates
    max_rate_c: float = 0.5
    steady_tol: float = 0.1         # relative deviation from the segment's current that ends it
    bin_c: float = 0.0025           # charge per bin (fraction of design capacity)
    settle_c: float = 0.03          # charge skipped after a segment starts (transients, hysteresis)
    window_c: float = 0.04          # Savitzky-Golay window (fraction of design capacity)
    match_soc: float = 0.12         # search a feature this far (SOC) either side of where it is expected
    fit_half_soc: float = 0.06      # template fit over this SOC either side of the feature
    step_soc: float = 0.0005        # shift grid of the search
    min_r2: float = 0.7             # template fit quality to accept a feature
    gain_range: tuple[float, float] = (0.4, 2.5)   # template gain accepted (dV/dQ scale vs the reference)
    loc_sd: float = 0.006           # location sigma of a feature (reference SOC units)
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
    r2: np.ndarray                  # (n,) template fit quality


def savgol_slope(x: np.ndarray, window: int, delta: float, axis: int = -1) -> np.ndarray:
    """First derivative by a quadratic Savitzky-Golay filter; the ends from the quadratic of the end windows.

    Equals ``scipy.signal.savgol_filter(x, window, 2, deriv=1, delta=delta, axis=axis)`` (mode "interp"),
    written here because importing scipy.signal costs every estimator process 1.6 s at start.
    """
    x = np.moveaxis(np.asarray(x, dtype=float), axis, -1)
    n, half = x.shape[-1], window // 2
    k = np.arange(-half, half + 1, dtype=float)
    fit = np.linalg.pinv(np.vander(k, 3, increasing=True))        # a window's values -> its quadratic
    out = np.empty_like(x)
    out[..., half:n - half] = np.lib.stride_tricks.sliding_window_view(x, window, axis=-1) @ fit[1]
    first, last = x[..., :window] @ fit.T, x[..., n - window:] @ fit.T
    out[..., :half] = first[..., 1:2] + 2.0 * first[..., 2:3] * k[:half]
    out[..., n - half:] = last[..., 1:2] + 2.0 * last[..., 2:3] * k[half + 1:]
    return np.moveaxis(out / delta, -1, axis)


def peaks_by_prominence(y: np.ndarray, min_prominence: float) -> tuple[np.ndarray, np.ndarray]:
    """Local maxima of ``y`` whose prominence reaches ``min_prominence``: (indices, prominences).

    Equals ``scipy.signal.find_peaks(y, prominence=min_prominence)``: a flat top's middle (rounded down);
    the prominence is the height over the higher of the lowest points on each side before higher ground.
    """
    y = np.asarray(y, dtype=float)
    idx, prom = [], []
    i, last = 1, len(y) - 1
    while i < last:
        if y[i - 1] < y[i]:
            ahead = i + 1
            while ahead < last and y[ahead] == y[i]:
                ahead += 1
            if y[ahead] < y[i]:
                peak = (i + ahead - 1) // 2
                lows = []
                for side in (y[peak::-1], y[peak:]):
                    higher = np.flatnonzero(side > y[peak])
                    lows.append(side[: higher[0] if len(higher) else len(side)].min())
                if y[peak] - max(lows) >= min_prominence:
                    idx.append(peak)
                    prom.append(y[peak] - max(lows))
                i = ahead
        i += 1
    return np.array(idx, dtype=int), np.array(prom, dtype=float)


def reference_features(soc: np.ndarray, ocv: np.ndarray, params: IcaParams | None = None) -> list[RefFeature]:
    """The dV/dSOC peaks of an OCV table inside ``soc_range`` (the features a charge can show)."""
    p = params or IcaParams()
    grid = np.linspace(0.0, 1.0, 801)
    v = np.interp(grid, soc, ocv)
    dv = savgol_slope(v, 9, grid[1] - grid[0])
    idx, prominences = peaks_by_prominence(dv, p.min_feature_prominence)
    lo, hi = p.soc_range
    return [RefFeature(float(grid[i]), float(dv[i]), float(pr)) for i, pr in zip(idx, prominences)
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

    def __init__(self, n_cells: int, design_capacity_ah: float, reference: OCVCurve,
                 params: IcaParams | None = None) -> None:
        """``reference``: the cell type's OCV curve (its dV/dSOC peaks are the features looked for)."""
        self.n = int(n_cells)
        self.design = float(design_capacity_ah)
        self.p = params or IcaParams()
        self.ref = reference
        self.features = reference_features(reference.soc, reference.ocv, self.p)
        self.seg: _Segment | None = None
        self._i_avg = 0.0
        self.segments = 0
        self.rejected = 0

    def update(self, dt: float, ah: float, current: float, v: np.ndarray, soc: np.ndarray) -> list[FeatureEvent]:
        """One sample: ``ah`` the Ah counter, ``current`` offset-corrected (+ = charge), ``soc`` (n,) where
        each cell is on the reference curve (its expected position; features are searched around it)."""
        p = self.p
        self._i_avg += min(max(dt, 0.0) / 5.0, 1.0) * (current - self._i_avg)
        rate = self._i_avg / self.design
        steady = p.min_rate_c <= rate <= p.max_rate_c
        seg = self.seg
        if seg is not None and (not steady or abs(self._i_avg - seg.current) > p.steady_tol * seg.current):
            return self.close()
        if seg is None:
            if steady and abs(current - self._i_avg) <= p.steady_tol * self._i_avg:
                self.seg = _Segment(float(self._i_avg), float(ah))
            return []
        if not (np.isfinite(v).all() and np.isfinite(soc).all()):
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

    def close(self) -> list[FeatureEvent]:
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
        full = cnt[skip:] > 0
        v = np.stack(seg.sum_v)[skip:] / np.maximum(cnt[skip:], 1)[:, None]
        s = np.stack(seg.sum_s)[skip:] / np.maximum(cnt[skip:], 1)[:, None]
        if not full.all():          # a missing bin (data gap): fill by interpolation in charge
            k = np.arange(len(full))
            v = np.column_stack([np.interp(k, k[full], v[full, c]) for c in range(self.n)])
            s = np.column_stack([np.interp(k, k[full], s[full, c]) for c in range(self.n)])
        dvdq = savgol_slope(v, w, p.bin_c, axis=0)   # V per unit SOC of design
        ah_bins = seg.ah0 + (np.arange(len(v)) + skip + 0.5) * p.bin_c * self.design
        rate = seg.sum_i / seg.n_i / self.design
        events = []
        for f in self.features:
            found = [self._locate(f, dvdq[:, c], s[:, c], w) for c in range(self.n)]
            pos = np.array([x[0] for x in found])
            ok = np.isfinite(pos)
            self.rejected += int(self.n - ok.sum())
            if ok.any():
                ah = np.array([np.interp(x, s[:, c], ah_bins) if np.isfinite(x) else np.nan
                               for c, x in enumerate(pos)])
                events.append(FeatureEvent(f, ah, ok, rate, np.array([x[1] for x in found])))
        return events

    def _locate(self, f: RefFeature, y: np.ndarray, sb: np.ndarray, w: int) -> tuple[float, float]:
        """Where (reference SOC in the bins' frame) the measured dV/dQ ``y`` matches the feature; (NaN, r2) if not."""
        p = self.p
        half = w // 2
        deltas = np.arange(-p.match_soc, p.match_soc + 0.5 * p.step_soc, p.step_soc)
        tpl = savgol_slope(self.ref(sb[None, :] - deltas[:, None]), w, p.bin_c, axis=1)
        inner = np.zeros(len(sb), dtype=bool)
        inner[half:len(sb) - half] = True
        win = inner[None, :] & (np.abs(sb[None, :] - (f.soc + deltas[:, None])) <= p.fit_half_soc)
        need = 0.8 * 2.0 * p.fit_half_soc / max(float(np.median(np.diff(sb))), 1e-6)
        n = win.sum(axis=1).astype(np.float64)
        wt = win.astype(np.float64)
        sx, sy = (wt * tpl).sum(1), (wt * y).sum(1)
        sxx, sxy, syy = (wt * tpl * tpl).sum(1), (wt * tpl * y).sum(1), (wt * y * y).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            vx, vy, cxy = sxx - sx * sx / n, syy - sy * sy / n, sxy - sx * sy / n
            gain = cxy / vx
            sse = vy - gain * cxy
            r2 = 1.0 - sse / vy
        lo, hi = p.gain_range
        good = (n >= need) & (gain >= lo) & (gain <= hi) & np.isfinite(sse)
        if not good.any():
            return np.nan, 0.0
        cost = np.where(good, sse / np.maximum(n, 1.0), np.inf)
        k = int(np.argmin(cost))
        if k == 0 or k == len(deltas) - 1 or not (np.isfinite(cost[k - 1]) and np.isfinite(cost[k + 1])):
            return np.nan, float(r2[k])
        if r2[k] < p.min_r2:
            return np.nan, float(r2[k])
        c0, c1, c2 = cost[k - 1], cost[k], cost[k + 1]
        den = c0 - 2.0 * c1 + c2
        frac = float(np.clip(0.5 * (c0 - c2) / den, -0.5, 0.5)) if den > 0 else 0.0
        return float(f.soc + deltas[k] + frac * p.step_soc), float(r2[k])

    def state(self) -> dict:
        """Counters only: an open segment does not survive a power cycle (it is closed at the session end)."""
        return {"segments": self.segments, "rejected": self.rejected}

    def restore(self, d: dict) -> None:
        """Counters from ``state()``."""
        self.segments = int(d.get("segments", 0))
        self.rejected = int(d.get("rejected", 0))
