"""PyBaMM parameters of a chemistry's physical cell: the one place they are set up.

``published_parameters`` is the PyBaMM set as published, only completed for
the lumped thermal model (cell-level training drives, ``bms_ai.training.synth``).
``base_parameters`` also fixes the can geometry and scales the electrode width
so the cell has exactly its rated capacity (the simulator's pack cells).
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
