"""PyBaMM parameters of a chemistry's physical cell: the one place they are set up.

``published_parameters`` is the PyBaMM set as published, only completed for
the lumped thermal model (cell-level training drives, ``bms_ai.training.synth``).
``base_parameters`` also fixes the can geometry and scales the electrode width
so the cell has exactly its rated capacity (the simulator's pack cells).
The per-set helpers (``load_params``, ``electrode_window``, ``soc_capacity_ah``,
``ocv_curve``) work on any PyBaMM lithium-ion set by name (``PARAMETER_SETS``):
the data factory's cell catalogue (``bms_ai.sim.cells``) builds its cells on them.
PyBaMM is imported only when a function here runs.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from bms_ai.chemistry.registry import get_chemistry

os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")

FARADAY = 96485.33212


def published_parameters(name: str):
    """A fresh PyBaMM ParameterValues of the chemistry's set, completed from its donor set where needed."""
    import pybamm

    chem = get_chemistry(name)
    p = pybamm.ParameterValues(chem.parameter_set)
    if chem.parameter_donor:
        donor = pybamm.ParameterValues(chem.parameter_donor)
        have = set(p.keys())  # ParameterValues is not a dict
        missing = {k: donor[k] for k in sorted(donor.keys()) if k not in have}  # noqa: SIM118
        p.update(missing, check_already_exists=False)
    return p


@functools.cache
def base_parameters(name: str):
    """PyBaMM ParameterValues for the simulator's cell (complete for SPMe + lumped thermal); shared, do not mutate."""
    chem = get_chemistry(name)
    p = published_parameters(name)
    if chem.can_radius_m > 0:
        r, h = chem.can_radius_m, chem.can_height_m
        p.update({"Cell volume [m3]": np.pi * r ** 2 * h,
                  "Cell cooling surface area [m2]": 2 * np.pi * r * h + 2 * np.pi * r ** 2},
                 check_already_exists=False)
    # scale electrode width so the stoichiometric capacity equals the rating exactly
    # (Chen2020: 5.153 -> 5.0 Ah; Prada2013: 2.3035 -> 2.3 Ah); OCV and kinetics per area unchanged
    p["Electrode width [m]"] = p["Electrode width [m]"] * chem.cell_rated_ah / window_capacity_ah(p)
    p["Nominal cell capacity [A.h]"] = chem.cell_rated_ah
    return p


@functools.cache
def stoich_window(name: str) -> tuple[float, float, float, float]:
    """(x0, x100, y100, y0): electrode stoichiometries at SOC 0 and 1 of the simulator's cell."""
    import pybamm

    x0, x100, y100, y0 = pybamm.lithium_ion.get_min_max_stoichiometries(base_parameters(name))
    return float(x0), float(x100), float(y100), float(y0)


@functools.cache
def cell_capacity_ah(name: str) -> float:
    """Capacity of one physical cell between the PyBaMM cut-off stoichiometries."""
    return window_capacity_ah(base_parameters(name))


def window_capacity_ah(p) -> float:
    """Ah of a parameter set's negative electrode between the SOC 0 and SOC 1 stoichiometries."""
    import pybamm

    x0, x100, _, _ = (float(v) for v in pybamm.lithium_ion.get_min_max_stoichiometries(p))
    area = p["Electrode width [m]"] * p["Electrode height [m]"] * p["Number of electrodes connected in parallel to make a cell"]
    qn = (p["Negative electrode active material volume fraction"] * p["Negative electrode thickness [m]"] * area
          * p["Maximum concentration in negative electrode [mol.m-3]"] * FARADAY / 3600.0)
    return float(qn * (x100 - x0))


@functools.cache
def ocv_table(name: str, n: int = 401) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(soc grid, cell OCV [V], negative-electrode OCP [V]) from the PyBaMM electrode OCPs.

    SOC is PyBaMM's definition: linear in electrode stoichiometry between the
    cut-off voltage limits, so it matches ``initial_soc`` and Coulomb counting.
    """
    import pybamm

    p = base_parameters(name)
    x0, x100, y100, y0 = stoich_window(name)
    s = np.linspace(0.0, 1.0, n)
    x = x0 + s * (x100 - x0)
    y = y0 - s * (y0 - y100)
    un = np.asarray(p["Negative electrode OCP [V]"](pybamm.Vector(x)).evaluate()).ravel()
    up = np.asarray(p["Positive electrode OCP [V]"](pybamm.Vector(y)).evaluate()).ravel()
    return s, up - un, un


def ocv(name: str, soc: np.ndarray) -> np.ndarray:
    """Cell OCV at ``soc``; linear beyond 0..1 so over- and under-charge stay visible in the voltage."""
    s, v, _ = ocv_table(name)
    soc = np.asarray(soc, dtype=float)
    out = np.interp(soc, s, v)
    lo, hi = soc < 0, soc > 1
    if lo.any():
        out[lo] = v[0] + (v[1] - v[0]) / (s[1] - s[0]) * soc[lo]
    if hi.any():
        out[hi] = v[-1] + (v[-1] - v[-2]) / (s[-1] - s[-2]) * (soc[hi] - 1)
    return out


def anode_ocp(name: str, soc: np.ndarray) -> np.ndarray:
    """Negative-electrode OCP at ``soc`` (lithium plating starts where the anode potential goes below 0 V)."""
    s, _, un = ocv_table(name)
    return np.interp(soc, s, un)


# ---------------------------------------------------------------------------------------------
# Any PyBaMM parameter set by name (the data factory's cell catalogue builds on these)
# ---------------------------------------------------------------------------------------------

R_GAS = 8.314462618

# PyBaMM lithium-ion sets: family, the cell they describe, and the kind of model they need
# (full: single-phase electrodes; composite: two negative phases; msmr: MSMR thermodynamics;
# halfcell: positive electrode vs lithium metal).
PARAMETER_SETS: dict[str, dict[str, str]] = {
    "Ai2020": {"family": "LCO", "cell": "Enertech 2.28 Ah LCO/graphite pouch", "kind": "full"},
    "Chen2020": {"family": "NMC", "cell": "LG M50 21700 NMC811/graphite-SiOx", "kind": "full"},
    "Chen2020_composite": {"family": "NMC", "cell": "LG M50 21700 NMC811/graphite+Si composite", "kind": "composite"},
    "Ecker2015": {"family": "NMC", "cell": "Kokam SLPB 75106100 NMC/graphite pouch", "kind": "full"},
    "MSMR_Example": {"family": "NMC", "cell": "NMC622/graphite MSMR thermodynamics, LG M50 geometry", "kind": "msmr"},
    "Marquis2019": {"family": "LCO", "cell": "Kokam SLPB78205130H LCO/graphite", "kind": "full"},
    "Mohtat2020": {"family": "NMC", "cell": "5 Ah NMC532/graphite pouch", "kind": "full"},
    "NCA_Kim2011": {"family": "NCA", "cell": "NCA/graphite pouch (Kim 2011 nominal design)", "kind": "full"},
    "OKane2022": {"family": "NMC", "cell": "LG M50 21700 NMC811/graphite-SiOx (degradation fit)", "kind": "full"},
    "ORegan2022": {"family": "NMC", "cell": "LG M50 21700 NMC811/graphite-SiOx (temperature-dependent)", "kind": "full"},
    "Prada2013": {"family": "LFP", "cell": "A123 ANR26650 LFP/graphite", "kind": "full"},
    "Ramadass2004": {"family": "LCO", "cell": "Sony 18650 LCO/graphite", "kind": "full"},
    "Xu2019": {"family": "NMC", "cell": "NMC vs lithium-metal half cell", "kind": "halfcell"},
}

COMPOSITE_OPTIONS = {"particle phases": ("2", "1"), "open-circuit potential": (("single", "current sigmoid"), "single")}
MSMR_OPTIONS = {"open-circuit potential": "MSMR", "particle": "MSMR", "number of MSMR reactions": ("6", "4"),
                "intercalation kinetics": "MSMR"}

# cylindrical cells whose sets lack the lumped-thermal geometry: can radius, height [m]
_CANS = {"Prada2013": (0.013, 0.065), "Ramadass2004": (0.009, 0.065)}

# entries the lumped thermal model with contact resistance needs; missing ones come from Chen2020
# (entropic coefficients default to 0, cans get their own volume and cooling surface)
_THERMAL_KEYS = tuple(
    ["Cell volume [m3]", "Cell cooling surface area [m2]", "Total heat transfer coefficient [W.m-2.K-1]",
     "Separator density [kg.m-3]", "Separator specific heat capacity [J.kg-1.K-1]",
     "Separator thermal conductivity [W.m-1.K-1]"]
    + [f"{e} current collector {q}" for e in ("Negative", "Positive")
       for q in ("conductivity [S.m-1]", "thickness [m]", "density [kg.m-3]", "specific heat capacity [J.kg-1.K-1]",
                 "thermal conductivity [W.m-1.K-1]")]
    + [f"{e} electrode {q}" for e in ("Negative", "Positive")
       for q in ("density [kg.m-3]", "specific heat capacity [J.kg-1.K-1]", "thermal conductivity [W.m-1.K-1]",
                 "OCP entropic change [V.K-1]")])


def set_kind(name: str) -> str:
    """The model kind of a PyBaMM set (full, composite, msmr, halfcell); unknown names fail with the list."""
    if name not in PARAMETER_SETS:
        raise ValueError(f"unknown PyBaMM parameter set {name!r}; known: {', '.join(sorted(PARAMETER_SETS))}")
    return PARAMETER_SETS[name]["kind"]


def model_options(name: str, thermal: str = "lumped") -> dict:
    """SPMe options a set needs (phases / MSMR / half cell) plus lumped thermal and contact resistance."""
    kind = set_kind(name)
    opts: dict = {"thermal": thermal, "contact resistance": "true"}
    if kind == "composite":
        opts.update(COMPOSITE_OPTIONS)
    elif kind == "msmr":
        opts.update(MSMR_OPTIONS)
    elif kind == "halfcell":
        opts["working electrode"] = "positive"
    return opts


@functools.cache
def raw_parameters(name: str):
    """The set as PyBaMM ships it (cached: copy before changing it)."""
    import pybamm

    set_kind(name)
    return pybamm.ParameterValues(name)


def load_params(name: str):
    """(ParameterValues complete for SPMe + lumped thermal + contact resistance, keys that were filled in).

    Missing thermal entries are copied from Chen2020 so every set runs the same model;
    cylindrical cells get their own can volume and cooling surface; missing entropic
    coefficients are 0; the contact resistance starts at 0 ohm.
    """
    p = raw_parameters(name).copy()
    have = set(p.keys())   # ParameterValues is not a dict
    donor = raw_parameters("Chen2020")
    upd, filled = {}, []
    for key in _THERMAL_KEYS:
        if key in have:
            continue
        if name in _CANS and key in ("Cell volume [m3]", "Cell cooling surface area [m2]"):
            r, h = _CANS[name]
            upd[key] = np.pi * r ** 2 * h if key.startswith("Cell volume") else 2 * np.pi * r * h + 2 * np.pi * r ** 2
        elif key.endswith("entropic change [V.K-1]"):
            upd[key] = 0.0
        else:
            upd[key] = donor[key]
        filled.append(key)
    if "Contact resistance [Ohm]" not in have:
        upd["Contact resistance [Ohm]"] = 0.0
    if upd:
        p.update(upd, check_already_exists=False)
    return p, filled


def ocp(p, key: str, sto: np.ndarray) -> np.ndarray:
    """An electrode OCP [V] of a parameter set at stoichiometries ``sto``."""
    import pybamm

    fn = p[key]
    if callable(fn):
        return np.asarray(fn(pybamm.Vector(np.asarray(sto, float))).evaluate(), float).ravel()
    return np.full(np.shape(sto), float(fn))


def _msmr_occupancy(p, electrode: str, n: int, u: np.ndarray, temp_k: float = 298.15) -> np.ndarray:
    x = np.zeros_like(u)
    for j in range(n):
        u0 = p[f"{electrode} electrode host site standard potential ({j}) [V]"]
        share = p[f"{electrode} electrode host site occupancy fraction ({j})"]
        w = p[f"{electrode} electrode host site ideality factor ({j})"]
        with np.errstate(over="ignore"):   # far from the site potential the occupancy is exactly 0 or 1
            x += share / (1 + np.exp(FARADAY * (u - u0) / (w * R_GAS * temp_k)))
    return x


def _msmr_potential(p, electrode: str, n: int, x: np.ndarray) -> np.ndarray:
    grid = np.linspace(-0.5, 5.5, 60001)
    occ = _msmr_occupancy(p, electrode, n, grid)   # decreasing in potential
    return np.interp(x, occ[::-1], grid[::-1])


def electrode_window(name: str, p=None) -> dict[str, float]:
    """Stoichiometries at SOC 0 / 1 (x0, x100, y100, y0; + x0_2, x100_2 for composites), PyBaMM electrode SOH.

    SOC is linear in stoichiometry between the states where the equilibrium OCV equals the
    set's cut-off voltages (PyBaMM's ``initial_soc``), so OCV table, initial state and Coulomb
    counting agree for every cell built from the set.
    """
    import pybamm

    p = p if p is not None else load_params(name)[0]
    kind = set_kind(name)
    if kind in ("full", "msmr"):
        opts = MSMR_OPTIONS if kind == "msmr" else None
        x0, x100, y100, y0 = (float(v) for v in pybamm.lithium_ion.get_min_max_stoichiometries(p, options=opts))
        return {"x0": x0, "x100": x100, "y100": y100, "y0": y0}
    if kind == "composite":
        d = pybamm.lithium_ion.get_initial_stoichiometries_composite(1.0, p, options=COMPOSITE_OPTIONS)
        return {"x0": float(d["x_0_1"]), "x100": float(d["x_100_1"]), "x0_2": float(d["x_0_2"]),
                "x100_2": float(d["x_100_2"]), "y100": float(d["y_100_1"]), "y0": float(d["y_0_1"])}
    from scipy.optimize import brentq

    def gap(y: float, v: float) -> float:
        return float(ocp(p, "Positive electrode OCP [V]", np.array([y]))[0] - v)

    v_min, v_max = p["Lower voltage cut-off [V]"], p["Upper voltage cut-off [V]"]
    return {"y100": brentq(gap, 1e-4, 0.9999, args=(v_max,)), "y0": brentq(gap, 1e-4, 0.9999, args=(v_min,))}


def electrode_capacity_ah(p, electrode: str = "Positive", phase: str = "") -> float:
    """Ah of one electrode (or one phase of it) from stoichiometry 0 to 1."""
    pre = f"{phase}: " if phase else ""
    area = p["Electrode width [m]"] * p["Electrode height [m]"] * p["Number of electrodes connected in parallel to make a cell"]
    return float(p[f"{pre}{electrode} electrode active material volume fraction"] * p[f"{electrode} electrode thickness [m]"]
                 * area * p[f"{pre}Maximum concentration in {electrode.lower()} electrode [mol.m-3]"] * FARADAY / 3600.0)


def soc_capacity_ah(p, win: dict[str, float]) -> float:
    """Capacity between SOC 0 and 1, counted on the positive electrode (valid for every kind)."""
    return electrode_capacity_ah(p, "Positive") * (win["y0"] - win["y100"])


def ocv_curve(name: str, p, win: dict[str, float], soc: np.ndarray) -> dict[str, np.ndarray]:
    """Equilibrium OCV(SOC) [V] at the reference temperature: ``ocv``, ``un``, ``up`` (+ branches for composites)."""
    soc = np.asarray(soc, float)
    kind = set_kind(name)
    y = win["y0"] - soc * (win["y0"] - win["y100"])
    if kind == "msmr":
        x = win["x0"] + soc * (win["x100"] - win["x0"])
        un, up = _msmr_potential(p, "Negative", 6, x), _msmr_potential(p, "Positive", 4, y)
        return {"ocv": up - un, "un": un, "up": up}
    up = ocp(p, "Positive electrode OCP [V]", y)
    if kind == "halfcell":
        return {"ocv": up, "un": np.zeros_like(up), "up": up}
    if kind == "full":
        un = ocp(p, "Negative electrode OCP [V]", win["x0"] + soc * (win["x100"] - win["x0"]))
        return {"ocv": up - un, "un": un, "up": up}
    return _composite_ocv(p, win, soc, up)


def _composite_ocv(p, win: dict[str, float], soc: np.ndarray, up: np.ndarray) -> dict[str, np.ndarray]:
    """Composite negative: both phases at one potential, lithium shared by capacity; three secondary branches."""
    q1 = electrode_capacity_ah(p, "Negative", "Primary")
    q2 = electrode_capacity_ah(p, "Negative", "Secondary")
    n0 = q1 * win["x0"] + q2 * win["x0_2"]
    n100 = q1 * win["x100"] + q2 * win["x100_2"]
    nli = n0 + soc * (n100 - n0)
    sto = np.linspace(1e-4, 1 - 1e-4, 4001)
    grid = np.linspace(-0.05, 1.5, 6001)
    u1 = ocp(p, "Primary: Negative electrode OCP [V]", sto)
    x1 = np.interp(grid, np.minimum.accumulate(u1)[::-1], sto[::-1])   # monotone envelope for flat plateaus
    out = {"up": up}
    for branch, key in (("avg", "Secondary: Negative electrode OCP [V]"),
                        ("lith", "Secondary: Negative electrode lithiation OCP [V]"),
                        ("delith", "Secondary: Negative electrode delithiation OCP [V]")):
        x2 = np.interp(grid, np.minimum.accumulate(ocp(p, key, sto))[::-1], sto[::-1])
        total = q1 * x1 + q2 * x2          # decreasing in potential
        out[f"un_{branch}"] = np.interp(nli, total[::-1], grid[::-1])
    out["un"] = out["un_avg"]
    out["ocv"] = up - out["un"]
    out["ocv_charge"] = up - out["un_lith"]
    out["ocv_discharge"] = up - out["un_delith"]
    return out
