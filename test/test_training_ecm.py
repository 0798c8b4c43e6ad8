"""The classical fallback's identification gives back the parameters of ideal ECM cells, and honest sigmas."""

from __future__ import annotations

import numpy as np
import pytest

from bms_ai.estimation.filter import FilterParams
from bms_ai.estimation.overpotential import EcmParams
from bms_ai.training.ecm import calibrate_ecm, ecm_cell_drive, ecm_eta, ecm_literal, fit_ecm
from bms_ai.training.rows import drive_rng, drive_rows

TRUE = EcmParams(r0=0.002, r1=0.0015, tau=40.0, activation_k=3000.0, hysteresis_v=0.01)


@pytest.fixture(scope="module")
def rows():
    drives = [ecm_cell_drive(TRUE, "lfp", s, amb, duration=1800.0, dt=2.0) for s, amb in ((1, 0.0), (2, 25.0), (3, 40.0))]
    return [drive_rows(d, drive_rng(0, d.name), 2.0, 4) for d in drives]


def test_identification_recovers_the_cells(rows) -> None:
    p = fit_ecm(rows, "lfp", taus=(20.0, 40.0, 80.0), ks=(2000.0, 3000.0, 4000.0), log=lambda *a, **k: None)
    assert (p.tau, p.activation_k) == (40.0, 3000.0)
    assert p.r0 == pytest.approx(TRUE.r0, rel=0.02) and p.r1 == pytest.approx(TRUE.r1, rel=0.02)
    assert p.hysteresis_v == pytest.approx(TRUE.hysteresis_v, abs=5e-4)
    # the prediction is what EcmEta computes: residual = the 1 mV voltage noise
    res = np.concatenate([(r.eta - ecm_eta(p, r))[r.valid()] for r in rows])
    assert np.sqrt(np.mean(res ** 2)) == pytest.approx(0.001, rel=0.15)


def test_calibration_of_a_perfect_model_leaves_only_floors(rows) -> None:
    cal, rep = calibrate_ecm(TRUE, [(TRUE, r) for r in rows], FilterParams().r_sensor)
    # the residual is sensor noise only, which the filter adds itself: no model error left
    assert cal["sigma_per_c"] < 2e-4 and cal["sigma_rest"] < 6e-4
    assert rep["rmse_mv"]["all"] == pytest.approx(1.0, rel=0.15) and set(rep["rmse_mv"]["by_temp"]) >= {"[-inf,0)C", "[0,10)C", "[20,30)C", "[40,inf)C"}
    line = ecm_literal(cal)
    assert line.startswith("EcmParams(r0=0.00200, r1=0.00150, tau=40, activation_k=3000")
