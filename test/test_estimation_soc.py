"""Estimators against PyBaMM truth on the bundled self-test drives (shipped models, no rclpy)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from testutil import trap_soc_model

from bms_ai.estimation.evaluate import run_drive
from bms_ai.estimation.features import SocFeatures, soc_features_table
from bms_ai.estimation.health import HealthEstimator
from bms_ai.estimation.pack import open_models
from bms_ai.estimation.soc import SocEstimator
from bms_ai.models.manifest import write_manifest
from bms_ai.models.runtime import LoadedModel, ModelRegistry
from bms_ai.sim.dataset import RecordedDrive, load_drive

DATA = Path(__file__).resolve().parent / "data"
# Stated bounds on the 15-min self-test drives (25 C; initial SOC known), measured values in docs/estimation.md.
# Measured with the shipped models: NMC NN+CC 1.5 % / max 2.0 %, LFP 1.3 % / 2.2 %; EKF 1.5 % / 9.4 %.
# The fast tier runs the first minutes (4 past the NN warm-up; 6 for the convergence checked at 5 min),
# -m slow the whole drives.
WHOLE = pytest.param(None, marks=pytest.mark.slow, id="whole")
BOUNDS = {"nmc": {"nn_rmse": 0.02, "nn_max": 0.03, "ekf_rmse": 0.03, "wrong_init_5min": 0.03},
          "lfp": {"nn_rmse": 0.02, "nn_max": 0.035, "ekf_rmse": 0.15, "wrong_init_5min": 0.10}}


@pytest.fixture(scope="module")
def registry(root: Path) -> ModelRegistry:
    reg = open_models(root / "models")
    reg.poll()
    return reg


def selftest_drive(chem: str, seconds: float | None = None) -> RecordedDrive:
    """The bundled self-test drive, cut to its first ``seconds`` (None: whole)."""
    d = load_drive(DATA / f"selftest_{chem}")
    if seconds is None:
        return d
    k = int(np.searchsorted(d.t, d.t[0] + seconds))
    return replace(d, t=d.t[:k], current=d.current[:k], cell_v=d.cell_v[:k], cell_t=d.cell_t[:k], soc=d.soc[:k])


@pytest.mark.parametrize("seconds", [240.0, WHOLE])
@pytest.mark.parametrize("chem", ["nmc", "lfp"])
def test_soc_against_truth_within_bounds(registry: ModelRegistry, chem: str, seconds: float | None) -> None:
    d = selftest_drive(chem, seconds)
    r = run_drive(d, registry)
    assert r.method_used == "nn+cc"
    m = r.metrics
    b = BOUNDS[chem]
    assert m["nn"]["rmse"] <= b["nn_rmse"], m
    assert m["nn"]["max"] <= b["nn_max"], m
    assert m["ekf"]["rmse"] <= b["ekf_rmse"], m
    assert np.all((r.est["nn"] >= 0) & (r.est["nn"] <= 1))
    assert np.all(np.isfinite(r.sigma)) and r.sigma[-1] < 0.05


@pytest.mark.parametrize("seconds", [360.0, WHOLE])
@pytest.mark.parametrize("chem", ["nmc", "lfp"])
def test_wrong_initial_soc_converges(registry: ModelRegistry, chem: str, seconds: float | None) -> None:
    d = selftest_drive(chem, seconds)
    s0 = np.clip(d.soc[0] - 0.3, 0, 1)
    r = run_drive(d, registry, soc0=s0, condition="init-30")
    assert r.metrics["cc"]["max_after_5min"] > 0.25          # Coulomb counting keeps the error
    # LFP misses the 2 % target here (measured 7.8 %): the NN is weak on the plateau, see reports/estimation
    assert r.metrics["nn"]["max_after_5min"] <= BOUNDS[chem]["wrong_init_5min"], r.metrics["nn"]


def test_no_model_falls_back_to_ekf_with_reason() -> None:
    d = selftest_drive("nmc", 120.0)
    r = run_drive(d, None)
    assert r.method_used == "ekf"
    assert np.allclose(r.est["nn"], r.est["ekf"])


def test_feature_table_equals_streaming_pipeline() -> None:
    """Training features (table) and inference features (streaming) are the same code path."""
    d = load_drive(DATA / "selftest_lfp")
    tab = soc_features_table(d.t[:500], d.current[:500], d.cell_v[:500], d.cell_t[:500], d.capacity_ah)
    fx = SocFeatures(d.n_cells, d.cell_t.shape[1], d.capacity_ah)
    for k in range(500):
        row = fx.update(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k])
    assert np.array_equal(tab[-1], row)


def test_r0_from_current_steps() -> None:
    """R0 from dV/dI on steps, checked against a synthetic step with known R0."""
    h = HealthEstimator(3, 50.0)
    r0 = np.array([0.001, 0.0012, 0.0015])
    t, v = 0.0, np.full(3, 3.7)
    for k in range(200):
        i = -50.0 if (k // 20) % 2 else 0.0
        h.update(t + 0.1 * k, i, v + r0 * i, np.full(3, 0.5))
    assert np.allclose(h.output().cell_r0, r0, rtol=0.02)


# ----------------------------------------------------------------------------- run-time output guard

TRAP_V = 3.85   # the self-test drive's cells cross it often: none, one or both cells above it


def _trap(tmp_path: Path, kind: str, threshold: float) -> LoadedModel:
    """A trap model (testutil.trap_soc_model) loaded through the registry, as the estimator node gets it."""
    write_manifest(tmp_path, [trap_soc_model(tmp_path, kind, threshold)])
    reg = open_models(tmp_path)
    reg.poll()
    model = reg.get("soc", "nmc")
    assert model is not None, reg.slot("soc", "nmc").reason      # the smoke input cannot see the trap
    return model


@pytest.mark.parametrize(("kind", "needle"), [("nan", "non-finite"), ("huge", "outside the declared range")])
def test_refused_cells_follow_the_ekf(tmp_path: Path, kind: str, needle: str) -> None:
    """NaN or 1e30 for cells above 3.85 V: those cells follow the EKF, the others the NN; no NaN, counted."""
    model = _trap(tmp_path, kind, TRAP_V)
    d = selftest_drive("nmc", 120.0)       # one minute past the warm-up: 2 mixed steps, 355 on the EKF
    est = SocEstimator(d.n_cells, d.cell_t.shape[1], "nmc", d.capacity_ah, model=model, soc0=d.soc[0],
                       retire_after=10 ** 9)
    steps = cells = 0
    seen = set()
    for k in range(len(d.t)):
        o = est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k])
        refused = d.cell_v[k].astype(np.float32) > np.float32(TRAP_V)    # what the graph compares
        n = int(refused.sum())
        steps, cells = steps + (n > 0), cells + n
        assert np.isfinite(o.cell_soc).all() and np.isfinite(o.soc) and np.isfinite(o.sigma)
        assert (f"{n} cell(s): model output refused: soc: " in o.fallback_reason) == (n > 0), o.fallback_reason
        assert (needle in o.fallback_reason) == (n > 0)
        if d.t[k] - d.t[0] < est.fusion.warmup_s:
            assert o.method == "nn+cc"                   # NN not used yet: Coulomb counting for every cell
            continue
        assert o.method == ("nn+cc" if n == 0 else "ekf" if n == d.n_cells else "mixed")
        assert np.array_equal(o.cell_soc[refused], np.clip(o.ekf_soc[refused], 0.0, 1.0))
        assert np.isnan(o.nn_soc[refused]).all() and np.isfinite(o.nn_soc[~refused]).all()
        assert abs(o.soc - d.soc[k].mean()) < 0.04
        seen.add(o.method)
    assert seen == {"nn+cc", "mixed", "ekf"}
    g = est.guard
    assert (g.steps, g.cells) == (steps, cells) and steps > 500 and needle in g.last_reason
    assert model.guard.rejected_rows == cells and est.retire_request == ""


def test_retire_request_after_consecutive_refusals(tmp_path: Path) -> None:
    """Every cell refused: after ``retire_after`` steps in a row the estimator asks to retire the model."""
    model = _trap(tmp_path, "nan", 0.0)
    d = selftest_drive("nmc", 5.0)
    est = SocEstimator(d.n_cells, d.cell_t.shape[1], "nmc", d.capacity_ah, model=model, soc0=d.soc[0],
                       retire_after=20)
    for k in range(20):
        assert est.retire_request == ""
        o = est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k])
        assert np.isfinite(o.cell_soc).all()
    assert est.retire_request.startswith("output guard refused cells in 20 consecutive steps (last: soc: non-finite")
    assert est.guard.consecutive == 20
    est.set_model(None, "retired")                       # the owner's answer: the EKF from here on
    assert est.retire_request == "" and est.guard.consecutive == 0 and est.guard.steps == 20
    o = est.step(float(d.t[20]), float(d.current[20]), d.cell_v[20], d.cell_t[20])
    assert o.method == "ekf" and o.fallback_reason == "retired" and np.array_equal(o.cell_soc, o.ekf_soc)
