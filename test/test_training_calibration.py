"""Error-model calibration on synthetic residuals whose correlation times, sigmas and cell shares are known."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms_ai.training.calibration import (
    ResidualRun,
    calibrate_error_model,
    coverage_table,
    fit_two_scales,
    passed_fraction,
)
from bms_ai.training.common import gauss_markov, smooth

NOISE = 0.0015 ** 2
TRUE = {"a_s": 1.0, "b_s": 0.001, "k": 0.4, "a_f": 0.5, "b_f": 0.0005, "kf": 0.8, "tau_s": 600.0, "tau_f": 10.0}


def _run(seed: int, n: int = 4, seconds: float = 12000.0) -> ResidualRun:
    """r = (a_s ref + b_s)(e + k d_i)/sqrt(1+k^2) + (a_f ref + b_f)(f + kf g_i)/sqrt(1+kf^2) + noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, seconds, 1.0)
    ref = 0.002 + 0.008 * (0.5 + 0.5 * np.sin(2 * np.pi * t / 3000.0 + seed))[:, None] * np.ones(n)
    p = TRUE
    e = gauss_markov(t, (), rng, 1.0, p["tau_s"])[:, None] + p["k"] * gauss_markov(t, (n,), rng, 1.0, p["tau_s"])
    f = gauss_markov(t, (), rng, 1.0, p["tau_f"])[:, None] + p["kf"] * gauss_markov(t, (n,), rng, 1.0, p["tau_f"])
    r = ((p["a_s"] * ref + p["b_s"]) * e / math.sqrt(1 + p["k"] ** 2)
         + (p["a_f"] * ref + p["b_f"]) * f / math.sqrt(1 + p["kf"] ** 2) + math.sqrt(NOISE) * rng.standard_normal(ref.shape))
    return ResidualRun(name=f"d{seed}", variant="x", t=t, session=np.zeros(len(t), int), r=r, ref=ref,
                       temp=np.full(ref.shape, 25.0), i_c=np.sin(t / 100.0), keep=t >= 60.0)


@pytest.fixture(scope="module")
def calibrated():
    return calibrate_error_model([_run(s) for s in range(10)], NOISE)


def test_correlation_times_are_recovered(calibrated) -> None:
    em, rep = calibrated
    assert TRUE["tau_f"] / 1.5 < em.tau_fast < TRUE["tau_f"] * 1.5
    assert TRUE["tau_s"] / 1.6 < em.tau_model < TRUE["tau_s"] * 1.6
    assert rep["correlation"]["tau_split"] in (60.0, 120.0)


def test_cell_shares_are_recovered(calibrated) -> None:
    em, _ = calibrated
    assert em.k_cell == pytest.approx(TRUE["k"], abs=0.15)
    assert em.k_cell_fast == pytest.approx(TRUE["kf"], abs=0.2)


def test_sigmas_are_recovered_per_process(calibrated) -> None:
    em, _ = calibrated
    for ref in (0.002, 0.006, 0.01):
        slow = (em.slow_scale * ref + em.slow_floor) * math.sqrt(1 + em.k_cell ** 2)
        fast = (em.fast_scale * ref + em.fast_floor) * math.sqrt(1 + em.k_cell_fast ** 2)
        assert slow == pytest.approx(TRUE["a_s"] * ref + TRUE["b_s"], rel=0.2)
        assert fast == pytest.approx(TRUE["a_f"] * ref + TRUE["b_f"], rel=0.2)


def test_coverage_of_the_calibrated_sigmas_is_gaussian(calibrated) -> None:
    _, rep = calibrated
    c = rep["coverage"]["total"]["all"]
    assert 0.64 < c["cover1"] < 0.73 and 0.935 < c["cover2"] < 0.97, c
    for part in ("slow", "fast"):  # split parts: only roughly (a split is never clean)
        assert 0.8 < rep["coverage"][part]["all"]["rms_z"] < 1.2
    assert set(rep["coverage"]["total"]["by_current"]) == {"[0,0.05)C-rate", "[0.05,0.5)C-rate", "[0.5,1)C-rate"}


def test_two_exponentials_are_separated() -> None:
    lags = np.array([1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000.0])
    rho = 0.3 * np.exp(-lags / 8.0) + 0.6 * np.exp(-lags / 900.0)
    tf, ts, af, a_s = fit_two_scales(lags, rho, np.array([4.0, 8.0, 16.0]), np.array([300.0, 900.0, 2700.0]))
    assert (tf, ts) == (8.0, 900.0) and af == pytest.approx(0.3) and a_s == pytest.approx(0.6)


def test_passed_fraction_matches_a_simulated_split() -> None:
    rng = np.random.default_rng(3)
    t = np.arange(0.0, 400000.0, 1.0)
    for tau in (0.0, 10.0, 600.0):
        x = rng.standard_normal(len(t)) if tau == 0 else gauss_markov(t, (), rng, 1.0, tau)
        got = float(np.var(smooth(t, x, 60.0)) / np.var(x))
        assert got == pytest.approx(passed_fraction(60.0, 1.0, tau), rel=0.1, abs=0.003)
    assert passed_fraction(60.0, 1.0, 1e9) == pytest.approx(1.0, abs=1e-4)


def test_coverage_table_of_gaussian_samples() -> None:
    z = np.random.default_rng(0).standard_normal(100000)
    row = coverage_table(z, np.zeros_like(z), (-np.inf, np.inf), "")["[-inf,inf)"]
    assert row["cover1"] == pytest.approx(0.683, abs=0.01) and row["cover2"] == pytest.approx(0.954, abs=0.005)
