"""Scenario -> pack current profile (1 s steps): road load for driving, CC-CV
for charging, zero for rests and parking.

Power demand becomes current through a planning equivalent circuit (PyBaMM
OCV table + a DC resistance guess); the physics solve then runs on that
current, so the realised pack power differs from the demand only by the
planning model's voltage error (a few %), as in a real car whose inverter
regulates torque, not battery power.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bms_ai.chemistry.pybamm_cell import cell_capacity_ah, ocv
from bms_ai.chemistry.registry import Chemistry
from bms_ai.sim.scenario import Phase, Scenario

DATA = Path(__file__).resolve().parent / "data"
CYCLES = ("udds", "hwfet", "us06", "wltc_3b")
N_SERIES = 96
G = 9.81
RHO_AIR = 1.2

MODE_PARK, MODE_REST, MODE_DRIVE, MODE_CHARGE = 0, 1, 3, 4  # == BmsState where it applies


@functools.cache
def load_cycle(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(time s, speed m/s) of a vendored standard schedule."""
    if name not in CYCLES:
        raise ValueError(f"unknown drive cycle {name!r}; choose from {CYCLES}")
    arr = np.genfromtxt(DATA / "cycles" / f"{name}.csv", delimiter=",", skip_header=1, usecols=(0, 1))
    return arr[:, 0].astype(float), arr[:, 1].astype(float)


def arrhenius(temp_c: float | np.ndarray, ea_over_r: float = 3500.0) -> float | np.ndarray:
    """Resistance multiplier vs 25 degC (planning and limits only)."""
    return np.exp(ea_over_r * (1.0 / (np.asarray(temp_c) + 273.15) - 1.0 / 298.15))


def current_limits(chem: Chemistry, temp_c: float | np.ndarray, soc: float | np.ndarray, capacity_ah: float):
    """(max charge A, max discharge A) of the pack: temperature and SOC derating (state of function)."""
    t = np.asarray(temp_c, dtype=float)
    s = np.asarray(soc, dtype=float)
    dis_c = np.interp(t, [-30, -20, 0, 10, 45, 55, 60], [0.3, 1.0, 2.5, 4.0, 4.0, 1.0, 0.0])
    chg_c = np.interp(t, [-20, 0, 10, 25, 45, 55], [0.05, 0.3, 1.0, 2.0, 2.0, 0.0])
    dis_c = dis_c * np.clip(s / 0.1, 0.0, 1.0)
    chg_c = chg_c * np.clip((1.0 - s) / 0.1, 0.0, 1.0)
    return chg_c * capacity_ah, dis_c * capacity_ah


@dataclass
class Profile:
    """The planned pack current at 1 s steps, with mode, speed and charger state."""

    t: np.ndarray            # s, 1 s steps
    current: np.ndarray      # pack current A, + = charging
    mode: np.ndarray         # MODE_*
    speed: np.ndarray        # m/s
    charger_state: np.ndarray  # 0 none, 1 CC, 2 CV, 3 complete
    soc_plan: np.ndarray     # planning-model SOC


def road_power(v: np.ndarray, grade: np.ndarray | None, veh) -> np.ndarray:
    """Battery power demand [W] (+ = discharge) from a speed trace at 1 s."""
    a = np.gradient(v)
    grade = np.zeros_like(v) if grade is None else grade
    f = veh.mass_kg * a + 0.5 * RHO_AIR * veh.cda_m2 * v ** 2 + veh.crr * veh.mass_kg * G * (v > 0.05) + veh.mass_kg * G * grade
    p_wheel = f * v
    p = np.where(p_wheel >= 0, p_wheel / veh.drivetrain_eff, p_wheel * veh.regen_eff)
    return p + veh.aux_w


def planning_resistance(sc: Scenario, chem: Chemistry) -> float:
    """DC resistance guess of one cell group [ohm] used to turn power into current."""
    return chem.r_guess_ohm / chem.n_parallel * arrhenius(sc.ambient_c) * (1.0 + 2.5 * (1.0 - sc.soh))


def build_profile(sc: Scenario, chem: Chemistry, r_scale: float = 1.0) -> Profile:
    """``r_scale`` corrects the planning resistance after a physics solve showed it too low."""
    cap = cell_capacity_ah(chem.name) * chem.n_parallel * sc.soh
    r_group = planning_resistance(sc, chem) * r_scale
    soc = sc.soc0
    out_i: list[float] = []
    out_mode: list[int] = []
    out_v: list[float] = []
    out_cs: list[int] = []
    out_soc: list[float] = []

    def step(i: float, mode: int, v: float = 0.0, cs: int = 0) -> None:
        nonlocal soc
        out_i.append(i)
        out_mode.append(mode)
        out_v.append(v)
        out_cs.append(cs)
        out_soc.append(soc)
        soc += i / (3600.0 * cap)

    for seg in sc.segments:
        if seg.kind == "drive":
            _drive(seg, sc, chem, cap, r_group, step, lambda: soc)
        elif seg.kind in ("rest", "park"):
            for _ in range(int(round(seg.duration_s))):
                step(0.0, MODE_REST if seg.kind == "rest" else MODE_PARK)
        elif seg.kind == "charge":
            _charge(seg, chem, cap, r_group, step, lambda: soc)
        elif seg.kind == "discharge":
            _discharge(seg, chem, cap, r_group, step, lambda: soc)
    if len(out_i) < 2:
        raise ValueError(f"scenario {sc.name!r} produces an empty profile")
    n = len(out_i)
    return Profile(np.arange(n, dtype=float), np.asarray(out_i), np.asarray(out_mode, dtype=np.int8),
                   np.asarray(out_v), np.asarray(out_cs, dtype=np.int8), np.asarray(out_soc))


def _drive(seg: Phase, sc: Scenario, chem: Chemistry, cap: float, r_group: float, step, get_soc) -> None:
    t, v = load_cycle(seg.cycle)
    reps = max(seg.repeats, 0.0)
    n = int(round(len(t) * reps))
    idx = np.arange(n) % len(t)
    speed = v[idx]
    power = road_power(speed, None, sc.vehicle)
    for k in range(n):
        soc = get_soc()
        u = float(ocv(chem.name, np.array([soc]))[0]) * N_SERIES
        r = r_group * N_SERIES
        p = float(power[k])
        # P = (U - I R) I with I = discharge current: smaller root of R I^2 - U I + P = 0
        disc = u * u - 4.0 * r * p
        i_dis = (u - np.sqrt(max(disc, 0.0))) / (2.0 * r)
        chg_max, dis_max = current_limits(chem, sc.ambient_c, soc, cap)
        # voltage limits too: the BMS derates power so cells stay inside v_min..v_max
        u_cell = u / N_SERIES
        dis_max = min(dis_max, max((u_cell - chem.v_min) / r_group, 0.0))
        chg_max = min(chg_max, max((chem.v_max - u_cell) / r_group, 0.0))
        i_dis = float(np.clip(i_dis, -chg_max, dis_max))
        step(-i_dis, MODE_DRIVE, float(speed[k]))


def _charge(seg: Phase, chem: Chemistry, cap: float, r_group: float, step, get_soc) -> None:
    i_cc = seg.c_rate * cap
    limit = int(round(seg.duration_s)) if seg.duration_s > 0 else 10 ** 7
    cv = False
    for _ in range(limit):
        soc = get_soc()
        if soc >= seg.soc_target:
            break
        u = float(ocv(chem.name, np.array([soc]))[0])
        i = i_cc
        if u + i * r_group >= chem.v_max - 0.01:
            cv = True
        if cv:
            i = min(i_cc, max((chem.v_max - 0.01 - u) / r_group, 0.0))
            if i < cap / 20.0:
                break
        step(i, MODE_CHARGE, 0.0, 2 if cv else 1)
    for _ in range(5):  # charger reports complete briefly before the segment ends
        step(0.0, MODE_CHARGE, 0.0, 3)


def _discharge(seg: Phase, chem: Chemistry, cap: float, r_group: float, step, get_soc) -> None:
    """Constant-current discharge (lab-style capacity / OCV-branch tests) to the SOC target or v_min."""
    limit = int(round(seg.duration_s)) if seg.duration_s > 0 else 10 ** 7
    i = seg.c_rate * cap
    for _ in range(limit):
        soc = get_soc()
        if soc <= seg.soc_target or float(ocv(chem.name, np.array([soc]))[0]) - i * r_group <= chem.v_min:
            break
        step(-i, MODE_DRIVE)
