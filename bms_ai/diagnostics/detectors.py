"""Incipient-fault detectors: statistical residual tests plus a small learned plating model.

All detectors run per fixed-rate tick on the measured PackSample, vectorised
over cells, and report through the same debounced event machinery as the
rules (one CheckResult per check, with the cell and the evidence):

- ``internal short`` / ``imbalance growth``: cell-vs-pack voltage residuals
  r_i = v_i - median(v), taken only at quiet ticks (|I| small for a while, so
  the residual is mostly OCV difference, i.e. SOC difference), are regressed
  on [1, Ah throughput, time, recent mean current]. All cells share the
  regressors, so one 4x4 normal-equation matrix serves 96 right-hand sides.
  The time slope of a cell's residual, divided by the pack's own dV/dAh, is
  its extra leak current (A): throughput-proportional drift (capacity
  mismatch) and relaxation are absorbed by the other regressors. A leak is
  flagged when it is both large in A and an outlier against the other cells
  (robust z from the median/MAD across cells).
- ``thermal anomaly``: the sensors' deviations from the pack median share
  one heating factor: each sensor's deviation grows with the pack's rise
  over an ambient the BMS does not measure, by its own gain (its place in
  the pack's cooling). The gains are the leading principal direction of the
  deviations' covariance (exponential forgetting; a suspect sensor adds its
  model's answer, so it cannot learn its fault), the factor is read each
  update from the other sensors (leave-one-out), and a one-sided CUSUM on
  each sensor's standardised innovation catches extra heat long before the
  temperature limits. The median's rise since the wake is not the pack's
  rise: it also moves with the ambient's daily swing and starts warm after
  a short park.
- ``lithium plating``: logistic model (ONNX, models/faults/) on
  [min temperature, C-rate, max cell voltage] during charge, trained on the
  data factory's plating labels (anode potential < 0 Li/Li+). Every ONNX
  answer passes an output guard (a probability: finite, in 0..1); a refused
  one is replaced by the same weights in numpy and counted, and an ONNX
  session refused ``PLATING_RETIRE_AFTER`` times in a row is dropped.
- ``anomaly score``: the largest of the normalised statistics above.

Thresholds come from models/faults/detectors.json (calibrated on fault-free
drives by bms_ai.diagnostics.train); defaults below are the fallback.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from bms_ai.core.files import load_json, sha256_file
from bms_ai.core.levels import OK, WARN
from bms_ai.core.paths import share_path
from bms_ai.diagnostics.rules import CheckResult, Event, _Rule, active_events
from bms_ai.diagnostics.stats import SampleStats, median
from bms_ai.models.manifest import TensorSpec
from bms_ai.models.runtime import OutputGuard, guarded
from bms_ai.pack import PackSample

# robust standard deviation from the median absolute deviation (normal data)
MAD_TO_SIGMA = 1.4826
# the plating model's output as the guard checks it: one probability per row
PLATING_OUTPUT = TensorSpec("p_plating", ["batch", 1], range=[0.0, 1.0])
PLATING_RETIRE_AFTER = 50   # refused ONNX answers in a row before the session is dropped for numpy


@dataclass
class DetectorParams:
    """Every number the detectors use, so calibration (bms_ai.diagnostics.train) sees and can set each one."""

    capacity_ah: float = 50.0
    quiet_current_c: float = 0.05      # |I| below this C-rate counts as quiet
    quiet_settle_s: float = 10.0       # ... for at least this long
    quiet_decimate: int = 5            # regress every k-th tick (samples are correlated)
    current_tau_s: float = 600.0       # slow EWMA of current: diffusion / relaxation regressor
    current_fast_tau_s: float = 30.0   # fast EWMA of current: polarisation regressor
    load_current_c: float = 0.3        # |I| above this C-rate: resistance-signature samples
    all_ticks: bool = False            # regress on load ticks too (default: settled quiet ticks only)
    dvdah_default: float = 0.017       # V/Ah fallback for the pack OCV slope (NMC mid-SOC, 50 Ah)
    dvdah_min: float = 0.004
    min_span_s: float = 600.0          # quiet samples must span this long before judging
    min_quiet_episodes: int = 5        # ... and come from this many separate rests
    ah_ridge: float = 25.0             # (noise / prior sd of the capacity-mismatch term)^2, spread units
    relax_ridge: float = 1.0
    leak_alarm_a: float = 0.12         # extra leak current (A) -> internal short
    leak_z: float = 3.0                # alarm on leak - leak_z * standard error (lower confidence bound)
    leak_mad_floor_a: float = 0.02
    imbalance_alarm_v: float = 0.004   # fitted residual drift since start (V) ...
    # ... and an outlier among the pack's own cells by this many robust sigmas (MAD of the drifts): healthy
    # cells' self-discharge differs by tens of percent, so over a week every pack's drifts spread past any
    # fixed voltage (fleet weeks, 8 x 96 cells: 250 healthy cells flagged without it, 4 with it, the
    # injected short still flagged)
    imbalance_z: float = 6.0
    isc_debounce: int = 10             # regression updates
    thermal_tau_s: float = 3600.0      # RLS forgetting time constant
    thermal_warmup_s: float = 120.0
    thermal_sigma_floor_c: float = 0.08
    thermal_k: float = 1.0             # CUSUM allowance (sigma units)
    thermal_h: float = 300.0           # CUSUM alarm level (sigma * s)
    thermal_debounce: int = 10
    plating_threshold: float = 0.5
    plating_debounce: int = 100        # 10 s of risk within a charge
    plating_charge_c: float = 0.05     # charge current above this C-rate counts as charging
    plating_context_s: float = 60.0    # ... continuously this long (or charger connected): a charge,
    plating_gap_s: float = 2.0         # not a regen pulse; dips shorter than this don't end the charge
    anomaly_debounce: int = 20
    clear_count: int = 50
    max_tick_gap_s: float = 5.0        # a longer gap between ticks counts as this long (Ah, current EWMAs)
    resistance_min_samples: int = 50   # load samples before the resistance signature is projected out
    resistance_ridge: tuple[float, float] = (1e-9, 1e-6)  # [offset, slope] ridge of the resistance fit
    spread_floor_v: float = 1e-3       # floor of the cross-cell spread that normalises the residuals
    spread_rate: float = 0.05          # weight of each new settled spread in its running average
    fit_min_samples: int = 20          # quiet samples before the leak fit is judged
    fit_ridge_scale: float = 1e-6      # numerical ridge of the leak fit, relative to each regressor's scale
    thermal_period_s: float = 1.0      # thermal model update period
    thermal_max_dt_s: float = 10.0     # a longer gap counts as this long in the thermal model's forgetting
    # A gap this long is a park: the pack cooled towards the ambient and the CUSUM restarts (fleet weeks,
    # 8 x 96 cells, with the model before the heating factor: 25 sensors falsely flagged shortly after
    # wake-ups, 10 with this)
    thermal_park_s: float = 1800.0
    thermal_min_samples: int = 10      # samples before the thermal model predicts
    thermal_learn_fraction: float = 0.25  # a sensor with CUSUM above this share of thermal_h stops learning
    # The heating factor is used once its direction carries this many times the variance of the next one
    # (before, in a pack that never heated, and next to a hot sensor's own direction, the deviations' mean
    # alone is the model).
    thermal_factor_ratio: float = 2.0
    knee_slope_ratio: float = 5.0      # OCV slope x its mid-range median where a knee begins (cell fit skips it)
    thermal_power_steps: int = 4       # at most this many power-iteration steps per update for the gains
    thermal_clip: float = 4.0          # a reading teaches the thermal model at most this many sigmas off it
    plating_clear_fraction: float = 0.5   # plating risk clears below this share of the threshold
    anomaly_clear_score: float = 0.7      # the anomaly alarm clears below this score
    anomaly_unconfirmed_cap: float = 0.99  # plating's share of the score until its own debounce confirmed it

    @classmethod
    def defaults(cls, chemistry: str = "nmc") -> DetectorParams:
        """Uncalibrated values for a chemistry (the OCV slope differs: LFP is flat)."""
        if chemistry.lower() == "lfp":  # flat OCV: a leak moves the voltage far less per Ah
            return cls(dvdah_default=0.004, dvdah_min=0.001)
        return cls()

    @classmethod
    def load(cls, path: str | Path | None = None, chemistry: str = "nmc") -> DetectorParams:
        """Calibrated thresholds (models/faults/detectors.json, per chemistry); defaults if absent."""
        base = cls.defaults(chemistry)
        p = Path(path) if path else share_path("models", "faults", "detectors.json")
        if not p.is_file():
            return base
        doc = load_json(p, "detector parameters")
        params = doc.get("params", {}) if isinstance(doc, dict) else None
        d = params.get(chemistry.lower(), {}) if isinstance(params, dict) else None
        if not isinstance(d, dict):
            raise ValueError(f"{p}: expected {{\"params\": {{chemistry: {{name: value}}}}}}")
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"{p}: unknown detector parameters {sorted(map(str, bad))}")
        wrong = sorted(k for k, v in d.items() if not _same_kind(v, getattr(base, k)))
        if wrong:
            raise ValueError(f"{p}: detector parameters of the wrong type: {wrong}")
        return cls(**{**asdict(base), **d})

    def to_dict(self) -> dict[str, Any]:
        """All parameters by name (what detectors.json stores per chemistry)."""
        return asdict(self)


def _same_kind(value: Any, default: Any) -> bool:
    """A JSON value fits a parameter whose default is ``default`` (ints for floats, lists for tuples)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and (isinstance(default, float) or isinstance(value, int))
    if isinstance(default, tuple):
        return isinstance(value, (list, tuple)) and all(_same_kind(v, default[0]) for v in value) if default else True
    return isinstance(value, type(default))


class PlatingModel:
    """Logistic plating-risk model; ONNX when available, the same weights in numpy otherwise.

    The numpy path is also the fallback for ONNX answers the output guard
    refuses (NaN, outside 0..1, inference errors), so a bad session can
    neither raise nor put NaN into the plating check.
    """

    FEATURES = ("t_min_c", "c_rate", "v_max")

    def __init__(self, weights: np.ndarray, bias: float, mean: np.ndarray, std: np.ndarray,
                 onnx_path: Path | None = None) -> None:
        self.w, self.b, self.mean, self.std = weights, bias, mean, std
        self.guard = OutputGuard([PLATING_OUTPUT], onnx_path.name if onnx_path is not None else "")
        self.retired = ""   # why the ONNX session was dropped ("" while it runs or was never there)
        self.session = None
        if onnx_path is not None and onnx_path.is_file():
            try:
                import onnxruntime as ort

                so = ort.SessionOptions()
                so.intra_op_num_threads = 1
                so.inter_op_num_threads = 1
                self.session = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
            except Exception:  # fall back to numpy: same weights
                self.session = None

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Plating probability per row of [t_min_c, c_rate, v_max]; refused ONNX rows come from numpy."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if self.session is None:
            return self._logistic(x)
        session = self.session
        outs, verdict = guarded(self.guard, lambda: session.run(None, {"features": x}), x.shape[0])
        if verdict.all_ok:
            return outs[0].reshape(-1)
        p = self._logistic(x)
        if verdict.ok.any():
            p = np.where(verdict.ok, outs[0].reshape(x.shape[0], -1)[:, 0], p)
        if self.guard.consecutive_rejected_calls >= PLATING_RETIRE_AFTER:
            self.session, self.retired = None, self.guard.last_reason
        return p

    def _logistic(self, x: np.ndarray) -> np.ndarray:
        z = ((x - self.mean) / self.std) @ self.w + self.b
        return 1.0 / (1.0 + np.exp(-z))

    def kind(self) -> str:
        """Which implementation answers now, as the plating check reports it."""
        if self.session is not None:
            return "onnx"
        return f"numpy (onnx retired: {self.retired})" if self.retired else "numpy"

    @classmethod
    def load(cls, directory: Path | None = None) -> PlatingModel | None:
        """The shipped model (models/faults/plating.*), None if not trained; ValueError if its hash is wrong."""
        d = directory or share_path("models", "faults")
        meta = d / "plating.json"
        if not meta.is_file():
            return None
        m = load_json(meta, "plating model")
        onnx_path = d / "plating.onnx"
        man = d / "manifest.json"
        if onnx_path.is_file() and man.is_file():  # integrity: a tampered/corrupt model is not used
            doc = load_json(man, "fault model manifest")
            models = doc.get("models") if isinstance(doc, dict) else None
            want = {e.get("file"): e.get("sha256") for e in models if isinstance(e, dict)} \
                if isinstance(models, list) else {}
            if want.get("plating.onnx") != sha256_file(onnx_path):
                raise ValueError(f"{onnx_path}: sha256 does not match {man}")
        try:
            w, mean, std = (np.asarray(m[k], dtype=np.float32).reshape(-1) for k in ("weights", "mean", "std"))
            bias = float(m["bias"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"{meta}: not a plating model ({type(exc).__name__}: {exc})") from None
        n = len(cls.FEATURES)
        if not (w.size == mean.size == std.size == n and np.isfinite([*w, *mean, *std, bias]).all() and (std > 0).all()):
            raise ValueError(f"{meta}: weights, mean and std need {n} finite values each (std > 0)")
        return cls(w, bias, mean, std, d / "plating.onnx")


def flat_band(chemistry: str, ratio: float) -> tuple[float, float]:
    """The cell voltages between the chemistry's OCV knees: slope at most ``ratio`` x its 10-90 % median.

    An unknown chemistry (or ratio inf) gives no bound.
    """
    from bms_ai.chemistry.ocv import ocv_or_none

    curve = ocv_or_none(chemistry)
    if curve is None:
        return -math.inf, math.inf
    soc, ocv, slope = curve.soc, curve.ocv, curve.docv_tab
    mid = float(np.median(slope[(soc >= 0.1) & (soc <= 0.9)]))
    steep = slope > ratio * mid
    lo = soc < 0.5
    v_lo = float(ocv[lo & steep].max()) if (lo & steep).any() else -math.inf
    v_hi = float(ocv[~lo & steep].min()) if (~lo & steep).any() else math.inf
    return v_lo, v_hi


class _SharedRLS:
    """Least squares for many outputs sharing the regressors, with exponential forgetting."""

    def __init__(self, p: int, n: int) -> None:
        self.xx = np.zeros((p, p))
        self.xy = np.zeros((p, n))
        self.yy = np.zeros(n)
        self.w = 0.0

    def add(self, x: np.ndarray, y: np.ndarray, lam: float = 1.0) -> None:
        """One sample of the regressors ``x`` and every output's ``y``, after forgetting by ``lam``.

        ``lam == 1`` (no forgetting) skips the scaling: x * 1.0 is x, bit for bit.
        The outer products are numpy's np.outer (the same multiply), without its wrapper.
        """
        xc = x[:, None]
        if lam != 1.0:
            self.xx *= lam
            self.xy *= lam
            self.yy *= lam
        self.xx += xc * x
        self.xy += xc * y
        self.yy += y * y
        self.w = lam * self.w + 1.0

    def solve(self, ridge: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.xx + np.diag(ridge), self.xy)


class DetectorBank:
    """All incipient-fault detectors for one pack; ``step`` once per tick like RuleEngine."""

    CHECKS = ("internal short", "imbalance growth", "thermal anomaly", "lithium plating", "anomaly score")

    def __init__(self, n_cells: int, n_temps: int, tick_hz: float = 10.0, params: DetectorParams | None = None,
                 plating: PlatingModel | None | bool = True, chemistry: str = "nmc") -> None:
        self.p = params or DetectorParams.load(chemistry=chemistry)
        self.n_cells, self.n_temps, self.tick_s = n_cells, n_temps, 1.0 / tick_hz
        self.plating = PlatingModel.load() if plating is True else (plating or None)
        p = self.p
        self.flat_v = flat_band(chemistry, p.knee_slope_ratio)

        def rule(check: str, n: int, debounce: int, element: str = "cell") -> _Rule:
            return _Rule(check, n, (debounce,), p.clear_count, None, (WARN,), ("detector",), element)

        self.internal_short_rule = rule("internal short", n_cells, p.isc_debounce)
        self.imbalance_rule = rule("imbalance growth", n_cells, p.isc_debounce)
        self.thermal_rule = rule("thermal anomaly", n_temps, p.thermal_debounce, "sensor")
        self.plating_rule = rule("lithium plating", 1, p.plating_debounce)
        self.anomaly_rule = rule("anomaly score", 1, p.anomaly_debounce)
        self.rules = [self.internal_short_rule, self.imbalance_rule, self.thermal_rule, self.plating_rule,
                      self.anomaly_rule]
        # time, charge throughput and current filters
        self.t0 = math.nan
        self.last_t = math.nan
        self.ah = 0.0
        self.current_slow = 0.0   # EWMA over current_tau_s
        self.current_fast = 0.0   # EWMA over current_fast_tau_s
        # quiet periods: when the cell residuals are mostly OCV (SOC) differences
        self.quiet_since = math.nan
        self.quiet_episodes = 0
        self._was_settled = False
        self.quiet_first_t = math.nan
        self.quiet_last_t = math.nan
        self.quiet_ticks = 0
        self.load_ticks = 0
        # cell residual regression (last column: pack median, for dV/dAh) and resistance signatures
        self.residual_fit = _SharedRLS(6, n_cells + 1)
        self.resistance_fit = _SharedRLS(2, n_cells)
        self.leak = np.zeros(n_cells)
        self.leak_z = np.zeros(n_cells)
        self.leak_lcb = np.zeros(n_cells)
        self.drift = np.zeros(n_cells)
        self.drift_rate = np.zeros(n_cells)   # V/h relative to the pack
        self.drift_cell = 0                   # cell whose drift is furthest from the median
        self.ocv_slope = self.p.dvdah_default  # pack dV/dAh
        self.spread_v = math.nan
        # thermal model of each sensor's deviation from the pack median
        self.thermal_w = 0.0
        self.thermal_mean = np.zeros(n_temps)
        self.thermal_cov = np.zeros((n_temps, n_temps))
        start = np.linspace(1.0, 2.0, n_temps) / math.sqrt(max(n_temps, 1))   # power-iteration starts
        self.thermal_dir, self.thermal_dir2 = start * (-1.0) ** np.arange(n_temps), start[::-1].copy()
        self.thermal_cusum = np.zeros(n_temps)
        self.thermal_excess = np.zeros(n_temps)   # innovation: degC above the model
        self.thermal_sigma = self.p.thermal_sigma_floor_c
        self.thermal_last_t = math.nan
        # plating
        self.p_plating = 0.0
        self.charge_since = math.nan  # start of the current charge (sustained charge current)
        self.charge_last = math.nan   # last tick with charge current
        self.charge_ah_at_risk = 0.0
        self.score = 0.0
        # per-tick scratch and summaries of arrays that change only on a fit / thermal update
        self._buffers = (np.empty(n_cells), np.empty(n_temps))
        self._leak_cache: tuple[tuple[np.ndarray, ...], dict[str, Any], float] | None = None
        self._cusum_cache: tuple[np.ndarray, int, float] | None = None
        self._drift_cache: tuple[np.ndarray, np.ndarray, int, float, float] | None = None
        self._plating_model: dict[str, Any] | None = None  # see _plating_model_values
        self._sensor_cells = [f"{3 * k}..{3 * k + 2}" for k in range(n_temps)]  # the cells near each sensor

    # ------------------------------------------------------------ public
    def not_monitored(self, checks: Iterable[str], reason: str) -> None:
        """Detectors this pack's data cannot support: reported STALE with ``reason``, never set."""
        for r in self.rules:
            if r.check in checks:
                r.not_monitored(reason)

    @property
    def events(self) -> list[Event]:
        """Every event of every detector, in the order they were set."""
        return sorted((e for r in self.rules for e in r.events), key=lambda e: e.set_time)

    def active_events(self) -> list[Event]:
        """Events not cleared yet, in the order they were set."""
        return active_events(self.rules)

    def step(self, s: PackSample, t: float, stats: SampleStats | None = None) -> list[CheckResult]:
        """Evaluate every detector for one tick at time ``t``: one result per check in CHECKS order.

        ``stats``: the sample's shared reductions when the caller already has them (the rule engine's).
        """
        st = stats if stats is not None else SampleStats.of(s, self._buffers)
        i = float(s.pack_current)
        dt = self.tick_s if not math.isfinite(self.last_t) else min(max(t - self.last_t, 0.0), self.p.max_tick_gap_s)
        if not math.isfinite(self.t0):
            self.t0 = t
        self.last_t = t
        if math.isfinite(i):
            self.ah += i * dt / 3600.0
            a = dt / self.p.current_tau_s
            self.current_slow += a * (i - self.current_slow)
            self.current_fast += min(dt / self.p.current_fast_tau_s, 1.0) * (i - self.current_fast)
        charger = (s.status or {}).get("charger_connected", math.nan)
        out = [*self._cells(st, i, t), self._thermal(st, t), self._plating(st, i, t, charger == 1.0)]
        out.append(self._anomaly(t))
        return out

    # ------------------------------------------------------------ cells
    def _settled(self, finite: bool, i: float, t: float) -> bool:
        """Quiet (|I| small) for quiet_settle_s; counts separate rests."""
        p = self.p
        quiet = finite and abs(i) < p.quiet_current_c * p.capacity_ah
        if not quiet:
            self.quiet_since = math.nan
        elif not math.isfinite(self.quiet_since):
            self.quiet_since = t
        settled = quiet and t - self.quiet_since >= p.quiet_settle_s
        if settled and not self._was_settled:
            self.quiet_episodes += 1  # time and Ah separate only across several distinct rests
        self._was_settled = settled
        return settled

    def _learn_resistance(self, v: np.ndarray, med: float, i: float) -> None:
        """On load ticks: each cell's resistance signature (V/A against the median ``med``)."""
        p = self.p
        self.load_ticks += 1
        if self.load_ticks % p.quiet_decimate == 0:
            self.resistance_fit.add(np.array([1.0, i / p.capacity_ah]), v - med)

    def _residuals(self, v: np.ndarray, med: float, settled: bool) -> tuple[np.ndarray, float]:
        """Cell residuals against the median ``med``, common-mode polarisation removed, in cell-spread units."""
        p = self.p
        r = v - med
        if self.resistance_fit.w >= p.resistance_min_samples:
            # remaining polarisation at a stop is common-mode eta(t) x each cell's resistance signature:
            # estimate eta(t) across cells and remove it (a single leaking cell barely moves the fit)
            k = self.resistance_fit.solve(np.asarray(p.resistance_ridge))[1]
            kc = k - k.mean()
            den = float(kc @ kc)
            if den > 0:
                r = r - kc * float(kc @ (r - r.mean())) / den
        # a SOC offset shows as OCV'(soc) x offset, and OCV' is common to all cells: dividing by the
        # cross-cell spread (measured at settled ticks, where IR drops do not widen it) removes it
        if settled or not math.isfinite(self.spread_v):
            sp = max(MAD_TO_SIGMA * float(np.median(np.abs(r))), p.spread_floor_v)
            self.spread_v = sp if not math.isfinite(self.spread_v) else \
                self.spread_v + p.spread_rate * (sp - self.spread_v)
        return r / self.spread_v, med

    def _regress(self, v: np.ndarray, med: float, i: float, t: float, settled: bool) -> bool:
        """Add one sample to the residual regression; True when the leak fit was (re)judged."""
        p = self.p
        y_cells, med = self._residuals(v, med, settled)
        y = np.append(y_cells, med)
        c = p.capacity_ah
        # load ticks too: resistance and polarisation differences are absorbed by the current terms
        x = np.array([1.0, self.ah, (t - self.t0) / 3600.0, i / c, self.current_fast / c, self.current_slow / c])
        self.residual_fit.add(x, y)
        if not math.isfinite(self.quiet_first_t):
            self.quiet_first_t = t
        self.quiet_last_t = t
        if self.quiet_last_t - self.quiet_first_t >= p.min_span_s and self.residual_fit.w >= p.fit_min_samples and \
                self.quiet_episodes >= p.min_quiet_episodes:
            self._fit()
            return True
        return False

    def _cells(self, st: SampleStats, i: float, t: float) -> list[CheckResult]:
        p = self.p
        v, med = st.v.values, st.v.median  # med: np.median(v) whenever v is complete (the only time it is used)
        finite = math.isfinite(i) and st.v.all_finite
        settled = self._settled(finite, i, t)
        if finite and abs(i) > p.load_current_c * p.capacity_ah:
            self._learn_resistance(v, med, i)
        # on an OCV knee a cell a few SOC points off the others stands out by 100+ mV (LFP at full charge):
        # capacity mismatch the flat part hid, not a leak; the cell fit learns and judges only off the knees
        sampled = (settled or (finite and p.all_ticks)) and self.flat_v[0] <= st.v.min and st.v.max <= self.flat_v[1]
        if sampled:
            self.quiet_ticks += 1
        if sampled and self.quiet_ticks % p.quiet_decimate == 0 and self._regress(v, med, i, t, settled):
            isc = self.leak_lcb > p.leak_alarm_a  # lower confidence bound of the leak above the threshold
            dev = np.abs(self.drift - np.median(self.drift))
            imb = (dev > p.imbalance_alarm_v) & (dev > p.imbalance_z * MAD_TO_SIGMA * float(np.median(dev)))
            if not self.internal_short_rule.skips(bool(isc.any())):
                self.internal_short_rule.update(isc[None], ~isc[None], t, self.leak)
            if not self.imbalance_rule.skips(bool(imb.any())):
                self.imbalance_rule.update(imb[None], ~imb[None], t, self.drift)
        return [self._internal_short_result(), self._imbalance_result()]

    def _internal_short_result(self) -> CheckResult:
        p = self.p
        span = (self.quiet_last_t - self.quiet_first_t) if math.isfinite(self.quiet_first_t) else 0.0
        kv = {**self._leak_summary()[0], "dv_dah": self.ocv_slope,
              "quiet_span_s": span, "quiet_samples": int(self.residual_fit.w), "quiet_episodes": self.quiet_episodes}
        return self.internal_short_rule.result(
            self.leak, "no abnormal leak current" if span >= p.min_span_s else
            f"learning ({span:.0f}/{p.min_span_s:.0f} s of quiet data)", kv, " A leak")

    def _leak_summary(self) -> tuple[dict[str, Any], float]:
        """The largest leak (cell, value, z, lower bound) and the largest lower bound.

        Recomputed only when a fit replaced the arrays (they change nowhere else).
        """
        arrays = (self.leak, self.leak_z, self.leak_lcb)
        cached = self._leak_cache
        if cached is None or not all(map(operator.is_, arrays, cached[0])):
            k = int(np.argmax(self.leak)) if self.leak.size else -1
            kv = {"max_leak_a": float(self.leak[k]) if k >= 0 else math.nan, "max_leak_cell": k,
                  "leak_z": float(self.leak_z[k]) if k >= 0 else math.nan,
                  "leak_lower_bound_a": float(self.leak_lcb[k]) if k >= 0 else math.nan}
            lcb_max = float(np.max(self.leak_lcb)) if self.leak.size else math.nan
            cached = self._leak_cache = (arrays, kv, lcb_max)
        return cached[1], cached[2]

    def _imbalance_result(self) -> CheckResult:
        j = self.drift_cell
        cached = self._drift_cache  # the drifts change only with a fit, which replaces the arrays
        if cached is None or cached[0] is not self.drift or cached[1] is not self.drift_rate or cached[2] != j:
            cached = self._drift_cache = (self.drift, self.drift_rate, j, self.drift.item(j), self.drift_rate.item(j))
        kv = {"max_drift_v": cached[3], "max_drift_cell": j, "drift_rate_v_per_h": cached[4]}
        return self.imbalance_rule.result(self.drift, "no growing imbalance", kv, " V drift")

    def _fit(self) -> None:
        p = self.p
        rls = self.residual_fit
        scale = np.sqrt(np.maximum(np.diag(rls.xx), 1e-12))
        # Bayesian ridge: capacity mismatch (the Ah term) has a known prior spread; when Ah and time
        # are collinear (steady driving) the data cannot split them and the prior decides - a drift
        # beyond what ~1 % capacity spread explains is then attributed to a leak.
        ridge = p.fit_ridge_scale * scale ** 2 + np.array(
            [0.0, p.ah_ridge, 0.0, p.relax_ridge, p.relax_ridge, p.relax_ridge])
        coef = rls.solve(ridge)
        # pack OCV slope (V/Ah) from the median column; prior when throughput is too small to tell
        b_pack = float(coef[1, -1])
        self.ocv_slope = b_pack if b_pack > p.dvdah_min else p.dvdah_default
        slope_t = coef[2, :-1] * self.spread_v   # V/h relative to the pack
        self.drift_rate = slope_t
        rel = slope_t - np.median(slope_t)
        self.leak = -rel / self.ocv_slope  # A: a leaking cell falls behind the pack
        # standard error of each cell's slope (residual variance x (X'X)^-1), in A; decimated quiet
        # samples are still correlated, so z is a ranking statistic with a calibrated threshold
        a = rls.xx + np.diag(ridge)
        c = coef[:, :-1]
        rss = np.maximum(rls.yy[:-1] - 2 * np.sum(c * rls.xy[:, :-1], axis=0) + np.sum(c * (a @ c), axis=0), 0.0)
        dof = max(rls.w - 6.0, 1.0)
        inv22 = float(np.linalg.inv(a)[2, 2])
        se = np.sqrt(rss / dof * inv22) * self.spread_v / self.ocv_slope
        self.leak_z = self.leak / np.maximum(se, p.leak_mad_floor_a)
        self.leak_lcb = self.leak - p.leak_z * se
        hours = (self.quiet_last_t - self.t0) / 3600.0
        self.drift = rel * hours
        self.drift_cell = int(np.argmax(np.abs(self.drift - np.median(self.drift))))

    # ------------------------------------------------------------ thermal
    def _thermal(self, st: SampleStats, t: float) -> CheckResult:
        p = self.p
        if st.t.all_finite and (not math.isfinite(self.thermal_last_t) or
                                t - self.thermal_last_t >= p.thermal_period_s):
            self._thermal_update(st.t.values, st.t.median, t)
        k, _ = self._cusum_summary()
        kv = {"max_cusum": float(self.thermal_cusum[k]), "sensor": k, "cells": self._sensor_cells[k],
              "excess_c": float(self.thermal_excess[k]), "sigma_c": self.thermal_sigma}
        return self.thermal_rule.result(self.thermal_excess, "no thermal anomaly", kv, " degC above model")

    def _cusum_summary(self) -> tuple[int, float]:
        """Sensor with the largest CUSUM and that CUSUM: recomputed only when an update replaced the array."""
        if self._cusum_cache is None or self._cusum_cache[0] is not self.thermal_cusum:
            c = self.thermal_cusum
            k = int(np.argmax(c))
            self._cusum_cache = (c, k, float(np.max(c)) if c.size else math.nan)
        return self._cusum_cache[1], self._cusum_cache[2]

    def _thermal_update(self, temps: np.ndarray, med: float, t: float) -> None:
        """Each sensor's deviation from the pack median ``med`` against the pack's heating factor; CUSUM on the excess."""
        p = self.p
        dt = p.thermal_period_s if not math.isfinite(self.thermal_last_t) else \
            min(t - self.thermal_last_t, p.thermal_max_dt_s)
        if t - self.thermal_last_t > p.thermal_park_s:     # False on the first update (NaN)
            self.thermal_cusum = np.zeros(self.n_temps)
        self.thermal_last_t = t
        c = temps - med - self.thermal_mean
        # a clearly suspect sensor must not learn its fault, nor tell the others how hot the pack is
        learn = self.thermal_cusum <= p.thermal_learn_fraction * p.thermal_h
        fitted = self.thermal_w >= p.thermal_min_samples
        model = self._heating(c, learn) if fitted else np.zeros(self.n_temps)
        judged = fitted and t - self.t0 >= p.thermal_warmup_s
        if judged:
            innov = c - model
            buf = self._buffers[1]
            mad = MAD_TO_SIGMA * median(np.abs(innov - median(innov, buf)), buf)
            self.thermal_sigma = max(mad, p.thermal_sigma_floor_c)
            z = innov / self.thermal_sigma
            self.thermal_excess = innov
            # each reading is one piece of evidence (its noise is white), however long ago the last one was:
            # weighted by its interval, a 0.1 Hz reading counted ten times one at 1 Hz and sensor noise alone
            # flagged healthy sensors (fleet weeks at 0.1 Hz); slower readings now detect in as many readings
            self.thermal_cusum = np.maximum(0.0, self.thermal_cusum + (z - p.thermal_k) * min(dt, p.thermal_period_s))
            # robust learning: a reading counts at most thermal_clip sigmas off the model (one 70 degC spike
            # would otherwise own the covariance, and so the factor's direction, for an hour)
            lim = p.thermal_clip * self.thermal_sigma
            c = np.where(learn, model + np.clip(c - model, -lim, lim), model)
        # exponentially weighted mean and covariance of the deviations
        lam = math.exp(-dt / p.thermal_tau_s)
        self.thermal_w = lam * self.thermal_w + 1.0
        alpha = 1.0 / self.thermal_w
        self.thermal_mean += alpha * c
        self.thermal_cov *= 1.0 - alpha
        self.thermal_cov += (alpha * (1.0 - alpha)) * c[:, None] * c
        _, cusum_max = self._cusum_summary()
        if not self.thermal_rule.skips(not cusum_max <= p.thermal_h):  # NaN: judge every sensor
            alarm = self.thermal_cusum > p.thermal_h
            self.thermal_rule.update(alarm[None], (self.thermal_cusum == 0.0)[None], t, self.thermal_excess)

    def _heating(self, c: np.ndarray, use: np.ndarray) -> np.ndarray:
        """Each sensor's deviation ``c`` (from its mean) as the heating factor predicts it from the other sensors.

        The gains are the covariance's leading unit eigenvector; the factor is the least-squares
        projection of the ``use`` sensors' deviations on it without the sensor itself. No dominant
        direction (a pack at one temperature: only noise): no prediction.
        """
        n = self.n_temps
        if n < 3:   # two sensors' deviations from their median are one number: nothing to read it from
            return np.zeros(n)
        # the two leading directions by power iteration from the last ones (the covariance drifts slowly, so a
        # few products of a microsecond each converge; numpy's eigh of 32 x 32 took 0.17-4 ms on this machine)
        cov = self.thermal_cov
        g, lead = self._power(cov, self.thermal_dir)
        second = cov - lead * g[:, None] * g
        self.thermal_dir = g
        self.thermal_dir2, lead2 = self._power(second, self.thermal_dir2)
        # one direction must dominate: a hot sensor next to the pack's heating makes two, and neither is the model
        if not lead > self.p.thermal_factor_ratio * max(lead2, 0.0):
            return np.zeros(n)
        rest = max(float(np.trace(cov)) - lead, 0.0) / (n - 1)   # the other directions' mean variance
        gu = np.where(use, g, 0.0)
        gc, gg = gu * c, gu * gu
        # posterior mean of the factor (prior variance: the direction's; noise: the others'): when the other
        # sensors carry little of the direction, the estimate shrinks to 0 instead of amplifying their noise
        return g * ((float(gc.sum()) - gc) / (float(gg.sum()) - gg + rest / lead))

    def _power(self, m: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, float]:
        """The leading unit eigenvector of the symmetric ``m`` (power iteration from ``g``) and its eigenvalue."""
        for _ in range(self.p.thermal_power_steps):
            h = m @ g
            norm = float(np.sqrt(h @ h))
            if not norm > 0.0:
                return g, 0.0
            h /= norm
            done = float(np.abs(h - g).max()) < 1e-4
            g = h
            if done:
                break
        return g, float(g @ m @ g)

    # ------------------------------------------------------------ plating
    def _charge_seconds(self, in_charge: bool, t: float) -> float:
        """How long the current charge has lasted; dips shorter than plating_gap_s do not end it."""
        gap = self.p.plating_gap_s
        if in_charge:
            if not (math.isfinite(self.charge_since) and t - self.charge_last <= gap):
                self.charge_since = t
            self.charge_last = t
        elif not (math.isfinite(self.charge_last) and t - self.charge_last <= gap):
            self.charge_since = math.nan
        return t - self.charge_since if math.isfinite(self.charge_since) else 0.0

    def _plating(self, st: SampleStats, i: float, t: float, charger: bool = False) -> CheckResult:
        """Plating risk only inside a charge: sustained charge current or a connected charger.

        Regen braking at low temperature gives the same instantaneous (T, C-rate, V)
        as a cold charge but for seconds; plating needs a charge's worth of Ah.
        """
        p = self.p
        c_rate = i / p.capacity_ah if math.isfinite(i) else math.nan
        in_charge = math.isfinite(c_rate) and c_rate > p.plating_charge_c
        charge_s = self._charge_seconds(in_charge, t)
        charging = in_charge and (charger or charge_s >= p.plating_context_s)
        coldest, tmin, vmax = st.t.argmin, st.t.min, st.v.max
        prob = 0.0
        if self.plating is not None and charging and math.isfinite(tmin) and math.isfinite(vmax):
            prob = float(self.plating.predict(np.array([[tmin, c_rate, vmax]]))[0])
            self._plating_model = None  # the guard counted this answer (the model may have been retired)
        self.p_plating = prob
        risk = prob > p.plating_threshold
        if risk:
            self.charge_ah_at_risk += i * self.tick_s / 3600.0
        clear = not charging or prob < p.plating_clear_fraction * p.plating_threshold
        if not self.plating_rule.skips(risk):
            self.plating_rule.update(np.array([[risk]]), np.array([[clear]]), t, np.array([prob]))
        kv = {"p_plating": prob, "t_min_c": tmin, "c_rate": c_rate, "v_max": vmax, "coldest_sensor": coldest,
              "charge_s": charge_s, "charging": charging,
              "cells": self._sensor_cells[coldest] if coldest >= 0 else "",
              "charge_ah_at_risk": self.charge_ah_at_risk, **self._plating_model_values()}
        return self.plating_rule.result(prob, "no plating risk" if self.plating is not None else
                                        "plating model missing", kv, " probability")

    def _plating_model_values(self) -> dict[str, Any]:
        """Which model answers and its output guard's counters: they change only with a prediction."""
        if self._plating_model is None:
            self._plating_model = {"model": "missing"} if self.plating is None else \
                {"model": self.plating.kind(), **self.plating.guard.stats()}
        return self._plating_model

    # ------------------------------------------------------------ anomaly
    def _anomaly(self, t: float) -> CheckResult:
        p = self.p
        plating = self.p_plating / p.plating_threshold
        leak = self._leak_summary()[1] / p.leak_alarm_a if self.leak.size else 0.0
        thermal = self._cusum_summary()[1] / p.thermal_h if self.thermal_cusum.size else 0.0
        # plating counts once its own (longer) debounce confirmed it: regen pulses stay below 1
        if not self.plating_rule.deb.any_active():
            plating = min(plating, p.anomaly_unconfirmed_cap)
        self.score = score = max(leak, thermal, plating)
        bad = score > 1.0
        if not self.anomaly_rule.skips(bad):
            self.anomaly_rule.update(np.array([[bad]]), np.array([[score < p.anomaly_clear_score]]), t,
                                     np.array([score]))
        kv = {"score": score, "leak_part": leak, "thermal_part": thermal, "plating_part": plating}
        text = f"score {score:.2f}"
        r = self.anomaly_rule.result(score, text, kv)
        if r.level == OK:
            r.message = text + " (alarm > 1)"
        return r
