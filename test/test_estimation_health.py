"""SOH (rest/OCV capacity on a simulated aged pack) and RUL (interval coverage on held-out trajectories)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation.health import HealthEstimator
from bms_ai.estimation.rul import (
    RulEstimator,
    RulParams,
    evaluate_rul,
    fit_rul,
    load_rul_estimator,
    sample_trajectories,
)
from bms_ai.models.runtime import default_model_dir


def test_trajectories_reproducible_and_reach_eol() -> None:
    a = sample_trajectories(5, 3)
    b = sample_trajectories(5, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.soh_obs, y.soh_obs)
        assert x.soh[0] > 0.95 and x.soh[-1] <= 0.8 + 0.01
        assert np.all(np.diff(x.r_rel) > 0)     # resistance grows
    assert any(not np.array_equal(x.soh, y.soh) for x, y in zip(a, sample_trajectories(5, 4)))


def test_rul_interval_coverage_on_held_out() -> None:
    """Calibrated on one set, measured on another seed: 90 % interval covers 80..97 % (n = 240)."""
    train = sample_trajectories(60, 10)
    cal = sample_trajectories(60, 11)
    test = sample_trajectories(80, 12)
    p = fit_rul(train, cal, 0.01)
    # each held-out trajectory is predicted once: pooled = the knee and no-knee groups together
    no_knee = evaluate_rul(RulEstimator(p), [t for t in test if t.params["knee_efc"] == 0])["pooled"]
    knee = evaluate_rul(RulEstimator(p), [t for t in test if t.params["knee_efc"] > 0])["pooled"]
    pooled = {"n": no_knee["n"] + knee["n"],
              "coverage_90": (no_knee["coverage_90"] * no_knee["n"] + knee["coverage_90"] * knee["n"])
              / (no_knee["n"] + knee["n"])}
    assert pooled["n"] >= 200
    assert 0.80 <= pooled["coverage_90"] <= 0.97, pooled
    assert no_knee["rel_err_median"] <= 0.15, no_knee


def test_shipped_rul_params_load_and_predict() -> None:
    est, what = load_rul_estimator(default_model_dir(), "nmc")
    assert what == "rul_fadelaw_nmc_v1.json"
    tr = sample_trajectories(1, 99)[0]
    n = len(tr.efc) // 2
    rul, lo, hi = est.predict(tr.efc[:n], tr.soh_obs[:n])
    assert lo < rul < hi and math.isfinite(rul)
    bad, what = load_rul_estimator("/nonexistent", "nmc")
    assert what.startswith("defaults") and isinstance(bad, RulEstimator)
    assert math.isnan(RulEstimator(RulParams()).predict([1.0, 2.0], [1.0, 1.0])[0])   # too little history


def test_health_estimator_rul_from_history() -> None:
    tr = sample_trajectories(1, 5)[0]
    n = len(tr.efc) // 2
    h = HealthEstimator(2, 50.0, soh_history=list(zip(tr.efc[:n], tr.soh_obs[:n])), efc0=float(tr.efc[n - 1]))
    o = h.output()
    assert o.rul_lo <= o.rul_efc <= o.rul_hi
    assert abs(o.rul_efc - (tr.eol_efc - tr.efc[n - 1])) < 0.6 * (tr.eol_efc - tr.efc[n - 1])


@pytest.mark.pybamm
def test_soh_from_rests_on_aged_sim_pack() -> None:
    """Aged pack (SOH 0.88) from bms_ai.sim: rest, partial charge, rest; sensor noise + current offset."""
    pytest.importorskip("pybamm")
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    from bms_ai.sim import Phase, Scenario, simulate_drive

    sc = Scenario("aged_test", chemistry="nmc", segments=[
        Phase("rest", duration_s=700), Phase("charge", c_rate=1.0, soc_target=0.7),
        Phase("rest", duration_s=700)], ambient_c=25, soc0=0.3, soh=0.88)
    d = simulate_drive(sc, seed=3)
    rng = np.random.default_rng(0)
    q_true = d.capacity[0] / d.design_capacity_ah
    h = HealthEstimator(d.v.shape[1], d.design_capacity_ah, ocv=load_ocv("nmc"))
    nan = np.full(d.v.shape[1], np.nan)
    cur = d.current + 0.2 + rng.normal(0, 0.1, d.current.shape)            # offset + noise (A)
    v = np.round((d.v + rng.normal(0, 0.002, d.v.shape)) * 1000) / 1000     # 2 mV noise, 1 mV steps
    for k in range(len(d.t)):
        h.update(float(d.t[k]), float(cur[k]), v[k], nan)
    h.flush_rest()
    o = h.output()
    assert h.rest_updates == 1
    rmse = float(np.sqrt(np.mean((o.cell_soh - q_true) ** 2)))
    assert rmse <= 0.02, (rmse, o.cell_soh.mean(), q_true.mean())
    assert abs(o.cell_soh.mean() - 0.88) < 0.02
