"""Classic BMS rules: three-tier limits, sensor plausibility, timeouts, estimator checks, derating.

Library only (no rclpy): :class:`RuleEngine.step` takes one PackSample per
fixed-rate tick and returns one :class:`CheckResult` per check, plus the
latched :class:`Event` log. Every array op covers all cells at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bms_ai.chemistry.ocv import ocv_or_none
from bms_ai.core.levels import ERROR, OK, STALE, WARN
from bms_ai.diagnostics.config import TIERS, LimitsConfig, TierLimits
from bms_ai.diagnostics.debounce import Debouncer, Transition
from bms_ai.diagnostics.stats import SampleStats, _Group, amin
from bms_ai.pack import PackSample

TIER_LEVEL = (WARN, WARN, ERROR)  # MOL, RSL -> WARN; MSL -> ERROR (contactors must open)
_F64 = np.dtype(np.float64)  # a sample's arrays already of this dtype are used as they are (no conversion call)


@dataclass(slots=True)
class CheckResult:
    """One check's verdict for one tick (maps 1:1 to a DiagnosticStatus); slots: ~20 are built per tick."""

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
        self._live: list[Event] = []   # events not seen cleared yet (a cleared event never becomes active again)
        self._part: tuple[int, Any] | None = None  # (debouncer generation, active part of the result)
        self.unmonitored = ""  # why this pack cannot be checked ('' = monitored): never set, never OK

    def not_monitored(self, reason: str) -> None:
        """Stop judging this check for good (its data does not exist in this pack): STALE with ``reason``."""
        self.unmonitored = reason

    def apply(self, tr: Transition, values: np.ndarray | float, t: float) -> None:
        """Log the events ``tr`` sets (with their value) and clears (at ``t``)."""
        vals = np.broadcast_to(np.asarray(values, dtype=float), (self.deb.n,))
        for k, i in zip(tr.set_tier.tolist(), tr.set_index.tolist()):
            ev = Event(self.check, self.tier_names[k], i if self.deb.n > 1 else -1,
                       float(self.deb.onset[k, i]), float(self.deb.set_time[k, i]), float(vals[i]),
                       level=self.levels[k])
            self.open[(k, i)] = ev
            self.events.append(ev)
            self._live.append(ev)
        for k, i in zip(tr.clear_tier.tolist(), tr.clear_index.tolist()):
            ev = self.open.pop((k, i), None)
            if ev is not None:
                ev.cleared = t

    def update(self, violating: np.ndarray, inside: np.ndarray, t: float, values: np.ndarray | float) -> None:
        if self.unmonitored:
            return
        tr = self.deb.update(violating, inside, t)
        if tr.any:
            self.apply(tr, values, t)

    def active_events(self) -> list[Event]:
        """This rule's events not cleared yet, in the order they were set."""
        if self._live:
            self._live = [e for e in self._live if e.active]
        return self._live

    def skips(self, possible: bool) -> bool:
        """Whether this tick cannot change this rule, so its arrays need not be built; False: call :meth:`update`.

        ``possible``: whether any element may violate this tick (a scalar test on
        the shared reductions). While the debouncer is idle a tick without a
        violation changes nothing, exactly as :meth:`update` would find.
        """
        return not possible and self.deb.idle

    def reset(self, t: float) -> None:
        self.apply(self.deb.reset(), np.nan, t)

    def result(self, values: np.ndarray | float, ok_message: str, extra: dict[str, Any] | None = None,
               unit: str = "") -> CheckResult:
        """This tick's verdict: the highest active tier, where (first element, count) and since when.

        ``extra`` becomes the result's values (not copied: every caller builds it for this result).
        """
        deb = self.deb
        kv: dict[str, Any] = extra if extra is not None else {}
        if self.unmonitored:
            return CheckResult(self.check, STALE, self.unmonitored, {**kv, "monitored": False})
        part = None if deb.idle else self._active_part()
        if part is None:
            return CheckResult(self.check, OK, ok_message, kv)
        top, first, head, where, latched = part
        value = _element(values, first, deb.n)
        kv.update(head)
        kv["value"] = value
        kv["latched"] = latched
        msg = f"{self.tier_names[top].upper()} violated at {where}: {_fmt(value)}{unit}"
        if latched:
            msg += " (latched until reset)"
        return CheckResult(self.check, self.levels[top], msg, kv)

    def _active_part(self) -> tuple[int, int, dict[str, Any], str, bool] | None:
        """The highest active tier's elements, onset and set time: rebuilt only after a set, clear or reset.

        Between transitions the active elements, their onsets and set times cannot change.
        """
        deb = self.deb
        if self._part is not None and self._part[0] == deb.generation:
            return self._part[1]
        top = deb.top_tier()
        part = None
        if top >= 0:
            idx = np.nonzero(deb.active[top])[0]
            first = int(idx[0])
            head: dict[str, Any] = {"tier": self.tier_names[top].upper(), "count": int(idx.size),
                                    "onset": _finite_min(deb.onset[top, idx]),
                                    "set_time": _finite_min(deb.set_time[top, idx])}
            if deb.n > 1:
                head[f"{self.element}_index"] = ",".join(str(i) for i in idx[:16].tolist()) + \
                    ("..." if idx.size > 16 else "")
                where = f"{self.element} {first}" + (f" (+{idx.size - 1} more)" if idx.size > 1 else "")
            else:
                where = "pack"
            part = (top, first, head, where, bool(deb.latch[top, 0]))
        self._part = (deb.generation, part)
        return part


def _set_time(e: Event) -> float:
    return e.set_time


def active_events(rules: Iterable[_Rule]) -> list[Event]:
    """The active events of ``rules`` in the order they were set (as filtering the sorted full log gives)."""
    live = [e for r in rules if r._live for e in r.active_events()]
    return sorted(live, key=_set_time) if len(live) > 1 else live


def _element(values: np.ndarray | float, i: int, n: int) -> float:
    """Element ``i`` of per-element ``values`` of length ``n``, or the one value shared by all."""
    if type(values) is float:
        return values
    if type(values) is np.ndarray and values.dtype is _F64 and values.ndim == 1 and values.size == n:
        return values.item(i)
    a = np.asarray(values, dtype=float)
    if a.size not in (1, n):
        raise ValueError(f"{a.size} values for {n} elements")
    return float(a.flat[i if a.size > 1 else 0])


def _finite_min(a: np.ndarray) -> float:
    """Smallest non-NaN value, NaN if there is none (without numpy's all-NaN warning)."""
    m = amin(a)  # NaN if any value is NaN
    if math.isfinite(m):
        return m
    return float(np.nanmin(a)) if np.isfinite(a).any() else math.nan


def _fmt(v: float) -> str:
    return "nan" if not math.isfinite(v) else f"{v:.4g}"


class _LimitRule(_Rule):
    """Three-tier limit with hysteresis; thresholds may change per tick (charge/discharge)."""

    def __init__(self, check: str, n: int, cfg: LimitsConfig, deb, element: str = "cell") -> None:
        super().__init__(check, n, deb.set_counts, deb.clear_count, cfg.latch_mask, TIER_LEVEL, TIERS, element)
        self.hyst = deb.hysteresis
        self._limits: TierLimits | None = None  # the thresholds below are for these limits
        self._thr = self._thr_in = np.zeros((3, 1))
        self._bound = math.nan                  # innermost threshold: no value beyond it, no violation

    def step(self, values: np.ndarray | float, limits: TierLimits, t: float, extreme: float | None = None) -> None:
        """One tick against ``limits``; ``extreme``: the largest (upper limits) / smallest value, NaN if none.

        Given the extreme, a tick on which no value passes the innermost threshold is
        skipped without comparing every element (nothing can change while idle).
        """
        if limits is not self._limits:
            self._limits = limits
            self._thr = np.asarray(limits.as_tuple()).reshape(3, 1)
            self._thr_in = self._thr - self.hyst if limits.upper else self._thr + self.hyst  # back inside
            thr = [x for x in limits.as_tuple() if not math.isnan(x)]
            self._bound = (min(thr) if limits.upper else max(thr)) if thr else math.nan
        # self.skips() inline (this runs for six limits every tick)
        if extreme is not None and self.deb.idle and \
                not (extreme > self._bound if limits.upper else extreme < self._bound):
            return
        values = _floats(values)
        if values.ndim == 0:   # one value shared by every element (np.atleast_1d without its Python call)
            values = values.reshape(1)
        thr = self._thr
        if limits.upper:
            viol = values > thr
            inside = values < self._thr_in
        else:
            viol = values < thr
            inside = values > self._thr_in
        self.update(viol, inside, t, values)


class _FrozenTracker:
    """An element is frozen when it stayed within eps while its reference moved by >= move."""

    def __init__(self, n: int, eps: float, move: float, window: float) -> None:
        self.eps, self.move, self.window = eps, move, window
        self.last = np.full(n, np.nan)
        # time of each element's last change and its reference then: one array, so one masked copy a tick
        self._at_change = np.full((2, n), np.nan)
        self.t_change, self.ref_at_change = self._at_change
        self._now = np.empty((2, 1))
        # amin(t_change) and where it is, kept: it moves only when that element changes (a change sets the newest
        # time), -1: not known
        self._oldest, self._oldest_at = math.nan, -1
        self._diff = np.empty(n)
        self._changed = np.empty(n, dtype=bool)

    def step(self, values: np.ndarray, reference: float, t: float) -> np.ndarray | None:
        """Track changes; the frozen elements, or None when none can be (nothing unchanged for the window).

        A tick on which no element changed (signals holding still, as quantised
        temperatures do between steps) updates nothing: four array ops.
        """
        n = values.size
        if not n:
            return None
        d, changed = self._diff, self._changed
        np.subtract(values, self.last, out=d)
        np.abs(d, out=d)
        np.less_equal(d, self.eps, out=changed)  # unchanged, for now
        if np.count_nonzero(changed) != n:
            np.logical_not(changed, out=changed)  # NaN counts as changed (restarts)
            np.copyto(self.last, values, where=changed)
            now = self._now
            now[0, 0], now[1, 0] = t, reference
            np.copyto(self._at_change, now, where=changed)
            if self._oldest_at < 0 or changed.item(self._oldest_at):
                i = int(self.t_change.argmin())  # a NaN (never changed) is the minimum, as in amin
                self._oldest, self._oldest_at = self.t_change.item(i), i
        if t - self._oldest < self.window:  # the oldest change is recent: nothing frozen
            return None
        return ((t - self.t_change) >= self.window) & (np.abs(reference - self.ref_at_change) >= self.move)


class _FrozenScalar:
    """:class:`_FrozenTracker` for one signal (the pack voltage), in plain floats."""

    def __init__(self, eps: float, move: float, window: float) -> None:
        self.eps, self.move, self.window = eps, move, window
        self.last = self.t_change = self.ref_at_change = math.nan

    def step(self, value: float, reference: float, t: float) -> np.ndarray | None:
        """Track changes; ``[True]`` when frozen, else None."""
        value = float(value)  # as the float64 array of the vector tracker holds it
        if not abs(value - self.last) <= self.eps:  # NaN counts as changed (restarts)
            self.last, self.t_change, self.ref_at_change = value, t, reference
        if t - self.t_change >= self.window and abs(reference - self.ref_at_change) >= self.move:
            return np.ones(1, dtype=bool)
        return None


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
        self._ocv = ocv_or_none(cfg.chemistry)   # None: the spread is voltage alone
        self._frozen_cells = _FrozenTracker(n_cells, p.stuck_epsilon_v, p.stuck_reference_move_v, p.stuck_window_s)
        self._frozen_sensors = _FrozenTracker(n_temps, p.stuck_epsilon_c, p.stuck_reference_move_c,
                                              p.stuck_temperature_window_s)
        self._frozen_pack_voltage = _FrozenScalar(p.stuck_epsilon_v * 10, p.stuck_pack_move_v, p.stuck_window_s)
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
        self.buffers = (np.empty(n_cells), np.empty(n_temps))  # scratch for the per-tick medians
        self.stats: SampleStats | None = None                   # reductions of the last step's sample
        self._no_frozen = np.zeros(n_cells + n_temps + 1, dtype=bool)
        self._channels = f"0..{n_cells - 1}=cells, {n_cells}..{n_cells + n_temps - 1}=sensors"
        self._signals = f"{self._channels}, {n_cells + n_temps}=pack_v"
        tl, dr = cfg.temperature, cfg.derating
        self._charge_ramps = _ramps(tl.charge_under.mol, *dr.charge_temperature_full, tl.charge_over.mol)
        self._discharge_ramps = _ramps(tl.discharge_under.mol, *dr.discharge_temperature_full, tl.discharge_over.mol)
        self._derating_msg = (math.nan, math.nan, "")   # derating: currents and their message
        self._derating_t = (math.nan, math.nan, 0.0, 0.0)  # derating: temperature extremes and their factors

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
        """Events not cleared yet, in the order they were set."""
        return active_events(self.rules)

    def event_count(self) -> int:
        """How many events were set since the start (active or cleared)."""
        return sum(len(r.events) for r in self.rules)

    def reset(self, t: float) -> None:
        """Acknowledge latched (MSL) events; still-violating limits re-set after their debounce."""
        for r in self.rules:
            r.reset(t)

    def step(self, s: PackSample, t: float, timed_out: Iterable[str] | None = None,
             soc: float | None = None, soc_stamp: float | None = None, capacity_ah: float | None = None,
             model_fallback: bool | None = None, stats: SampleStats | None = None) -> list[CheckResult]:
        """Evaluate every rule for one tick at time ``t`` (node clock, s).

        ``stats``: the sample's shared reductions when the caller already has them;
        the ones used stay in :attr:`stats` (the monitor hands them to the detectors).
        """
        self.ticks += 1
        v, temps = _floats(s.cell_voltages), _floats(s.cell_temperatures)
        if v.shape != (self.n_cells,) or temps.shape != (self.n_temps,):
            raise ValueError(f"sample has {v.size} cells / {temps.size} sensors, engine expects "
                             f"{self.n_cells} / {self.n_temps}")
        st = self.stats = stats if stats is not None else SampleStats.of_arrays(v, temps, self.buffers)
        i = float(s.pack_current)
        out = self._limits(st, i, t)
        out += self._plausibility(s, st, t)
        out.append(self._offset(s, i, st, t))                  # current sensor offset at rest
        out.append(self._timeouts(s, t, timed_out))             # CAN timeouts: named messages + stale stamps
        out.append(self._estimator(t, i, soc, soc_stamp, capacity_ah, model_fallback))
        out.append(self.derating(v, temps, st))                 # SOF-like derating
        return out

    # ------------------------------------------------------------------ parts
    def _charge_range(self, i: float, t: float) -> bool:
        """Charge or discharge temperature range, with a dwell time both ways so regen pulses don't flip it."""
        cfg = self.cfg
        want = math.isfinite(i) and i > cfg.temperature.charge_current_a
        if want != self._charging:
            if not math.isfinite(self._mode_since):
                self._mode_since = t
            if t - self._mode_since >= cfg.temperature.charge_mode_s - 1e-9:
                self._charging, self._mode_since = want, math.nan
        else:
            self._mode_since = math.nan
        return self._charging

    def _limits(self, st: SampleStats, i: float, t: float) -> list[CheckResult]:
        """Three-tier limits: cell voltage, temperature (charge/discharge range), pack current."""
        cfg, gv, gt = self.cfg, st.v, st.t
        self.cell_over.step(gv.values, cfg.cell_over, t, gv.max)
        self.cell_under.step(gv.values, cfg.cell_under, t, gv.min)
        charging = self._charge_range(i, t)
        tl = cfg.temperature
        self.temp_over.step(gt.values, tl.charge_over if charging else tl.discharge_over, t, gt.max)
        self.temp_under.step(gt.values, tl.charge_under if charging else tl.discharge_under, t, gt.min)
        self.cur_charge.step(i, cfg.current_charge, t, i)
        self.cur_discharge.step(-i, cfg.current_discharge, t, -i)
        mode = "charge" if charging else "discharge"
        return [
            self.cell_over.result(gv.values, "all cells below MOL", {"max_v": gv.max, "max_cell": gv.argmax}, " V"),
            self.cell_under.result(gv.values, "all cells above MOL", {"min_v": gv.min, "min_cell": gv.argmin}, " V"),
            self.temp_over.result(gt.values, f"all sensors below {mode} MOL", {"max_c": gt.max, "range": mode},
                                  " degC"),
            self.temp_under.result(gt.values, f"all sensors above {mode} MOL", {"min_c": gt.min, "range": mode},
                                   " degC"),
            self.cur_charge.result(i, "charge current within MOL", {"current_a": i}, " A"),
            self.cur_discharge.result(-i, "discharge current within MOL", {"current_a": i}, " A"),
        ]

    def _plausibility(self, s: PackSample, st: SampleStats, t: float) -> list[CheckResult]:
        """Pack voltage against the cells, spreads, open wires, stuck signals."""
        p = self.cfg.plausibility
        gv, gt = st.v, st.t
        sum_v = st.sum_v
        dpv = abs(s.pack_voltage - sum_v)
        if not self.pack_v.skips(dpv > p.pack_voltage_tolerance_v):
            dpa = np.array([dpv])
            self.pack_v.update(dpa[None, :] > p.pack_voltage_tolerance_v, dpa[None, :] <= p.pack_voltage_tolerance_v,
                               t, dpa)
        out = [self.pack_v.result(dpv, "pack voltage matches sum of cells",
                                  {"pack_v": s.pack_voltage, "sum_cells_v": sum_v, "diff_v": dpv}, " V")]

        # Whole-sample staleness (CAN log ended, bus silent: every value NaN) is a communication loss,
        # reported by `can timeout`; the measurement checks below hold their state instead of firing.
        # A group (cells, sensors) is judged only while most of it is valid, so a message timing out
        # part by part at the end of a log is not mistaken for open wires or a spread.
        self.comm_lost = not gv.any_finite and not gt.any_finite
        out.append(self._spread(self.v_spread, gv, p.cell_voltage_spread_v, t, "cell voltages within spread",
                                "median_v", "max_dev_v", " V", self._small_soc_gap))
        out.append(self._spread(self.t_spread, gt, p.temperature_spread_c, t, "temperatures within spread",
                                "median_c", "max_dev_c", " degC"))
        out.append(self._open_wire(s, st, t))
        missing: list[str] = []  # the lists below are built only when something is missing
        if not (gv.any_finite and gt.any_finite):
            missing += [name for name, g in (("cell_voltage", gv), ("cell_temperature", gt))
                        if g.values.size and not g.any_finite]
        if not (math.isfinite(s.pack_voltage) and math.isfinite(s.pack_current)):
            missing += [name for name, x in (("pack_voltage", s.pack_voltage), ("pack_current", s.pack_current))
                        if not math.isfinite(x)]
        self._missing = missing
        out.append(self._stuck(s, st, t))
        return out

    @staticmethod
    def _spread(rule: _Rule, g: _Group, limit: float, t: float, ok: str, med_key: str, dev_key: str,
                unit: str, explained: Callable[[np.ndarray, float], np.ndarray] | None = None) -> CheckResult:
        """|reading - median| of a group against its limit (judged only while most of the group is valid).

        ``explained(values, median)``: which readings beyond the limit are still plausible (cells: a small
        SOC imbalance on an OCV knee).
        """
        med = g.median
        # the largest |x - median| is at the largest or the smallest x (subtraction is monotonic)
        max_dev = max(abs(g.max - med), abs(g.min - med)) if g.any_finite else math.nan
        if g.mostly_valid and not rule.skips(max_dev > limit):
            dev = np.abs(g.values - med)
            bad, good = dev > limit, dev <= limit
            if explained is not None and bad.any():
                ok_knee = bad & explained(g.values, med)
                bad, good = bad & ~ok_knee, good | ok_knee
            rule.update(bad[None], good[None], t, g.values)
        return rule.result(g.values, ok, {med_key: med, dev_key: max_dev}, unit)

    def _small_soc_gap(self, v: np.ndarray, med: float) -> np.ndarray:
        """Cells whose OCV-equivalent SOC lies within ``cell_soc_spread`` of the median's (all False without
        a known OCV curve or with the test off)."""
        lim = self.cfg.plausibility.cell_soc_spread
        if self._ocv is None or lim <= 0:
            return np.zeros(v.shape, bool)
        soc = self._ocv.inverse(np.where(np.isfinite(v), v, med))
        return np.isfinite(v) & (np.abs(soc - float(self._ocv.inverse(med))) <= lim)

    def _open_wire(self, s: PackSample, st: SampleStats, t: float) -> CheckResult:
        """An individual reading invalid (NaN with a fresh CAN stamp, or implausibly low), or the low/high
        pair an open sense wire makes, while the rest of its group is valid. A stale value (old stamp) or a
        whole group missing is a timeout, not an open wire."""
        p = self.cfg.plausibility
        gv, gt = st.v, st.t
        v, temps = gv.values, gt.values
        # a pair needs one cell below the median by the pair voltage and one above it
        pair_possible = gv.min - gv.median < -p.open_wire_pair_v and gv.max - gv.median > p.open_wire_pair_v
        possible = not (gv.all_finite and gt.all_finite) or gv.min < p.open_wire_min_v or pair_possible
        if not self.open_wire.skips(possible):
            fresh_v = t - np.asarray(s.cell_voltage_stamps, dtype=float) <= p.stale_s
            fresh_t = t - np.asarray(s.cell_temperature_stamps, dtype=float) <= p.stale_s
            if fresh_v.shape != v.shape:
                fresh_v = np.ones(v.shape, dtype=bool)
            if fresh_t.shape != temps.shape:
                fresh_t = np.ones(temps.shape, dtype=bool)
            ow = (~gv.finite & fresh_v) | (v < p.open_wire_min_v)
            d = v - gv.median
            pair = (d[:-1] < -p.open_wire_pair_v) & (d[1:] > p.open_wire_pair_v)
            ow[:-1] |= pair
            ow[1:] |= pair
            owt = ~gt.finite & fresh_t
            v_ok, t_ok = gv.mostly_valid, gt.mostly_valid
            # groups not judged this tick: neither violating nor good (active alarms hold, pending counts decay)
            ow_all = np.concatenate((ow & v_ok, owt & t_ok))
            good_all = np.concatenate((~ow & v_ok, ~owt & t_ok))
            self.open_wire.update(ow_all[None], good_all[None], t, np.concatenate((v, temps)))
        vals = np.concatenate((v, temps)) if not self.open_wire.deb.idle else v
        return self.open_wire.result(vals, "all cell and sensor readings valid",
                                     {"invalid_cells": v.size - int(gv.finite.sum()) if not gv.all_finite else 0,
                                      "invalid_sensors": temps.size - int(gt.finite.sum()) if not gt.all_finite else 0,
                                      "channels": self._channels})

    def _stuck(self, s: PackSample, st: SampleStats, t: float) -> CheckResult:
        """Stuck / frozen signals: unchanged within epsilon for the window while their reference moved."""
        gv, gt = st.v, st.t
        parts = (self._frozen_cells.step(gv.values, gv.median, t),
                 self._frozen_sensors.step(gt.values, gt.median, t),
                 self._frozen_pack_voltage.step(s.pack_voltage, st.sum_v, t))
        possible = False
        for f in parts:
            if f is not None and np.count_nonzero(f):
                possible = True
                break
        sig = None
        if not self.stuck.skips(possible):
            z = self._no_frozen
            bounds = (0, self.n_cells, self.n_cells + self.n_temps, z.size)
            fz = np.concatenate([f if f is not None else z[a:b] for f, a, b in zip(parts, bounds, bounds[1:])])
            sig = np.concatenate((gv.values, gt.values, [s.pack_voltage]))
            self.stuck.update(fz[None], (~fz & np.isfinite(sig))[None], t, sig)
        # skipped: the debouncer is idle, so the result reads no values
        return self.stuck.result(sig if sig is not None else s.pack_voltage, "no frozen signal",
                                 {"signals": self._signals})

    def _offset(self, s: PackSample, i: float, st: SampleStats, t: float) -> CheckResult:
        p = self.cfg.plausibility
        contactors = s.status.get("contactor_plus") if s.status else None
        open_contactors = contactors is not None and math.isfinite(contactors) and contactors == 0
        # a rest is what was seen: a step on a current reading older than ``stale_s`` (the watchdog's steps on
        # the last sample during a bus silence: the same voltage each time) ends it instead of extending it
        at_rest = t - s.pack_current_stamp <= p.stale_s and math.isfinite(i) and \
            (open_contactors or abs(i) < p.rest_current_a)
        # the cell mean (the same sum numpy's nanmean takes) is needed only at rest
        vmean = _mean(st.v, st.sum_v) if at_rest else math.nan
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
        if not self.offset.skips(bad):
            self.offset.update(np.array([[bad]]), np.array([[good]]), t, np.array([mean_i]))
        return self.offset.result(mean_i, "current offset within tolerance at rest",
                                  {"at_rest": bool(at_rest), "rest_mean_a": mean_i}, " A")

    def _timeouts(self, s: PackSample, t: float, timed_out: Iterable[str] | None) -> CheckResult:
        p = self.cfg.plausibility
        names = sorted(timed_out) if timed_out else []
        stale: list[str] = []
        stale_s = p.stale_s
        if not (t - s.pack_voltage_stamp <= stale_s):
            stale.append("pack_voltage")
        if not (t - s.pack_current_stamp <= stale_s):
            stale.append("pack_current")
        n_old = _n_stale(_floats(s.cell_voltage_stamps), t, stale_s)
        if n_old:
            stale.append(f"cell_voltage[{n_old}]")
        n_old = _n_stale(_floats(s.cell_temperature_stamps), t, stale_s)
        if n_old:
            stale.append(f"cell_temperature[{n_old}]")
        if self._missing:
            stale += [f"{m} missing" for m in self._missing]
        bad = bool(names or stale)
        n_bad = float(len(names) + len(stale))
        if not self.timeout.skips(bad):
            self.timeout.update(np.array([[bad]]), np.array([[not bad]]), t, np.array([n_bad]))
        r = self.timeout.result(n_bad, "all messages fresh", {"timed_out": ",".join(names), "stale": ",".join(stale)})
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
                jump = soc - self._soc_prev[0] - expected if dt <= p.soc_jump_max_gap_s else 0.0
                bad_jump = abs(jump) > p.soc_jump
            if self._soc_prev is None or stamp > self._soc_prev[1]:
                self._soc_prev = (soc, stamp)
            bad_jump = bad_jump or not (0.0 <= soc <= 1.0)
        fb = bool(fallback)
        # no measurements (comm_lost): the estimator falls back (or coasts) because its inputs are missing;
        # that is the communication loss reported by can timeout, not an estimator fault. Hold the state.
        if not self.est.skips((bad_jump or fb) and not self.comm_lost):
            viol = np.array([[bad_jump, fb]])
            if self.comm_lost:
                self.est.update(np.zeros_like(viol), np.zeros_like(viol), t, np.array([jump, float(fb)]))
            else:
                self.est.update(viol, ~viol, t, np.array([jump, float(fb)]))
        values = np.array([jump, float(fb)]) if not self.est.deb.idle else jump
        r = self.est.result(values, "estimator plausible",
                            {"soc": soc if soc is not None else math.nan, "soc_jump": jump, "model_fallback": fb})
        if r.level != OK:
            idx = np.nonzero(self.est.deb.active[0])[0].tolist()
            r.message = " and ".join(({0: "SOC jump", 1: "model fallback active"})[k] for k in idx)
        return r

    def _temperature_factors(self, tmin: float, tmax: float) -> tuple[float, float]:
        """The charge and discharge temperature factors; the last ones while the extremes stand still (most ticks)."""
        last_min, last_max, f_tc, f_td = self._derating_t
        if _same(tmin, last_min) and _same(tmax, last_max):
            return f_tc, f_td
        f_tc, f_td = (_trapezoid(tmin, tmax, *self._charge_ramps), _trapezoid(tmin, tmax, *self._discharge_ramps)) \
            if math.isfinite(tmin) and math.isfinite(tmax) else (0.0, 0.0)
        self._derating_t = (tmin, tmax, f_tc, f_td)
        return f_tc, f_td

    def derating(self, v: np.ndarray, temps: np.ndarray, stats: SampleStats | None = None) -> CheckResult:
        """Recommended charge/discharge current (foxBMS SOF trapezoid: temperature x voltage headroom)."""
        cfg, dr = self.cfg, self.cfg.derating
        if stats is not None:
            tmin, tmax, vmax, vmin = stats.t.min, stats.t.max, stats.v.max, stats.v.min
        else:
            tmin, tmax, vmax, vmin = _nanmin(temps), _nanmax(temps), _nanmax(v), _nanmin(v)
        f_tc, f_td = self._temperature_factors(tmin, tmax)
        f_vc = _clip01((cfg.cell_over.mol - vmax) / dr.voltage_headroom_v) if math.isfinite(vmax) else 0.0
        f_vd = _clip01((vmin - cfg.cell_under.mol) / dr.voltage_headroom_v) if math.isfinite(vmin) else 0.0
        ic, idis = dr.max_charge_a * f_tc * f_vc, dr.max_discharge_a * f_td * f_vd
        # an active limit violation forbids current in that direction
        if self.cell_over.deb.any_active(1) or self.temp_over.deb.any_active(2):
            ic = 0.0
        if self.cell_under.deb.any_active(1):
            idis = 0.0
        level = WARN if (ic == 0.0 or idis == 0.0) else OK
        last_ic, last_idis, msg = self._derating_msg
        if not (_same(ic, last_ic) and _same(idis, last_idis)):  # the currents sit at their maxima most ticks
            msg = f"allowed charge {ic:.1f} A, discharge {idis:.1f} A"
            self._derating_msg = (ic, idis, msg)
        if not (math.isfinite(vmax) and math.isfinite(tmax)):
            # no measurement to derate from: a communication loss (can timeout), not a derating condition
            level = STALE
            msg = f"no valid measurements (see can timeout): {msg}"
        return CheckResult("current derating", level, msg, {
            "max_charge_current_a": ic, "max_discharge_current_a": idis,
            "charge_temperature_factor": f_tc, "charge_voltage_factor": f_vc,
            "discharge_temperature_factor": f_td, "discharge_voltage_factor": f_vd})

def _same(x: float, y: float) -> bool:
    """The same float for a cache key: equal and, for zeros, the same sign (-0.0 formats differently); NaN never."""
    return x == y and (x != 0.0 or math.copysign(1.0, x) == math.copysign(1.0, y))


def _ramps(lo0: float, lo1: float, hi1: float, hi0: float) -> tuple[float, float, float, float]:
    """A temperature trapezoid (0 at lo0, full from lo1 to hi1, 0 at hi0) as :func:`_trapezoid` takes it."""
    return lo0, max(lo1 - lo0, 1e-9), hi0, max(hi0 - hi1, 1e-9)


def _trapezoid(tmin: float, tmax: float, lo0: float, lo_span: float, hi0: float, hi_span: float) -> float:
    """Allowed share of the current at these (finite) extremes: the lower of the rising and the falling ramp."""
    return float(min(_clip01((tmin - lo0) / lo_span), _clip01((hi0 - tmax) / hi_span)))


def _mean(g: _Group, total: float) -> float:
    """The group's mean ignoring NaN (np.nanmean's value: the same pairwise sum over the same count).

    ``total``: the group's sum when it is complete (:attr:`SampleStats.sum_v`, the same reduction).
    """
    if g.all_finite:
        return total / g.values.size if g.values.size else math.nan
    return float(np.nanmean(g.values)) if g.any_finite else math.nan


def _floats(a: np.ndarray) -> np.ndarray:
    """``np.asarray(a, dtype=float)``: a sample's float64 arrays as they are (the conversion is a numpy call)."""
    return a if type(a) is np.ndarray and a.dtype is _F64 else np.asarray(a, dtype=float)


def _n_stale(stamps: np.ndarray, t: float, stale_s: float) -> int:
    """How many stamps are older than ``stale_s`` at ``t`` (NaN counts as stale)."""
    if not stamps.size:
        return 0
    if t - amin(stamps) <= stale_s:  # the oldest is fresh (a NaN anywhere makes min NaN: counted below)
        return 0
    return int((~(t - stamps <= stale_s)).sum())


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


def _clip01(x: float) -> float:
    """x limited to [0, 1] (NaN stays NaN), without numpy's per-call overhead on a scalar."""
    return min(max(x, 0.0), 1.0)
