"""Regenerate the OCV tables from PyBaMM parameter sets (run once; output committed).

OCV(SOC) = U_p(y(SOC)) - U_n(x(SOC)) with the stoichiometry window from
PyBaMM's electrode-SOH solver, i.e. the same SOC definition PyBaMM uses for
``initial_soc``. NMC: Chen2020 (LG M50, NMC811/graphite-SiOx).
LFP: Prada2013 (A123 ANR26650, LFP/graphite).

    PYBAMM_DISABLE_TELEMETRY=true python -m bms_ai.chemistry.data.make_ocv
"""

from __future__ import annotations

import os

import numpy as np

from bms_ai.chemistry.registry import CHEMISTRIES


def main() -> None:
    """Write ocv_<chem>.csv for every registered chemistry."""
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    import pybamm

    soc = np.linspace(0.0, 1.0, 201)
    for chem in CHEMISTRIES.names():
        entry = CHEMISTRIES.get(chem)
        name = entry.parameter_set
        pv = pybamm.ParameterValues(name)
        x0, x100, y100, y0 = pybamm.lithium_ion.get_min_max_stoichiometries(pv)
        x = x0 + soc * (x100 - x0)
        y = y0 - soc * (y0 - y100)
        un = pv["Negative electrode OCP [V]"]
        up = pv["Positive electrode OCP [V]"]
        u_neg = np.array([pv.evaluate(un(pybamm.Scalar(float(v)))) if callable(un) else float(un) for v in x]).ravel()
        u_pos = np.array([pv.evaluate(up(pybamm.Scalar(float(v)))) if callable(up) else float(up) for v in y]).ravel()
        ocv = u_pos - u_neg
        header = (f"OCV table from PyBaMM ParameterValues('{name}') OCP functions, 25 C; "
                  f"x0={x0:.6f} x100={x100:.6f} y100={y100:.6f} y0={y0:.6f}; "
                  f"nominal capacity {pv['Nominal cell capacity [A.h]']} Ah\nsoc,ocv_v")
        np.savetxt(entry.ocv_table_path, np.column_stack([soc, ocv]), delimiter=",", fmt="%.6f", header=header)
        print(chem, ocv[0], ocv[-1])


if __name__ == "__main__":
    main()
