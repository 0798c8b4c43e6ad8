"""LFP: OCV hysteresis (charge branch above discharge branch) and its pack config."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bms_ai.can.packconfig import load_pack_config  # noqa: E402
from bms_ai.chemistry import get_chemistry  # noqa: E402
from bms_ai.chemistry.pybamm_cell import ocv  # noqa: E402
from bms_ai.sim import Phase, Scenario, simulate_drive  # noqa: E402
from bms_ai.sim.scenario import Variation  # noqa: E402

pytestmark = pytest.mark.pybamm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAME = Variation(capacity=0, resistance=0, soc=0, self_discharge_a=0, cooling=0)


def _rest_gap(chem: str) -> float:
    """Rested voltage after reaching SOC 0.55 from below minus from above [V]."""
    up = Scenario("up", chem, [Phase("charge", c_rate=0.5, soc_target=0.55, duration_s=3000),
                               Phase("rest", duration_s=1200)], soc0=0.35, variation=SAME)
    dn = Scenario("dn", chem, [Phase("discharge", c_rate=0.5, soc_target=0.55, duration_s=3000),
                               Phase("rest", duration_s=1200)], soc0=0.75, variation=SAME)
    du, dd = simulate_drive(up, seed=1), simulate_drive(dn, seed=1)
    assert du.soc[-1, 0] == pytest.approx(0.55, abs=0.01) and dd.soc[-1, 0] == pytest.approx(0.55, abs=0.01)
    # compare against the OCV at each one's own SOC so the small SOC mismatch cancels
    gu = du.v[-1, 0] - ocv(chem, np.array([du.soc[-1, 0]]))[0]
    gd = dd.v[-1, 0] - ocv(chem, np.array([dd.soc[-1, 0]]))[0]
    return float(gu - gd)


def test_lfp_charge_discharge_ocv_gap():
    gap_lfp = _rest_gap("lfp")
    gap_nmc = _rest_gap("nmc")
    full = get_chemistry("lfp").hysteresis_gap_v
    # after 20 % SOC in one direction the one-state model is on its branch
    assert 0.8 * full < gap_lfp < 1.5 * full + 0.005
    # NMC: after 20 min rest the diffusion overpotential has relaxed, no hysteresis left
    assert abs(gap_nmc) < 0.25 * full


def test_lfp_pack_config_matches_simulator():
    cfg = load_pack_config(os.path.join(ROOT, "config", "pack96_lfp.yaml"))
    chem = get_chemistry("lfp")
    assert cfg.chemistry == "lfp"
    assert cfg.design_capacity_ah == pytest.approx(chem.design_capacity_ah)
    assert cfg.n_cells == 96 and cfg.n_temps == 32


def test_lfp_drive_voltages_on_the_flat_plateau():
    d = simulate_drive(Scenario("lfp_short", "lfp", [Phase("drive", "udds", repeats=0.05)], soc0=0.6), seed=2)
    assert d.v.min() > 3.0 and d.v.max() < 3.5
    assert d.design_capacity_ah == pytest.approx(46.0)
