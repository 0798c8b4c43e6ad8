"""Simulator: *how* a scenario becomes per-cell truth.

One PyBaMM SPMe + lumped-thermal solve of the nominal cell (at the scenario's
SOH and ambient) on the pack current profile, then a per-cell layer for the 96
series groups (see docs/sim.md, "Per-cell approximation"):

  soc_i   Coulomb counting of the series current minus leak currents
          (self-discharge, internal short, plated lithium), exact per cell
  v_i     OCV(soc_i) + rho_i * eta_nom(t) + h_i(t)
          eta_nom = V_pybamm - OCV(soc_nom): the nominal cell's total
          overpotential, scaled by the cell's resistance factor rho_i;
          h_i one-state OCV hysteresis (LFP)
  T_i     T_amb + (T_nom - T_amb) * rho_i * k_i + dT_i, dT_i from extra heat
          (short, thermal fault) through the cell group's thermal RC
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry.pybamm_cell import anode_ocp, base_parameters, cell_capacity_ah, ocv
from bms_ai.chemistry.registry import Chemistry, get_chemistry
from bms_ai.sim.profile import N_SERIES, Profile, build_profile, current_limits
from bms_ai.sim.scenario import Scenario

DT = 0.1          # truth step [s] (10 Hz)
N_TEMP = 32
PLATING_IRREVERSIBLE = 0.3  # share of plated lithium counted as capacity loss (stripping not modelled)
MAX_REPLANS = 2            # re-plans of the current profile when cells leave their voltage window
PLATING_MAX_SHARE = 0.1     # max share of the charge current going to plating
PLATING_LABEL_SHARE = 1e-4  # label once a cell has plated this share of its capacity (ignores µAh regen blips)
CELL_FAULTS = ("isc", "self_discharge", "thermal")
SENSOR_FAULTS = ("sensor_stuck", "sensor_drift", "open_wire")


@dataclass
class SimulatedDrive:
    """Simulated drive: truth at 10 Hz plus what the CAN encoder needs."""

    scenario: Scenario
    seed: int
    chemistry: Chemistry
    t: np.ndarray                 # (N,) s
    current: np.ndarray           # (N,) pack current A, + = charging
    mode: np.ndarray              # (N,) 0 park, 1 rest, 3 drive, 4 charge
    charger_state: np.ndarray     # (N,)
    speed: np.ndarray             # (N,) m/s
    soc: np.ndarray               # (N, 96)
    v: np.ndarray                 # (N, 96) true cell-group voltages
    temp: np.ndarray              # (N, 96) degC
    capacity: np.ndarray          # (N, 96) Ah
    r0: np.ndarray                # (N, 96) ohm
    sensor_temp: np.ndarray       # (N, 32) true temperature at each sensor location
    labels: dict[str, np.ndarray]  # fault_* -> (N,) uint8
    fault_cell: np.ndarray        # (N,) int16, -1 = none
    events: list[dict] = field(default_factory=list)   # fault onsets (ground truth)
    design_capacity_ah: float = 0.0
    compute_s: float = 0.0
    truncated_at_s: float | None = None

    @property
    def duration_s(self) -> float:
        """Length of the drive [s] (truth steps times DT)."""
        return float(self.t[-1] - self.t[0] + DT)

    @property
    def pack_voltage(self) -> np.ndarray:
        """True pack voltage per step: sum of the series groups."""
        return self.v.sum(axis=1)


def _solve_nominal(chem: Chemistry, sc: Scenario, prof: Profile, t_out: np.ndarray):
    """PyBaMM solve of one physical cell; returns dict of arrays on t_out and end time."""
    import pybamm

    p = base_parameters(chem.name).copy()
    t_amb = sc.ambient_c + 273.15
    i_cell = -prof.current / chem.n_parallel  # PyBaMM: + = discharge
    tt = np.append(prof.t, prof.t[-1] + 1.0)
    ii = np.append(i_cell, i_cell[-1])
    p.update({
        "Current function [A]": pybamm.Interpolant(tt, ii, pybamm.t, interpolator="linear"),
        "Ambient temperature [K]": t_amb,
        "Initial temperature [K]": t_amb,
        "Contact resistance [Ohm]": chem.r_guess_ohm * 2.5 * (1.0 - sc.soh),
        # a little outside the BMS window: the solve ends (drive truncated) only when
        # the cells really leave it, e.g. diffusion-limited end of discharge
        "Lower voltage cut-off [V]": chem.v_min - 0.3,
        "Upper voltage cut-off [V]": chem.v_max + 0.3,
    }, check_already_exists=False)
    for k in ("Negative electrode active material volume fraction", "Positive electrode active material volume fraction"):
        p[k] = p[k] * sc.soh  # loss of active material in both electrodes -> capacity x SOH
    model = pybamm.lithium_ion.SPMe(options={"thermal": "lumped", "contact resistance": "true"})
    sim = pybamm.Simulation(model, parameter_values=p, solver=pybamm.IDAKLUSolver(rtol=1e-6, atol=1e-8))
    sol = sim.solve(t_eval=[0.0, float(t_out[-1])], t_interp=t_out, initial_soc=float(np.clip(sc.soc0, 0.0, 1.0)))
    n = len(sol.t)
    names = {"v": "Voltage [V]", "T": "Volume-averaged cell temperature [K]",
             "dphi_n": "Negative electrode surface potential difference at separator interface [V]",
             "q": "Discharge capacity [A.h]"}
    out = {k: np.asarray(sol[v].entries, dtype=float).reshape(n, -1)[:, -1] if sol[v].entries.ndim > 1
           else np.asarray(sol[v].entries, dtype=float) for k, v in names.items()}
    return out, float(sol.t[-1])


def _replan_scale(chem: Chemistry, sc: Scenario, prof: Profile, t: np.ndarray, nom: dict, t_end: float) -> float | None:
    """None when the solve stayed inside the cell voltage window; else the
    planning-resistance multiplier the solve's overpotential per amp calls for
    (the profile is then rebuilt, like a BMS that derates on measured voltage)."""
    v = nom["v"]
    done = t_end >= t[-1] - 1e-6
    if done and v.min() >= chem.v_min - 0.05 and v.max() <= chem.v_max + 0.05:
        return None
    from bms_ai.sim.profile import planning_resistance

    k = min(len(v), len(t))
    cap_nom = cell_capacity_ah(chem.name) * chem.n_parallel * sc.soh
    soc_nom = sc.soc0 - nom["q"][:k] * chem.n_parallel / cap_nom
    i = np.interp(t[:k], prof.t, prof.current)
    eta = v[:k] - ocv(chem.name, soc_nom)
    busy = np.abs(i) > 0.05 * cap_nom
    if busy.sum() < 5:
        return 2.0
    r_app = eta[busy] / i[busy]
    return float(np.clip(np.percentile(r_app, 98) / planning_resistance(sc, chem), 1.3, 10.0))


def simulate_drive(scenario: Scenario | str, seed: int = 0, progress=None) -> SimulatedDrive:
    """Deterministic: same scenario + seed -> identical arrays."""
    from bms_ai.sim.scenario import get_scenario

    t_start = time.perf_counter()
    sc = get_scenario(scenario) if isinstance(scenario, str) else scenario
    sc.validate()
    chem = get_chemistry(sc.chemistry)
    say = progress or (lambda msg: None)
    r_scale = 1.0
    best = None
    for attempt in range(MAX_REPLANS + 1):
        say(f"{sc.name}: building profile" + (f" (planning resistance x{r_scale:.2f})" if attempt else ""))
        try:
            prof = build_profile(sc, chem, r_scale)
        except ValueError:
            if best is None:
                raise
            break  # the derated plan leaves nothing to do: keep the previous (truncated) run
        n = int(round(prof.t[-1] / DT)) + 1
        t = np.arange(n) * DT
        say(f"{sc.name}: PyBaMM {chem.parameter_set} SPMe+lumped thermal, {t[-1]:.0f} s")
        nom, t_end = _solve_nominal(chem, sc, prof, t)
        best = (prof, t, nom, t_end)
        needed = _replan_scale(chem, sc, prof, t, nom, t_end)
        if needed is None or attempt == MAX_REPLANS:
            break
        r_scale = min(max(needed, 1.3 * r_scale), 10.0)
    prof, t, nom, t_end = best
    n = len(t)
    truncated = None
    if t_end < t[-1] - 1e-6:
        keep = t <= t_end + 1e-9
        truncated = float(t_end)
        t = t[keep]
        n = len(t)
    nom = {k: v[:n] for k, v in nom.items()}
    current = np.interp(t, prof.t, prof.current)
    mode = prof.mode[np.minimum((t + 1e-9).astype(int), len(prof.mode) - 1)]
    cstate = prof.charger_state[np.minimum((t + 1e-9).astype(int), len(prof.mode) - 1)]
    speed = np.interp(t, prof.t, prof.speed)
    say(f"{sc.name}: per-cell layer ({N_SERIES} cells)")
    d = _cell_layer(sc, chem, seed, t, current, nom)
    drive = SimulatedDrive(scenario=sc, seed=seed, chemistry=chem, t=t, current=current, mode=mode, charger_state=cstate,
                  speed=speed, design_capacity_ah=chem.design_capacity_ah, truncated_at_s=truncated, **d)
    drive.compute_s = time.perf_counter() - t_start
    return drive


@dataclass
class _CellSpread:
    """Per-cell deviations from the nominal cell (one draw per drive, from the seed)."""

    cap0: np.ndarray      # initial capacity [Ah]
    rho: np.ndarray       # resistance factor
    soc0: np.ndarray
    leak_a: np.ndarray    # self-discharge current [A]
    cool: np.ndarray      # cooling factor (module-end cells see the coolant better)


def _cell_spread(sc: Scenario, cap_nom: float, seed: int, m: int) -> _CellSpread:
    rng = np.random.default_rng([seed, 1])
    var = sc.variation
    cap0 = cap_nom * (1.0 + var.capacity * rng.standard_normal(m))
    rho = np.exp(var.resistance * rng.standard_normal(m))
    soc0 = np.clip(sc.soc0 + var.soc * rng.standard_normal(m), 0.0, 1.0)
    leak = var.self_discharge_a * np.exp(0.5 * rng.standard_normal(m) - 0.125)
    pos = np.arange(m) % 12     # 12 cells per module
    cool = (1.0 + var.cooling * rng.standard_normal(m)) * np.where((pos == 0) | (pos == 11), 0.8, 1.0)
    return _CellSpread(cap0, rho, soc0, leak, cool)


@dataclass
class _CellFaults:
    """Cell faults as per-cell arrays (onset inf = never) plus their ground-truth events."""

    isc_r: np.ndarray
    isc_on: np.ndarray
    sd_extra: np.ndarray
    sd_on: np.ndarray
    heat: np.ndarray
    heat_on: np.ndarray
    events: list[dict]


def _cell_faults(sc: Scenario, m: int) -> _CellFaults:
    f_ = _CellFaults(np.full(m, np.inf), np.full(m, np.inf), np.zeros(m), np.full(m, np.inf), np.zeros(m),
                     np.full(m, np.inf), [])
    for f in sc.faults:
        c = f.cell
        if f.kind in CELL_FAULTS and not 0 <= c < m:
            raise ValueError(f"fault {f.kind}: cell {c} outside 0..{m - 1}")
        if f.kind == "isc":
            if not f.magnitude > 0:
                raise ValueError("isc fault needs magnitude = R_ISC > 0 ohm")
            f_.isc_r[c], f_.isc_on[c] = f.magnitude, f.onset_s
        elif f.kind == "self_discharge":
            f_.sd_extra[c], f_.sd_on[c] = f.magnitude, f.onset_s
        elif f.kind == "thermal":
            f_.heat[c], f_.heat_on[c] = f.magnitude, f.onset_s
        f_.events.append({"kind": f.kind, "onset_s": f.onset_s, "cell": c, "magnitude": f.magnitude,
                          "target": f.target, "duration_s": None if math.isinf(f.duration_s) else f.duration_s})
    return f_


def _effective_resistance(chem: Chemistry, eta: np.ndarray, current: np.ndarray, cap_nom: float) -> float:
    """DC resistance of the nominal group over this drive (least squares of eta on I above C/20)."""
    busy = np.abs(current) > 0.05 * cap_nom
    fallback = chem.r_guess_ohm / chem.n_parallel
    r_eff = float(np.sum(eta[busy] * current[busy]) / np.sum(current[busy] ** 2)) if busy.sum() > 20 else fallback
    return r_eff if r_eff > 0 else fallback


def _plating_current(chem: Chemistry, i: float, s: np.ndarray, rho: np.ndarray, dphi_n_over: float) -> np.ndarray:
    """Charge current diverted to lithium plating per cell (zero unless the anode goes below 0 V vs Li)."""
    if i <= 0:
        return np.zeros(s.shape)
    dphi = anode_ocp(chem.name, s) + rho * dphi_n_over
    pl = dphi < 0
    if not pl.any():
        return np.zeros(s.shape)
    # surrogate: share of the charge current diverted to plating grows with the
    # negative anode potential, up to PLATING_MAX_SHARE at -50 mV vs Li/Li+
    return np.where(pl, i * np.clip(-dphi / 0.05, 0.0, 1.0) * PLATING_MAX_SHARE, 0.0)


def _integrate_cells(chem: Chemistry, t: np.ndarray, current: np.ndarray, spread: _CellSpread,
                     faults: _CellFaults, dphi_n_over: np.ndarray) -> dict[str, np.ndarray]:
    """Step the per-cell states (SOC, capacity, hysteresis, extra temperature) at DT; plating onsets."""
    n, m = len(t), len(spread.cap0)
    c_th = chem.n_parallel * chem.cell_mass_kg * chem.cell_cp
    r_th = chem.r_th_cell / chem.n_parallel
    gap = chem.hysteresis_gap_v
    out = {k: np.empty((n, m)) for k in ("soc", "capacity", "hyst", "dtemp")}
    plated = np.zeros(m)                     # cumulative plated charge per cell [Ah]
    plating_onset = np.full(m, -1, dtype=np.int64)
    s = spread.soc0.copy()
    c_now = spread.cap0.copy()
    h = np.zeros(m)  # hysteresis state starts mid-gap (history unknown)
    dt_extra = np.zeros(m)
    for k in range(n):
        tk = t[k]
        out["soc"][k], out["capacity"][k], out["hyst"][k], out["dtemp"][k] = s, c_now, h, dt_extra
        i = current[k]
        u = ocv(chem.name, s)
        leak = spread.leak_a + np.where(tk >= faults.sd_on, faults.sd_extra, 0.0)
        p_extra = np.where(tk >= faults.heat_on, faults.heat, 0.0)
        short = tk >= faults.isc_on
        if short.any():
            i_sc = np.where(short, u / faults.isc_r, 0.0)
            leak = leak + i_sc
            p_extra = p_extra + i_sc * u
        i_pl = _plating_current(chem, i, s, spread.rho, dphi_n_over[k])
        if i_pl.any():
            plated += i_pl * DT / 3600.0
            new = (plating_onset < 0) & (plated > PLATING_LABEL_SHARE * spread.cap0)
            plating_onset[new] = k
        s = s + (i - leak - i_pl) * DT / (3600.0 * c_now)
        c_now = c_now - PLATING_IRREVERSIBLE * i_pl * DT / 3600.0
        if gap:
            # one-state hysteresis (Plett): h -> +gap/2 when charging, -gap/2 when discharging
            rate = chem.hysteresis_rate * abs(i) * DT / (3600.0 * c_now)
            h = h + (np.sign(i) * 0.5 * gap - h) * np.minimum(rate, 1.0)
        dt_extra = dt_extra + DT * (p_extra - dt_extra / r_th) / c_th
    out["plating_onset"] = plating_onset
    return out


def _fault_labels(sc: Scenario, t: np.ndarray, cap0: np.ndarray, cap: np.ndarray, plating_onset: np.ndarray,
                  events: list[dict]) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """fault_* label columns and the faulty cell per step; appends the plating event to ``events``."""
    n = len(t)
    labels: dict[str, np.ndarray] = {f"fault_{kind}": np.zeros(n, dtype=np.uint8) for kind in CELL_FAULTS}
    fault_cell = np.full(n, -1, dtype=np.int16)
    for f in sc.faults:
        if f.kind in CELL_FAULTS:
            act = f.active(t)
            labels[f"fault_{f.kind}"] |= act.astype(np.uint8)
            fault_cell[act & (fault_cell < 0)] = f.cell
    labels["fault_plating"] = np.zeros(n, np.uint8)
    if (plating_onset >= 0).any():
        onsets = np.where(plating_onset >= 0, plating_onset, n)
        first = int(np.argmin(onsets))
        k0 = int(onsets[first])
        labels["fault_plating"][k0:] = 1
        fault_cell[(labels["fault_plating"] > 0) & (fault_cell < 0)] = first
        events.append({"kind": "plating", "onset_s": round(float(t[k0]), 3), "cell": first,
                       "magnitude": float(np.sum(cap0 - cap[-1])), "target": "", "duration_s": None,
                       "cells": sorted(int(c) for c in np.nonzero(plating_onset >= 0)[0])})
    labels["fault_sensor"] = np.zeros(n, dtype=np.uint8)
    labels["fault_can"] = np.zeros(n, dtype=np.uint8)
    for f in sc.faults:
        if f.kind in SENSOR_FAULTS:
            labels["fault_sensor"] |= f.active(t).astype(np.uint8)
        elif f.kind == "can_timeout":
            labels["fault_can"] |= f.active(t).astype(np.uint8)
    labels["fault_any"] = np.zeros(n, dtype=np.uint8)
    for k in list(labels):
        if k != "fault_any":
            labels["fault_any"] |= labels[k]
    return labels, fault_cell


def _cell_layer(sc: Scenario, chem: Chemistry, seed: int, t: np.ndarray, current: np.ndarray, nom: dict) -> dict:
    """The 96 series groups from the nominal cell's solve (module docstring: the per-cell approximation)."""
    n, m = len(t), N_SERIES
    cap_nom = cell_capacity_ah(chem.name) * chem.n_parallel * sc.soh
    spread = _cell_spread(sc, cap_nom, seed, m)
    # nominal cell: SOC by Coulomb counting (matches PyBaMM's discharge capacity)
    soc_nom = sc.soc0 - nom["q"] * chem.n_parallel / cap_nom
    eta = nom["v"] - ocv(chem.name, soc_nom)                  # per physical cell == per group
    dphi_n_over = nom["dphi_n"] - anode_ocp(chem.name, soc_nom)  # anode overpotential (neg. when charging)
    t_nom_c = nom["T"] - 273.15
    r_eff = _effective_resistance(chem, eta, current, cap_nom)   # for the r0 truth column
    faults = _cell_faults(sc, m)
    st = _integrate_cells(chem, t, current, spread, faults, dphi_n_over)
    soc, cap = st["soc"], st["capacity"]
    v = ocv(chem.name, soc.ravel()).reshape(n, m) + spread.rho[None, :] * eta[:, None] + st["hyst"]
    temp = sc.ambient_c + (t_nom_c - sc.ambient_c)[:, None] * (spread.rho * spread.cool)[None, :] + st["dtemp"]
    r0 = np.broadcast_to(spread.rho * r_eff, (n, m)).copy()
    # temperature sensor s sits between cells 3s and 3s+2 (DBC comment): mean of the three
    sensor_temp = temp.reshape(n, N_TEMP, 3).mean(axis=2)
    labels, fault_cell = _fault_labels(sc, t, spread.cap0, cap, st["plating_onset"], faults.events)
    faults.events.sort(key=lambda e: (e["onset_s"], e["kind"]))
    return dict(soc=soc, v=v, temp=temp, capacity=cap, r0=r0, sensor_temp=sensor_temp, labels=labels,
                fault_cell=fault_cell, events=faults.events)


def limits_for(drive: SimulatedDrive) -> tuple[np.ndarray, np.ndarray]:
    """BMS state-of-function limits per truth step (pack A)."""
    return current_limits(drive.chemistry, drive.temp.max(axis=1), drive.soc.min(axis=1),
                          float(drive.capacity[0].min()))

