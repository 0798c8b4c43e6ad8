"""SOH (capacity per cell, R0 per cell) from field data, and RUL with a 90 % interval.

Capacity: Ah between anchors of known SOC over their SOC difference, fused per
cell by the anchor Kalman filter of ``estimation.capacity`` (its docstring has
the method and the references). The anchors found in ordinary vehicle use:

- end of a CC-CV full charge: the charger holds the highest cell at v_max until
  the current has tapered to ``full_taper_c`` (C/20) after ``full_cv_min_s`` at
  the CV level (a regen pulse near the top is no full charge); every cell's SOC then
  follows from its voltage on the steep top of the OCV curve (the highest
  cell's is 1 by the definition of the SOC window);
- relaxed rests: the first sample after the vehicle slept ``park_min_s``, or an
  awake pause of ``rest_min_s``; OCV -> SOC with a sigma of (OCV error) /
  (OCV slope), so a rest counts only where the curve is steep enough
  (``max_soc_sd``): every rest on NMC, only the knees (below ~20 %, above
  ~95 %) on LFP, whose flat plateau and hysteresis make a mid-SOC rest worth
  nothing (and below the top knee an LFP rest is a graphite position, see
  ``_soc_anchor``); the anchor is the 5 s average of samples still at rest,
  never the first sample of the step that ends the rest;
- charging features (``estimation.ica``): dV/dQ peaks of graphite staging during
  steady low-rate charges, on by default where the OCV is flat (LFP).

The current-sensor offset is a state of the capacity filter: awake rests
(true current ~0 up to an unmetered load, ``rest_load_sd_c``) measure it
directly, anchors far apart in awake time constrain it, and its sigma grows the
Ah uncertainty with the awake time between anchors. The SOC filter's own offset
estimate is not used by default (``filter_offset``): before that filter knows
the capacity, it explains a capacity error during a long charge as an offset
(a 12 % capacity error at 0.26 C reads as +0.3 A on 50 Ah), and correcting the
Ah with it would feed the capacity error back into the capacity. The current
sensor's gain error cannot be separated from capacity by any of these
methods: the result is the effective capacity as that sensor sees it.

R0 per cell from current steps: dV/dI over one sample when |dI| is large (the
RC branch cannot move in 0.1 s, so the step sees R0 only).

RUL: ``bms_ai.estimation.rul.RulEstimator`` (Bayesian fade-law fit with a
conformal-calibrated 90 % interval) on the SOH history against equivalent full
cycles.

Persistence: ``state()`` / ``restore()`` (JSON) carry the capacity filter,
R0, EFC, the SOH history and the sleep time across power cycles; ``state()``
is the end of a session: a charge segment or a rest still open is closed and
used first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.estimation.capacity import AnchorResult, CapacityFilter, CapacityParams
from bms_ai.estimation.features import WAKE_REST_C
from bms_ai.estimation.ica import FeatureEvent, FeatureFinder, IcaParams
from bms_ai.estimation.rul import RulEstimator

STATE_VERSION = 1


@dataclass
class HealthParams:
    """Tuning of the field SOH estimator: R0 steps, anchors, charging features."""

    step_min_c: float = 0.3          # |dI| (C-rate) that counts as a current step (R0)
    r0_alpha: float = 0.05           # EMA weight per accepted step
    rest_max_c: float = 0.02         # |I| below this C-rate counts as rest while awake
    rest_min_s: float = 900.0        # awake rest this long gives an OCV anchor
    park_min_s: float = 1800.0       # a sleep this long makes the next session's first sample an OCV
    wake_max_c: float = WAKE_REST_C  # ... if that sample's |I| is below this C-rate
    session_gap_s: float = 60.0      # a gap between samples longer than this is a sleep
    ocv_sd_v: float = 0.008          # a relaxed cell's OCV vs its type's curve (spread, ageing, relaxation)
    hyst_sd: float = 0.3             # hysteresis branch uncertainty, fraction of half the gap
    graphite_frame_soc: float = 0.0  # rests below this SOC anchor the graphite scale G (LFP: below the top knee)
    meas_sd_v: float = 0.002         # voltage measurement
    max_soc_sd: float = 0.03         # a rest with a larger SOC sigma is no anchor (flat OCV)
    full_min_c: float = 0.1          # a full charge: charging at least this C-rate first ...
    full_taper_c: float = 0.05       # ... then tapered to at most this (CV at v_max)
    full_top_soc: float = 0.95       # ... with the highest cell above the OCV of this SOC
    full_cv_soc: float = 0.99        # ... after a taper with the highest cell held above the OCV of this SOC (CV)
    cv_margin_v: float = 0.01        # ... or above the chemistry's v_max less this (sensor error), if lower
    full_cv_min_s: float = 120.0     # ... for this long while charging (not a regen pulse at the top)
    full_sd: float = 0.003           # SOC sigma at the end of a full charge
    filter_offset: bool = False      # correct the current with the SOC filter's offset estimate (see the docstring)
    zero_min_s: float = 300.0        # an awake rest this long (not at the top: CV tail) measures the offset ...
    rest_load_sd_c: float = 0.001    # ... up to an unmetered load at rest (C-rate sigma)
    min_report_sd: float = 0.03      # SOH history (RUL) only from estimates with a sigma below this
    ica: bool | None = None          # charging features; None: on for chemistries with OCV hysteresis (LFP)
    capacity: CapacityParams = field(default_factory=CapacityParams)
    features: IcaParams = field(default_factory=IcaParams)

    @classmethod
    def for_chemistry(cls, chemistry: str) -> HealthParams:
        """Defaults with the chemistry's graphite diffusion time for the charging features."""
        p = cls()
        shift = GRAPHITE_SHIFT_S.get(get_chemistry(chemistry).name) if chemistry else None
        if shift is not None:
            p.capacity.tau_s, p.capacity.tau_sd_s = shift
        if chemistry and get_chemistry(chemistry).hysteresis_gap_v > 0:
            # flat cathode: every step of the voltage below the top knee is a graphite stage
            p.graphite_frame_soc = 0.95
        return p


# Graphite R^2 / (15 D) of the reference cells [s] and its prior spread (capacity.py: the state tau):
# A123-type LFP (Prada2013: R 5 um, D 3e-15 m^2/s) 555 s; LG M50 (Chen2020: R 5.86 um, D 3.3e-14) 69 s.
GRAPHITE_SHIFT_S: dict[str, tuple[float, float]] = {"lfp": (555.0, 200.0), "nmc": (70.0, 40.0)}


@dataclass
class HealthOutput:
    """SOH, capacity, R0 and RUL as reported (pack values are the weakest cell's)."""

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
    soh_sd: float = math.nan        # sigma of the pack SOH
    cell_soh_sd: np.ndarray = field(default_factory=lambda: np.empty(0))
    anchors: dict = field(default_factory=dict)   # anchors used / rejected by kind


def rest_ocv(chemistry: str) -> OCVCurve:
    """The chemistry's OCV curve (rests on a flat part are rejected by their SOC sigma, not by chemistry)."""
    return load_ocv(chemistry)


def _curve(ocv) -> OCVCurve:
    """The plain curve of an ``OcvModel`` (its ``curve``) or an ``OCVCurve``."""
    return getattr(ocv, "curve", ocv)


class HealthEstimator:
    """Capacity and R0 per cell from field data (no lab test), plus the RUL from the SOH history."""

    def __init__(self, n_cells: int, design_capacity_ah: float, params: HealthParams | None = None,
                 efc0: float = 0.0, soh_history: list[tuple[float, float]] | None = None,
                 ocv=None, rul: RulEstimator | None = None, chemistry: str = "") -> None:
        """``ocv``: an ``OcvModel`` (the SOC filter's, with its field learning) or an ``OCVCurve``; None: no anchors."""
        self.n = n_cells
        self.q_design = float(design_capacity_ah)
        self.p = params or HealthParams.for_chemistry(chemistry)
        self.chem = get_chemistry(chemistry) if chemistry else None
        self.ocv = ocv
        self.hyst_v = 0.5 * self.chem.hysteresis_gap_v if self.chem else 0.0
        self.hyst_rate = self.chem.hysteresis_rate if self.chem else 0.0
        self.hyst = 0.0                     # one-state hysteresis: -1 discharge branch .. +1 charge branch
        self.cap = CapacityFilter(n_cells, self.q_design, self.p.capacity)
        self.cell_r0 = np.full(n_cells, np.nan)
        self.efc = float(efc0)
        self.ah = 0.0                       # offset-corrected Ah counter (+ = charge)
        self.history: list[tuple[float, float]] = list(soh_history or [])
        self.rul_est = rul or RulEstimator()
        self.q_updates = 0
        # the latest end of a CC-CV full charge as a SOC measurement for the SOC filter: (Ah counter at the
        # anchor, SOC per cell, sigma per cell, usable cells), and how many there have been
        self.full_soc: tuple[float, np.ndarray, np.ndarray, np.ndarray] | None = None
        self.full_count = 0
        # the latest awake zero-current rest as an offset reading for the SOC filter: (mean current [A], sigma [A])
        self.zero_reading: tuple[float, float] | None = None
        self.zero_count = 0
        self.r0_updates = 0
        self.counts: dict[str, list[int]] = {}      # kind -> [used, rejected, flat]
        use_ica = self.p.ica if self.p.ica is not None else bool(self.chem and self.chem.hysteresis_gap_v > 0)
        self.finder: FeatureFinder | None = None
        if use_ica and ocv is not None:
            self.finder = FeatureFinder(n_cells, self.q_design, _curve(ocv), self.p.features)
        self.v_top = float(_curve(ocv)(self.p.full_top_soc)) if ocv is not None else math.inf
        self.v_cv = float(_curve(ocv)(self.p.full_cv_soc)) if ocv is not None else math.inf
        if self.chem is not None:
            # the charger holds the chemistry's v_max: a curve whose top lies above it (a fleet-learned curve of
            # an NCA type: 4.203 V at 99 %) would otherwise never see a CV phase, and no full charge at all
            self.v_cv = min(self.v_cv, self.chem.v_max - self.p.cv_margin_v)
            self.v_top = min(self.v_top, self.v_cv)
        self._reset_session()
        self.t_sleep: float | None = None    # time of the last sample before a sleep (persisted)
        self.t_anchor_days = 0.0             # day count of the last capacity-filter prediction

    def _reset_session(self) -> None:
        self._last: tuple[float, float, np.ndarray] | None = None
        self._i_avg = 0.0
        self._v_avg: np.ndarray | None = None      # cell voltages averaged like _i_avg (anchors: less noise)
        self._charged = False
        self._cv_s = 0.0                           # seconds charging with the highest cell at the CV level
        self._tapered = False
        self._full: tuple[float, np.ndarray, float] | None = None    # (ah, v, current) at the end of a taper
        self._rest_t0: float | None = None
        self._rest: tuple[float, np.ndarray, float] | None = None        # (ah, v, current) of an open rest
        self._zero = [0.0, 0, 0.0, 0.0]     # awake rest for the offset: seconds, samples, sum and sum^2 of current
        self._ah_kf = self.ah
        self._awake_kf = 0.0
        self._asleep_kf = 0.0

    # -- per sample --------------------------------------------------------------
    def update(self, t: float, current: float, cell_v: np.ndarray, cell_soc: np.ndarray | None = None, *,
               offset_a: float = 0.0) -> None:
        """Every sample: Ah (offset-corrected), R0 steps, rests, full-charge ends, charging features."""
        v = np.asarray(cell_v, dtype=np.float64)
        if not math.isfinite(current) or not math.isfinite(t):
            return
        use = self.p.filter_offset and math.isfinite(offset_a)
        i_corr = float(current) + (float(offset_a) if use else 0.0)
        soc = np.full(self.n, np.nan) if cell_soc is None else np.asarray(cell_soc, dtype=np.float64)
        dt = 0.0
        if self._last is None:
            self._wake(t, i_corr, v, soc)
        else:
            t0, i0, v0 = self._last
            dt = t - t0
            if dt > self.p.session_gap_s:          # slept without a power cycle of this object
                self.end_session()
                self._wake(t, i_corr, v, soc)
                dt = 0.0
            elif dt > 0:
                self._integrate(dt, i0, i_corr)
                self._r0_step(dt, i0, i_corr, v0, v)
        self._last = (t, i_corr, v)
        if self.ocv is None:
            return
        self._average_v(dt, v)
        self._track_zero(dt, i_corr, v)
        self._track_rest(t, i_corr, v)
        self._track_full(t, dt, i_corr, v)
        if self.finder is not None:
            x = self.cap.x           # where each cell is on the graphite (z / G), from the anchors so far
            s_g = (x[:, 0] + self.ah - self._ah_kf) / np.maximum(x[:, 2], 1e-6)
            for ev in self.finder.update(dt, self.ah, i_corr, v, s_g):
                self._feature(ev)

    def _wake(self, t: float, current: float, v: np.ndarray, soc: np.ndarray) -> None:
        """First sample of a session: start the filter once; after a long sleep the voltage is an OCV."""
        if not self.cap.started:
            self.cap.start(soc if np.isfinite(soc).any() else np.full(self.n, 0.5))
        if self.t_sleep is None:
            return
        slept = t - self.t_sleep
        self._asleep_kf += max(slept, 0.0)
        self.t_sleep = None
        if slept >= self.p.park_min_s and abs(current) <= self.p.wake_max_c * self.q_design and self.ocv is not None:
            self._soc_anchor("rest", v, current)

    def _integrate(self, dt: float, i0: float, i1: float) -> None:
        i_mean = 0.5 * (i0 + i1)
        dq = i_mean * dt / 3600.0
        self.ah += dq
        if self.hyst_rate > 0:
            a = min(self.hyst_rate * abs(dq) / self.q_design, 1.0)
            self.hyst += a * (math.copysign(1.0, dq) - self.hyst) if dq else 0.0
        self.efc += abs(i_mean) * dt / 3600.0 / (2 * self.q_design)
        self._awake_kf += dt
        self._i_avg += min(dt / 5.0, 1.0) * (i1 - self._i_avg)

    def _average_v(self, dt: float, v: np.ndarray) -> None:
        if self._v_avg is None or dt <= 0 or not np.isfinite(self._v_avg).all():
            self._v_avg = v.copy()
        else:
            self._v_avg += min(dt / 5.0, 1.0) * (v - self._v_avg)

    def _r0_step(self, dt: float, i0: float, i1: float, v0: np.ndarray, v1: np.ndarray) -> None:
        di = i1 - i0
        if abs(di) < self.p.step_min_c * self.q_design or dt > 0.25:
            return
        with np.errstate(invalid="ignore", divide="ignore"):
            r = (v1 - v0) / di
        ok = np.isfinite(r) & (r > 0) & (r < 1.0)
        first = ok & ~np.isfinite(self.cell_r0)
        self.cell_r0[first] = r[first]
        upd = ok & ~first
        self.cell_r0[upd] += self.p.r0_alpha * (r[upd] - self.cell_r0[upd])
        self.r0_updates += int(ok.any())

    # -- anchors ---------------------------------------------------------------
    def _track_rest(self, t: float, current: float, v: np.ndarray) -> None:
        thr = self.p.rest_max_c * self.q_design
        if abs(self._i_avg) > thr or abs(current) > 3.0 * thr:
            if self._rest is not None:
                ah, v_r, i_r = self._rest
                self._soc_anchor("rest", v_r, i_r, ah_at=ah)
            self._rest_t0, self._rest = None, None
            return
        if self._rest_t0 is None:
            self._rest_t0 = t
        elif t - self._rest_t0 >= self.p.rest_min_s and np.isfinite(v).all() and abs(current) <= thr:
            # averaged voltage and current of the rest so far (not a sample where a step already started)
            self._rest = (self.ah, self._v_avg.copy(), self._i_avg)

    def _track_zero(self, dt: float, current: float, v: np.ndarray) -> None:
        """Awake at rest the true current is ~0: what the sensor reads then is its offset.

        Not at the top of the curve: a charger holding the voltage there tapers its
        current through the rest band for an hour (C/50 .. C/200, far from zero).
        Short stops (traffic) are excluded by ``zero_min_s``: they carry the
        auxiliary load.
        """
        thr = self.p.rest_max_c * self.q_design
        if abs(current) <= thr and abs(self._i_avg) <= thr and np.nanmax(v) < self.v_top:
            z = self._zero
            z[0] += dt
            z[1] += 1
            z[2] += current
            z[3] += current * current
        else:
            self._commit_zero()

    def _commit_zero(self) -> None:
        secs, n, s1, s2 = self._zero
        self._zero = [0.0, 0, 0.0, 0.0]
        if secs < self.p.zero_min_s or n < 2:
            return
        mean = s1 / n
        var_mean = max(s2 / n - mean * mean, 0.0) / n
        sd = math.sqrt((self.p.rest_load_sd_c * self.q_design) ** 2 + var_mean)
        self.zero_reading = (mean, sd)
        self.zero_count += 1
        self._predict()
        self._count("zero_current", self.cap.update_offset(mean, sd), 0)

    def _track_full(self, t: float, dt: float, current: float, v: np.ndarray) -> None:
        """End of a CC-CV charge: at the top, the charger itself brought the current down to C/20.

        A charge stopped early (AC target, DC fast charge ending in CV at 0.4 C) jumps
        from its current to zero without passing through the taper band, so it is no
        full charge even if the voltage touched the top; nor is a regen pulse near the top
        (the taper must follow ``full_cv_min_s`` of charging at the CV level).
        """
        p = self.p
        taper = p.full_taper_c * self.q_design
        v_hi = np.nanmax(v)
        if self._i_avg >= p.full_min_c * self.q_design:
            self._charged = True
        elif self._i_avg < -p.full_min_c * self.q_design:
            self._charged = self._tapered = False
            self._cv_s = 0.0
        if self._i_avg > taper and v_hi >= self.v_cv:
            self._cv_s += dt
        top = self._charged and v_hi >= self.v_top
        if top and 0.2 * taper <= current <= taper and v_hi >= self.v_cv and self._cv_s >= p.full_cv_min_s:
            self._tapered = True
        rest = -p.rest_max_c * self.q_design
        if top and self._tapered and rest <= self._i_avg < p.full_min_c * self.q_design:
            if rest <= current <= taper:                  # the latest: the CV tail and a pause after it count
                self._full = (self.ah, self._v_avg.copy(), self._i_avg)
            self._rest_t0, self._rest = t, None           # ... as this one anchor, not as a rest too
            return
        self._commit_full()

    def _commit_full(self) -> None:
        full, self._full = self._full, None
        if full is None:
            return
        ah, v, current = full
        self._charged = self._tapered = False
        self._cv_s = 0.0
        self._soc_anchor("full", v, current, ah_at=ah)

    def _soc_anchor(self, kind: str, v: np.ndarray, current: float, ah_at: float | None = None) -> AnchorResult:
        """SOC from the OCV at each cell's voltage (less R0 x I and the hysteresis branch) as an anchor.

        Below ``graphite_frame_soc`` (LFP: below the top knee) the rest's SOC on the
        reference curve is a graphite position: it anchors z = s G, not z = s C.
        """
        r0 = np.where(np.isfinite(self.cell_r0), self.cell_r0, 0.0)
        v_ocv = np.asarray(v, dtype=np.float64) - r0 * current - self.hyst * self.hyst_v
        soc = np.asarray(self.ocv.inverse(v_ocv), dtype=np.float64)
        slope = np.maximum(np.asarray(_curve(self.ocv).slope(soc), dtype=np.float64), 1e-4)
        sd_v = math.sqrt(self.p.ocv_sd_v ** 2 + self.p.meas_sd_v ** 2 + (self.p.hyst_sd * self.hyst_v) ** 2)
        sd = np.maximum(sd_v / slope, self.p.full_sd if kind == "full" else 0.0)
        flat = sd > self.p.max_soc_sd
        ok = np.isfinite(soc) & ~flat
        if kind == "full" and ok.any():
            self.full_soc = (self.ah if ah_at is None else ah_at, soc, sd, ok)
            self.full_count += 1
        graphite = ok & (soc < self.p.graphite_frame_soc) & (kind != "full")
        self._predict()
        back = 0.0 if ah_at is None else self.ah - ah_at
        g = np.maximum(self.cap.x[:, 2], 0.3 * self.q_design)
        res = self.cap.update_soc(soc, sd, ok & ~graphite, back, current) if (ok & ~graphite).any() else None
        if graphite.any():
            rg = self.cap.update_feature(soc, np.full(self.n, back), sd * g, graphite)
            res = rg if res is None else AnchorResult(res.used | rg.used, res.rejected | rg.rejected,
                                                      res.informative | rg.informative)
        if res is None:
            res = AnchorResult(*(np.zeros(self.n, dtype=bool),) * 3)
        self._count(kind, res, int(flat.sum()))
        return res

    def _feature(self, ev: FeatureEvent) -> None:
        self._predict()
        g = np.maximum(self.cap.x[:, 2], 0.3 * self.q_design)
        res = self.cap.update_feature(ev.feature.soc, self.ah - ev.ah, g * self.p.features.loc_sd, ev.ok,
                                      ev.rate_c * self.q_design)
        self._count(f"feature@{ev.feature.soc:.2f}", res, int((~ev.ok).sum()))

    def _predict(self) -> None:
        """Bring the capacity filter to now: Ah since the last anchor with its offset uncertainty, sleep, fade."""
        dah = self.ah - self._ah_kf
        asleep = self._asleep_kf / 86400.0
        self.cap.predict(dah, self._awake_kf / 3600.0, asleep, asleep + self._awake_kf / 86400.0)
        self._ah_kf, self._awake_kf, self._asleep_kf = self.ah, 0.0, 0.0

    def _count(self, kind: str, res: AnchorResult, flat: int) -> None:
        c = self.counts.setdefault(kind, [0, 0, 0])
        c[0] += int(res.used.sum())
        c[1] += int(res.rejected.sum())
        c[2] += flat
        if res.informative.any():
            self.q_updates += 1
            soh, sd = self._pack_soh()
            if sd <= self.p.min_report_sd:
                self.history.append((self.efc, soh))

    def end_session(self) -> None:
        """The session ends (sleep, power off): close an open charge segment, a full-charge taper, a rest."""
        if self.finder is not None:
            for ev in self.finder.close():
                self._feature(ev)
        self._commit_full()
        if self._rest is not None:
            self._soc_anchor("rest", self._rest[1], self._rest[2], ah_at=self._rest[0])
        self._commit_zero()
        self._predict()
        last = self._last
        self._reset_session()
        if last is not None:
            self.t_sleep = last[0]

    def flush_rest(self) -> None:
        """End of data (e.g. the end of a drive log): use what is still open."""
        self.end_session()

    def estimate_capacity(self) -> bool:
        """Kept for callers of the periodic hook: anchors update the estimate as they happen."""
        return False

    # -- results -----------------------------------------------------------------
    def _pack_soh(self) -> tuple[float, float]:
        c, sd = self.cap.capacity, self.cap.capacity_sd
        k = int(np.argmin(c))
        return float(c[k] / self.q_design), float(sd[k] / self.q_design)

    def capacity_factors(self) -> tuple[np.ndarray, float, float]:
        """Per-cell capacity / design, the pack mean factor and its variance (for the SOC filter)."""
        c, sd = self.cap.capacity, self.cap.capacity_sd
        f = c / self.q_design
        return f, float(f.mean()), float(np.mean(sd / self.q_design) ** 2)

    def rul(self) -> tuple[float, float, float]:
        """Remaining EFC to EOL with a 90 % interval (NaN if too little history)."""
        if not self.history:
            return float("nan"), float("nan"), float("nan")
        h = np.array(self.history, dtype=np.float64)
        return self.rul_est.predict(h[:, 0], h[:, 1])

    def output(self) -> HealthOutput:
        """The current estimate (runs the RUL forecast, so call it at the slow rate)."""
        c, sd = self.cap.capacity, self.cap.capacity_sd
        soh_c = c / self.q_design
        k = int(np.argmin(c))
        rul, lo, hi = self.rul()
        return HealthOutput(soh=float(soh_c[k]), cell_soh=soh_c, capacity_ah=float(c[k]),
                            r0=float(np.nanmean(self.cell_r0)) if np.isfinite(self.cell_r0).any() else float("nan"),
                            cell_r0=self.cell_r0.copy(), rul_efc=rul, rul_lo=lo, rul_hi=hi, efc=self.efc,
                            capacity_updates=self.q_updates, r0_updates=self.r0_updates,
                            soh_sd=float(sd[k] / self.q_design), cell_soh_sd=sd / self.q_design,
                            anchors={k_: {"used": v[0], "rejected": v[1], "not_steep": v[2]}
                                     for k_, v in self.counts.items()})

    # -- persistence ---------------------------------------------------------------
    def state(self) -> dict:
        """Everything the next power cycle needs (JSON); ends the session (see ``end_session``)."""
        self.end_session()
        return {"version": STATE_VERSION, "n": self.n, "design_capacity_ah": self.q_design,
                "capacity": self.cap.state(), "cell_r0": [None if not math.isfinite(r) else float(r)
                                                          for r in self.cell_r0],
                "efc": self.efc, "hyst": self.hyst, "history": [[float(e), float(s)] for e, s in self.history[-500:]],
                "t_sleep": self.t_sleep, "q_updates": self.q_updates, "r0_updates": self.r0_updates,
                "counts": self.counts, "features": self.finder.state() if self.finder is not None else {}}

    def restore(self, d: dict) -> str:
        """Continue from ``state()``; '' or why not (then this estimator keeps its fresh start)."""
        try:
            if int(d["version"]) != STATE_VERSION:
                return f"health state version {d['version']}, expected {STATE_VERSION}"
            if int(d["n"]) != self.n or not math.isclose(float(d["design_capacity_ah"]), self.q_design):
                return "health state is for another pack (cell count or design capacity differ)"
            r0 = np.array([np.nan if r is None else float(r) for r in d["cell_r0"]], dtype=np.float64)
            history = [(float(e), float(s)) for e, s in d["history"]]
            efc = float(d["efc"])
            t_sleep = None if d.get("t_sleep") is None else float(d["t_sleep"])
        except (KeyError, TypeError, ValueError) as exc:
            return f"health state malformed ({type(exc).__name__}: {exc})"
        if r0.shape != (self.n,):
            return "health state has the wrong number of R0 values"
        why = self.cap.restore(d.get("capacity", {}))
        if why:
            return why
        self.cell_r0, self.history, self.efc, self.t_sleep = r0, history, efc, t_sleep
        self.hyst = float(np.clip(float(d.get("hyst", 0.0)), -1.0, 1.0))
        self.q_updates = int(d.get("q_updates", 0))
        self.r0_updates = int(d.get("r0_updates", 0))
        self.counts = {str(k): [int(x) for x in v] for k, v in dict(d.get("counts", {})).items()}
        if self.finder is not None:
            self.finder.restore(d.get("features", {}))
        return ""
