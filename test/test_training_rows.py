"""Training rows: targets against the drive's own OCV, the filter-like SOC input, splits, the estimator's features."""

from __future__ import annotations

import numpy as np
import pytest

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation.features import ETA_FEATURES, eta_features_table
from bms_ai.estimation.overpotential import EcmParams
from bms_ai.training.ecm import ecm_cell_drive
from bms_ai.training.rows import (
    after_warmup,
    drive_rng,
    drive_rows,
    eta_target,
    hysteresis_rate,
    soc_input,
    split_drives,
    true_ocv,
)

CELL = EcmParams(r0=0.0025, r1=0.002, tau=60.0, activation_k=3500.0, hysteresis_v=0.0)


def test_target_is_voltage_minus_the_drives_own_ocv() -> None:
    d = ecm_cell_drive(CELL, "nmc", 1, 25.0, duration=300.0, n_cells=2, v_noise=0.0, ocv_shift_v=0.02)
    assert true_ocv(d)(0.5) == pytest.approx(load_ocv("nmc")(0.5) + 0.02, abs=1e-4)
    eta = eta_target(d)
    np.testing.assert_allclose(eta, d.cell_v - (load_ocv("nmc")(d.soc) + 0.02), atol=1e-4)
    d.ocv_soc = d.ocv_v = None  # an old drive: the chemistry's table is its true curve
    np.testing.assert_allclose(eta_target(d) - eta, 0.02, atol=1e-4)


def test_soc_input_is_truth_plus_a_slow_one_percent_error() -> None:
    t = np.arange(0.0, 200000.0, 1.0)
    soc = np.full((len(t), 4), 0.5)
    a = soc_input(t, soc, np.random.default_rng(1))
    b = soc_input(t, soc, np.random.default_rng(1))
    assert np.array_equal(a, b)
    err = a - soc
    assert 0.007 < err.std() < 0.013
    assert np.corrcoef(err[:-60, 0], err[60:, 0])[0, 1] > 0.9          # slowly varying
    assert 0.5 < np.corrcoef(err[:, 0], err[:, 1])[0, 1] < 0.95         # mostly common to the string
    assert soc_input(t[:10], np.ones((10, 2)), np.random.default_rng(0)).max() <= 1.0


def test_split_by_drive_is_seeded_and_order_free() -> None:
    names = [f"d{k}" for k in range(10)]
    tr, va = split_drives(names, 0.2, 7)
    assert len(va) == 2 and not set(tr) & set(va) and sorted(tr + va) == list(range(10))
    rev = names[::-1]
    tr2, va2 = split_drives(rev, 0.2, 7)
    assert sorted(rev[i] for i in va2) == sorted(names[i] for i in va)
    assert split_drives(names, 0.2, 8)[1] != va


def test_warmup_restarts_with_each_session() -> None:
    t = np.r_[np.arange(0.0, 100.0), 1000.0 + np.arange(0.0, 100.0)]
    session = np.r_[np.zeros(100, int), np.ones(100, int)]
    keep = after_warmup(t, session, 60.0)
    assert keep.sum() == 80 and not keep[100:160].any() and keep[160:].all()


def test_rows_use_the_estimators_feature_code_and_sensor_map() -> None:
    d = ecm_cell_drive(CELL, "nmc", 2, 25.0, duration=600.0, n_cells=6)
    d.cell_t = d.cell_t[:, ::3] + np.array([0.0, 10.0])   # two sensors along the string
    rows = drive_rows(d, drive_rng(0, d.name), 2.0, 3)
    full = eta_features_table(d.t, d.current, d.cell_t, d.soc, d.capacity_ah, hysteresis_rate("nmc"), None, 2)
    names = [n for n, _ in ETA_FEATURES]
    same = [names.index(n) for n in ("i", "i_ema600", "temp", "hysteresis", "log_rest_s")]
    np.testing.assert_allclose(rows.feats[:, :, same], full[:, rows.cells][:, :, same], atol=1e-5)
    soc = rows.feats[:, :, names.index("soc")]
    assert np.abs(soc - d.soc[rows.idx][:, rows.cells]).max() < 0.05
    assert rows.eta.shape == soc.shape and rows.valid().sum() == rows.keep.sum() * 3


