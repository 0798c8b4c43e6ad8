"""Classic BMS rules: three-tier limits, sensor plausibility, timeouts, estimator checks, derating.

Library only (no rclpy): :class:`RuleEngine.step` takes one PackSample per
fixed-rate tick and returns one :class:`CheckResult` per check, plus the
latched :class:`Event` log. Every array op covers all cells at once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bms_ai.core.levels import ERROR, OK, STALE, WARN
from bms_ai.diagnostics.config import TIERS, LimitsConfig, TierLimits
from bms_ai.diagnostics.debounce import Debouncer, Transition
from bms_ai.pack import PackSample

TIER_LEVEL = (WARN, WARN, ERROR)  # MOL, RSL -> WARN; MSL -> ERROR (contactors must open)


@dataclass
class CheckResult:
    """One check's verdict for one tick (maps 1:1 to a DiagnosticStatus)."""

    check: str
    level: int
    message: str
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class Event:
    """A latched diagnostic event: when it started, when it was confirmed and cleared."""

    check: str
    tier: str
    index: int            # cell / sensor index, -1 for pack-level checks
    onset: float          # first violating tick (start of debounce)
    set_time: float       # debounce complete: the event is reported from here
    value: float
    cleared: float = math.nan
    level: int = WARN

    @property
    def active(self) -> bool:
        """Not cleared yet."""
        return math.isnan(self.cleared)


class _Rule:
    """A debounced check over n elements with k tiers; keeps its events."""

    def __init__(self, check: str, n: int, set_counts: tuple[int, ...], clear_count: int,
                 latch: tuple[bool, ...] | None, levels: tuple[int, ...], tier_names: tuple[str, ...],
                 element: str = "cell") -> None:
        self.check = check
        self.deb = Debouncer(n, set_counts, clear_count, latch)
        self.levels = levels
        self.tier_names = tier_names
        self.element = element
        self.open: dict[tuple[int, int], Event] = {}
        self.events: list[Event] = []
        self.unmonitored = ""  # why this pack cannot be checked ('' = monitored): never set, never OK

    def not_monitored(self, reason: str) -> None:
        """Stop judging this check for good (its data does not exist in this pack): STALE with ``reason``."""
        self.unmonitored = reason

    def apply(self, tr: Transition, values: np.ndarray | float) -> None:
        vals = np.broadcast_to(np.asarray(values, dtype=float), (self.deb.n,))
        for k, i in zip(tr.set_tier.tolist(), tr.set_index.tolist()):
            ev = Event(self.check, self.tier_names[k], i if self.deb.n > 1 else -1,
                       float(self.deb.onset[k, i]), float(self.deb.set_time[k, i]), float(vals[i]),
                       level=self.levels[k])
            self.open[(k, i)] = ev
            self.events.append(ev)
        for k, i in zip(tr.clear_tier.tolist(), tr.clear_index.tolist()):
            ev = self.open.pop((k, i), None)
            if ev is not None:
                ev.cleared = self._t

    def update(self, violating: np.ndarray, inside: np.ndarray, t: float, values: np.ndarray | float) -> None:
        self._t = t
        if self.unmonitored:
            return
        tr = self.deb.update(violating, inside, t)
        if tr.any:
            self.apply(tr, values)

    def reset(self, t: float) -> None:
        self._t = t
        self.apply(self.deb.reset(), np.nan)

    def result(self, values: np.ndarray | float, ok_message: str, extra: dict[str, Any] | None = None,
               unit: str = "") -> CheckResult:
        """This tick's verdict: the highest active tier, where (first element, count) and since when."""
        deb = self.deb
        top = deb.top_tier()
        kv: dict[str, Any] = dict(extra or {})
        if self.unmonitored:
            return CheckResult(self.check, STALE, self.unmonitored, {**kv, "monitored": False})
        if top < 0:
            return CheckResult(self.check, OK, ok_message, kv)
        idx = np.nonzero(deb.active[top])[0]
        first = int(idx[0])
        value = _element(values, first, deb.n)
        kv.update({"tier": self.tier_names[top].upper(), "count": int(idx.size),
                   "onset": _finite_min(deb.onset[top, idx]), "set_time": _finite_min(deb.set_time[top, idx])})
        if deb.n > 1:
            kv[f"{self.element}_index"] = ",".join(str(i) for i in idx[:16].tolist()) + ("..." if idx.size > 16 else "")
            where = f"{self.element} {first}" + (f" (+{idx.size - 1} more)" if idx.size > 1 else "")
        else:
            where = "pack"
        kv["value"] = value
        latched = bool(deb.latch[top, 0])
        kv["latched"] = latched
        msg = f"{self.tier_names[top].upper()} violated at {where}: {_fmt(value)}{unit}"
        if latched:
            msg += " (latched until reset)"
        return CheckResult(self.check, self.levels[top], msg, kv)


def _element(values: np.ndarray | float, i: int, n: int) -> float:
    """Element ``i`` of per-element ``values`` of length ``n``, or the one value shared by all."""
    a = np.asarray(values, dtype=float)
    if a.size not in (1, n):
        raise ValueError(f"{a.size} values for {n} elements")
    return float(a.flat[i if a.size > 1 else 0])


def _finite_min(a: np.ndarray) -> float:
    """Smallest finite value, NaN if there is none (without numpy's all-NaN warning)."""
    finite = np.isfinite(a)
    if finite.all():
        return float(a.min())
    return float(np.nanmin(a)) if finite.any() else math.nan


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4g}"


class _LimitRule(_Rule):
    """Three-tier limit with hysteresis; thresholds may change per tick (charge/discharge)."""

    def __init__(self, check: str, n: int, cfg: LimitsConfig, deb, element: str = "cell") -> None:
        super().__init__(check, n, deb.set_counts, deb.clear_count, cfg.latch_mask, TIER_LEVEL, TIERS, element)
        self.hyst = deb.hysteresis

    def step(self, values: np.ndarray, limits: TierLimits, t: float) -> None:
        thr = np.asarray(limits.as_tuple()).reshape(3, 1)
        if limits.upper:
            viol = values > thr
            inside = values < thr - self.hyst
        else:
            viol = values < thr
            inside = values > thr + self.hyst
        self.update(viol, inside, t, values)


class _FrozenTracker:
    """An element is frozen when it stayed within eps while its reference moved by >= move."""

    def __init__(self, n: int, eps: float, move: float, window: float) -> None:
        self.eps, self.move, self.window = eps, move, window
        self.last = np.full(n, np.nan)
        self.t_change = np.full(n, np.nan)
        self.ref_at_change = np.full(n, np.nan)

    def step(self, values: np.ndarray, reference: float, t: float) -> np.ndarray:
        changed = ~(np.abs(values - self.last) <= self.eps)  # NaN counts as changed (restarts)
        self.last[changed] = values[changed]
        self.t_change[changed] = t
        self.ref_at_change[changed] = reference
        return ((t - self.t_change) >= self.window) & (np.abs(reference - self.ref_at_change) >= self.move)


#: checks (rules and detectors) that judge individual cell voltages: not monitored in a pack-level config
CELL_CHECKS = frozenset({"cell overvoltage", "cell undervoltage", "pack voltage plausibility", "cell voltage spread",
                         "open wire", "internal short", "imbalance growth"})
#: checks that compare temperature sensors with each other: not monitored with fewer than two sensors
SENSOR_SPREAD_CHECKS = frozenset({"temperature spread", "thermal anomaly"})
NO_CELLS = "not monitored: no cell voltages in this pack config"
FEW_SENSORS = "not monitored: fewer than two temperature sensors in this pack config"


class RuleEngine:
    """All rule checks for one pack; call :meth:`step` once per fixed-rate tick."""

    def __init__(self, cfg: LimitsConfig, n_cells: int, n_temps: int) -> None:
        self.cfg, self.n_cells, self.n_temps = cfg, n_cells, n_temps
        p = cfg.plausibility

        def plausibility(check: str, n: int, level: int, element: str = "cell", set_count: int = p.debounce,
                         tier: str = "plausibility") -> _Rule:
            return _Rule(check, n, (set_count,), p.clear_count, (False,), (level,), (tier,), element)

        self.cell_over = _LimitRule("cell overvoltage", n_cells, cfg, cfg.cell_voltage_debounce)
        self.cell_under = _LimitRule("cell undervoltage", n_cells, cfg, cfg.cell_voltage_debounce)
        self.temp_over = _LimitRule("cell overtemperature", n_temps, cfg, cfg.temperature.debounce, "sensor")
        self.temp_under = _LimitRule("cell undertemperature", n_temps, cfg, cfg.temperature.debounce, "sensor")
        self.cur_charge = _LimitRule("charge overcurrent", 1, cfg, cfg.current_debounce)
        self.cur_discharge = _LimitRule("discharge overcurrent", 1, cfg, cfg.current_debounce)
        self.pack_v = plausibility("pack voltage plausibility", 1, ERROR)
        self.v_spread = plausibility("cell voltage spread", n_cells, WARN)
        self.t_spread = plausibility("temperature spread", n_temps, WARN, "sensor")
        # open wire over cells then temperature sensors (index >= n_cells: sensor index + n_cells)
        self.open_wire = plausibility("open wire", n_cells + n_temps, ERROR, "channel")
        # stuck: cells, sensors, pack voltage in one rule (elements concatenated). Pack current is not
        # checked: a CC charge legitimately holds it constant while everything else moves.
        self.stuck = plausibility("stuck signal", n_cells + n_temps + 1, WARN, "signal")
        self.offset = plausibility("current sensor offset", 1, WARN)
        self.timeout = plausibility("can timeout", 1, ERROR, set_count=1, tier="timeout")
        self.est = plausibility("estimator plausibility", 2, WARN, "signal", set_count=1)
        self.rules: list[_Rule] = [self.cell_over, self.cell_under, self.temp_over, self.temp_under,
                                   self.cur_charge, self.cur_discharge, self.pack_v, self.v_spread, self.t_spread,
                                   self.open_wire, self.stuck, self.offset, self.timeout, self.est]
        self._frozen_cells = _FrozenTracker(n_cells, p.stuck_epsilon_v, p.stuck_reference_move_v, p.stuck_window_s)
        self._frozen_sensors = _FrozenTracker(n_temps, p.stuck_epsilon_c, p.stuck_reference_move_c,
                                              p.stuck_temperature_window_s)
        self._frozen_pack_voltage = _FrozenTracker(1, p.stuck_epsilon_v * 10, p.stuck_pack_move_v, p.stuck_window_s)
        self._rest_start = math.nan
        self._rest_isum = 0.0
        self._rest_n = 0
        self._rest_vref = math.nan
        self._soc_prev: tuple[float, float] | None = None
        self._charging = False
        self._mode_since = math.nan
        self.ticks = 0
        self.comm_lost = False
        self._missing: list[str] = []

    # ------------------------------------------------------------------ public
    def not_monitored(self, checks: Iterable[str], reason: str) -> None:
        """Checks this pack's data cannot support (see :data:`CELL_CHECKS`): reported STALE with ``reason``."""
        for r in self.rules:
            if r.check in checks:
                r.not_monitored(reason)

    @property
    def events(self) -> list[Event]:
        """Every event of every rule, in the order they were set."""
        return sorted((e for r in self.rules for e in r.events), key=lambda e: e.set_time)

    def active_events(self) -> list[Event]:
        """Events not cleared yet."""
        return [e for e in self.events if e.active]

    def reset(self, t: float) -> None:
        """Acknowledge latched (MSL) events; still-violating limits re-set after their debounce."""
        for r in self.rules:
            r.reset(t)

    def step(self, s: PackSample, t: float, timed_out: Iterable[str] | None = None,
             soc: float | None = None, soc_stamp: float | None = None, capacity_ah: float | None = None,
             model_fallback: bool | None = None) -> list[CheckResult]:
        """Evaluate every rule for one tick at time ``t`` (node clock, s)."""
        cfg, p = self.cfg, self.cfg.plausibility
        self.ticks += 1
        v = np.asarray(s.cell_voltages, dtype=float)
        temps = np.asarray(s.cell_temperatures, dtype=float)
        if v.shape != (self.n_cells,) or temps.shape != (self.n_temps,):
            raise ValueError(f"sample has {v.size} cells / {temps.size} sensors, engine expects "
                             f"{self.n_cells} / {self.n_temps}")
        i = float(s.pack_current)
        out: list[CheckResult] = []

        # --- three-tier limits
        self.cell_over.step(v, cfg.cell_over, t)
        self.cell_under.step(v, cfg.cell_under, t)
        # charge/discharge range with a dwell time both ways, so short regen pulses don't flip the range
        want = math.isfinite(i) and i > cfg.temperature.charge_current_a
        if want != self._charging:
            if not math.isfinite(self._mode_since):
                self._mode_since = t
            if t - self._mode_since >= cfg.temperature.charge_mode_s - 1e-9:
                self._charging, self._mode_since = want, math.nan
        else:
            self._mode_since = math.nan
        charging = self._charging
        tl = cfg.temperature
        self.temp_over.step(temps, tl.charge_over if charging else tl.discharge_over, t)
        self.temp_under.step(temps, tl.charge_under if charging else tl.discharge_under, t)
        ia = np.array([i])
        self.cur_charge.step(ia, cfg.current_charge, t)
        self.cur_discharge.step(-ia, cfg.current_discharge, t)
        mode = "charge" if charging else "discharge"
        out.append(self.cell_over.result(v, "all cells below MOL", {"max_v": _nanmax(v),
                                                                     "max_cell": _nanargmax(v)}, " V"))
        out.append(self.cell_under.result(v, "all cells above MOL", {"min_v": _nanmin(v),
                                                                      "min_cell": _nanargmin(v)}, " V"))
        out.append(self.temp_over.result(temps, f"all sensors below {mode} MOL",
                                         {"max_c": _nanmax(temps), "range": mode}, " degC"))
        out.append(self.temp_under.result(temps, f"all sensors above {mode} MOL",
                                          {"min_c": _nanmin(temps), "range": mode}, " degC"))
        out.append(self.cur_charge.result(ia, "charge current within MOL", {"current_a": i}, " A"))
        out.append(self.cur_discharge.result(-ia, "discharge current within MOL", {"current_a": i}, " A"))

        # --- plausibility
        finite = np.isfinite(v)
        sum_v = float(v.sum()) if finite.all() else math.nan
        dpv = abs(s.pack_voltage - sum_v)
        dpa = np.array([dpv])
        self.pack_v.update(dpa[None, :] > p.pack_voltage_tolerance_v, dpa[None, :] <= p.pack_voltage_tolerance_v,
                           t, dpa)
        out.append(self.pack_v.result(dpa, "pack voltage matches sum of cells",
                                      {"pack_v": s.pack_voltage, "sum_cells_v": sum_v, "diff_v": dpv}, " V"))

        # Whole-sample staleness (CAN log ended, bus silent: every value NaN) is a communication loss,
        # reported by `can timeout`; the measurement checks below hold their state instead of firing.
        # A group (cells, sensors) is judged only while most of it is valid, so a message timing out
        # part by part at the end of a log is not mistaken for open wires or a spread.
        v_ok = _mostly_valid(finite)
        tf = np.isfinite(temps)
        t_ok = _mostly_valid(tf)
        self.comm_lost = not finite.any() and not tf.any()
        med_v = float(np.median(v[finite])) if finite.any() else math.nan
        dv = np.abs(v - med_v)
        if v_ok:
            self.v_spread.update((dv > p.cell_voltage_spread_v)[None], (dv <= p.cell_voltage_spread_v)[None], t, v)
        out.append(self.v_spread.result(v, "cell voltages within spread",
                                        {"median_v": med_v, "max_dev_v": _nanmax(dv)}, " V"))
        med_t = float(np.median(temps[tf])) if tf.any() else math.nan
        dt = np.abs(temps - med_t)
        if t_ok:
            self.t_spread.update((dt > p.temperature_spread_c)[None], (dt <= p.temperature_spread_c)[None], t, temps)
        out.append(self.t_spread.result(temps, "temperatures within spread",
                                        {"median_c": med_t, "max_dev_c": _nanmax(dt)}, " degC"))

        # open wire: an individual reading invalid (NaN with a fresh CAN stamp, or implausibly low), or the
        # low/high pair an open sense wire makes, while the rest of its group is valid. A stale value
        # (old stamp) or a whole group missing is a timeout, not an open wire.
        fresh_v = t - np.asarray(s.cell_voltage_stamps, dtype=float) <= p.stale_s
        fresh_t = t - np.asarray(s.cell_temperature_stamps, dtype=float) <= p.stale_s
        if fresh_v.shape != v.shape:
            fresh_v = np.ones(v.shape, dtype=bool)
        if fresh_t.shape != temps.shape:
            fresh_t = np.ones(temps.shape, dtype=bool)
        ow = (~finite & fresh_v) | (v < p.open_wire_min_v)
        d = v - med_v
        pair = (d[:-1] < -p.open_wire_pair_v) & (d[1:] > p.open_wire_pair_v)
        ow[:-1] |= pair
        ow[1:] |= pair
        owt = ~tf & fresh_t
        # groups not judged this tick: neither violating nor good (active alarms hold, pending counts decay)
        ow_all = np.concatenate((ow & v_ok, owt & t_ok))
        good_all = np.concatenate((~ow & v_ok, ~owt & t_ok))
        vals = np.concatenate((v, temps))
        self.open_wire.update(ow_all[None], good_all[None], t, vals)
        out.append(self.open_wire.result(vals, "all cell and sensor readings valid",
                                         {"invalid_cells": int((~finite).sum()), "invalid_sensors": int((~tf).sum()),
                                          "channels": f"0..{self.n_cells - 1}=cells, {self.n_cells}.."
                                                      f"{self.n_cells + self.n_temps - 1}=sensors"}))
        self._missing = [name for name, arr in (("cell_voltage", v), ("cell_temperature", temps))
                         if arr.size and not np.isfinite(arr).any()]
        self._missing += [name for name, x in (("pack_voltage", s.pack_voltage), ("pack_current", i))
                          if not math.isfinite(x)]

        # stuck / frozen signals
        fz = np.concatenate((
            self._frozen_cells.step(v, med_v, t),
            self._frozen_sensors.step(temps, med_t, t),
            self._frozen_pack_voltage.step(np.array([s.pack_voltage]), sum_v, t),
        ))
        sig = np.concatenate((v, temps, [s.pack_voltage]))
        self.stuck.update(fz[None], (~fz & np.isfinite(sig))[None], t, sig)
        out.append(self.stuck.result(sig, "no frozen signal",
                                     {"signals": f"0..{self.n_cells - 1}=cells, {self.n_cells}.."
                                                 f"{self.n_cells + self.n_temps - 1}=sensors, "
                                                 f"{self.n_cells + self.n_temps}=pack_v"}))

        # current sensor offset at rest
        out.append(self._offset(s, i, v, t))

        # CAN timeouts: named messages + stale stamps
        out.append(self._timeouts(s, t, timed_out))

        # estimator plausibility
        out.append(self._estimator(t, i, soc, soc_stamp, capacity_ah, model_fallback))

        # SOF-like derating
        out.append(self.derating(v, temps))
        return out

    # ------------------------------------------------------------------ parts
    def _offset(self, s: PackSample, i: float, v: np.ndarray, t: float) -> CheckResult:
        p = self.cfg.plausibility
        contactors = s.status.get("contactor_plus") if s.status else None
        open_contactors = contactors is not None and math.isfinite(contactors) and contactors == 0
        vmean = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
        at_rest = math.isfinite(i) and (open_contactors or abs(i) < p.rest_current_a)
        if at_rest and math.isfinite(self._rest_start) and not open_contactors and \
                abs(vmean - self._rest_vref) > p.rest_voltage_drift_v:
            at_rest = False  # voltage moves: a real (small) load, not an offset
        if not at_rest:
            self._rest_start, self._rest_isum, self._rest_n = math.nan, 0.0, 0
        else:
            if not math.isfinite(self._rest_start):
                self._rest_start, self._rest_vref = t, vmean
            self._rest_isum += i
            self._rest_n += 1
        long_rest = at_rest and (open_contactors or t - self._rest_start >= p.rest_window_s)
        mean_i = self._rest_isum / self._rest_n if self._rest_n else math.nan
        bad = long_rest and abs(mean_i) > p.current_offset_a
        good = long_rest and not bad
        self.offset.update(np.array([[bad]]), np.array([[good]]), t, np.array([mean_i]))
        return self.offset.result(np.array([mean_i]), "current offset within tolerance at rest",
                                  {"at_rest": bool(at_rest), "rest_mean_a": mean_i}, " A")

    def _timeouts(self, s: PackSample, t: float, timed_out: Iterable[str] | None) -> CheckResult:
        p = self.cfg.plausibility
        names = sorted(timed_out) if timed_out else []
        stale: list[str] = []
        for label, st in (("pack_voltage", s.pack_voltage_stamp), ("pack_current", s.pack_current_stamp)):
            if not (t - st <= p.stale_s):
                stale.append(label)
        for label, arr in (("cell_voltage", s.cell_voltage_stamps), ("cell_temperature", s.cell_temperature_stamps)):
            a = np.asarray(arr, dtype=float)
            n_old = int((~(t - a <= p.stale_s)).sum()) if a.size else 0
            if n_old:
                stale.append(f"{label}[{n_old}]")
        stale = stale + [f"{m} missing" for m in self._missing]
        bad = bool(names or stale)
        self.timeout.update(np.array([[bad]]), np.array([[not bad]]), t, np.array([float(len(names) + len(stale))]))
        r = self.timeout.result(np.array([float(len(names) + len(stale))]), "all messages fresh",
                                {"timed_out": ",".join(names), "stale": ",".join(stale)})
        r.values["communication_lost"] = bool(self.comm_lost)
        if r.level != OK and bad:
            r.message = ("communication lost (no valid measurement); " if r.values["communication_lost"] else
                         "") + "timeout: " + ", ".join(names + stale)
        return r

    def _estimator(self, t: float, i: float, soc: float | None, soc_stamp: float | None,
                   capacity_ah: float | None, fallback: bool | None) -> CheckResult:
        p = self.cfg.plausibility
        jump = 0.0
        bad_jump = False
        if soc is not None and math.isfinite(soc) and not self.comm_lost:  # no SOC reference from a comm loss
            stamp = t if soc_stamp is None else soc_stamp
            if self._soc_prev is not None and stamp > self._soc_prev[1]:
                dt = stamp - self._soc_prev[1]
                expected = (i * dt / 3600.0 / capacity_ah) if capacity_ah and math.isfinite(i) else 0.0
                jump = soc - self._soc_prev[0] - expected
                bad_jump = abs(jump) > p.soc_jump
            if self._soc_prev is None or stamp > self._soc_prev[1]:
                self._soc_prev = (soc, stamp)
            bad_jump = bad_jump or not (0.0 <= soc <= 1.0)
        fb = bool(fallback)
        viol = np.array([[bad_jump, fb]])
        if self.comm_lost:
            # no measurements: the estimator falls back (or coasts) because its inputs are missing; that is
            # the communication loss reported by can timeout, not an estimator fault. Hold the state.
            self.est.update(np.zeros_like(viol), np.zeros_like(viol), t, np.array([jump, float(fb)]))
        else:
            self.est.update(viol, ~viol, t, np.array([jump, float(fb)]))
        r = self.est.result(np.array([jump, float(fb)]), "estimator plausible",
                            {"soc": soc if soc is not None else math.nan, "soc_jump": jump, "model_fallback": fb})
        if r.level != OK:
            idx = np.nonzero(self.est.deb.active[0])[0].tolist()
            r.message = " and ".join(({0: "SOC jump", 1: "model fallback active"})[k] for k in idx)
        return r

    def derating(self, v: np.ndarray, temps: np.ndarray) -> CheckResult:
        """Recommended charge/discharge current (foxBMS SOF trapezoid: temperature x voltage headroom)."""
        cfg, dr = self.cfg, self.cfg.derating
        tl = cfg.temperature
        tmin, tmax, vmax, vmin = _nanmin(temps), _nanmax(temps), _nanmax(v), _nanmin(v)

        def trap(lo0: float, lo1: float, hi1: float, hi0: float) -> float:
            if not (math.isfinite(tmin) and math.isfinite(tmax)):
                return 0.0
            f_lo = _clip01((tmin - lo0) / max(lo1 - lo0, 1e-9))
            f_hi = _clip01((hi0 - tmax) / max(hi0 - hi1, 1e-9))
            return float(min(f_lo, f_hi))

        f_tc = trap(tl.charge_under.mol, *dr.charge_temperature_full, tl.charge_over.mol)
        f_td = trap(tl.discharge_under.mol, *dr.discharge_temperature_full, tl.discharge_over.mol)
        f_vc = _clip01((cfg.cell_over.mol - vmax) / dr.voltage_headroom_v) if math.isfinite(vmax) else 0.0
        f_vd = _clip01((vmin - cfg.cell_under.mol) / dr.voltage_headroom_v) if math.isfinite(vmin) else 0.0
        ic, idis = dr.max_charge_a * f_tc * f_vc, dr.max_discharge_a * f_td * f_vd
        # an active limit violation forbids current in that direction
        if self.cell_over.deb.active[1:].any() or self.temp_over.deb.active[2].any():
            ic = 0.0
        if self.cell_under.deb.active[1:].any():
            idis = 0.0
        level = WARN if (ic == 0.0 or idis == 0.0) else OK
        msg = f"allowed charge {ic:.1f} A, discharge {idis:.1f} A"
        if not (math.isfinite(vmax) and math.isfinite(tmax)):
            # no measurement to derate from: a communication loss (can timeout), not a derating condition
            level = STALE
            msg = f"no valid measurements (see can timeout): {msg}"
        return CheckResult("current derating", level, msg, {
            "max_charge_current_a": ic, "max_discharge_current_a": idis,
            "charge_temperature_factor": f_tc, "charge_voltage_factor": f_vc,
            "discharge_temperature_factor": f_td, "discharge_voltage_factor": f_vd})


def _mostly_valid(finite: np.ndarray) -> bool:
    """At least half of a group valid: only then are single invalid members faults of their own."""
    return bool(finite.size) and 2 * int(finite.sum()) >= finite.size


def _nanmax(a: np.ndarray) -> float:
    """Largest value ignoring NaN; NaN when nothing is finite (the NaN-aware scan only when needed)."""
    finite = np.isfinite(a)
    if finite.all():
        return float(a.max()) if a.size else math.nan
    return float(np.nanmax(a)) if finite.any() else math.nan


def _nanmin(a: np.ndarray) -> float:
    """Smallest value ignoring NaN; NaN when nothing is finite."""
    finite = np.isfinite(a)
    if finite.all():
        return float(a.min()) if a.size else math.nan
    return float(np.nanmin(a)) if finite.any() else math.nan


def _nanargmax(a: np.ndarray) -> int:
    """Index of the largest value ignoring NaN; -1 when nothing is finite."""
    finite = np.isfinite(a)
    if finite.all():
        return int(a.argmax()) if a.size else -1
    return int(np.nanargmax(a)) if finite.any() else -1


def _nanargmin(a: np.ndarray) -> int:
    """Index of the smallest value ignoring NaN; -1 when nothing is finite."""
    finite = np.isfinite(a)
    if finite.all():
        return int(a.argmin()) if a.size else -1
    return int(np.nanargmin(a)) if finite.any() else -1


def _clip01(x: float) -> float:
    """x limited to [0, 1] (NaN stays NaN), without numpy's per-call overhead on a scalar."""
    return min(max(x, 0.0), 1.0)
