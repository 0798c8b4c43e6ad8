"""Fleet cell types: the closed-form recursion, the shipped fits, park physics, and one check against PyBaMM."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from bms_ai.fleet import cellmodel as cm
from bms_ai.sim.variants import get_variant


def _loop(a, x, y0):
    out, y = np.empty(np.broadcast_shapes(a.shape, x.shape)), y0
    for k in range(len(out)):
        y = a[k] * y + x[k]
        out[k] = y
    return out


def test_recur_matches_the_loop_including_long_parks():
    rng = np.random.default_rng(3)
    a = rng.uniform(0.9, 1.0, (3000, 4))
    a[::500] = 1e-250                        # a park decays the state to nothing: no overflow, no NaN
    x = rng.standard_normal((3000, 4))
    y0 = rng.standard_normal(4)
    got = cm.recur(a, x, y0)
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _loop(a, x, y0), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(cm.recur(a[:, 0], x[:, 0], 0.5), _loop(a[:, 0], x[:, 0], 0.5), rtol=1e-9, atol=1e-9)


def test_shipped_cell_types_are_complete_and_match_their_variant():
    names = cm.available()
    assert "NMC_Chen2020" in names
    for name in names:
        ct = cm.load_cell_type(name)
        var = get_variant(name)
        assert (ct.chemistry, ct.held_out) == (var.chemistry, var.held_out)
        assert ct.hyst_gap_v == pytest.approx(var.hyst_mv / 1000.0)
        assert np.all(np.diff(ct.ocv.ocv) >= 0) and ct.v_min < ct.ocv.ocv[100] < ct.v_max
        assert np.asarray(ct.rc_r).shape == (len(ct.rc_tau), len(ct.temp_knots), len(ct.soc_knots))
        assert ct.heat_capacity_j_k > 0 and ct.heat_transfer_w_k > 0 and ct.leak_a > 0
        assert ct.fit["command"].startswith("python -m bms_ai.fleet.cellmodel fit")
        assert ct.fit["validation"]["drives"], "every shipped type carries its held-out RMSE"


def test_unknown_cell_type_is_a_one_line_error():
    with pytest.raises(ValueError) as e:
        cm.load_cell_type("NMC_Nonexistent")
    assert "\n" not in str(e.value) and "fitted:" in str(e.value)


def test_file_from_another_version_is_rejected(tmp_path):
    d = json.loads((cm.CELLS_DIR / "NMC_Chen2020.json").read_text())
    d["unknown_field"] = 1
    with pytest.raises(TypeError):
        cm.CellType.from_json(d)


def _park_run(ct, gap_s=7200.0, leak=0.01):
    """Charge 600 s, park ``gap_s``, discharge 600 s at 25 degC: two cells of 50 Ah groups."""
    dt = np.r_[0.0, np.ones(600), gap_s, np.ones(600)]
    i = np.r_[0.0, np.full(600, 20.0), 0.0, np.full(600, -20.0)]
    cap = np.array([50.0, 48.0])
    run = cm.run_cells(ct, dt, i, np.full(len(i), 25.0), np.array([0.5, 0.5]), cap, n_parallel=10,
                       leak_a=np.array([0.0, leak]), h0=np.array([0.3, -0.3]))
    return dt, i, cap, run


def test_run_cells_counts_charge_and_loses_the_leak_in_parks():
    ct = cm.load_cell_type("NMC_Chen2020")
    dt, i, cap, run = _park_run(ct)
    t = np.cumsum(dt)
    expect = 0.5 + (np.cumsum(i * dt)[:, None] - np.array([0.0, 0.01]) * t[:, None]) / (3600.0 * cap)
    np.testing.assert_allclose(run.soc, expect, atol=1e-12)
    # the park itself: no current, only the leak
    drop = run.soc[601] - run.soc[600]
    np.testing.assert_allclose(drop, [0.0, -0.01 * 7200.0 / (3600.0 * 48.0)], atol=1e-12)
    # relaxed after two hours: the voltage sits on the OCV, the temperature on the ambient
    np.testing.assert_allclose(run.v[601], ct.ocv(run.soc[601]), atol=2e-3)
    assert abs(float(run.temp[601].mean()) - 25.0) < 0.2


def test_hysteresis_is_frozen_while_parked():
    ct = dataclasses.replace(cm.load_cell_type("NMC_Chen2020"), hyst_gap_v=0.02)
    _, _, _, run = _park_run(ct)
    np.testing.assert_allclose(run.h[601], run.h[600], atol=1e-7)     # the park sample changes nothing
    assert run.h[600].min() > 0.5 and run.h[-1].max() < -0.5           # moved towards charge, then discharge


@pytest.mark.pybamm
def test_fitted_type_follows_pybamm_on_an_unseen_drive():
    """NMC_Chen2020 against a short PyBaMM drive it was not fitted on (docs/fleet_sim.md: 7.1 mV measured)."""
    ct = cm.load_cell_type("NMC_Chen2020")
    d = cm.pybamm_drive("NMC_Chen2020", 300, 25.0, 0.3, hysteresis=True)
    assert cm.rmse_mv(ct, d) <= 10.0
