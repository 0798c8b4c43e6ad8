"""Cell catalogue: the variant split, seeded cell draws, ageing to a target SOH, true OCV, DC resistance."""

from __future__ import annotations

import os

import numpy as np
import pytest

from bms_ai.core.registry import UnknownName
from bms_ai.sim.cells import SPREAD, CellSpec, draw_cell
from bms_ai.sim.variants import draw_variant_cell, get_variant, spec, variant_names

os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")

TRAIN = {"nmc": ["NMC_Chen2020", "NMC_OKane2022", "NMC_ORegan2022_4V2", "NMC532_Mohtat2020"],
         "lfp": ["LFP_A123", "LFP_T_graphiteB", "LFP_T_power"]}
HELD_OUT = {"nmc": ["NMC_Ecker2015", "NCA_Kim2011"], "lfp": ["LFP_H_energy", "LFP_H_graphiteC"]}


def test_split_by_cell_type() -> None:
    for chem in ("nmc", "lfp"):
        assert variant_names(chem, "train") == TRAIN[chem]
        assert variant_names(chem, "heldout") == HELD_OUT[chem]
    assert set(variant_names()) == {n for d in (TRAIN, HELD_OUT) for v in d.values() for n in v}
    assert get_variant("NCA_Kim2011").held_out and not get_variant("NMC_Chen2020").held_out
    assert get_variant("LFP_A123").nominal_ah == 2.3 and get_variant("NMC_OKane2022").nominal_ah == 5.0
    assert all(get_variant(n).hyst_mv > 0 for n in TRAIN["lfp"] + HELD_OUT["lfp"])
    assert all(get_variant(n).hyst_mv == 0 for n in TRAIN["nmc"] + HELD_OUT["nmc"])


def test_unknown_variant_names_the_known_ones() -> None:
    with pytest.raises(UnknownName, match="NMC_Chen2020"):
        get_variant("NMC_Nonexistent")


def test_draw_is_seeded_and_spread_scales_the_knobs() -> None:
    a, b = draw_cell("Chen2020", 3), draw_cell("Chen2020", 3)
    assert a == b and a != draw_cell("Chen2020", 4)
    base = draw_cell("Chen2020", 3, spread=0.0)
    assert all(getattr(base, k) == (0.0 if SPREAD[k][0] == "uniform" else 1.0) for k in SPREAD)
    wide = draw_cell("Chen2020", 3, spread=2.0)
    assert abs(wide.area_scale - 1) == pytest.approx(2 * abs(a.area_scale - 1))
    assert CellSpec.from_json(a.to_json()) == a


def test_aged_draw_has_mechanism_shares() -> None:
    cs = draw_cell("Chen2020", 1, soh=(0.7, 0.95))
    assert 0.7 <= cs.soh <= 0.95
    assert cs.lli + cs.lam_ne + cs.lam_pe == pytest.approx(1.0)
    assert 0.4 <= cs.lli <= 0.8 and 1.5 <= cs.k_r <= 3.5
    fresh = draw_cell("Chen2020", 1)
    assert fresh.soh == 1.0 and fresh.lli == 0.0


def test_variant_draw_keeps_the_variant_design() -> None:
    v = draw_variant_cell("LFP_T_power", 7)
    plain = draw_cell("Prada2013", 7)
    assert v.j0_n == pytest.approx(1.5 * plain.j0_n) and v.warp_n == plain.warp_n
    assert v.hyst_mv == 20.0 and v.overrides == spec("LFP_T_power").overrides and v.target_ah == 2.3


@pytest.mark.pybamm
def test_load_params_completes_every_set() -> None:
    from bms_ai.chemistry.pybamm_cell import PARAMETER_SETS, electrode_window, load_params, ocv_curve, soc_capacity_ah

    p, filled = load_params("Prada2013")
    assert "Cell volume [m3]" in filled and p["Cell volume [m3]"] == pytest.approx(np.pi * 0.013 ** 2 * 0.065)
    soc = np.linspace(0, 1, 51)
    for name in PARAMETER_SETS:
        p, _ = load_params(name)
        win = electrode_window(name, p)
        assert soc_capacity_ah(p, win) > 0, name
        o = ocv_curve(name, p, win, soc)["ocv"]
        assert o[-1] - o[0] > 0.4, name
        assert o[0] == pytest.approx(p["Lower voltage cut-off [V]"], abs=0.05), name


@pytest.mark.pybamm
def test_ageing_hits_the_target_and_moves_the_ocv() -> None:
    from bms_ai.sim.cells import make_cell, true_ocv

    fresh = draw_variant_cell("NMC_Chen2020", 2, spread=0.0)
    aged = draw_variant_cell("NMC_Chen2020", 2, soh=0.8, spread=0.0)
    pf, info_f = make_cell(fresh)
    pa, info_a = make_cell(aged)
    assert info_f["capacity_ah"] == pytest.approx(5.0, rel=1e-6)
    assert info_a["soh_real"] == pytest.approx(0.8, abs=1e-3)
    assert info_a["capacity_ah"] == pytest.approx(4.0, rel=2e-3)
    assert info_a["lli"] > 0 and info_a["lam_ne"] > 0 and info_a["lam_pe"] > 0
    assert info_a["r_contact_ohm"] == pytest.approx(aged.k_r * 0.2 * info_a["rdc_base_ohm"])
    soc, o_f, gap = true_ocv(fresh, (pf, info_f))
    _, o_a, _ = true_ocv(aged, (pa, info_a))
    assert gap == 0.0 and np.all(np.diff(o_f) > 0)
    mid = (soc >= 0.2) & (soc <= 0.8)
    assert np.max(np.abs(o_a - o_f)[mid]) > 0.01     # LLI-dominated ageing moves OCV(SOC) by tens of mV
    assert o_a[0] == pytest.approx(o_f[0], abs=1e-3) and o_a[-1] == pytest.approx(o_f[-1], abs=1e-3)  # same cut-offs


@pytest.mark.pybamm
def test_contact_resistance_adds_to_the_dc_resistance() -> None:
    from bms_ai.sim.cells import dc_resistance, make_cell

    cs = spec("NMC_Chen2020")
    p, info = make_cell(cs)
    r0 = dc_resistance(cs.base, p, info["capacity_ah"])
    assert r0 == pytest.approx(info["rdc_base_ohm"], rel=1e-6)
    p2, info2 = make_cell(spec("NMC_Chen2020", r_contact_frac=0.5))
    r1 = dc_resistance(cs.base, p2, info2["capacity_ah"])
    assert r1 - r0 == pytest.approx(0.5 * r0, rel=0.02)


@pytest.mark.pybamm
def test_check_cell_solves_a_held_out_variant() -> None:
    from bms_ai.sim.cells import check_cell, true_ocv

    cs = draw_variant_cell("LFP_H_graphiteC", 1)
    r = check_cell(cs, temps=(25.0,))
    assert r["runs"]["1C@25"].startswith("ok") and r["runs"]["UDDS@25"] == "ok"
    assert 0.01 < r["rdc_mohm"] / 1000 < 0.06 and r["docv_max_mv_20_80"] < 30
    soc, o, gap = true_ocv(cs)
    assert gap == pytest.approx(0.010)
    plateau = (soc >= 0.3) & (soc <= 0.7)
    assert np.ptp(o[plateau]) < 0.08          # LFP: flat mid-SOC OCV
