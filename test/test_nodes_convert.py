"""Seconds <-> ROS time in one place (message types only: no rclpy, no DDS)."""

from __future__ import annotations

import math

import pytest
from builtin_interfaces.msg import Time
from hypothesis import given
from hypothesis import strategies as st

from bms_ai.nodes.convert import stamp_to_time, time_to_float


def test_a_fraction_rounding_to_a_whole_second_carries():
    """1.9999999999 s is 2 s, not 1 s: a stamp never jumps back a second."""
    t = stamp_to_time(1.9999999999)
    assert (t.sec, t.nanosec) == (2, 0)
    t = stamp_to_time(1_700_000_000.9999999999)
    assert (t.sec, t.nanosec) == (1_700_000_001, 0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, -0.5, 2.0**31, 1e20])
def test_times_a_stamp_cannot_hold_become_the_zero_stamp(bad):
    """No exception inside a publishing callback for a garbage CAN timestamp."""
    assert stamp_to_time(bad) == Time()


@given(st.floats(min_value=0, max_value=2**31 - 1, allow_nan=False))
def test_stamp_is_the_nearest_nanosecond(t):
    """Normalised (0 <= nanosec < 1e9) and within half a nanosecond plus float resolution."""
    s = stamp_to_time(t)
    assert 0 <= s.nanosec < 1_000_000_000 and s.sec >= 0
    assert abs(time_to_float(s) - t) <= 0.5e-9 + 2 * math.ulp(t)


@given(st.floats(min_value=0, max_value=2**31 - 2, allow_nan=False), st.floats(min_value=0, max_value=1))
def test_order_is_kept(t, dt):
    """Later seconds never give an earlier stamp (samples stay ordered on the wire)."""
    a, b = stamp_to_time(t), stamp_to_time(t + dt)
    assert (a.sec, a.nanosec) <= (b.sec, b.nanosec)


@given(st.integers(min_value=0, max_value=2**20), st.integers(min_value=0, max_value=999_999_999))
def test_stamps_round_trip_exactly_while_floats_resolve_nanoseconds(sec, nanosec):
    """Up to ~12 days of seconds a float holds every nanosecond, so stamp -> float -> stamp is exact."""
    t = Time(sec=sec, nanosec=nanosec)
    assert stamp_to_time(time_to_float(t)) == t


def test_cell_arrays_go_out_as_float32_arrays_and_come_back_equal():
    """float32[] fields are array.array('f') (the message setter's fast path); values survive the round trip."""
    import array

    import numpy as np

    from bms_ai.nodes.convert import battery_state_to_sample, sample_to_battery_state
    from bms_ai.pack import PackSample

    v = np.linspace(3.0, 4.2, 96)
    v[5] = np.nan
    t = np.full(32, 25.5)
    s = PackSample(stamp=12.5, pack_voltage=380.0, pack_current=-3.0, cell_voltages=v, cell_temperatures=t)
    m = sample_to_battery_state(s, "battery", "p")
    assert isinstance(m.cell_voltage, array.array) and m.cell_voltage.typecode == "f"
    back = battery_state_to_sample(m)
    np.testing.assert_array_equal(back.cell_voltages, v.astype(np.float32).astype(np.float64))
    np.testing.assert_array_equal(back.cell_temperatures, t)
