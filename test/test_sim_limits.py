"""Cells stay in their voltage window: the current plan is derated after a physics
solve shows it too aggressive, and a diffusion-limited end of discharge truncates."""

from __future__ import annotations

import pytest

from bms_ai.chemistry import get_chemistry  # noqa: E402
from bms_ai.sim import Phase, Scenario, simulate_drive  # noqa: E402

pytestmark = pytest.mark.pybamm


def test_aggressive_charge_is_replanned_inside_the_window():
    sc = Scenario("hot_3c", "nmc", [Phase("charge", c_rate=3.0, soc_target=0.85, duration_s=1500)],
                  ambient_c=45.0, soc0=0.5, soh=0.7)
    msgs: list[str] = []
    d = simulate_drive(sc, seed=1, progress=msgs.append)
    chem = get_chemistry("nmc")
    assert any("planning resistance" in m for m in msgs)
    assert d.truncated_at_s is None
    assert d.v.max() <= chem.v_max + 0.06
    # a 3C request on hot aged cells runs voltage-limited (CV) most of the way
    assert 2 in set(d.charger_state.tolist())
    assert d.soc.mean(axis=1)[-1] > 0.8


def test_diffusion_limited_discharge_truncates_cleanly():
    sc = Scenario("lfp_2c_empty", "lfp", [Phase("discharge", c_rate=2.0, soc_target=0.0, duration_s=2000)],
                  soc0=0.5)
    d = simulate_drive(sc, seed=1)
    chem = get_chemistry("lfp")
    assert d.truncated_at_s is not None and d.truncated_at_s < 2000
    assert d.t[-1] <= d.truncated_at_s + 1e-9
    # the nominal cell ends at the solver cut-off; spread cells at most a little beyond
    assert d.v.min() > chem.v_min - 0.3 - 0.15
