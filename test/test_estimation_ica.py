"""Charging features: the dV/dQ peaks of a known OCV found in noisy constant-current charges."""

from __future__ import annotations

import numpy as np
import pytest

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation.ica import FeatureFinder, IcaParams, peaks_by_prominence, reference_features, savgol_slope

CAP = 41.0          # true capacity [Ah] (design 50)
LEAD_S = 500.0      # graphite surface lead [s]: a feature shows current x LEAD_S early


def _charge(rate_c: float, s0: float, s1: float, seed: int, dt: float = 1.0, jitter: float = 0.0):
    """A CC charge of a fresh-type LFP cell (OCV = the chemistry's table at z / CAP): t, Ah, I, V."""
    rng = np.random.default_rng(seed)
    curve = load_ocv("lfp")
    i_set = rate_c * 50.0
    n = int((s1 - s0) * CAP * 3600.0 / i_set / dt)
    i = i_set * (1.0 + jitter * rng.standard_normal(n)) + rng.normal(0, 0.15, n)
    ah = s0 * CAP + np.cumsum(i) * dt / 3600.0
    v = curve((ah + i_set * LEAD_S / 3600.0) / CAP) + 0.0012 * i + 0.01 + rng.normal(0, 0.002, n)
    return np.arange(n) * dt, ah, i, np.round(v * 1000.0) / 1000.0


def _run(t, ah, i, v, finder: FeatureFinder, soc_error: float = 0.0):
    events = []
    for k in range(len(t)):
        events += finder.update(1.0, ah[k], i[k], v[k:k + 1], np.array([ah[k] / CAP + soc_error]))
    return events + finder.close()


@pytest.mark.parametrize("seed", range(40))
def test_slope_and_peaks_equal_scipy_signal(seed: int) -> None:
    """The numpy filter and peak search (kept out of scipy.signal for start-up time) give scipy's answers:
    edges, both axes, flat tops (rounded values), prominence thresholds."""
    signal = pytest.importorskip("scipy.signal")
    rng = np.random.default_rng(seed)
    n, w, delta = int(rng.integers(25, 300)), int(rng.choice([5, 9, 21])), float(rng.uniform(1e-3, 1.0))
    x = rng.normal(size=(n, 3)).cumsum(axis=0)
    for data, axis in ((x, 0), (x.T, 1)):
        want = signal.savgol_filter(data, w, 2, deriv=1, delta=delta, axis=axis)
        assert np.allclose(savgol_slope(data, w, delta, axis=axis), want, rtol=1e-10, atol=1e-10)
    y = np.round(rng.normal(size=n), 1)
    for least in (0.0, 0.3, 1.0):
        idx, props = signal.find_peaks(y, prominence=least)
        got, prominences = peaks_by_prominence(y, least)
        assert np.array_equal(got, idx) and np.allclose(prominences, props["prominences"])


def test_reference_features_of_the_lfp_curve_are_the_graphite_stages() -> None:
    c = load_ocv("lfp")
    socs = [f.soc for f in reference_features(c.soc, c.ocv)]
    assert len(socs) == 2 and socs[0] == pytest.approx(0.33, abs=0.02) and socs[1] == pytest.approx(0.75, abs=0.02)


@pytest.mark.parametrize("rate_c,seed", [(0.1, 1), (0.2, 2), (0.3, 3)])
def test_feature_gives_the_capacity_within_half_a_percent(rate_c: float, seed: int) -> None:
    """The 75 % feature's charge to full over its SOC distance: the capacity, within 0.5 % (noise, LSB, rates)."""
    c = load_ocv("lfp")
    events = _run(*_charge(rate_c, 0.2, 0.95, seed), FeatureFinder(1, 50.0, c))
    peak = next(e for e in events if e.feature.soc > 0.7)
    assert peak.ok[0] and peak.rate_c == pytest.approx(rate_c, rel=0.02)
    ah_eq = peak.ah[0] + peak.rate_c * 50.0 * LEAD_S / 3600.0          # where it sits at equilibrium
    cap = (CAP - ah_eq) / (1.0 - peak.feature.soc)                       # full charge at z = CAP
    assert cap == pytest.approx(CAP, rel=0.005)


def test_unsteady_or_short_charges_give_no_feature() -> None:
    c = load_ocv("lfp")
    noisy = _run(*_charge(0.2, 0.2, 0.95, 4, jitter=0.3), FeatureFinder(1, 50.0, c))
    short = _run(*_charge(0.2, 0.70, 0.78, 5), FeatureFinder(1, 50.0, c))
    assert noisy == [] and short == []


def test_a_feature_far_from_where_it_is_expected_is_not_matched() -> None:
    c = load_ocv("lfp")
    finder = FeatureFinder(1, 50.0, c, IcaParams(match_soc=0.05))
    events = _run(*_charge(0.2, 0.2, 0.95, 6), finder, soc_error=0.2)    # the cell believes it is 20 % higher
    assert not any(e.ok[0] for e in events)
