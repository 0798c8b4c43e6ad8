"""The anchor Kalman filter: capacity from Ah between anchors, its sigma, forgetting, gating, persistence."""

from __future__ import annotations

import json

import numpy as np

from bms_ai.estimation.capacity import STATE_VERSION, CapacityFilter, CapacityParams

DESIGN = 50.0


def _two_anchor_filter(c_true: np.ndarray, s1: float = 0.2, s2: float = 1.0, hours: float = 0.0,
                       sd: float = 0.005) -> CapacityFilter:
    """Cells that all moved from s1 to s2 (each passing its own Ah: one cell per filter row here)."""
    n = len(c_true)
    f = CapacityFilter(n, DESIGN)
    f.start(np.full(n, 0.5))
    f.update_soc(np.full(n, s1), np.full(n, sd))
    f.x[:, 0] += (s2 - s1) * c_true          # the Ah each cell passed (predict adds one common value)
    f.predict(0.0, hours=hours)
    f.update_soc(np.full(n, s2), np.full(n, sd))
    return f


def test_two_anchors_give_ah_over_soc_difference() -> None:
    c_true = np.array([0.87 * DESIGN])
    f = _two_anchor_filter(c_true)
    assert abs(f.capacity[0] / c_true[0] - 1.0) < 0.01
    # sigma ~ sqrt(2) x 0.5 % / 0.8 of the capacity, plus the prior's small share
    assert 0.005 < f.capacity_sd[0] / c_true[0] < 0.012


def test_series_cells_pass_the_same_ah_so_their_soc_spans_differ() -> None:
    f = CapacityFilter(3, DESIGN)
    f.start(np.full(3, 0.5))
    f.update_soc(np.array([0.20, 0.22, 0.25]), np.full(3, 0.003))
    dah = 38.0
    caps = np.array([0.95, 0.90, 0.80]) * DESIGN
    f.predict(dah)
    f.update_soc(np.array([0.20, 0.22, 0.25]) + dah / caps, np.full(3, 0.003))
    np.testing.assert_allclose(f.capacity, caps, rtol=0.01)
    assert np.argmin(f.capacity) == 2


def test_offset_uncertainty_weakens_anchors_far_apart_in_awake_time() -> None:
    c_true = np.array([0.9 * DESIGN])
    near = _two_anchor_filter(c_true, hours=0.5)
    far = _two_anchor_filter(c_true, hours=8.0)
    assert far.capacity_sd[0] > 2.0 * near.capacity_sd[0]


def test_forgetting_grows_the_capacity_sigma_over_days() -> None:
    f = _two_anchor_filter(np.array([0.9 * DESIGN]))
    sd0 = f.capacity_sd[0]
    f.predict(0.0, days=365.0)
    assert f.capacity_sd[0] > 1.5 * sd0


def test_an_anchor_far_outside_its_sigma_is_rejected() -> None:
    f = _two_anchor_filter(np.array([0.9 * DESIGN]))
    before = f.capacity.copy()
    res = f.update_soc(np.array([0.3]), np.array([0.003]))    # z says ~1.0: 70 % SOC away
    assert res.rejected[0] and not res.used[0]
    np.testing.assert_array_equal(f.capacity, before)


def test_graphite_anchor_sets_the_feature_scale_not_the_capacity() -> None:
    f = CapacityFilter(1, DESIGN, CapacityParams(feature_prior_corr=0.0))
    f.start(np.array([0.5]))
    f.update_feature(0.2, np.array([0.0]), np.array([0.2]), np.array([True]))   # z = 0.2 G
    f.predict(30.0)
    f.update_feature(0.8, np.array([0.0]), np.array([0.2]), np.array([True]))   # 30 Ah later: z = 0.8 G
    assert abs(f.x[0, 2] - 50.0) < 0.5                                           # G = 30 / 0.6
    assert f.capacity_sd[0] > 0.9 * CapacityParams().prior_sd * DESIGN           # C learned nothing


def test_state_round_trip_and_refusals() -> None:
    f = _two_anchor_filter(np.array([0.9 * DESIGN, 0.85 * DESIGN]))
    g = CapacityFilter(2, DESIGN)
    assert g.restore(json.loads(json.dumps(f.state()))) == ""
    np.testing.assert_array_equal(g.x, f.x)
    np.testing.assert_array_equal(g.P, f.P)
    assert "cells" in CapacityFilter(3, DESIGN).restore(f.state())
    assert "design" in CapacityFilter(2, 40.0).restore(f.state())
    assert "malformed" in CapacityFilter(2, DESIGN).restore({"version": STATE_VERSION})
    assert "version" in CapacityFilter(2, DESIGN).restore({**f.state(), "version": 99})
