"""Randomised PyBaMM cells: manufacturing spread and ageing around a base parameter set.

A cell is a ``CellSpec`` (plain numbers and JSON-safe overrides, so it round-trips
through a drive's meta.json) turned into PyBaMM parameters by ``make_cell``.
The stoichiometry windows are never set by hand: PyBaMM's electrode-SOH solver
derives them from the electrode capacities Q_n, Q_p, the cyclable lithium Q_Li
and the cut-off voltages, so every OCV change real cells show (N/P ratio,
formation loss, ageing) is a change of Q_n, Q_p or Q_Li and the SOC definition,
the OCV table and Coulomb counting stay consistent by construction.

Knobs (``SPREAD``; ``spread`` scales every range): electrode area (capacity),
electrode capacities (N/P ratio), lithium inventory, OCP stoichiometry warps and a
smooth OCV offset, contact resistance, exchange-current densities, diffusivities.
Ageing (``age_cell``): loss of lithium inventory + loss of active material in both
electrodes, one multiplier solved so the capacity is exactly ``soh`` x fresh,
plus SEI-film resistance and slower kinetics. Unlike scaling both electrodes by
SOH, this moves OCV(SOC) by tens of mV on aged cells, as real ageing does.

Supports single-phase, non-MSMR full-cell sets (PARAMETER_SETS kind "full").
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry import pybamm_cell as pc

C_INIT = ("Initial concentration in negative electrode [mol.m-3]", "Initial concentration in positive electrode [mol.m-3]")
EPS = ("Negative electrode active material volume fraction", "Positive electrode active material volume fraction")
J0 = ("Negative electrode exchange-current density [A.m-2]", "Positive electrode exchange-current density [A.m-2]")
GEOMETRY = ("Electrode width [m]", "Cell volume [m3]", "Cell cooling surface area [m2]")

# knob -> (distribution, a, b). normal: mean a, sigma b (clipped at 3 sigma); uniform: [a, b];
# lognormal: median a, sigma of ln b (clipped at 3 sigma). Capacity sigma ~1.6 % overall:
# about 1.5x the production spread, so the estimator sees some extra variety.
SPREAD: dict[str, tuple[str, float, float]] = {
    "area_scale": ("normal", 1.0, 0.01),
    "q_ne": ("normal", 1.0, 0.015),
    "q_pe": ("normal", 1.0, 0.015),
    "q_li": ("normal", 1.0, 0.006),
    "warp_n": ("uniform", -0.03, 0.03),
    "warp_p": ("uniform", -0.03, 0.03),
    "dv_mv": ("uniform", -3.0, 3.0),
    "r_contact_frac": ("uniform", 0.0, 0.15),   # fraction of the base cell's 10 s DC resistance
    "j0_n": ("lognormal", 1.0, 0.15),
    "j0_p": ("lognormal", 1.0, 0.15),
    "d_n": ("lognormal", 1.0, 0.3),
    "d_p": ("lognormal", 1.0, 0.3),
}
# ageing: share of the capacity loss that is lithium loss, LAM_ne share of the rest, SEI resistance factor
AGE = {"lli_share": (0.4, 0.8), "lam_ne_share_of_rest": (0.3, 0.7), "k_r": (1.5, 3.5)}


@dataclass
class CellSpec:
    """One cell: base set, capacity normalisation, manufacturing knobs, ageing, hysteresis, raw overrides."""

    base: str
    seed: int = 0
    target_ah: float | None = None   # scale electrode area so the fresh base cell has this capacity (None: keep)
    area_scale: float = 1.0
    q_ne: float = 1.0
    q_pe: float = 1.0
    q_li: float = 1.0
    warp_n: float = 0.0
    warp_p: float = 0.0
    dv_mv: float = 0.0
    r_contact_frac: float = 0.0
    j0_n: float = 1.0
    j0_p: float = 1.0
    d_n: float = 1.0
    d_p: float = 1.0
    soh: float = 1.0                 # target capacity / fresh capacity (make_cell reports the realised one)
    lli: float = 0.0                 # shares of the capacity loss (draw_cell); age_cell scales them
    lam_ne: float = 0.0
    lam_pe: float = 0.0
    k_r: float = 0.0
    hyst_mv: float = 0.0             # full OCV hysteresis gap, applied on the voltage by bms_ai.sim.life
    overrides: dict = field(default_factory=dict)   # raw parameters; "@Set" / "@Set:key" take another set's value

    def to_json(self) -> dict:
        """Plain dict (meta.json, hashing)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CellSpec:
        """Inverse of ``to_json``."""
        return cls(**d)


def _draw(rng: np.random.Generator, spec: tuple[str, float, float], scale: float = 1.0) -> float:
    kind, a, b = spec
    if kind == "normal":
        return float(a + np.clip(rng.standard_normal(), -3, 3) * b * scale)
    if kind == "lognormal":
        return float(a * np.exp(np.clip(rng.standard_normal(), -3, 3) * b * scale))
    return float(rng.uniform(a * scale, b * scale))


def draw_cell(base: str, seed: int, soh: float | tuple[float, float] | None = None, spread: float = 1.0,
              target_ah: float | None = None, hyst_mv: float = 0.0, overrides: dict | None = None) -> CellSpec:
    """A cell around ``base``: same seed, same cell.

    ``soh``: None (fresh), a value, or a (lo, hi) range drawn uniformly; ``spread`` scales every
    manufacturing range (0 = the base cell). The ageing mechanism shares are drawn here,
    their size is solved in ``make_cell``.
    """
    rng = np.random.default_rng([seed, 7919])
    kw = {k: _draw(rng, s, spread) for k, s in SPREAD.items()}
    if isinstance(soh, (tuple, list)):
        soh = float(rng.uniform(*soh))
    cs = CellSpec(base=base, seed=seed, target_ah=target_ah, hyst_mv=hyst_mv, overrides=dict(overrides or {}), **kw)
    if soh is not None and soh < 1.0:
        cs.soh = float(soh)
        cs.k_r = float(rng.uniform(*AGE["k_r"]))
        lli_share = float(rng.uniform(*AGE["lli_share"]))
        ne_share = (1 - lli_share) * float(rng.uniform(*AGE["lam_ne_share_of_rest"]))
        cs.lli, cs.lam_ne, cs.lam_pe = lli_share, ne_share, 1 - lli_share - ne_share
    return cs


# ---------------------------------------------------------------- applying a spec


def _scaled(fn, s: float):
    """A parameter (number or function) times ``s``."""
    if s == 1.0:
        return fn
    if callable(fn):
        def scaled(*a):
            return fn(*a) * s
        return scaled
    return fn * s


def _warped(fn, w: float, dv: float = 0.0):
    """OCP with the stoichiometry axis warped (plateaus move by up to w/4) and a smooth offset dv sin(pi sto)."""
    if w == 0.0 and dv == 0.0:
        return fn
    import pybamm

    def warped(sto):
        return fn(sto + w * sto * (1 - sto)) + dv * pybamm.sin(np.pi * sto)
    return warped


def resolve_overrides(ov: dict) -> dict:
    """JSON-safe overrides to parameter values: "@Set" takes the same key from another set, "@Set:key" another key."""
    out = {}
    for k, v in ov.items():
        if isinstance(v, str) and v.startswith("@"):
            src, _, key = v[1:].partition(":")
            out[k] = pc.raw_parameters(src)[key or k]
        else:
            out[k] = v
    return out


def _window_capacity(base: str, p) -> tuple[dict[str, float], float]:
    win = pc.electrode_window(base, p)
    return win, pc.soc_capacity_ah(p, win)


def fresh_parameters(cs: CellSpec):
    """Base set + overrides + capacity normalisation + manufacturing knobs (no ageing, no contact resistance)."""
    if pc.set_kind(cs.base) != "full":
        raise ValueError(f"{cs.base}: cells can be drawn around single-phase, non-MSMR full-cell sets only")
    p, _ = pc.load_params(cs.base)
    if cs.overrides:
        p.update(resolve_overrides(cs.overrides), check_already_exists=False)
    k = cs.area_scale
    if cs.target_ah:
        k *= cs.target_ah / _window_capacity(cs.base, p)[1]
    p.update({key: p[key] * k for key in GEOMETRY})   # width, volume and cooling area together
    p["Negative electrode OCP [V]"] = _warped(p["Negative electrode OCP [V]"], cs.warp_n)
    p["Positive electrode OCP [V]"] = _warped(p["Positive electrode OCP [V]"], cs.warp_p, cs.dv_mv / 1000.0)
    for key, s in ((J0[0], cs.j0_n), (J0[1], cs.j0_p), ("Negative particle diffusivity [m2.s-1]", cs.d_n),
                   ("Positive particle diffusivity [m2.s-1]", cs.d_p)):
        p[key] = _scaled(p[key], s)
    _set_capacities(p, cs.q_ne, cs.q_pe, cs.q_li)
    return p


def _q_li(p) -> float:
    """Cyclable lithium in the particles (concentration x active volume), arbitrary units."""
    return float(p[C_INIT[0]] * p["Negative electrode thickness [m]"] * p[EPS[0]]
                 + p[C_INIT[1]] * p["Positive electrode thickness [m]"] * p[EPS[1]])


def _set_capacities(p, f_ne: float, f_pe: float, f_li: float) -> None:
    """Scale the electrode capacities (active volume fraction) and the cyclable lithium independently.

    Scaling a volume fraction alone would silently change the lithium inventory too
    (PyBaMM's SOH solver reads it from the initial concentrations), so those are rescaled.
    """
    q0 = _q_li(p)
    p[EPS[0]] = p[EPS[0]] * f_ne
    p[EPS[1]] = p[EPS[1]] * f_pe
    k = f_li * q0 / _q_li(p)
    p[C_INIT[0]] = p[C_INIT[0]] * k
    p[C_INIT[1]] = p[C_INIT[1]] * k


def _aged(p_fresh, cs: CellSpec, m: float):
    p = p_fresh.copy()
    _set_capacities(p, 1 - m * cs.lam_ne, 1 - m * cs.lam_pe, 1 - m * cs.lli)
    return p


def age_cell(cs: CellSpec, p_fresh=None, cap_fresh: float | None = None) -> tuple[object, float]:
    """(aged parameters, m): the LLI / LAM shares scaled by one multiplier m so capacity = soh x fresh."""
    from scipy.optimize import brentq

    if cs.lli + cs.lam_ne + cs.lam_pe <= 0:
        raise ValueError("aged cell without LLI/LAM shares: draw it with draw_cell(..., soh=...)")
    p_fresh = p_fresh if p_fresh is not None else fresh_parameters(cs)
    cap_fresh = cap_fresh or _window_capacity(cs.base, p_fresh)[1]

    def short(m: float) -> float:
        return _window_capacity(cs.base, _aged(p_fresh, cs, m))[1] / cap_fresh - cs.soh

    m = brentq(short, 0.0, 0.6, xtol=1e-5)
    return _aged(p_fresh, cs, m), m


_RDC_CACHE: dict[str, float] = {}


def base_rdc(base: str, target_ah: float | None, overrides: dict | None = None) -> float:
    """10 s DC resistance of the unrandomised base cell (the unit of ``r_contact_frac`` and SEI growth); cached."""
    key = json.dumps([base, target_ah, overrides or {}], sort_keys=True, default=str)
    if key not in _RDC_CACHE:
        p = fresh_parameters(CellSpec(base=base, target_ah=target_ah, overrides=dict(overrides or {})))
        _RDC_CACHE[key] = dc_resistance(base, p, _window_capacity(base, p)[1])
    return _RDC_CACHE[key]


def make_cell(cs: CellSpec) -> tuple[object, dict]:
    """(ParameterValues for SPMe + lumped thermal + contact resistance, info).

    info: capacity_ah, window, cap_fresh_ah, soh_real, r_contact_ohm, rdc_base_ohm, v_min, v_max
    (+ lli, lam_ne, lam_pe as fractions for aged cells).
    """
    p = fresh_parameters(cs)
    cap_fresh = _window_capacity(cs.base, p)[1]
    rdc0 = base_rdc(cs.base, cs.target_ah, cs.overrides)
    info: dict = {"cap_fresh_ah": cap_fresh}
    r_c = cs.r_contact_frac * rdc0
    if cs.soh < 1.0:
        p, m = age_cell(cs, p, cap_fresh)
        info.update(lli=m * cs.lli, lam_ne=m * cs.lam_ne, lam_pe=m * cs.lam_pe)
        r_c += cs.k_r * (1 - cs.soh) * rdc0            # SEI film
        for key in J0:                                  # slower kinetics on the remaining surface
            p[key] = _scaled(p[key], 1 - 0.5 * (1 - cs.soh))
    p["Contact resistance [Ohm]"] = r_c
    win, cap = _window_capacity(cs.base, p)
    info.update(window=win, capacity_ah=cap, soh_real=cap / cap_fresh, r_contact_ohm=r_c, rdc_base_ohm=rdc0,
                v_min=float(p["Lower voltage cut-off [V]"]), v_max=float(p["Upper voltage cut-off [V]"]))
    return p, info


def true_ocv(cs: CellSpec, made: tuple | None = None, n: int = 201) -> tuple[np.ndarray, np.ndarray, float]:
    """(soc grid, equilibrium OCV [V], full hysteresis gap [V]) of this cell as it is (aged, randomised).

    The curve is the mid curve: for cells with hysteresis the charge / discharge branches sit
    gap/2 above / below it. ``made`` = make_cell(cs) when already at hand.
    """
    p, info = made if made is not None else make_cell(cs)
    soc = np.linspace(0.0, 1.0, n)
    return soc, pc.ocv_curve(cs.base, p, info["window"], soc)["ocv"], cs.hyst_mv / 1000.0


# ---------------------------------------------------------------- solving and checks


# a coarse mesh (PyBaMM's default: 20 points per domain and particle) for solves that only shape a current
COARSE_MESH = {"x_n": 5, "x_s": 5, "x_p": 5, "r_n": 10, "r_p": 10}


def build_sim(base: str, p, model: str = "SPMe", rtol: float = 1e-6, atol: float = 1e-8,
              output_variables=None, extra_options: dict | None = None, var_pts: dict | None = None):
    """PyBaMM simulation of one cell: SPMe (or SPM) + the set's options + lumped thermal, IDAKLU.

    ``output_variables`` keeps only those (much less memory for long 10 Hz outputs);
    ``var_pts`` overrides the mesh (e.g. COARSE_MESH).
    """
    import pybamm

    opts = pc.model_options(base)
    opts.update(extra_options or {})
    kw = {"output_variables": list(output_variables)} if output_variables else {}
    cls = {"SPMe": pybamm.lithium_ion.SPMe, "SPM": pybamm.lithium_ion.SPM}[model]
    return pybamm.Simulation(cls(options=opts), parameter_values=p, var_pts=var_pts,
                             solver=pybamm.IDAKLUSolver(rtol=rtol, atol=atol, **kw))


def set_current(p, t, i_a) -> None:
    """Piecewise-linear applied current (A, + = discharge: PyBaMM's sign)."""
    import pybamm

    p.update({"Current function [A]": pybamm.Interpolant(np.asarray(t, float), np.asarray(i_a, float), pybamm.t,
                                                         interpolator="linear")}, check_already_exists=False)


def set_ambient(p, temp_c: float, initial_c: float | None = None) -> None:
    """Constant ambient temperature; the cell starts at ``initial_c`` (default: ambient)."""
    p.update({"Ambient temperature [K]": temp_c + 273.15,
              "Initial temperature [K]": (temp_c if initial_c is None else initial_c) + 273.15},
             check_already_exists=False)


def dc_resistance(base: str, p, cap: float, soc: float = 0.5, temp_c: float = 25.0, secs: float = 10.0) -> float:
    """DC resistance [ohm]: (V before - V after a ``secs`` 1C discharge pulse from rest) / I."""
    q = p.copy()
    set_current(q, [0.0, 1.0, 1.0 + secs, 100.0], [0.0, cap, cap, cap])
    set_ambient(q, temp_c)
    sol = build_sim(base, q).solve([0.0, 1.0 + secs], t_interp=np.array([0.0, 1.0 + secs]), initial_soc=soc)
    v = sol["Voltage [V]"].entries
    return float((v[0] - v[-1]) / cap)


def _check_run(cs: CellSpec, p, info: dict, case: str, temp_c: float) -> str:
    """One solve of ``check_cell``: "ok ..." or "FAIL reason"."""
    from bms_ai.sim.profile import load_cycle, road_power
    from bms_ai.sim.scenario import Vehicle

    cap = info["capacity_ah"]
    q = p.copy()
    if case == "1C":
        set_current(q, [0, 4000], [cap, cap])
        t_end, soc0 = 3960.0, 1.0
    else:
        tc, v = load_cycle("udds")
        pw = road_power(v, None, Vehicle())
        set_current(q, tc, pw / pw.max() * cap)
        t_end, soc0 = float(tc[-1]), 0.9
        q.update({"Lower voltage cut-off [V]": info["v_min"] - 0.3, "Upper voltage cut-off [V]": info["v_max"] + 0.3})
    set_ambient(q, temp_c)
    try:
        sol = build_sim(cs.base, q).solve([0, t_end], t_interp=np.arange(0, t_end, 1.0), initial_soc=soc0)
    except Exception as exc:  # noqa: BLE001 - the report names the failure, the caller decides
        return "FAIL " + str(exc).splitlines()[0][:120]
    if case == "1C":
        return f"ok {float(sol['Discharge capacity [A.h]'].entries[-1]) / cap:.3f}"
    return "ok" if sol.t[-1] >= t_end - 1 else f"stopped {sol.t[-1]:.0f}s"


def check_cell(cs: CellSpec, temps: tuple[float, ...] = (25.0, -10.0)) -> dict:
    """Does the cell solve? 1C discharge from SOC 1 and a 1C-peak UDDS from SOC 0.9 per temperature.

    Also reports the 10 s DC resistance at 25 degC and the largest OCV(SOC) difference to the
    unrandomised base cell (5-95 % and 20-80 % SOC). Costs 15-35 s per cell.
    """
    t0 = time.perf_counter()
    p, info = make_cell(cs)
    out = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in info.items() if k != "window"}
    out["window"] = {k: round(v, 4) for k, v in info["window"].items()}
    out["rdc_mohm"] = round(1000 * dc_resistance(cs.base, p, info["capacity_ah"]), 3)
    ref = CellSpec(base=cs.base, target_ah=cs.target_ah, overrides=cs.overrides)
    p_ref = fresh_parameters(ref)
    soc, o_ref, _ = true_ocv(ref, (p_ref, {"window": pc.electrode_window(cs.base, p_ref)}))
    _, o_cell, _ = true_ocv(cs, (p, info), n=len(soc))
    diff = np.abs(o_cell - o_ref)
    out["docv_max_mv_5_95"] = round(1000 * float(diff[(soc >= 0.05) & (soc <= 0.95)].max()), 1)
    out["docv_max_mv_20_80"] = round(1000 * float(diff[(soc >= 0.2) & (soc <= 0.8)].max()), 1)
    out["runs"] = {f"{case}@{t:g}": _check_run(cs, p, info, case, t) for t in temps for case in ("1C", "UDDS")}
    out["check_s"] = round(time.perf_counter() - t0, 1)
    return out
