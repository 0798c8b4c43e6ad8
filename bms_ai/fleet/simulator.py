"""The fleet simulator: many vehicles for days, fast enough to give the fleet loop weeks of data.

Each vehicle is a series string of parallel groups of one fitted cell type
(``bms_ai.fleet.cellmodel``), with manufacturing spread, ageing, a climate, a driver, charging
habits, sensors and rare injected faults. Its period is planned by Coulomb counting
(``bms_ai.sim.life.Planner``: trips from the vendored cycles, awake rests, AC / DC / full
charges), the current is realised at 1 Hz with the BMS voltage limits (CC-CV taper) and
every cell is evaluated over the whole period at once (``cellmodel.run_cells``). Parks are
closed form: no samples, each cell loses charge through its leak, RC branches relax, the
hysteresis state is frozen, the temperature relaxes to the ambient.

``simulate_fleet(cfg)`` yields one ``RecordedDrive`` per vehicle (truth alongside, faults in
``meta["faults"]``); vehicle k depends only on (seed, k), so vehicles can be simulated apart.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry.registry import get_chemistry
from bms_ai.core.cliargs import nonneg_int, out_dir
from bms_ai.fleet.cellmodel import CellType, load_cell_type, run_cells
from bms_ai.sim.dataset import RecordedDrive
from bms_ai.sim.life import (
    Planner,
    SensorSpec,
    TempSensorSpec,
    VoltageSensorSpec,
    command_knots,
    current_sensor,
    temperature_sensor,
)
from bms_ai.sim.variants import get_variant

GENERATOR = "bms_ai.fleet.simulator/1"
RATE_HZ = 1.0
CLIMATES = {"cold": (-3.0, 5.0), "temperate": (12.0, 6.0), "hot": (29.0, 7.0)}   # daily mean degC, diurnal +-
FAULT_KINDS = ("internal_short", "capacity_fade", "contact_resistance")
VIN_CHARS = "ABCDEFGHJKLMNPRSTUVWXYZ0123456789"        # no I, O, Q
URBAN, HIGHWAY = ("udds", "wltc_3b"), ("hwfet", "us06")
DEFAULT_START_UNIX = 1_767_225_600.0                   # 2026-01-01T00:00:00Z


@dataclass
class FleetConfig:
    """Everything that defines a fleet run; same config -> same vehicles."""

    vehicles: int = 10
    days: float = 7.0
    seed: int = 0
    mix: dict[str, float] | None = None      # variant -> weight; None: every fitted train set, equal weights
    n_cells: int = 96
    n_temps: int | None = None               # temperature sensors; None: one per 3 cells
    soh: tuple[float, float] = (0.7, 1.0)    # vehicle SOH drawn uniformly
    fade_per_day: float = 5e-5               # relative capacity loss per day (calendar + cycling)
    climates: dict[str, float] = field(default_factory=lambda: {"cold": 1.0, "temperate": 2.0, "hot": 1.0})
    fault_rate: float = 0.03                 # probability per vehicle and fault kind
    spread: float = 1.0                      # manufacturing spread multiplier
    pack_cooling: float = 8.0                # heat transfer of a cell in the pack / of the free cell PyBaMM fitted
    start_unix: float = DEFAULT_START_UNIX
    period: int = 0                          # k-th period of ``days`` of the same vehicles (cells, climate, driver,
    #                                          faults); new trips; time, ageing and fault onsets continue
    cells_dir: str | None = None             # fitted cell types (default: the shipped ones)
    current_sensor: SensorSpec = field(default_factory=SensorSpec)
    voltage_sensor: VoltageSensorSpec = field(default_factory=VoltageSensorSpec)
    temp_sensor: TempSensorSpec = field(default_factory=TempSensorSpec)

    def validate(self) -> FleetConfig:
        """One-line ValueError on anything a run cannot use (checked before any vehicle is simulated)."""
        from bms_ai.fleet.cellmodel import available

        if not (isinstance(self.vehicles, int) and self.vehicles >= 1):
            raise ValueError(f"vehicles must be a positive integer, not {self.vehicles!r}")
        if not (isinstance(self.days, (int, float)) and 0 < self.days <= 366):
            raise ValueError(f"days must be in (0, 366], not {self.days!r}")
        for name, hi in (("n_cells", 1000), ("n_temps", self.n_cells), ("period", 10_000)):
            x, lo = getattr(self, name), 0 if name == "period" else 1
            if not (name == "n_temps" and x is None) and not (isinstance(x, int) and lo <= x <= hi):
                raise ValueError(f"{name} must be an integer in [{lo}, {hi}], not {x!r}")
        lo, hi = self.soh
        if not 0.5 <= lo <= hi <= 1.0:
            raise ValueError(f"soh must be a range inside [0.5, 1.0], not {self.soh!r}")
        if not (0.0 <= self.fade_per_day < 0.01 and 0.0 <= self.fault_rate <= 1.0 and 0.0 <= self.spread <= 5.0
                and 0.1 <= self.pack_cooling <= 100.0):
            raise ValueError("fade_per_day must be in [0, 0.01), fault_rate in [0, 1], spread in [0, 5], "
                             "pack_cooling in [0.1, 100]")
        unknown = set(self.climates) - set(CLIMATES)
        if unknown or not self.climates or min(self.climates.values()) < 0 or sum(self.climates.values()) <= 0:
            raise ValueError(f"climates: weights >= 0 (sum > 0) over {', '.join(CLIMATES)}; got {self.climates!r}")
        mix = self.variant_mix()
        fitted = set(available(self.cells_dir))
        for v, w in mix.items():
            get_variant(v)
            if v not in fitted:
                raise ValueError(f"no fitted cell type for variant {v!r}; fitted: {', '.join(sorted(fitted)) or 'none'}")
            if not w >= 0:
                raise ValueError(f"mix weight of {v} must be >= 0, not {w!r}")
        if sum(mix.values()) <= 0:
            raise ValueError("mix weights must sum to more than 0")
        return self

    def variant_mix(self) -> dict[str, float]:
        """The variant weights (default: every fitted train set, equal weights)."""
        from bms_ai.fleet.cellmodel import available

        if self.mix:
            return dict(self.mix)
        names = [n for n in available(self.cells_dir) if not get_variant(n).held_out]
        if not names:
            raise ValueError("no fitted train cell types to draw from (give a mix)")
        return {n: 1.0 for n in names}

    def to_json(self) -> dict:
        """Plain dict (fleet.json, meta)."""
        return dataclasses.asdict(self)


def parse_mix(text: str) -> dict[str, float]:
    """``VARIANT=W,VARIANT=W`` (W optional, default 1) -> weights; one-line ValueError otherwise."""
    out: dict[str, float] = {}
    for item in filter(None, (x.strip() for x in text.split(","))):
        name, sep, w = item.partition("=")
        try:
            out[name.strip()] = float(w) if sep else 1.0
        except ValueError:
            raise ValueError(f"--mix: expected VARIANT=WEIGHT, got {item!r}") from None
    if not out:
        raise ValueError("--mix: empty")
    return out


# ---------------------------------------------------------------- the vehicle draw


@dataclass
class Vehicle:
    """One vehicle's fixed properties (drawn from the seed and its index)."""

    index: int
    vehicle_id: str
    variant: str
    n_parallel: int
    climate: str
    driver: dict
    soh: np.ndarray            # (n,) at the start
    cap_ah: np.ndarray         # (n,) group capacity at the start
    r_scale: np.ndarray        # (n,)
    dv: np.ndarray             # (n,) OCV offset V
    leak_a: np.ndarray         # (n,)
    cool: np.ndarray           # (n,) heat-transfer factor
    soc0: np.ndarray
    h0: np.ndarray
    faults: list[dict]


def vehicle_id(seed: int, index: int) -> str:
    """A VIN-like 17-character id (WMI-looking prefix, no I / O / Q), unique per (seed, index)."""
    rng = np.random.default_rng([seed, index, 17])
    body = "".join(VIN_CHARS[int(k)] for k in rng.integers(0, len(VIN_CHARS), 8))
    return f"WBX{body}{index % 1_000_000:06d}"


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=float)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def draw_vehicle(cfg: FleetConfig, index: int) -> Vehicle:
    """The vehicle ``index`` of the fleet: cells, climate, driver and faults from (seed, index) alone."""
    rng = np.random.default_rng([cfg.seed, index, 1])
    variant = _choice(rng, cfg.variant_mix())
    ct = load_cell_type(variant, cfg.cells_dir)
    chem = get_chemistry(ct.chemistry)
    n = cfg.n_cells
    sp = cfg.spread
    soh_v = float(rng.uniform(*cfg.soh))
    soh = np.clip(soh_v * (1.0 + 0.01 * sp * rng.standard_normal(n)), 0.4, 1.05)
    cap = ct.capacity_ah * chem.n_parallel * soh * (1.0 + 0.005 * sp * rng.standard_normal(n))
    age_r = float(rng.uniform(1.5, 3.5))                 # resistance growth per unit of capacity lost (bms_ai.sim.cells)
    r_scale = (1.0 + age_r * (1.0 - soh)) * np.exp(0.05 * sp * rng.standard_normal(n))
    leak = ct.leak_a * chem.n_parallel * np.exp(0.5 * rng.standard_normal(n) - 0.125)
    driver = {"trips_per_day": float(rng.uniform(1.0, 4.0)), "urban_share": float(rng.uniform(0.3, 0.9)),
              "aggressiveness": float(rng.uniform(0.8, 1.3)), "charge_target": float(rng.choice([0.8, 0.9, 1.0], p=[0.5, 0.4, 0.1])),
              "charge_below": float(rng.uniform(0.35, 0.7)), "ac_c_rate": float(rng.uniform(0.1, 0.25)),
              "full_charge_p": float(rng.uniform(0.02, 0.1)), "dc_per_day": float(rng.uniform(0.0, 0.2))}
    v = Vehicle(index=index, vehicle_id=vehicle_id(cfg.seed, index), variant=variant, n_parallel=chem.n_parallel,
                climate=_choice(rng, cfg.climates), driver=driver, soh=soh, cap_ah=cap, r_scale=r_scale,
                dv=0.0015 * sp * np.clip(rng.standard_normal(n), -3, 3), leak_a=leak,
                cool=cfg.pack_cooling * np.exp(0.1 * sp * rng.standard_normal(n)),
                soc0=np.clip(float(rng.uniform(0.4, 0.9)) + 0.005 * sp * rng.standard_normal(n), 0.02, 0.99),
                h0=np.full(n, float(rng.uniform(-1, 1))), faults=[])
    _draw_faults(cfg, v, rng)
    return v


def _draw_faults(cfg: FleetConfig, v: Vehicle, rng: np.random.Generator) -> None:
    """Rare injected faults, one cell each; their truth goes to meta["faults"]."""
    n = len(v.cap_ah)
    period = cfg.days * 86400.0
    for kind in FAULT_KINDS:
        if rng.random() >= cfg.fault_rate:
            continue
        cell = int(rng.integers(0, n))
        onset = float(rng.uniform(0.0, 0.6)) * period
        f = {"cell": cell, "kind": kind, "onset_s": round(onset, 1)}
        if kind == "internal_short":
            f["leak_a"] = float(rng.uniform(0.02, 0.2) * v.cap_ah[cell] / 50.0)     # 20-200 mA at 50 Ah
        elif kind == "capacity_fade":
            f["fade_per_day"] = float(rng.uniform(0.003, 0.01))                      # 0.3-1 %/day against its peers
        else:
            f["r_extra_ohm"] = float(rng.uniform(0.5, 2.0) * 1.5e-3 * 50.0 / v.cap_ah[cell])   # +0.75-3 mOhm at 50 Ah
        v.faults.append(f)


# ---------------------------------------------------------------- the plan


class _Planner(Planner):
    """life.Planner with the driver's aggressiveness on trip currents."""

    def __init__(self, chemistry: str, soc0: float, rng: np.random.Generator, aggressiveness: float) -> None:
        super().__init__(chemistry, soc0, rng)
        self.aggr = aggressiveness

    def _append(self, kind, t_rel, i_c, detail):
        if kind == "trip":
            i_c = np.where(np.asarray(i_c) > 0, np.asarray(i_c) * self.aggr, i_c)   # harder acceleration, same regen
        return super()._append(kind, t_rel, i_c, detail)


def _cycles(rng: np.random.Generator, driver: dict, n_max: int = 3) -> list[str]:
    n = int(rng.integers(1, n_max + 1))
    return [str(rng.choice(URBAN if rng.random() < driver["urban_share"] else HIGHWAY)) for _ in range(n)]


def ambient_c(climate: str, day_means: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Ambient at period times ``t``: the day's mean plus a diurnal swing (warmest at 15:00)."""
    mean, swing = CLIMATES[climate]
    day = np.clip((np.asarray(t) // 86400).astype(int), 0, len(day_means) - 1)
    return day_means[day] + swing * np.sin(2 * np.pi * ((np.asarray(t) % 86400) / 86400 - 9 / 24))


def plan_period(cfg: FleetConfig, v: Vehicle, chemistry: str, rng: np.random.Generator, day_means: np.ndarray):
    """Sessions of the vehicle's period (t = 0 at midnight): morning trips, parks of 1-12 h, an evening session.

    The evening session (a home AC charge when the SOC is below the driver's threshold, else a short
    trip) keeps the days on the calendar: no park is longer than 12 h.
    """
    d = v.driver
    pl = _Planner(chemistry, float(np.mean(v.soc0)), rng, d["aggressiveness"])
    end = cfg.days * 86400.0

    def amb(park: float) -> float:
        return float(ambient_c(v.climate, day_means, np.array([pl.clock + park]))[0])

    for day in range(int(math.ceil(cfg.days))):
        wake = day * 86400 + 7.5 * 3600 + rng.normal(0, 2400)
        park = float(np.clip(wake - pl.clock, 3600.0, 12 * 3600.0))
        n_trips = int(np.clip(rng.poisson(d["trips_per_day"]), 1, 5))
        dc_trip = int(rng.integers(0, n_trips)) if rng.random() < d["dc_per_day"] else -1
        for k in range(n_trips):
            if pl.clock + park >= end or pl.clock + park > day * 86400 + 17 * 3600:
                break
            park = _trip(pl, rng, v, amb(park), park, k == dc_trip)
        park = float(np.clip(day * 86400 + rng.uniform(18.5, 21.5) * 3600 - pl.clock, 3600.0, 12 * 3600.0))
        if pl.clock + park >= end:
            break
        if pl.soc < d["charge_below"] or rng.random() < 0.3:
            full = rng.random() < d["full_charge_p"] or d["charge_target"] >= 1.0 and rng.random() < 0.3
            pl.wake(park, amb(park))
            target = 1.0 if full else d["charge_target"] if d["charge_target"] < 1.0 else 0.9
            pl.charge("full" if full else "ac", target, d["ac_c_rate"], cv_s=1800.0 if full else 0.0)
        else:
            pl.wake(park, amb(park))
            if pl.trip([str(rng.choice(URBAN))], floor=0.25) is None:
                pl.rest(120.0)
    return [s for s in pl.sessions if s.end_s <= end] or pl.sessions[:1]


def _trip(pl: _Planner, rng: np.random.Generator, v: Vehicle, t_amb: float, park: float, dc: bool) -> float:
    """One trip session (a DC fast-charge stop and the drive on when ``dc``); returns the next park."""
    d = v.driver
    cycles = ["hwfet", "us06", "hwfet", "hwfet"] if dc else _cycles(rng, d)
    if pl.soc < 0.25:
        pl.wake(park, t_amb)
        pl.charge("ac", max(d["charge_target"], 0.8) if d["charge_target"] < 1.0 else 0.9, d["ac_c_rate"])
        park = float(rng.uniform(1, 2)) * 3600
    pl.wake(park, t_amb)
    if pl.trip(cycles, floor=0.15 + 0.2 * max(pl.aggr - 1.0, 0.0) + 0.1) is None:
        pl.rest(120.0)
    if dc:
        pl.wake(600.0 + float(rng.uniform(0, 1200)), t_amb)
        pl.charge("dc", 0.8, float(rng.uniform(1.0, 2.0)), cv_s=600.0)
        pl.wake(300.0, t_amb)
        if pl.trip(["hwfet", "udds"]) is None:
            pl.rest(120.0)
    return float(np.clip(rng.exponential(3.0) + 1.0, 1.0, 12.0)) * 3600


def timeline(sessions, cap_ah: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, int, str]]]:
    """1 Hz awake samples: (t, session, commanded current A (+ charging), segments as (k0, k1, kind))."""
    t_cmd, i_cmd = command_knots(sessions, cap_ah, 0.0)
    ts = [s.start_s + np.arange(int(math.floor(s.end_s - s.start_s)) + 1, dtype=float) for s in sessions]
    t = np.concatenate(ts)
    ses = np.concatenate([np.full(len(x), k, np.int32) for k, x in enumerate(ts)])
    i = -np.interp(t, t_cmd, i_cmd)
    starts = np.r_[0, np.cumsum([len(x) for x in ts])[:-1]].astype(int)
    i[starts] = 0.0                          # the sample after a park carries no charge (the park is closed form)
    segs = []
    for s, k0, x in zip(sessions, starts, ts):
        # each segment runs to the next one's start: the 1 s transitions belong to a segment too
        a = [k0 + int(math.ceil(seg.start_s - s.start_s)) for seg in s.segments]
        b = a[1:] + [k0 + len(x)]
        segs += [(ka, kb, seg.kind) for ka, kb, seg in zip(a, b, s.segments)]
    return t, ses, i, segs


# ---------------------------------------------------------------- realising the current (BMS voltage limits)


@dataclass
class _Cells:
    """Per-cell inputs of ``run_cells`` for one vehicle (a subset of cells: ``take``)."""

    soc0: np.ndarray
    cap: np.ndarray            # (S, n) per session
    leak: np.ndarray
    r_scale: np.ndarray
    dv: np.ndarray
    h0: np.ndarray
    cool: np.ndarray
    steps: list

    def take(self, idx: np.ndarray) -> _Cells:
        """The cells ``idx`` only (fault steps renumbered)."""
        pos = {int(c): j for j, c in enumerate(idx)}
        steps = [(w, pos[c], k, x) for w, c, k, x in self.steps if c in pos]
        return _Cells(self.soc0[idx], self.cap[:, idx], self.leak[idx], self.r_scale[idx], self.dv[idx], self.h0[idx],
                      self.cool[idx], steps)


def _run(ct: CellType, n_par: int, dt, i, amb, ses, c: _Cells, k0: int = 0, prev=None, k1: int | None = None):
    """``run_cells`` for the cells ``c`` over samples k0..k1-1 (from the states of ``prev`` at k0 - 1)."""
    if k0 == 0 and k1 is None:
        return run_cells(ct, dt, i, amb, c.soc0, c.cap, n_par, ses, c.leak, c.r_scale, c.dv, c.h0, None, c.cool, c.steps)
    sl = slice(k0, k1)
    steps = [(w, cell, max(k - k0, 0), x) for w, cell, k, x in c.steps]
    return run_cells(ct, dt[sl], i[sl], amb[sl], prev.soc[k0 - 1], c.cap, n_par, ses[sl], c.leak, c.r_scale, c.dv,
                     prev.h[k0 - 1], prev.temp[k0 - 1], c.cool, steps, f0=prev.f[k0 - 1])


def _splice(run, part, k0: int) -> None:
    """Write a partial run into the whole one from sample k0."""
    k1 = k0 + len(part.f)
    for name in ("soc", "v", "temp", "h", "f"):
        getattr(run, name)[k0:k1] = getattr(part, name)


def bms_limits(ct: CellType) -> tuple[float, float]:
    """Voltage window the BMS holds: the chemistry's operating window inside the cell's cut-offs, half the
    hysteresis gap inside (as bms_ai.sim.life)."""
    chem = get_chemistry(ct.chemistry)
    half = 0.5 * ct.hyst_gap_v
    return max(ct.v_min, chem.v_min) + half, min(ct.v_max, chem.v_max) - half


def _limit_segment(ct: CellType, dt, i, i_cmd, ses_k, run, c: _Cells, k0: int, k1: int, charge: bool) -> None:
    """Cut the current of samples k0..k1-1 back so no watched cell leaves the window; a charge ends at C/20.

    Vectorised over the segment: each sample's allowed current from the states the last run left
    at the sample before (the caller re-runs and calls again until the segment holds).
    """
    v_lo, v_hi = bms_limits(ct)
    taus = np.asarray(ct.rc_tau)
    nb = len(taus)
    sl = slice(k0, k1)
    prev = slice(k0 - 1, k1 - 1)
    cap = c.cap[ses_k[sl]] if len(c.cap) > 1 else c.cap
    soc = np.clip(run.soc[prev], 0.0, 1.0)
    ocv, r = ct.ocv_and_resistances(run.temp[sl].mean(axis=1)[:, None], soc)
    r[:1 + nb] *= ct.capacity_ah / cap * c.r_scale
    for w, cell, k_on, x in c.steps:
        if w == "r0" and k_on < k1:
            r[0, max(k_on - k0, 0):, cell] += x
    a = np.exp(-dt[sl, None] / taus[None, :])                              # (L, B)
    base = ocv + c.dv + np.einsum("blw,lb->lw", r[1:1 + nb], a * run.f[prev]) + 0.5 * ct.hyst_gap_v * run.h[prev]
    slope = r[0] + np.einsum("blw,lb->lw", r[1:1 + nb], 1.0 - a)
    k_i = ct.capacity_ah / cap

    def inside(cur: np.ndarray) -> np.ndarray:
        v = base + slope * cur[:, None] + ct.nonlinear(r[1 + nb:], cur[:, None] * k_i) * c.r_scale
        return ((v >= v_lo) & (v <= v_hi)).all(axis=1)

    # the largest share of the command that keeps every watched cell inside (V is monotone in I): bisection
    cmd = i_cmd[sl]
    lo_s, hi_s = np.zeros(len(cmd)), np.ones(len(cmd))
    ok = inside(cmd)
    lo_s[ok] = 1.0
    for _ in range(14):
        mid = 0.5 * (lo_s + hi_s)
        good = inside(mid * cmd)
        lo_s = np.where(good & ~ok, mid, lo_s)
        hi_s = np.where(good | ok, hi_s, mid)
    new = lo_s * cmd
    if charge:
        end = np.flatnonzero((new < float(np.mean(cap)) / 20.0) & (i_cmd[sl] > 0))
        if len(end):
            new[end[0]:] = 0.0                # the CV taper reached the end current: the charge is complete
    i[sl] = new


def _watched(c: _Cells, i: np.ndarray, dt: np.ndarray) -> np.ndarray:
    """Cells likely to meet a limit first: highest / lowest Coulomb-counted SOC, highest resistance, faulty ones."""
    q = np.cumsum(i * dt) / 3600.0
    hi = c.soc0 + q.max() / c.cap[0]
    lo = c.soc0 + q.min() / c.cap[0]
    idx = set(np.argsort(hi)[-3:].tolist()) | set(np.argsort(lo)[:3].tolist()) | set(np.argsort(c.r_scale)[-2:].tolist())
    idx |= {cell for _, cell, _, _ in c.steps}
    return np.array(sorted(idx))


def _violations(run, v_lo: float, v_hi: float, tol: float) -> np.ndarray:
    """Samples where any of the run's cells is outside the window by more than ``tol``."""
    return ((run.v > v_hi + tol) | (run.v < v_lo - tol)).any(axis=1)


def _limit_watched(ct: CellType, n_par: int, dt, i, amb, ses, segs, seg_of, sub: _Cells, tol: float) -> int:
    """One sweep forward over the watched cells: limit each violating segment until it holds.

    After a limited segment the run is stale from its end on; it is brought up to date only up to
    the next flagged violation (one pass over the period in all, not one per segment).
    """
    v_lo, v_hi = bms_limits(ct)
    i_cmd = i.copy()
    run = _run(ct, n_par, dt, i, amb, ses, sub)
    bad = _violations(run, v_lo, v_hi, tol) & (seg_of >= 0)
    k_from, limited, stale, n = 0, 0, None, len(i)
    while True:
        nxt = np.flatnonzero(bad[k_from:])
        k_to = k_from + int(nxt[0]) if len(nxt) else n
        if stale is not None and k_to > stale:
            part = _run(ct, n_par, dt, i, amb, ses, sub, stale, run, k_to)
            _splice(run, part, stale)
            bad[stale:k_to] = _violations(part, v_lo, v_hi, tol) & (seg_of[stale:k_to] >= 0)
            stale = k_to if k_to < n else None
            continue
        if not len(nxt):
            return limited
        k0 = max(k_to, 1)
        a, b, kind = segs[int(seg_of[k0])]
        limited += 1
        for _ in range(6):                   # fixed point: allowed current <-> the states it leads to
            _limit_segment(ct, dt, i, i_cmd, ses, run, sub, k0, b, kind != "trip" and i_cmd[k0] > 0)
            part = _run(ct, n_par, dt, i, amb, ses, sub, k0, run, b)
            _splice(run, part, k0)
            if not (_violations(part, v_lo, v_hi, tol)).any():
                break
        stale = b if b < n else None
        k_from = b


def realise_current(ct: CellType, n_par: int, dt, i_cmd, amb, ses, segs, cells: _Cells, tol: float = 3e-3):
    """The series current after the BMS voltage limits (CC-CV taper, derating near empty) and the final cell run.

    The limits are enforced on a few watched cells (those Coulomb counting puts nearest a limit, the
    most resistive, the faulty ones); the final run of all cells adds any other cell that still
    leaves the window to the watched ones (rare) and tries again.
    """
    v_lo, v_hi = bms_limits(ct)
    i = i_cmd.copy()
    seg_of = np.full(len(i), -1)
    for j, (a, b, _) in enumerate(segs):
        seg_of[a:b] = j
    watch = _watched(cells, i, dt)
    limited = 0
    for _ in range(2):
        limited += _limit_watched(ct, n_par, dt, i, amb, ses, segs, seg_of, cells.take(watch), tol)
        run = _run(ct, n_par, dt, i, amb, ses, cells)
        # another round only for a cell clearly outside (a full run of every cell costs as much as the rest)
        worst = np.flatnonzero(((run.v > v_hi + 5 * tol) | (run.v < v_lo - 5 * tol)).any(axis=0))
        if not len(worst) or set(worst.tolist()) <= set(watch.tolist()):
            break
        watch = np.union1d(watch, worst)
    return i, run, limited


# ---------------------------------------------------------------- one vehicle, the fleet


def _session_caps(cfg: FleetConfig, v: Vehicle, t_start: np.ndarray) -> np.ndarray:
    """(S, n) group capacity during each session: the fleet fade plus a faulty cell's own (from its onset)."""
    days = np.asarray(t_start) / 86400.0
    cap = v.cap_ah[None, :] * (1.0 - cfg.fade_per_day * days[:, None])
    for f in v.faults:
        if f["kind"] == "capacity_fade":
            cap[:, f["cell"]] -= v.cap_ah[f["cell"]] * f["fade_per_day"] * np.maximum(days - f["onset_s"] / 86400.0, 0.0)
    return cap


def _sensor_groups(n: int, m: int) -> np.ndarray:
    return (np.arange(n) * m) // n


def _voltage_sensor(v: np.ndarray, spec: VoltageSensorSpec, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """``life.voltage_sensor`` (channel offset + noise, quantised) in float32: half the time on a week of 96 cells."""
    off = spec.offset_v * rng.standard_normal(v.shape[1])
    noise = rng.standard_normal(v.shape, dtype=np.float32)
    noise *= np.float32(spec.noise_v)
    noise += v
    noise += off.astype(np.float32)[None, :]
    np.rint(noise * np.float32(1.0 / spec.lsb_v), out=noise)
    return noise.astype(np.float64) * spec.lsb_v, off.tolist()


def simulate_vehicle(cfg: FleetConfig, index: int) -> RecordedDrive:
    """Vehicle ``index`` of the fleet over ``cfg.days``: measured inputs, truth and meta (common record)."""
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    v = draw_vehicle(cfg, index)
    ct = load_cell_type(v.variant, cfg.cells_dir)
    var = get_variant(v.variant)
    per = [cfg.period] if cfg.period else []      # period 0 draws exactly what a fleet without periods draws
    rng_plan, rng_sens = np.random.default_rng([cfg.seed, index, 2, *per]), np.random.default_rng([cfg.seed, index, 3, *per])
    offset = cfg.period * cfg.days * 86400.0
    if cfg.period:
        v.soc0 = np.clip(v.soc0 - np.mean(v.soc0) + np.random.default_rng([cfg.seed, index, 4, *per]).uniform(0.4, 0.9),
                         0.02, 0.99)
    faults = [dict(f, onset_s=round(f["onset_s"] - offset, 1)) for f in v.faults]   # < 0: before this period
    day_means = CLIMATES[v.climate][0] + 3.0 * rng_plan.standard_normal(int(math.ceil(cfg.days)) + 1)
    sessions = plan_period(cfg, v, ct.chemistry, rng_plan, day_means)
    t, ses, i_cmd, segs = timeline(sessions, float(np.mean(v.cap_ah)))
    dt = np.diff(t, prepend=t[0])
    amb = ambient_c(v.climate, day_means, t)
    starts = np.flatnonzero(np.r_[True, ses[1:] != ses[:-1]])
    steps = []
    for f in faults:
        k_on = int(np.searchsorted(t, f["onset_s"]))
        if f["kind"] == "internal_short":
            steps.append(("leak", f["cell"], k_on, f["leak_a"]))
        elif f["kind"] == "contact_resistance":
            steps.append(("r0", f["cell"], k_on, f["r_extra_ohm"]))
    cells = _Cells(v.soc0, _session_caps(cfg, v, t[starts] + offset), v.leak_a, v.r_scale, v.dv, v.h0, v.cool, steps)
    i_true, run, limited = realise_current(ct, v.n_parallel, dt, i_cmd, amb, ses, segs, cells)
    n, m = cfg.n_cells, cfg.n_temps or max(1, cfg.n_cells // 3)
    groups = _sensor_groups(n, m)
    temp_s = np.stack([run.temp[:, groups == j].mean(axis=1) for j in range(m)], axis=1)
    nominal = var.nominal_ah * v.n_parallel
    i_meas, cur = current_sensor(i_true, run.temp.mean(axis=1), ses, nominal, cfg.current_sensor, rng_sens)
    v_meas, v_off = _voltage_sensor(run.v, cfg.voltage_sensor, rng_sens)
    t_meas = temperature_sensor(temp_s, cfg.temp_sensor, rng_sens)
    timing = {"wall_s": round(time.perf_counter() - t_wall, 3), "cpu_s": round(time.process_time() - t_cpu, 3),
              "calendar_h": round(cfg.days * 24.0, 3), "awake_h": round(len(t) / 3600.0, 3)}
    soh = cells.cap[0] / (var.nominal_ah * v.n_parallel) if cfg.period else v.soh
    classes = ["b"] + (["d"] if v.climate != "temperate" or float(np.mean(soh)) < 0.9 else []) + (["e"] if var.held_out else [])
    meta = {"vehicle_id": v.vehicle_id, "t0_unix": float(cfg.start_unix + offset), "variant": v.variant,
            "cell_set": v.variant, "held_out": var.held_out, "soh": [round(float(x), 5) for x in soh], "faults": faults,
            "classes": classes, "period": cfg.period,
            "climate": {"name": v.climate, "day_mean_c": [round(float(x), 2) for x in day_means],
                        "diurnal_c": CLIMATES[v.climate][1]},
            "driver": v.driver, "rate_hz": RATE_HZ, "n_parallel": v.n_parallel, "n_sessions": int(ses[-1]) + 1,
            "cells": {"leak_a": v.leak_a.tolist(), "r_scale": v.r_scale.tolist(), "ocv_offset_v": v.dv.tolist(),
                      "capacity_end_ah": cells.cap[-1].tolist()},
            "temp_sensor_cells": groups.tolist(), "current_sensor": cur, "voltage_offset_v": v_off,
            "voltage_limited_segments": limited, "soc_stored": [float(x) for x in run.soc[0]],
            "source": f"{GENERATOR}: fitted ECM cell type {v.variant} (bms_ai.fleet.cellmodel)",
            "seed": cfg.seed, "index": index, "timing": timing}
    return RecordedDrive(name=v.vehicle_id, chemistry=ct.chemistry, capacity_ah=nominal, t=t, current=i_meas,
                         cell_v=v_meas, cell_t=t_meas, soc=run.soc, meta=meta, session=ses,
                         cell_capacity_ah=cells.cap[0].copy() if cfg.period else v.cap_ah.copy(),
                         ocv_soc=np.asarray(ct.ocv_soc), ocv_v=np.asarray(ct.ocv_v), current_true=i_true)


def simulate_fleet(cfg: FleetConfig) -> Iterator[RecordedDrive]:
    """One RecordedDrive per vehicle, in index order (the config is checked first: one-line ValueError)."""
    cfg.validate()
    for k in range(cfg.vehicles):
        yield simulate_vehicle(cfg, k)


# ---------------------------------------------------------------- `bms-ai fleet simulate`


def add_arguments(p) -> None:
    """`bms-ai fleet simulate` options."""
    p.add_argument("--vehicles", type=int, default=10, help="number of vehicles (default 10)")
    p.add_argument("--days", type=float, default=7.0, help="simulated calendar days per vehicle (default 7)")
    p.add_argument("--mix", default=None, help="cell types VARIANT=W,... (default: every fitted train set, equal)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    p.add_argument("--cells", type=int, default=96, help="series cells per vehicle (default 96)")
    p.add_argument("--fault-rate", type=float, default=0.03, help="probability per vehicle and fault kind")
    p.add_argument("--out", type=out_dir, required=True, help="output directory: <vehicle_id>/ per vehicle and fleet.json")


def run(args) -> int:
    """Simulate the fleet, write each vehicle (save_npz) and a fleet.json summary; one-line errors."""
    import json
    import sys
    from pathlib import Path

    from bms_ai.sim.dataset import save_npz

    try:
        cfg = FleetConfig(vehicles=args.vehicles, days=args.days, seed=args.seed, n_cells=args.cells,
                          mix=parse_mix(args.mix) if args.mix else None, fault_rate=args.fault_rate).validate()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        print(f"error: --out {out} exists and is not a directory", file=sys.stderr)
        return 2
    rows = []
    for d in simulate_fleet(cfg):
        save_npz(out / d.meta["vehicle_id"], d)
        m = d.meta
        rows.append({"vehicle_id": m["vehicle_id"], "variant": m["variant"], "held_out": m["held_out"],
                     "climate": m["climate"]["name"], "soh_mean": round(float(np.mean(m["soh"])), 4),
                     "faults": m["faults"], "sessions": m["n_sessions"], **m["timing"]})
        print(f"{m['vehicle_id']} {m['variant']:<18} {m['climate']['name']:<9} awake {m['timing']['awake_h']:.1f} h "
              f"cpu {m['timing']['cpu_s']:.1f} s faults {[f['kind'] for f in m['faults']]}", file=sys.stderr)
    cpu = sum(r["cpu_s"] for r in rows)
    summary = {"generator": GENERATOR, "config": cfg.to_json(), "vehicles": rows,
               "cpu_s": round(cpu, 3), "calendar_h": round(sum(r["calendar_h"] for r in rows), 3),
               "awake_h": round(sum(r["awake_h"] for r in rows), 3)}
    (out / "fleet.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{len(rows)} vehicles in {out} ({summary['calendar_h']:.0f} calendar h, {summary['awake_h']:.0f} awake h, "
          f"{cpu:.1f} s cpu)")
    return 0
