"""Shared per-sample reductions: the same bits as the numpy calls they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bms_ai.diagnostics.stats import SampleStats, median
from bms_ai.pack import PackSample


def _bits(x: float) -> tuple[bool, float, bool]:
    """A float as compared bit for bit: NaN-ness, value, sign (so -0.0 != 0.0)."""
    return math.isnan(x), 0.0 if math.isnan(x) else x, math.copysign(1.0, x) < 0


def _cases() -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    out = []
    for n in (1, 2, 3, 5, 32, 95, 96):
        out.append(rng.normal(3.7, 0.01, n))
        out.append(np.round(rng.normal(0.0, 1.0, n)) * 0.0)                  # all zeros: +0.0 and -0.0 mixed
        out.append(np.where(rng.random(n) < 0.5, -0.0, 0.0))
        z = rng.choice([-0.0, 0.0, 1.0, -1.0, 2.5], n)                       # ties and signed zeros in the middle
        out.append(z)
        out.append(rng.choice([24.0, 25.0, 25.5], n).astype(np.float32).astype(float))
        nan = rng.normal(0.0, 1.0, n)
        nan[rng.integers(n)] = math.nan
        out.append(nan)
        out.append(np.array([math.inf, -math.inf, 1.0] * n)[:n])
    return out


@pytest.mark.parametrize("a", _cases(), ids=lambda a: f"n{a.size}")
def test_median_is_numpys_median_bit_for_bit(a: np.ndarray) -> None:
    buf = np.empty(a.size)
    with np.errstate(invalid="ignore"):
        want = float(np.median(a))
    assert _bits(median(a, buf)) == _bits(want)
    assert _bits(median(a)) == _bits(want)


def test_median_of_nothing_is_nan() -> None:
    assert math.isnan(median(np.empty(0)))


def test_sample_stats_match_numpy_reductions() -> None:
    rng = np.random.default_rng(3)
    v, temps = rng.normal(3.7, 0.02, 96), rng.normal(25.0, 1.0, 32)
    s = PackSample.empty(96, 32)
    s.cell_voltages, s.cell_temperatures = v, temps
    st = SampleStats.of(s, (np.empty(96), np.empty(32)))
    assert (st.v.max, st.v.min, st.v.argmax, st.v.argmin) == (v.max(), v.min(), v.argmax(), v.argmin())
    assert (st.t.median, st.v.median, st.sum_v) == (np.median(temps), np.median(v), v.sum())
    temps[[3, 9]] = math.nan
    st = SampleStats.of(s)
    assert not st.t.all_finite and st.t.any_finite and st.t.mostly_valid
    assert (st.t.max, st.t.argmin, st.t.median) == (np.nanmax(temps), np.nanargmin(temps), np.nanmedian(temps))


@pytest.mark.parametrize("a", _cases(), ids=lambda a: f"n{a.size}")
def test_group_reductions_are_numpys_bit_for_bit(a: np.ndarray) -> None:
    """Extremes, where they are and the median of a group (ties, signed zeros, NaN, inf) as numpy finds them."""
    from bms_ai.diagnostics.stats import _group

    g = _group(a, np.empty(a.size))
    if not np.isfinite(a).all():  # the NaN-aware path (unchanged, covered above): only flagged here
        assert not g.all_finite
        return
    want = (float(a.max()), float(a.min()), float(np.median(a)))
    assert [_bits(x) for x in (g.max, g.min, g.median)] == [_bits(x) for x in want]
    assert (g.argmax, g.argmin) == (int(a.argmax()), int(a.argmin()))
    assert g.all_finite and g.mostly_valid
