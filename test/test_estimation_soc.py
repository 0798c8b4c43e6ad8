"""SocEstimator v2: one feature pipeline for training and inference, a classical fallback with its reason, R0 steps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bms_ai.estimation.features import EtaFeatures, eta_features_table, hysteresis_rate_for
from bms_ai.estimation.health import HealthEstimator
from bms_ai.estimation.soc import SocEstimator
from bms_ai.sim.dataset import load_drive

DATA = Path(__file__).resolve().parent / "data"


def test_feature_table_equals_streaming_pipeline() -> None:
    """Training features (table) and inference features (streaming) are the same code path."""
    d = load_drive(DATA / "selftest_lfp")
    k = 500
    rate = hysteresis_rate_for("lfp")
    tab = eta_features_table(d.t[:k], d.current[:k], d.cell_t[:k], d.soc[:k], d.capacity_ah, rate)
    fx = EtaFeatures(d.n_cells, d.cell_t.shape[1], d.capacity_ah, rate)
    for j in range(k):
        row = fx.update(float(d.t[j]), float(d.current[j]), d.cell_t[j], d.soc[j])
    assert np.array_equal(tab[-1], row)


def test_no_model_runs_the_classical_overpotential_with_a_reason() -> None:
    d = load_drive(DATA / "selftest_nmc")
    est = SocEstimator(d.n_cells, d.cell_t.shape[1], "nmc", d.capacity_ah, soc0=d.soc[0])
    for j in range(1200):
        out = est.step(float(d.t[j]), float(d.current[j]), d.cell_v[j], d.cell_t[j])
    assert out.method == "classical" and out.fallback_reason
    assert np.all((out.cell_soc >= 0) & (out.cell_soc <= 1)) and np.isfinite(out.cell_sigma).all()
    assert np.max(np.abs(out.cell_soc - d.soc[1199])) < 0.03


def test_r0_from_current_steps() -> None:
    """R0 from dV/dI on steps, checked against a synthetic step with known R0."""
    h = HealthEstimator(3, 50.0)
    r0 = np.array([0.001, 0.0012, 0.0015])
    t, v = 0.0, np.full(3, 3.7)
    for k in range(200):
        i = -50.0 if (k // 20) % 2 else 0.0
        h.update(t + 0.1 * k, i, v + r0 * i, np.full(3, 0.5))
    assert np.allclose(h.output().cell_r0, r0, rtol=0.02)
