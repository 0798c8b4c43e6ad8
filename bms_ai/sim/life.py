"""Vehicle lives and drives: a series string of randomised PyBaMM cells with ground truth.

One run = one vehicle: ``n_cells`` cells drawn around a named variant (manufacturing
spread, optional ageing), a plan of *sessions* (the BMS is awake: 10 Hz samples)
separated by *parks* (asleep: no samples; each cell loses charge through its own
leak, which no sensor sees). Two modes:

- ``life``: ``days`` calendar days: 2-3 trips a day from the vendored cycles (urban /
  highway mix, regen), parks of 1-12 h, partial AC charges, one DC fast charge in a long
  trip, one full CC-CV charge, a daily ambient with a diurnal swing;
- ``drive``: ``hours`` of awake time in one or two sessions: trips, awake rests of 5-60
  min and a charge (AC, DC fast with CV, or CC-CV to full), constant ambient.

How it is solved (one PyBaMM solve per cell plus one for the charger / BMS limits):
1. plan by Coulomb counting: sessions of segments -> a current command (1 s knots);
2. controller: the cell predicted to reach its limit first runs the whole command with
   PyBaMM's function "operating mode": the current is an algebraic variable with residual
   max(min(I - I_cmd, g (V_max - V)), g (V_min - V)) = 0, so CC-CV taper, regen derating
   near full and discharge derating near empty come out of one solve;
3. every cell (the controller's included) is solved once over the whole run with SPMe +
   lumped thermal + contact resistance on the realised series current (1 s knots) plus its
   own leak while parked; outputs only at the awake samples; the solver restarts at every
   wake-up / sleep / segment boundary (else IDA can step over a whole trip after a park);
4. truth SOC from the positive particles' average stoichiometry and the cell's own window,
   checked against Coulomb counting of the applied current in every run (< 0.1 %);
5. sensors: one current sensor for the string (offset drifting with temperature and per
   session, gain, noise, LSB; quoted per 50 Ah and scaled by C/50), cell voltages (noise,
   channel offset, 1 mV LSB), cell temperatures (noise, 0.1 degC LSB); LFP hysteresis as a
   one-state layer on the voltage, frozen while parked.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry.registry import get_chemistry
from bms_ai.sim.cells import COARSE_MESH, build_sim, make_cell, true_ocv
from bms_ai.sim.dataset import RecordedDrive
from bms_ai.sim.profile import current_limits, load_cycle, road_power
from bms_ai.sim.scenario import Vehicle
from bms_ai.sim.variants import draw_variant_cell, get_variant

GENERATOR = "bms_ai.sim.life/1"   # part of every config hash: bump when the output of a config changes
DT = 0.1                     # sample period while awake [s]
REF_PACK_AH = 50.0           # sensor and leak specs are quoted for the 50 Ah reference pack
REF_SERIES = 96              # reference pack: trip power -> C-rate through 96 cells x nominal voltage
RAMP_S = 5.0                 # charger current ramp [s]
TRUTH_TOL = 1e-3             # max |SOC(particles) - SOC(Coulomb count)|: the run fails above it
URBAN, HIGHWAY = ("udds", "wltc_3b"), ("hwfet", "us06")
CHARGES = ("ac", "dc", "full")
OUT_VARS = ("Voltage [V]", "Average positive particle stoichiometry", "Volume-averaged cell temperature [K]")


# ---------------------------------------------------------------- configuration


@dataclass
class SensorSpec:
    """Pack current sensor (quoted for a 50 Ah pack, scaled to the cell by C/50)."""

    offset_a: float = 0.3          # sigma of the offset at 25 degC
    tc_a_per_k: float = 0.01       # sigma of the offset temperature coefficient
    drift_a: float = 0.05          # sigma of the per-session random-walk step of the offset
    gain: float = 0.005            # gain error: uniform +-gain
    noise_a: float = 0.15          # white noise sigma at 10 Hz
    lsb_a: float = 0.1             # quantisation

    @classmethod
    def clean(cls) -> SensorSpec:
        """Noise and quantisation only (no offset, drift or gain error)."""
        return cls(offset_a=0.0, tc_a_per_k=0.0, drift_a=0.0, gain=0.0)


@dataclass
class VoltageSensorSpec:
    """Cell voltage channels (the pack simulator's CAN sensor model)."""

    noise_v: float = 0.8e-3
    offset_v: float = 0.5e-3       # sigma of a fixed per-channel offset
    lsb_v: float = 1e-3


@dataclass
class TempSensorSpec:
    """One temperature sensor per cell."""

    noise_c: float = 0.15
    lsb_c: float = 0.1


@dataclass
class LifeConfig:
    """Everything that defines one run; same config (and GENERATOR) -> same output."""

    variant: str = "NMC_Chen2020"
    seed: int = 0
    mode: str = "life"               # life | drive
    days: int = 3                    # life mode
    hours: float = 1.5               # drive mode: awake time
    sessions: int | None = None      # drive mode: 1 or 2 (None: drawn)
    n_cells: int = 3
    ambient_c: float | None = None   # life base / drive ambient; None: U(-10, 45)
    soh: float | list[float] | None = None   # per cell: None fresh, a value, or [lo, hi] drawn per cell
    soc0: float | None = None        # mean start SOC; None: U(0.5, 0.9) life, U(0.1, 0.95) drive
    spread: float = 1.0              # manufacturing spread multiplier (bms_ai.sim.cells.SPREAD)
    soc0_sigma: float = 0.01         # cell-to-cell start SOC spread
    leak_ma_per_50ah: float = 2.0    # mean self-discharge at the 50 Ah scale
    leak_sigma_ln: float = 0.5
    hyst_mv: float | None = None     # None: the variant's gap
    current_sensor: SensorSpec = field(default_factory=SensorSpec)
    voltage_sensor: VoltageSensorSpec = field(default_factory=VoltageSensorSpec)
    temp_sensor: TempSensorSpec = field(default_factory=TempSensorSpec)
    # solver settings (docs/sim.md "Speed"): the controller only shapes the current, the truth comes from
    # the cell solves; SPM as controller lets SPMe cells overshoot v_max by 25-90 mV in CV (no electrolyte)
    cell_rtol: float = 1e-5          # truth solves (atol = rtol / 100); SOC check error ~0.003-0.009 %
    ctrl_rtol: float = 1e-4          # controller
    ctrl_model: str = "SPMe"         # SPMe | SPM
    ctrl_mesh: str = "coarse"        # default | coarse (cells.COARSE_MESH)

    def validate(self) -> LifeConfig:
        """Fail early with one line instead of deep inside a solve."""
        get_variant(self.variant)
        if self.mode not in ("life", "drive"):
            raise ValueError(f"mode must be 'life' or 'drive', not {self.mode!r}")
        if self.n_cells < 1 or self.days < 1 or self.hours <= 0:
            raise ValueError("n_cells, days and hours must be positive")
        if self.sessions not in (None, 1, 2):
            raise ValueError("sessions must be 1, 2 or None")
        if self.ctrl_model not in ("SPMe", "SPM") or self.ctrl_mesh not in ("default", "coarse"):
            raise ValueError("ctrl_model must be SPMe or SPM, ctrl_mesh default or coarse")
        return self

    def to_json(self) -> dict:
        """Plain dict (meta.json and the config hash)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> LifeConfig:
        """Inverse of ``to_json``."""
        d = dict(d)
        specs = {"current_sensor": SensorSpec, "voltage_sensor": VoltageSensorSpec, "temp_sensor": TempSensorSpec}
        for k, c in specs.items():
            if isinstance(d.get(k), dict):
                d[k] = c(**d[k])
        return cls(**d)

    def config_hash(self) -> str:
        """Stable hash of the config and the generator version (the suite cache key)."""
        blob = json.dumps({"generator": GENERATOR, "config": self.to_json()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---------------------------------------------------------------- planning (Coulomb counting, no PyBaMM)


@dataclass
class Segment:
    """A stretch of one session: its current in C units (+ discharge) as knots relative to its start."""

    kind: str               # trip | rest | ac | dc | full
    start_s: float
    t_rel: np.ndarray
    i_c: np.ndarray
    detail: dict

    @property
    def end_s(self) -> float:
        """Life time at the segment's last knot."""
        return self.start_s + float(self.t_rel[-1])


@dataclass
class Session:
    """One awake period: the estimator restarts from its stored state at its first sample."""

    start_s: float
    park_before_s: float
    temp_c: float
    segments: list[Segment] = field(default_factory=list)

    @property
    def end_s(self) -> float:
        """Life time at the last knot of the last segment."""
        return self.segments[-1].end_s if self.segments else self.start_s


def trip_current_c(cycles: list[str], chemistry: str, temp_c: float, soc0: float) -> np.ndarray:
    """1 s current in C (+ discharge) of the reference vehicle over ``cycles``, with BMS derating.

    Road-load power -> C-rate of the 96s reference pack; derated by the temperature / SOC
    limits of bms_ai.sim.profile and a 0.2C regen cap above 90 % SOC.
    """
    chem = get_chemistry(chemistry)
    v = np.concatenate([load_cycle(c)[1] for c in cycles])
    i_c = road_power(v, None, Vehicle()) / (REF_SERIES * chem.nominal_v * REF_PACK_AH)
    chg_t, dis_t = (float(a) for a in current_limits(chem, temp_c, 0.5, 1.0))   # temperature part (SOC factors 1)
    soc, out = soc0, []
    for x in i_c.tolist():                      # the SOC part, sample by sample (plain floats: fast)
        chg = chg_t * min(max((1.0 - soc) / 0.1, 0.0), 1.0)
        if soc > 0.9:
            chg = min(chg, 0.2)
        y = min(max(x, -chg), dis_t * min(max(soc / 0.1, 0.0), 1.0))
        out.append(y)
        soc -= y / 3600.0
    return np.asarray(out)


def _charge_limit_c(chemistry: str, temp_c: float, soc: float) -> float:
    return float(current_limits(get_chemistry(chemistry), temp_c, min(soc, 0.85), 1.0)[0])


class Planner:
    """Coulomb-counting bookkeeping while sessions are appended (SOC in the nominal cell's units)."""

    def __init__(self, chemistry: str, soc0: float, rng: np.random.Generator) -> None:
        self.chemistry, self.soc, self.rng = chemistry, soc0, rng
        self.clock = 0.0
        self.sessions: list[Session] = []

    def wake(self, park_s: float, temp_c: float) -> Session:
        """Start a session after a park of ``park_s``."""
        s = Session(start_s=self.clock + park_s, park_before_s=park_s, temp_c=temp_c)
        self.sessions.append(s)
        self.clock = s.start_s
        return s

    def _append(self, kind: str, t_rel: np.ndarray, i_c: np.ndarray, detail: dict) -> Segment:
        s = self.sessions[-1]
        start = self.clock + (1.0 if s.segments else 0.0)   # 1 s linear transition between segments
        seg = Segment(kind, start, np.asarray(t_rel, float), np.asarray(i_c, float), detail)
        s.segments.append(seg)
        self.clock = seg.end_s
        self.soc -= float(np.sum(0.5 * (seg.i_c[1:] + seg.i_c[:-1]) * np.diff(seg.t_rel))) / 3600.0
        return seg

    def trip(self, cycles: list[str], floor: float = 0.2, max_s: float | None = None) -> Segment | None:
        """A trip over ``cycles``, shortened so the planned SOC stays above ``floor`` (None if < 60 s is left)."""
        temp = self.sessions[-1].temp_c
        i_c = trip_current_c(cycles, self.chemistry, temp, self.soc)
        while len(cycles) > 1 and self.soc - i_c.sum() / 3600 < floor:
            cycles = cycles[:-1]
            i_c = trip_current_c(cycles, self.chemistry, temp, self.soc)
        n = len(i_c)
        below = np.nonzero(self.soc - np.cumsum(i_c) / 3600 < floor)[0]
        if len(below):
            n = int(below[0])
        if max_s is not None:
            n = min(n, int(max_s) - 1)
        if n < 60:
            return None
        return self._append("trip", np.arange(n + 1, dtype=float), np.append(i_c[:n], 0.0), {"cycles": list(cycles)})

    def rest(self, duration_s: float) -> Segment:
        """Awake at zero current (contactors open, BMS on): the cells relax."""
        return self._append("rest", np.array([0.0, max(duration_s, 2.0)]), np.zeros(2), {})

    def charge(self, kind: str, target: float, c_rate: float, cv_s: float = 0.0, max_s: float | None = None) -> Segment:
        """CC at ``c_rate`` (temperature / SOC derated) towards ``target`` plus ``cv_s`` at the voltage limit.

        The CV part is a CC command the controller's voltage limit cuts back (the taper).
        """
        c = max(min(c_rate, _charge_limit_c(self.chemistry, self.sessions[-1].temp_c, self.soc)), 0.05)
        dur = max(target - self.soc, 0.0) / c * 3600.0 + cv_s
        if max_s is not None:
            dur = min(dur, max_s)
        dur = max(dur, 60.0)
        before = self.soc
        t = np.array([0.0, RAMP_S, dur - RAMP_S, dur])
        seg = self._append(kind, t, np.array([0.0, -c, -c, 0.0]),
                           {"c_rate": round(c, 4), "target_soc": round(target, 4), "cv_s": round(cv_s, 1)})
        self.soc = min(self.soc, max(target, before))    # the voltage limit ends the charge near the target
        return seg


def _random_cycles(rng: np.random.Generator, n_max: int = 3) -> list[str]:
    n = int(rng.integers(1, n_max + 1))
    return [str(rng.choice(URBAN if rng.random() < 0.6 else HIGHWAY)) for _ in range(n)]


def plan_life(cfg: LifeConfig, chemistry: str, rng: np.random.Generator, soc0: float,
              base_c: float) -> tuple[list[Session], np.ndarray]:
    """Sessions of a multi-day life and the daily ambient temperatures."""
    day_t = np.clip(base_c + rng.normal(0, 3, cfg.days), -10, 45)
    dc_day, full_day = int(rng.integers(0, cfg.days)), int(rng.integers(0, cfg.days))
    pl = Planner(chemistry, soc0, rng)
    park = float(rng.uniform(1, 3)) * 3600
    for day in range(cfg.days):
        if day:
            wake = day * 86400 + 7.5 * 3600 + rng.normal(0, 1800)
            park = float(np.clip(wake - pl.clock, 3600, 12 * 3600))
        t_amb = float(day_t[day])
        n_trips = int(rng.integers(2, 4))
        for k in range(n_trips):
            park = _life_trip(pl, rng, t_amb, park, long_trip=day == dc_day and k == 0)
        park = float(rng.uniform(1, 2)) * 3600
        if day == full_day:
            pl.wake(park, t_amb)
            pl.charge("full", 1.0, float(rng.uniform(0.2, 0.3)), cv_s=3600.0)
        elif pl.soc < 0.6 or rng.random() < 0.5:
            pl.wake(park, t_amb)
            pl.charge("ac", float(rng.uniform(0.7, 0.9)), float(rng.uniform(0.1, 0.3)))
    return pl.sessions, day_t


def _life_trip(pl: Planner, rng: np.random.Generator, t_amb: float, park: float, long_trip: bool) -> float:
    """One trip of a life (the long one with a DC fast charge and the drive home); returns the next park."""
    cycles = ["hwfet", "us06", "hwfet", "hwfet", "us06", "hwfet"] if long_trip else _random_cycles(rng)
    if pl.soc - trip_current_c(cycles[:1], pl.chemistry, t_amb, pl.soc).sum() / 3600 < 0.15:
        pl.wake(park, t_amb)                       # not enough charge: AC charge first
        pl.charge("ac", 0.8, float(rng.uniform(0.1, 0.3)))
        park = float(rng.uniform(1, 2)) * 3600
    pl.wake(park, t_amb)
    if pl.trip(cycles) is None:
        pl.rest(120.0)
    if long_trip:
        pl.wake(600.0 + float(rng.uniform(0, 1200)), t_amb)     # stop at a fast charger
        pl.charge("dc", 0.8, float(rng.uniform(1.0, 2.0)), cv_s=900.0)
        pl.wake(300.0, t_amb)
        if pl.trip(["hwfet", "hwfet", "udds"]) is None:
            pl.rest(120.0)
    return float(rng.uniform(1, 9)) * 3600


def plan_drive(cfg: LifeConfig, chemistry: str, rng: np.random.Generator, soc0: float,
               ambient_c: float) -> tuple[list[Session], np.ndarray]:
    """Sessions of a 1-2 h drive: trips, awake rests, one planned charge; one or two sessions."""
    n = cfg.sessions or int(rng.integers(1, 3))
    total = cfg.hours * 3600.0
    first = float(rng.uniform(0.35, 0.65)) if n == 2 else 1.0
    budgets = [total * first, total * (1 - first)][:n]
    charge_in = int(rng.integers(0, n))
    charge = str(rng.choice(CHARGES, p=[0.35, 0.35, 0.3]))
    pl = Planner(chemistry, soc0, rng)
    for k, budget in enumerate(budgets):
        pl.wake(60.0 if k == 0 else float(rng.uniform(600, 7200)), ambient_c)
        _fill_session(pl, budget, charge if k == charge_in else None)
    return pl.sessions, np.array([ambient_c])


def _next_kind(pl: Planner, last: str | None, charge: str | None) -> str:
    if pl.soc < 0.2:
        return charge or "ac"
    if charge and (pl.soc < 0.35 or (pl.soc < 0.85 and pl.rng.random() < 0.4)):
        return charge
    if last not in (None, "rest") and pl.rng.random() < 0.35:
        return "rest"
    return "trip"


def _fill_session(pl: Planner, budget_s: float, charge: str | None) -> None:
    end = pl.clock + budget_s
    last: str | None = None
    while end - pl.clock > 120.0:
        left = end - pl.clock
        kind = _next_kind(pl, last, charge)
        if kind == "trip" and pl.trip(_random_cycles(pl.rng, 2), floor=0.12, max_s=left) is None:
            kind = "rest"
            pl.rest(min(float(pl.rng.uniform(300, 3600)), left))
        elif kind == "rest":
            pl.rest(min(float(pl.rng.uniform(300, 3600)), max(0.5 * left, 300.0), left))
        elif kind in CHARGES:
            _drive_charge(pl, kind, left)
            charge = None if kind == charge else charge
        last = kind


def _drive_charge(pl: Planner, kind: str, left: float) -> None:
    """The drive's charge; it takes at most 65 % of the time left (all of it in the last 20 min), so trips remain."""
    rng = pl.rng
    max_s = left if left < 1200.0 else 0.65 * left
    if kind == "dc" and pl.soc < 0.75:
        pl.charge("dc", 0.8, float(rng.uniform(1.0, 2.0)), cv_s=float(rng.uniform(300, 900)), max_s=max_s)
    elif kind in ("dc", "full"):      # CC-CV to full, fast enough to reach CV inside the drive where allowed
        need = (1.0 - pl.soc) / max(0.45 * left / 3600.0, 0.1)
        c = min(max(float(rng.uniform(0.3, 1.0)), need), 2.0)
        pl.charge("full", 1.0, c, cv_s=float(rng.uniform(600, 1500)), max_s=max_s)
    else:
        c = float(rng.uniform(0.1, 0.3))
        dur = min(float(rng.uniform(900, 2400)), max_s)
        pl.charge("ac", min(pl.soc + c * dur / 3600.0, 0.95), c, max_s=dur)


# ---------------------------------------------------------------- command, samples, stop points


def command_knots(sessions: list[Session], cap: float, leak_a: float) -> tuple[np.ndarray, np.ndarray]:
    """Current command (A, PyBaMM sign: + discharge) as piecewise-linear knots; ``leak_a`` while parked."""
    tt, ii = [np.array([0.0])], [np.array([leak_a])]
    for s in sessions:
        tt.append(np.array([s.start_s - 1.0]))
        ii.append(np.array([leak_a]))
        for seg in s.segments:
            tt.append(seg.start_s + seg.t_rel)
            ii.append(seg.i_c * cap)
        tt.append(np.array([s.end_s + 1.0]))
        ii.append(np.array([leak_a]))
    tt.append(np.array([sessions[-1].end_s + 3600.0]))
    ii.append(np.array([leak_a]))
    return np.concatenate(tt), np.concatenate(ii)


def sample_times(sessions: list[Session]) -> list[np.ndarray]:
    """10 Hz samples of each session from its first knot over whole seconds (every 10th is a 1 s knot)."""
    return [s.start_s + DT * np.arange(10 * int(math.floor(s.end_s - s.start_s)) + 1) for s in sessions]


def stop_points(sessions: list[Session], t_end: float) -> np.ndarray:
    """t_eval for IDAKLU: the solver restarts at every wake-up, sleep and segment boundary.

    The current is only an interpolant of t: without these stops IDA can take one step
    over a whole trip after a long park (or a long rest) and never see it.
    """
    pts = [0.0, t_end]
    for s in sessions:
        pts += [s.start_s - 1.0, s.end_s + 1.0]
        for seg in s.segments:
            a, b = seg.start_s, seg.end_s
            pts += [a, a + 1.0, b - 1.0, b]
            if seg.kind in CHARGES:
                pts += [a + RAMP_S, b - RAMP_S]
    return np.array(sorted({float(x) for x in pts if 0.0 <= x <= t_end}))


def pick_controller(sessions: list[Session], t_cmd: np.ndarray, i_cmd: np.ndarray, soc0: np.ndarray,
                    caps: np.ndarray) -> int:
    """The cell a BMS would limit on: the one with the fewest Ah to full when the plan charges to the voltage
    limit (or regenerates above 90 % SOC), else the one with the fewest Ah to empty.

    Predicted by Coulomb counting of the command with each cell's own start SOC and capacity (at the
    start of the CV charges: their CC command overshoots full on purpose, the voltage limit cuts it).
    """
    q_ah = np.concatenate([[0.0], np.cumsum(0.5 * (i_cmd[1:] + i_cmd[:-1]) * np.diff(t_cmd))]) / 3600.0
    soc = soc0[None, :] - q_ah[:, None] / caps[None, :]
    cv_starts = [seg.start_s for s in sessions for seg in s.segments if seg.kind in ("dc", "full")]
    if cv_starts:
        soc = soc[np.searchsorted(t_cmd, cv_starts)]
    if cv_starts or soc.max() > 0.9:
        return int(np.argmin(((1.0 - soc) * caps[None, :]).min(axis=0)))
    return int(np.argmin((soc * caps[None, :]).min(axis=0)))


# ---------------------------------------------------------------- PyBaMM solves


def _at(sol, name: str, times: np.ndarray) -> np.ndarray:
    """Variable at output times (the solution holds t_interp plus the t_eval stop points)."""
    t = sol.t
    idx = np.clip(np.searchsorted(t, times - 1e-9), 0, len(t) - 1)
    if np.max(np.abs(t[idx] - times)) > 1e-6:
        raise RuntimeError("requested times are not solution output times")
    return np.asarray(sol[name].entries)[idx]


def run_controller(base: str, p, limits: tuple[float, float], t_cmd: np.ndarray, i_cmd: np.ndarray, t_out: np.ndarray,
                   soc0: float, stops: np.ndarray, extra: dict, rtol: float, model: str = "SPMe",
                   var_pts: dict | None = None) -> dict:
    """One cell on the command with the charger / BMS voltage limits (v_min, v_max) as a residual on the current.

    I = I_cmd while V_min < V < V_max, else the current is cut back so V sits on the limit
    (smooth min / max, 200 A/V: ~1 mV at the limit). Returns "Current [A]" and
    "Voltage [V]" at ``t_out``.
    """
    import pybamm

    v_min, v_max = limits

    def residual(var):
        i_c = pybamm.FunctionParameter("Current command [A]", {"Time [s]": pybamm.t})
        cur, volt = var["Current [A]"], var["Voltage [V]"]
        return pybamm.smooth_max(pybamm.smooth_min(cur - i_c, 200.0 * (v_max - volt), 5.0), 200.0 * (v_min - volt), 5.0)

    q = p.copy()
    q.update({"Current command [A]": pybamm.Interpolant(t_cmd, i_cmd, pybamm.t, interpolator="linear"),
              "Lower voltage cut-off [V]": v_min - 0.3, "Upper voltage cut-off [V]": v_max + 0.3, **extra},
             check_already_exists=False)
    names = ["Current [A]", "Voltage [V]"]
    sim = build_sim(base, q, model=model, rtol=rtol, atol=rtol / 100, output_variables=names,
                    extra_options={"operating mode": residual}, var_pts=var_pts)
    t_end = float(stops[-1])
    sol = sim.solve(stops, t_interp=np.concatenate([[0.0], t_out, [t_end]]), initial_soc=soc0)
    if sol.t[-1] < t_end - 1e-6:
        raise RuntimeError(f"controller stopped at {sol.t[-1]:.0f} s: {sol.termination}")
    return {n: _at(sol, n, t_out) for n in names}


def _control(cfg: LifeConfig, cc: _Cell, t_cmd, i_cmd, samp_t, stops, amb, say) -> tuple[dict, bool]:
    """The controller solve with the configured settings; once more with the default mesh if it fails.

    The limits apply to the voltage a BMS measures: with hysteresis (saturated at +-gap/2 at the
    end of a charge / discharge) the cell's PyBaMM voltage stops gap/2 inside the window.
    """
    half_gap = cc.spec.hyst_mv / 2000.0
    limits = (cc.info["v_min"] + half_gap, cc.info["v_max"] - half_gap)
    mesh = COARSE_MESH if cfg.ctrl_mesh == "coarse" else None
    try:
        return run_controller(cc.spec.base, cc.p, limits, t_cmd, i_cmd, samp_t, cc.soc0, stops, amb, cfg.ctrl_rtol,
                              cfg.ctrl_model, mesh), False
    except Exception as exc:  # noqa: BLE001 - solver failures have many types; the retry is the answer to all
        say(f"controller failed ({type(exc).__name__}: {str(exc)[:80]}); retrying with the default mesh")
    return run_controller(cc.spec.base, cc.p, limits, t_cmd, i_cmd, samp_t, cc.soc0, stops, amb, cfg.ctrl_rtol,
                          "SPMe"), True


def solve_cell(base: str, p, info: dict, tt: np.ndarray, ii: np.ndarray, t_out: np.ndarray, soc0: float,
               stops: np.ndarray, extra: dict, rtol: float) -> dict:
    """One cell over the whole run on the applied current knots: stoichiometry, voltage, temperature at ``t_out``."""
    import pybamm

    q = p.copy()
    q.update({"Lower voltage cut-off [V]": info["v_min"] - 0.5, "Upper voltage cut-off [V]": info["v_max"] + 0.5,
              "Current function [A]": pybamm.Interpolant(tt, ii, pybamm.t, interpolator="linear"), **extra},
             check_already_exists=False)
    sim = build_sim(base, q, rtol=rtol, atol=rtol / 100, output_variables=OUT_VARS)
    t_end = float(stops[-1])
    sol = sim.solve(stops, t_interp=np.concatenate([[0.0], t_out, [t_end]]), initial_soc=soc0)
    if sol.t[-1] < t_end - 1.0:
        raise RuntimeError(f"cell solve stopped at {sol.t[-1]:.0f} s: {sol.termination}")
    return {"y": _at(sol, OUT_VARS[1], t_out), "v": _at(sol, OUT_VARS[0], t_out).copy(),
            "temp_c": _at(sol, OUT_VARS[2], t_out) - 273.15}


# ---------------------------------------------------------------- sensors and hysteresis


def hysteresis(t: np.ndarray, i_chg: np.ndarray, cap_ah: float, gap_v: float, h0: float = 0.0,
               kappa: float = 25.0) -> np.ndarray:
    """One-state OCV hysteresis (the pack simulator's model) added to the voltage.

    dh/dt = kappa |I| / (3600 C) (sign(I) gap/2 - h), I + = charging; frozen across parks
    (sample gaps > 1 s) and at zero current.
    """
    out = np.empty(len(t))
    dt = np.diff(t, prepend=t[0])
    x = h0
    k = kappa / (3600.0 * cap_ah)
    for j, (i, d) in enumerate(zip(i_chg.tolist(), dt.tolist())):
        if i != 0.0 and d <= 1.0:
            a = math.exp(-k * abs(i) * d)
            x = math.copysign(gap_v / 2, i) * (1 - a) + x * a
        out[j] = x
    return out


def current_sensor(i_true: np.ndarray, temp_c: np.ndarray, session: np.ndarray, cap_ah: float, spec: SensorSpec,
                   rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Measured current: gain x true + offset (25 degC value + tempco x (T - 25) + per-session drift) + noise, LSB."""
    k = cap_ah / REF_PACK_AH
    off0 = spec.offset_a * k * rng.standard_normal()
    tc = spec.tc_a_per_k * k * rng.standard_normal()
    gain = 1.0 + float(rng.uniform(-spec.gain, spec.gain))
    drift = np.cumsum(spec.drift_a * k * rng.standard_normal(int(session.max()) + 1))
    offset = off0 + tc * (temp_c - 25.0) + drift[session]
    meas = i_true * gain + offset + spec.noise_a * k * rng.standard_normal(len(i_true))
    lsb = spec.lsb_a * k
    meas = np.round(meas / lsb) * lsb
    return meas, {"offset_a": off0, "tc_a_per_k": tc, "gain": gain, "session_drift_a": drift.tolist(),
                  "noise_a": spec.noise_a * k, "lsb_a": lsb}


def voltage_sensor(v: np.ndarray, spec: VoltageSensorSpec, rng: np.random.Generator) -> tuple[np.ndarray, list]:
    """Measured cell voltages (T, n): fixed channel offset + noise, quantised."""
    off = spec.offset_v * rng.standard_normal(v.shape[1])
    meas = v + off[None, :] + spec.noise_v * rng.standard_normal(v.shape)
    return np.round(meas / spec.lsb_v) * spec.lsb_v, off.tolist()


def temperature_sensor(temp: np.ndarray, spec: TempSensorSpec, rng: np.random.Generator) -> np.ndarray:
    """Measured cell temperatures (T, n): noise, quantised to the LSB."""
    return np.round((temp + spec.noise_c * rng.standard_normal(temp.shape)) / spec.lsb_c) * spec.lsb_c


# ---------------------------------------------------------------- the whole run


@dataclass
class _Cell:
    spec: object
    p: object
    info: dict
    soc0: float
    leak_a: float
    h0: float


def _draw_cells(cfg: LifeConfig, rng: np.random.Generator, soc0: float) -> list[_Cell]:
    soh = tuple(cfg.soh) if isinstance(cfg.soh, (list, tuple)) else cfg.soh
    cells = []
    for j in range(cfg.n_cells):
        cs = draw_variant_cell(cfg.variant, cfg.seed * 100 + j, soh=soh, spread=cfg.spread)
        if cfg.hyst_mv is not None:
            cs.hyst_mv = cfg.hyst_mv
        p, info = make_cell(cs)
        leak = cfg.leak_ma_per_50ah * 1e-3 * info["capacity_ah"] / REF_PACK_AH
        cells.append(_Cell(cs, p, info, float(np.clip(soc0 + cfg.soc0_sigma * rng.standard_normal(), 0.03, 0.98)),
                           leak * float(np.exp(cfg.leak_sigma_ln * rng.standard_normal() - cfg.leak_sigma_ln ** 2 / 2)),
                           float(rng.uniform(-0.5, 0.5)) * cs.hyst_mv / 1000.0))
    return cells


def _ambient(cfg: LifeConfig, day_t: np.ndarray, t_end: float) -> tuple[dict, object]:
    """PyBaMM ambient entries and a function of time (degC): constant for drives, daily + diurnal for lives."""
    import pybamm

    if cfg.mode == "drive":
        t0 = float(day_t[0])
        return {"Ambient temperature [K]": t0 + 273.15, "Initial temperature [K]": t0 + 273.15}, lambda t: np.full_like(t, t0)
    ta_t = np.arange(0.0, t_end + 900.0, 900.0)
    day = np.minimum((ta_t // 86400).astype(int), len(day_t) - 1)
    ta = day_t[day] + 4.0 * np.sin(2 * np.pi * ((ta_t % 86400) / 86400 - 9 / 24))   # +-4 K, warmest at 15:00
    return ({"Ambient temperature [K]": pybamm.Interpolant(ta_t, ta + 273.15, pybamm.t, interpolator="linear"),
             "Initial temperature [K]": float(ta[0] + 273.15)}, lambda t: np.interp(t, ta_t, ta))


def _follower_knots(windows: list[np.ndarray], i_ctrl: np.ndarray, leak_a: float, t_end: float):
    """Applied current knots of one cell: the realised series current at 1 s while awake, its leak while parked."""
    tt, ii, k = [np.array([0.0])], [np.array([leak_a])], 0
    for ts in windows:
        g, ig = ts[::10], i_ctrl[k:k + len(ts)][::10]
        k += len(ts)
        tt += [np.array([g[0] - 1.0]), g, np.array([g[-1] + 1.0])]
        ii += [np.array([leak_a]), ig, np.array([leak_a])]
    tt.append(np.array([t_end + 10.0]))
    ii.append(np.array([leak_a]))
    return np.concatenate(tt), np.concatenate(ii)


def _truth(c: _Cell, res: dict, tt: np.ndarray, ii: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, float]:
    """Truth SOC from the particles, and its largest difference to Coulomb counting of the applied knots."""
    win = c.info["window"]
    soc = (win["y0"] - res["y"]) / (win["y0"] - win["y100"])
    q_ah = np.concatenate([[0.0], np.cumsum(0.5 * (ii[1:] + ii[:-1]) * np.diff(tt))]) / 3600.0
    soc_cc = c.soc0 - np.interp(t, tt, q_ah) / c.info["capacity_ah"]
    return soc, float(np.max(np.abs(soc - soc_cc)))


def simulate(cfg: LifeConfig, name: str = "", classes: tuple[str, ...] = (), plan=None, log=None) -> RecordedDrive:
    """Run one life or drive; returns the RecordedDrive v2 with truth, sensors and full meta.

    ``plan`` = (sessions, day ambients) replaces the planner (tests, hand-made cases).
    """
    cfg.validate()
    say = log or (lambda msg: None)
    t_wall, t_cpu = time.perf_counter(), time.process_time()
    var = get_variant(cfg.variant)
    rng_cells, rng_plan, rng_sens = (np.random.default_rng([cfg.seed, 2024, k]) for k in range(3))
    lo, hi = (0.5, 0.9) if cfg.mode == "life" else (0.1, 0.95)
    soc0 = float(rng_plan.uniform(lo, hi)) if cfg.soc0 is None else cfg.soc0
    base_c = float(rng_plan.uniform(-10, 45)) if cfg.ambient_c is None else cfg.ambient_c
    cells = _draw_cells(cfg, rng_cells, soc0)
    cap_nom = float(np.mean([c.info["capacity_ah"] for c in cells]))
    if plan is None:
        planner = plan_life if cfg.mode == "life" else plan_drive
        plan = planner(cfg, var.chemistry, rng_plan, soc0, base_c)
    sessions, day_t = plan
    t_setup = time.perf_counter() - t_wall

    # controller: the realised series current
    windows = sample_times(sessions)
    samp_t = np.concatenate(windows)
    t_end = float(samp_t[-1]) + 2.0
    stops = stop_points(sessions, t_end)
    amb, amb_at = _ambient(cfg, day_t, t_end)
    t_cmd, i_cmd = command_knots(sessions, cap_nom, 0.0)
    j_ctrl = pick_controller(sessions, t_cmd, i_cmd, np.array([c.soc0 for c in cells]),
                             np.array([c.info["capacity_ah"] for c in cells]))
    cc = cells[j_ctrl]
    t_cmd, i_cmd = command_knots(sessions, cap_nom, cc.leak_a)
    t0 = time.perf_counter()
    ctrl, fallback = _control(cfg, cc, t_cmd, i_cmd, samp_t, stops, amb, say)
    t_ctrl = time.perf_counter() - t0
    i_ctrl = ctrl["Current [A]"]
    limited = float(np.mean(np.abs(i_ctrl - np.interp(samp_t, t_cmd, i_cmd)) > 0.01 * cap_nom))
    say(f"controller (cell {j_ctrl}, {cfg.ctrl_model}) {t_ctrl:.1f} s for {len(samp_t) * DT / 3600:.2f} awake h; "
        f"voltage-limited {100 * limited:.1f} % of samples")

    # every cell on the realised current (+ its own leak while parked)
    per_cell = []
    t_cells = time.perf_counter()
    for j, c in enumerate(cells):
        t1 = time.perf_counter()
        tt, ii = _follower_knots(windows, i_ctrl, c.leak_a, t_end)
        res = solve_cell(c.spec.base, c.p, c.info, tt, ii, samp_t, c.soc0, stops, amb, cfg.cell_rtol)
        soc, err = _truth(c, res, tt, ii, samp_t)
        if err > TRUTH_TOL:
            raise RuntimeError(f"cell {j}: truth SOC differs from Coulomb counting by {100 * err:.3f} % (> 0.1 %)")
        i_chg = -np.interp(samp_t, tt, ii)
        h = hysteresis(samp_t, i_chg, c.info["capacity_ah"], c.spec.hyst_mv / 1000.0, c.h0) if c.spec.hyst_mv else 0.0
        per_cell.append({"soc": soc, "v": res["v"] + h, "temp_c": res["temp_c"], "err": err,
                         "solve_s": time.perf_counter() - t1})
        say(f"cell {j}: solve {per_cell[-1]['solve_s']:.1f} s, truth vs Coulomb counting {100 * err:.4f} %")
    t_cells = time.perf_counter() - t_cells

    i_true = -np.interp(samp_t, *_follower_knots(windows, i_ctrl, 0.0, t_end))
    session = np.concatenate([np.full(len(w), k, np.int32) for k, w in enumerate(windows)])
    timing = {"wall_s": time.perf_counter() - t_wall, "cpu_s": time.process_time() - t_cpu, "setup_s": t_setup, "controller_s": t_ctrl, "cells_s": t_cells,
              "simulated_days": t_end / 86400, "awake_h": len(samp_t) * DT / 3600, "n_samples": int(len(samp_t))}
    return _assemble(cfg, var, name, classes, cells, per_cell, sessions, windows, day_t, amb_at, samp_t, session,
                     i_true, ctrl, j_ctrl, limited, rng_sens, timing | {"controller_fallback": fallback})


def _ocv_fields(cells: list[_Cell]) -> tuple[np.ndarray, np.ndarray, dict]:
    """Mean true OCV curve of the string's cells and how far the cells spread around it."""
    curves = []
    soc = np.zeros(0)
    for c in cells:
        soc, o, _ = true_ocv(c.spec, (c.p, c.info))
        curves.append(o)
    arr = np.array(curves)
    mean = arr.mean(axis=0)
    mid = (soc >= 0.05) & (soc <= 0.95)
    spread = {"ocv_cell_spread_mv": round(1000 * float(np.max(np.ptp(arr[:, mid], axis=0))), 2),
              "ocv_cell_max_dev_mv": [round(1000 * float(np.max(np.abs(o - mean)[mid])), 2) for o in arr],
              "ocv_hysteresis_gap_v": [c.spec.hyst_mv / 1000.0 for c in cells]}
    return soc, mean, spread


def _session_rows(sessions: list[Session], windows: list[np.ndarray], ctrl: dict, v_max: float, cap: float) -> list[dict]:
    rows, k = [], 0
    for n, (s, ts) in enumerate(zip(sessions, windows)):
        segs = []
        for seg in s.segments:
            a, b = np.searchsorted(ts, [seg.start_s - 1e-6, seg.end_s + 1e-6])
            row = {"kind": seg.kind, "start_s": round(seg.start_s, 1), "end_s": round(seg.end_s, 1), **seg.detail}
            if seg.kind in CHARGES and b > a:
                row["cv_reached"] = bool(np.any(ctrl["Voltage [V]"][k + a:k + b] > v_max - 2e-3))
                row["end_current_c"] = round(float(-ctrl["Current [A]"][k + max(b - 20, a)] / cap), 4)
            segs.append(row)
        rows.append({"session": n, "start_s": round(float(ts[0]), 1), "end_s": round(float(ts[-1]), 1),
                     "park_before_s": round(s.park_before_s, 1), "ambient_c": round(s.temp_c, 2), "segments": segs})
        k += len(ts)
    return rows


def _assemble(cfg, var, name, classes, cells, per_cell, sessions, windows, day_t, amb_at, samp_t, session, i_true,
              ctrl, j_ctrl, limited, rng, timing) -> RecordedDrive:
    soc = np.column_stack([pc["soc"] for pc in per_cell])
    v = np.column_stack([pc["v"] for pc in per_cell])
    temp = np.column_stack([pc["temp_c"] for pc in per_cell])
    caps = np.array([c.info["capacity_ah"] for c in cells])
    i_meas, cur = current_sensor(i_true, temp.mean(axis=1), session, var.nominal_ah, cfg.current_sensor, rng)
    v_meas, v_off = voltage_sensor(v, cfg.voltage_sensor, rng)
    t_meas = temperature_sensor(temp, cfg.temp_sensor, rng)
    ocv_soc, ocv_v, ocv_meta = _ocv_fields(cells)
    fallback = timing.pop("controller_fallback", False)
    wall = timing["wall_s"]
    timing.update(wall_s_per_vehicle_day=wall / timing["simulated_days"], wall_s_per_awake_h=wall / timing["awake_h"],
                  cpu_s_per_vehicle_day=timing["cpu_s"] / timing["simulated_days"])
    meta = {
        "chemistry": var.chemistry, "cell_set": var.name, "held_out": var.held_out, "classes": list(classes),
        "mode": cfg.mode, "ambient_c": round(float(np.mean(amb_at(samp_t))), 2),
        "day_ambient_c": [round(float(x), 2) for x in day_t],
        "soh": float(caps.mean() / var.nominal_ah), "soh_cells": (caps / var.nominal_ah).tolist(),
        "current_offset_a": cur["offset_a"], "current_gain": cur["gain"], "current_sensor": cur,
        "voltage_offset_v": v_off, "soc_stored": [float(x) for x in soc[0]],
        "source": f"{GENERATOR}: PyBaMM SPMe + lumped thermal per cell, variant {var.name}",
        "seed": cfg.seed, "config": cfg.to_json(), "config_hash": cfg.config_hash(),
        "cells": [{"spec": c.spec.to_json(), "soc0": c.soc0, "leak_a": c.leak_a, "hyst_h0_v": c.h0,
                   **{k: (round(x, 8) if isinstance(x, float) else x) for k, x in c.info.items()}} for c in cells],
        "controller": {"cell": j_ctrl, "model": cfg.ctrl_model, "mesh": cfg.ctrl_mesh, "fallback": fallback,
                       "voltage_limited_share": round(limited, 4)},
        "sessions": _session_rows(sessions, windows, ctrl, cells[j_ctrl].info["v_max"] - cells[j_ctrl].spec.hyst_mv / 2000,
                                  float(caps.mean())),
        "checks": {f"c{j}": {"max_abs_soc_vs_cc_pct": round(100 * pc["err"], 5), "soc_min": round(float(pc["soc"].min()), 4),
                             "soc_max": round(float(pc["soc"].max()), 4), "v_min": round(float(pc["v"].min()), 4),
                             "v_max": round(float(pc["v"].max()), 4), "t_max_c": round(float(pc["temp_c"].max()), 2),
                             "solve_s": round(pc["solve_s"], 2)} for j, pc in enumerate(per_cell)},
        "timing": {k: (round(x, 3) if isinstance(x, float) else x) for k, x in timing.items()},
        **ocv_meta,
    }
    return RecordedDrive(name=name or f"{cfg.mode}_{var.name}_{cfg.seed}", chemistry=var.chemistry,
                         capacity_ah=var.nominal_ah, t=samp_t, current=i_meas, cell_v=v_meas, cell_t=t_meas, soc=soc,
                         meta=meta, session=session, cell_capacity_ah=caps, ocv_soc=ocv_soc, ocv_v=ocv_v,
                         current_true=i_true)
