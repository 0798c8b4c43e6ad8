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
- ``thermal anomaly``: each sensor's deviation from the pack median follows
  a per-sensor linear model in the pack's own heating (offset + gain,
  recursive least squares with forgetting, frozen while a sensor is
  suspect); a one-sided CUSUM on the standardised innovation catches extra
  heat long before the temperature limits.
- ``lithium plating``: logistic model (ONNX, models/faults/) on
  [min temperature, C-rate, max cell voltage] during charge, trained on the
  data factory's plating labels (anode potential < 0 Li/Li+).
- ``anomaly score``: the largest of the normalised statistics above.

Thresholds come from models/faults/detectors.json (calibrated on fault-free
drives by bms_ai.diagnostics.train); defaults below are the fallback.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from bms_ai.core.levels import OK, WARN
from bms_ai.core.paths import share_path
from bms_ai.diagnostics.rules import CheckResult, Event, _Rule
from bms_ai.pack import PackSample


@dataclass
class DetectorParams:
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
    imbalance_alarm_v: float = 0.004   # fitted residual drift since start (V)
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

    @classmethod
    def defaults(cls, chemistry: str = "nmc") -> DetectorParams:
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
        d = json.loads(p.read_text()).get("params", {}).get(chemistry.lower(), {})
        known = {f.name for f in fields(cls)}
        bad = set(d) - known
        if bad:
            raise ValueError(f"{p}: unknown detector parameters {sorted(bad)}")
        return cls(**{**asdict(base), **d})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PlatingModel:
    """Logistic plating-risk model; ONNX when available, the same weights in numpy otherwise."""

    FEATURES = ("t_min_c", "c_rate", "v_max")

    def __init__(self, weights: np.ndarray, bias: float, mean: np.ndarray, std: np.ndarray,
                 onnx_path: Path | None = None) -> None:
        self.w, self.b, self.mean, self.std = weights, bias, mean, std
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
        x = np.atleast_2d(np.asarray(x, dtype=np.float32))
        if self.session is not None:
            return self.session.run(None, {"features": x})[0].reshape(-1)
        z = ((x - self.mean) / self.std) @ self.w + self.b
        return 1.0 / (1.0 + np.exp(-z))

    @classmethod
    def load(cls, directory: Path | None = None) -> PlatingModel | None:
        d = directory or share_path("models", "faults")
        meta = d / "plating.json"
        if not meta.is_file():
            return None
        m = json.loads(meta.read_text())
        onnx_path = d / "plating.onnx"
        man = d / "manifest.json"
        if onnx_path.is_file() and man.is_file():  # integrity: a tampered/corrupt model is not used
            import hashlib

            want = {e.get("file"): e.get("sha256") for e in json.loads(man.read_text()).get("models", [])}
            if want.get("plating.onnx") != hashlib.sha256(onnx_path.read_bytes()).hexdigest():
                raise ValueError(f"{onnx_path}: sha256 does not match {man}")
        return cls(np.asarray(m["weights"], dtype=np.float32), float(m["bias"]),
                   np.asarray(m["mean"], dtype=np.float32), np.asarray(m["std"], dtype=np.float32),
                   d / "plating.onnx")


class _SharedRLS:
    """Least squares for many outputs sharing the regressors, with exponential forgetting."""

    def __init__(self, p: int, n: int) -> None:
        self.xx = np.zeros((p, p))
        self.xy = np.zeros((p, n))
        self.yy = np.zeros(n)
        self.w = 0.0

    def add(self, x: np.ndarray, y: np.ndarray, lam: float = 1.0, mask: np.ndarray | None = None) -> None:
        self.xx *= lam
        self.xx += np.outer(x, x)
        if mask is None:
            self.xy *= lam
            self.xy += np.outer(x, y)
            self.yy *= lam
            self.yy += y * y
        else:  # frozen outputs keep their statistics (a suspect sensor must not learn its fault)
            self.xy[:, mask] = lam * self.xy[:, mask] + np.outer(x, y[mask])
            self.yy[mask] = lam * self.yy[mask] + y[mask] ** 2
        self.w = lam * self.w + 1.0

    def solve(self, ridge: np.ndarray) -> np.ndarray:
        return np.linalg.solve(self.xx + np.diag(ridge), self.xy)


class DetectorBank:
    """All incipient-fault detectors for one pack; ``step`` once per tick like RuleEngine."""

    CHECKS = ("internal short", "imbalance growth", "thermal anomaly", "lithium plating", "anomaly score")

    def __init__(self, n_cells: int, n_temps: int, tick_hz: float = 10.0, params: DetectorParams | None = None,
                 plating: PlatingModel | None | bool = True, chemistry: str = "nmc") -> None:
        self.p = params or DetectorParams.load(chemistry=chemistry)
        self.n, self.m, self.dt = n_cells, n_temps, 1.0 / tick_hz
        self.plating = PlatingModel.load() if plating is True else (plating or None)
        p = self.p
        self.r_isc = _Rule("internal short", n_cells, (p.isc_debounce,), p.clear_count, None, (WARN,), ("detector",))
        self.r_imb = _Rule("imbalance growth", n_cells, (p.isc_debounce,), p.clear_count, None, (WARN,), ("detector",))
        self.r_th = _Rule("thermal anomaly", n_temps, (p.thermal_debounce,), p.clear_count, None, (WARN,),
                          ("detector",), "sensor")
        self.r_pl = _Rule("lithium plating", 1, (p.plating_debounce,), p.clear_count, None, (WARN,), ("detector",))
        self.r_an = _Rule("anomaly score", 1, (p.anomaly_debounce,), p.clear_count, None, (WARN,), ("detector",))
        self.rules = [self.r_isc, self.r_imb, self.r_th, self.r_pl, self.r_an]
        # state
        self.t0 = math.nan
        self.ah = 0.0
        self.i_ewma = 0.0
        self.last_t = math.nan
        self.quiet_since = math.nan
        self.quiet_n = 0
        self.episodes = 0
        self._was_settled = False
        self.q_first = math.nan
        self.q_last = math.nan
        self.v_rls = _SharedRLS(6, n_cells + 1)
        self.r_rls = _SharedRLS(2, n_cells)
        self.load_n = 0  # last column: pack median (for dV/dAh)
        self.leak = np.zeros(n_cells)
        self.leak_z = np.zeros(n_cells)
        self.leak_se = np.zeros(n_cells)
        self.leak_lcb = np.zeros(n_cells)
        self.drift = np.zeros(n_cells)
        self.dvdah = self.p.dvdah_default
        self.spread_v = math.nan
        self.tick_n = 0
        self.i_fast = 0.0
        self.th_rls = _SharedRLS(2, n_temps)
        self.th_tmed0 = math.nan
        self.th_cusum = np.zeros(n_temps)
        self.th_innov = np.zeros(n_temps)
        self.th_sigma = self.p.thermal_sigma_floor_c
        self.th_last = math.nan
        self.p_plating = 0.0
        self.chg_since = math.nan     # start of the current charge (sustained charge current)
        self.chg_last = math.nan      # last tick with charge current
        self.score = 0.0
        self.charge_ah_at_risk = 0.0

    # ------------------------------------------------------------ public
    @property
    def events(self) -> list[Event]:
        return sorted((e for r in self.rules for e in r.events), key=lambda e: e.set_time)

    def active_events(self) -> list[Event]:
        return [e for e in self.events if e.active]

    def step(self, s: PackSample, t: float) -> list[CheckResult]:
        v = np.asarray(s.cell_voltages, dtype=float)
        temps = np.asarray(s.cell_temperatures, dtype=float)
        i = float(s.pack_current)
        dt = self.dt if not math.isfinite(self.last_t) else min(max(t - self.last_t, 0.0), 5.0)
        if not math.isfinite(self.t0):
            self.t0 = t
        self.last_t = t
        if math.isfinite(i):
            self.ah += i * dt / 3600.0
            a = dt / self.p.current_tau_s
            self.i_ewma += a * (i - self.i_ewma)
            self.i_fast += min(dt / self.p.current_fast_tau_s, 1.0) * (i - self.i_fast)
        charger = (s.status or {}).get("charger_connected", math.nan)
        out = [*self._cells(v, i, t), self._thermal(temps, t),
               self._plating(v, temps, i, t, charger == 1.0)]
        out.append(self._anomaly(t))
        return out

    # ------------------------------------------------------------ cells
    def _cells(self, v: np.ndarray, i: float, t: float) -> list[CheckResult]:
        p = self.p
        finite = math.isfinite(i) and bool(np.isfinite(v).all())
        quiet = finite and abs(i) < p.quiet_current_c * p.capacity_ah
        if not quiet:
            self.quiet_since = math.nan
        elif not math.isfinite(self.quiet_since):
            self.quiet_since = t
        settled = quiet and t - self.quiet_since >= p.quiet_settle_s
        if settled and not self._was_settled:
            self.episodes += 1  # time and Ah separate only across several distinct rests
        self._was_settled = settled
        judged = False
        if finite and abs(i) > p.load_current_c * p.capacity_ah:
            self.load_n += 1
            if self.load_n % p.quiet_decimate == 0:  # each cell's resistance signature (V/A vs the median)
                self.r_rls.add(np.array([1.0, i / p.capacity_ah]), v - float(np.median(v)))
        if settled or (finite and p.all_ticks):
            self.tick_n += 1
        if (settled or (finite and p.all_ticks)) and self.tick_n % p.quiet_decimate == 0:
            med = float(np.median(v))
            r = v - med
            if self.r_rls.w >= 50:
                # remaining polarisation at a stop is common-mode eta(t) x each cell's resistance signature:
                # estimate eta(t) across cells and remove it (a single leaking cell barely moves the fit)
                k = self.r_rls.solve(np.array([1e-9, 1e-6]))[1]
                kc = k - k.mean()
                den = float(kc @ kc)
                if den > 0:
                    r = r - kc * float(kc @ (r - r.mean())) / den
            # a SOC offset shows as OCV'(soc) x offset, and OCV' is common to all cells: dividing by the
            # cross-cell spread (measured at settled ticks, where IR drops do not widen it) removes it
            if settled or not math.isfinite(self.spread_v):
                sp = max(1.4826 * float(np.median(np.abs(r))), 1e-3)
                self.spread_v = sp if not math.isfinite(self.spread_v) else self.spread_v + 0.05 * (sp - self.spread_v)
            y = np.append(r / self.spread_v, med)
            c = p.capacity_ah
            # load ticks too: resistance and polarisation differences are absorbed by the current terms
            x = np.array([1.0, self.ah, (t - self.t0) / 3600.0, i / c, self.i_fast / c, self.i_ewma / c])
            self.v_rls.add(x, y)
            if not math.isfinite(self.q_first):
                self.q_first = t
            self.q_last = t
            if self.q_last - self.q_first >= p.min_span_s and self.v_rls.w >= 20 and \
                    self.episodes >= p.min_quiet_episodes:
                self._fit()
                judged = True
        if judged:
            isc = self.leak_lcb > p.leak_alarm_a  # lower confidence bound of the leak above the threshold
            imb = np.abs(self.drift - np.median(self.drift)) > p.imbalance_alarm_v
            self.r_isc.update(isc[None], ~isc[None], t, self.leak)
            self.r_imb.update(imb[None], ~imb[None], t, self.drift)
        span = (self.q_last - self.q_first) if math.isfinite(self.q_first) else 0.0
        k = int(np.argmax(self.leak)) if self.leak.size else -1
        kv = {"max_leak_a": float(self.leak[k]) if k >= 0 else math.nan, "max_leak_cell": k,
              "leak_z": float(self.leak_z[k]) if k >= 0 else math.nan,
              "leak_lower_bound_a": float(self.leak_lcb[k]) if k >= 0 else math.nan, "dv_dah": self.dvdah,
              "quiet_span_s": span, "quiet_samples": int(self.v_rls.w), "quiet_episodes": self.episodes}
        r1 = self.r_isc.result(self.leak, "no abnormal leak current" if span >= p.min_span_s else
                               f"learning ({span:.0f}/{p.min_span_s:.0f} s of quiet data)", kv, " A leak")
        j = int(np.argmax(np.abs(self.drift - np.median(self.drift))))
        kv2 = {"max_drift_v": float(self.drift[j]), "max_drift_cell": j,
               "drift_rate_v_per_h": float(self._slope_t[j]) if hasattr(self, "_slope_t") else 0.0}
        r2 = self.r_imb.result(self.drift, "no growing imbalance", kv2, " V drift")
        return [r1, r2]

    def _fit(self) -> None:
        p = self.p
        rls = self.v_rls
        scale = np.sqrt(np.maximum(np.diag(rls.xx), 1e-12))
        # Bayesian ridge: capacity mismatch (the Ah term) has a known prior spread; when Ah and time
        # are collinear (steady driving) the data cannot split them and the prior decides - a drift
        # beyond what ~1 % capacity spread explains is then attributed to a leak.
        ridge = 1e-6 * scale ** 2 + np.array([0.0, p.ah_ridge, 0.0, p.relax_ridge, p.relax_ridge, p.relax_ridge])
        coef = rls.solve(ridge)
        # pack OCV slope (V/Ah) from the median column; prior when throughput is too small to tell
        b_pack = float(coef[1, -1])
        self.dvdah = b_pack if b_pack > p.dvdah_min else p.dvdah_default
        slope_t = coef[2, :-1] * self.spread_v   # V/h relative to the pack
        self._slope_t = slope_t
        rel = slope_t - np.median(slope_t)
        self.leak = -rel / self.dvdah  # A: a leaking cell falls behind the pack
        # standard error of each cell's slope (residual variance x (X'X)^-1), in A; decimated quiet
        # samples are still correlated, so z is a ranking statistic with a calibrated threshold
        a = rls.xx + np.diag(ridge)
        c = coef[:, :-1]
        rss = np.maximum(rls.yy[:-1] - 2 * np.sum(c * rls.xy[:, :-1], axis=0) + np.sum(c * (a @ c), axis=0), 0.0)
        dof = max(rls.w - 6.0, 1.0)
        inv22 = float(np.linalg.inv(a)[2, 2])
        se = np.sqrt(rss / dof * inv22) * self.spread_v / self.dvdah
        self.leak_se = se
        self.leak_z = self.leak / np.maximum(se, p.leak_mad_floor_a)
        self.leak_lcb = self.leak - p.leak_z * se
        hours = (self.q_last - self.t0) / 3600.0
        self.drift = rel * hours

    # ------------------------------------------------------------ thermal
    def _thermal(self, temps: np.ndarray, t: float) -> CheckResult:
        p = self.p
        if np.isfinite(temps).all() and (not math.isfinite(self.th_last) or t - self.th_last >= 1.0):
            dt = 1.0 if not math.isfinite(self.th_last) else min(t - self.th_last, 10.0)
            self.th_last = t
            med = float(np.median(temps))
            if not math.isfinite(self.th_tmed0):
                self.th_tmed0 = med
            e = temps - med
            x = np.array([1.0, med - self.th_tmed0])
            self.th_dtmax = max(getattr(self, "th_dtmax", 0.0), abs(med - self.th_tmed0))
            warm = t - self.t0 >= p.thermal_warmup_s
            if warm and self.th_rls.w >= 10:
                theta = self.th_rls.solve(np.array([1e-6, 1e-2]))
                innov = e - x @ theta
                mad = 1.4826 * float(np.median(np.abs(innov - np.median(innov))))
                self.th_sigma = max(mad, p.thermal_sigma_floor_c)
                z = innov / self.th_sigma
                self.th_innov = innov
                self.th_cusum = np.maximum(0.0, self.th_cusum + (z - p.thermal_k) * dt)
            lam = math.exp(-dt / p.thermal_tau_s)
            learn = self.th_cusum <= 0.25 * p.thermal_h  # a clearly suspect sensor must not learn its fault
            self.th_rls.add(x, e, lam, mask=None if learn.all() else learn)
            alarm = self.th_cusum > p.thermal_h
            self.r_th.update(alarm[None], (self.th_cusum == 0.0)[None], t, self.th_innov)
        k = int(np.argmax(self.th_cusum))
        kv = {"max_cusum": float(self.th_cusum[k]), "sensor": k, "cells": f"{3 * k}..{3 * k + 2}",
              "excess_c": float(self.th_innov[k]), "sigma_c": self.th_sigma}
        return self.r_th.result(self.th_innov, "no thermal anomaly", kv, " degC above model")

    # ------------------------------------------------------------ plating
    def _plating(self, v: np.ndarray, temps: np.ndarray, i: float, t: float, charger: bool = False) -> CheckResult:
        """Plating risk only inside a charge: sustained charge current or a connected charger.

        Regen braking at low temperature gives the same instantaneous (T, C-rate, V)
        as a cold charge but for seconds; plating needs a charge's worth of Ah.
        """
        p = self.p
        c_rate = i / p.capacity_ah if math.isfinite(i) else math.nan
        in_charge = math.isfinite(c_rate) and c_rate > p.plating_charge_c
        if in_charge:
            if not (math.isfinite(self.chg_since) and t - self.chg_last <= p.plating_gap_s):
                self.chg_since = t
            self.chg_last = t
        elif not (math.isfinite(self.chg_last) and t - self.chg_last <= p.plating_gap_s):
            self.chg_since = math.nan
        charge_s = t - self.chg_since if math.isfinite(self.chg_since) else 0.0
        charging = in_charge and (charger or charge_s >= p.plating_context_s)
        tmin = float(np.nanmin(temps)) if np.isfinite(temps).any() else math.nan
        vmax = float(np.nanmax(v)) if np.isfinite(v).any() else math.nan
        prob = 0.0
        if self.plating is not None and charging and math.isfinite(tmin) and math.isfinite(vmax):
            prob = float(self.plating.predict(np.array([[tmin, c_rate, vmax]]))[0])
        self.p_plating = prob
        risk = prob > p.plating_threshold
        if risk:
            self.charge_ah_at_risk += i * self.dt / 3600.0
        self.r_pl.update(np.array([[risk]]), np.array([[not charging or prob < 0.5 * p.plating_threshold]]), t,
                         np.array([prob]))
        coldest = int(np.nanargmin(temps)) if np.isfinite(temps).any() else -1
        kv = {"p_plating": prob, "t_min_c": tmin, "c_rate": c_rate, "v_max": vmax, "coldest_sensor": coldest,
              "charge_s": charge_s, "charging": charging,
              "cells": f"{3 * coldest}..{3 * coldest + 2}" if coldest >= 0 else "",
              "charge_ah_at_risk": self.charge_ah_at_risk, "model": "onnx" if (
                  self.plating is not None and self.plating.session is not None) else (
                  "numpy" if self.plating is not None else "missing")}
        return self.r_pl.result(np.array([prob]), "no plating risk" if self.plating is not None else
                                "plating model missing", kv, " probability")

    # ------------------------------------------------------------ anomaly
    def _anomaly(self, t: float) -> CheckResult:
        p = self.p
        parts = {
            "leak": float(np.max(self.leak_lcb)) / p.leak_alarm_a if self.leak.size else 0.0,
            "thermal": float(np.max(self.th_cusum)) / p.thermal_h if self.th_cusum.size else 0.0,
            # plating counts once its own (longer) debounce confirmed it: regen pulses stay below 1
            "plating": self.p_plating / p.plating_threshold if self.r_pl.deb.active.any() else
            min(self.p_plating / p.plating_threshold, 0.99),
        }
        self.score = max(parts.values())
        bad = self.score > 1.0
        self.r_an.update(np.array([[bad]]), np.array([[self.score < 0.7]]), t, np.array([self.score]))
        kv = {"score": self.score, **{f"{k}_part": v for k, v in parts.items()}}
        r = self.r_an.result(np.array([self.score]), f"score {self.score:.2f}", kv)
        if r.level == OK:
            r.message = f"score {self.score:.2f} (alarm > 1)"
        return r
