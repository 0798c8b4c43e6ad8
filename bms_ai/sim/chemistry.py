"""Cell chemistries: which PyBaMM parameter set, how cells form a pack cell group,
and the few quantities the per-cell layer needs (OCV table, thermal mass).

A pack "cell" is a parallel group of ``n_parallel`` identical physical cells
(the BMS measures one voltage per group); all capacities/resistances in the
truth table refer to the group.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np

os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")

FARADAY = 96485.33212


@dataclass(frozen=True)
class Chemistry:
    name: str
    parameter_set: str
    n_parallel: int
    v_min: float               # BMS operating window per cell group [V]
    v_max: float
    r_guess_ohm: float         # DC resistance of one physical cell at 25 degC (planning only)
    cell_mass_kg: float        # one physical cell, for the per-cell extra-heat model
    cell_cp: float             # J/(kg K)
    r_th_cell: float           # K/W, cell to coolant/ambient
    hysteresis_gap_v: float    # full charge/discharge OCV gap (0 = none)
    hysteresis_rate: float     # one-state model: 1/(fraction of capacity) decay rate
    pack_config: str           # config file name under config/
    cell_rated_ah: float       # electrode width is scaled so the PyBaMM cell has exactly this capacity

    @property
    def design_capacity_ah(self) -> float:
        return self.cell_rated_ah * self.n_parallel


CHEMISTRIES: dict[str, Chemistry] = {
    # LG M50 21700 (Chen2020): 5 Ah; 10p -> 50 Ah group, matches config/pack96.yaml
    "nmc": Chemistry("nmc", "Chen2020", 10, 2.8, 4.2, 0.025, 0.068, 1000.0, 15.0,
                     0.0, 0.0, "pack96.yaml", 5.0),
    # A123 26650 LFP (Prada2013): 2.3 Ah; 20p -> 46 Ah group, config/pack96_lfp.yaml.
    # Hysteresis: 20 mV full gap, inside the 5-25 mV range of LFP/graphite
    # major loops (Roscher & Sauer, J. Power Sources 196 (2011) 331-336;
    # Marongiu et al., Applied Energy, 2016).
    "lfp": Chemistry("lfp", "Prada2013", 20, 2.5, 3.6, 0.012, 0.076, 1100.0, 12.0,
                     0.020, 25.0, "pack96_lfp.yaml", 2.3),
}

# Lumped-thermal parameters absent from Prada2013: copied from Chen2020 except
# the 26650 geometry (volume, cooling surface) computed for 26 mm x 65 mm.
_PRADA_THERMAL = {"Cell volume [m3]": np.pi * 0.013 ** 2 * 0.065,
                  "Cell cooling surface area [m2]": 2 * np.pi * 0.013 * 0.065 + 2 * np.pi * 0.013 ** 2}


def get_chemistry(name: str) -> Chemistry:
    try:
        return CHEMISTRIES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown chemistry {name!r}; choose from {sorted(CHEMISTRIES)}") from None


@functools.cache
def base_parameters(name: str):
    """PyBaMM ParameterValues for the chemistry (complete for SPMe + lumped thermal)."""
    import pybamm

    chem = get_chemistry(name)
    p = pybamm.ParameterValues(chem.parameter_set)
    if chem.parameter_set == "Prada2013":
        donor = pybamm.ParameterValues("Chen2020")
        have = set(p.keys())  # ParameterValues is not a dict
        missing = {k: donor[k] for k in sorted(donor.keys()) if k not in have}  # noqa: SIM118
        missing.update(_PRADA_THERMAL)
        p.update(missing, check_already_exists=False)
    # scale electrode width so the stoichiometric capacity equals the rating exactly
    # (Chen2020: 5.153 -> 5.0 Ah; Prada2013: 2.3035 -> 2.3 Ah); OCV and kinetics per area unchanged
    p["Electrode width [m]"] = p["Electrode width [m]"] * chem.cell_rated_ah / _raw_capacity_ah(p, name)
    p["Nominal cell capacity [A.h]"] = chem.cell_rated_ah
    return p


@functools.cache
def stoich_window(name: str) -> tuple[float, float, float, float]:
    import pybamm

    x0, x100, y100, y0 = pybamm.lithium_ion.get_min_max_stoichiometries(base_parameters(name))
    return float(x0), float(x100), float(y100), float(y0)


@functools.cache
def cell_capacity_ah(name: str) -> float:
    """Capacity of one physical cell between the PyBaMM cut-off stoichiometries."""
    return _raw_capacity_ah(base_parameters(name), name)


def _raw_capacity_ah(p, name: str) -> float:
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
    s, v, _ = ocv_table(name)
    soc = np.asarray(soc, dtype=float)
    # linear extrapolation slope beyond the window keeps over/under-charge visible
    out = np.interp(soc, s, v)
    lo, hi = soc < 0, soc > 1
    if lo.any():
        out[lo] = v[0] + (v[1] - v[0]) / (s[1] - s[0]) * soc[lo]
    if hi.any():
        out[hi] = v[-1] + (v[-1] - v[-2]) / (s[-1] - s[-2]) * (soc[hi] - 1)
    return out


def anode_ocp(name: str, soc: np.ndarray) -> np.ndarray:
    s, _, un = ocv_table(name)
    return np.interp(soc, s, un)
