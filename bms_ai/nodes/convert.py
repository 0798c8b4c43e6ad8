"""PackSample <-> sensor_msgs/BatteryState and seconds <-> ROS time: the only place that knows both sides."""

from __future__ import annotations

import array
import math

import numpy as np
from builtin_interfaces.msg import Time
from sensor_msgs.msg import BatteryState

from bms_ai.pack import PackSample

_MAX_SEC = 2**31  # builtin_interfaces/Time.sec is int32


def stamp_to_time(t: float) -> Time:
    """Seconds -> builtin_interfaces/Time, rounded to the nearest nanosecond.

    A fraction that rounds up to a whole second carries into ``sec`` (never a
    stamp one second early). Times a stamp cannot hold (NaN, inf, negative,
    beyond int32 seconds) become the zero stamp instead of an exception in a callback.
    """
    if not math.isfinite(t) or t < 0 or t >= _MAX_SEC:
        return Time()
    sec = math.floor(t)
    nanosec = round((t - sec) * 1e9)  # t - sec is exact for floats
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    return Time(sec=int(sec), nanosec=int(nanosec))


def time_to_float(t: Time) -> float:
    """builtin_interfaces/Time (or rosgraph Clock.clock, header.stamp) -> seconds."""
    return t.sec + t.nanosec / 1e9


def float32_array(values: np.ndarray) -> array.array:
    """A float32[] message field: array.array('f') takes the generated setter's fast path.

    A list is range-checked element by element in Python and converted again
    at publish (~0.2 ms for a 96-cell message); the array is copied as bytes.
    """
    return array.array("f", np.ascontiguousarray(values, dtype=np.float32).tobytes())


def sample_to_battery_state(s: PackSample, frame_id: str = "", serial: str = "") -> BatteryState:
    """Measured quantities only; NaN where unknown (estimates belong to battery_state)."""
    m = BatteryState()
    m.header.stamp = stamp_to_time(s.stamp)
    m.header.frame_id = frame_id
    m.voltage = float(s.pack_voltage)
    m.current = float(s.pack_current)
    tmax = np.nanmax(s.cell_temperatures) if np.isfinite(s.cell_temperatures).any() else math.nan
    m.temperature = float(tmax)
    nan = math.nan
    m.charge = m.capacity = m.design_capacity = m.percentage = nan
    m.power_supply_status = BatteryState.POWER_SUPPLY_STATUS_UNKNOWN
    if math.isfinite(s.pack_current):
        m.power_supply_status = (BatteryState.POWER_SUPPLY_STATUS_CHARGING if s.pack_current > 0.5
                                 else BatteryState.POWER_SUPPLY_STATUS_DISCHARGING if s.pack_current < -0.5
                                 else BatteryState.POWER_SUPPLY_STATUS_NOT_CHARGING)
    m.power_supply_health = BatteryState.POWER_SUPPLY_HEALTH_UNKNOWN
    m.power_supply_technology = BatteryState.POWER_SUPPLY_TECHNOLOGY_LION
    m.present = True
    m.cell_voltage = float32_array(s.cell_voltages)
    m.cell_temperature = float32_array(s.cell_temperatures)
    m.serial_number = serial
    return m


def battery_state_to_sample(m: BatteryState) -> PackSample:
    """The library's view of a pack/measurements message: every value stamped with the header time."""
    t = time_to_float(m.header.stamp)
    cv = np.asarray(m.cell_voltage, dtype=np.float64)
    ct = np.asarray(m.cell_temperature, dtype=np.float64)
    return PackSample(
        stamp=t, pack_voltage=float(m.voltage), pack_current=float(m.current),
        cell_voltages=cv, cell_temperatures=ct,
        pack_voltage_stamp=t, pack_current_stamp=t,
        cell_voltage_stamps=np.full(cv.shape, t), cell_temperature_stamps=np.full(ct.shape, t),
    )
