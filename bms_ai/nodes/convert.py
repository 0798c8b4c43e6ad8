"""PackSample <-> sensor_msgs/BatteryState and seconds <-> ROS time: the only place that knows both sides."""

from __future__ import annotations

import array
import math

import numpy as np
from builtin_interfaces.msg import Time
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import BatteryState

from bms_ai.core.cdr import BatteryFields, read_battery_state
from bms_ai.pack import PackSample

_MAX_SEC = 2**31  # builtin_interfaces/Time.sec is int32


def stamp_to_time(t: float) -> Time:
    """Seconds -> builtin_interfaces/Time, rounded to the nearest nanosecond (see :func:`time_parts`)."""
    sec, nanosec = time_parts(t)
    return Time(sec=sec, nanosec=nanosec)


def time_to_float(t: Time) -> float:
    """builtin_interfaces/Time (or rosgraph Clock.clock, header.stamp) -> seconds."""
    return t.sec + t.nanosec / 1e9


def float32_array(values: np.ndarray) -> array.array:
    """A float32[] message field: array.array('f') takes the generated setter's fast path.

    A list is range-checked element by element in Python and converted again
    at publish (~0.2 ms for a 96-cell message); the array is copied as bytes.
    """
    return array.array("f", np.ascontiguousarray(values, dtype=np.float32).tobytes())


def time_parts(t: float) -> tuple[int, int]:
    """Seconds -> (sec, nanosec) of a builtin_interfaces/Time, rounded to the nearest nanosecond.

    A fraction that rounds up to a whole second carries into ``sec`` (never a
    stamp one second early). Times a stamp cannot hold (NaN, inf, negative,
    beyond int32 seconds) become the zero stamp instead of an exception in a
    callback. No message is built: nodes that serialize the bytes themselves
    call this once per sample.
    """
    if not math.isfinite(t) or t < 0 or t >= _MAX_SEC:
        return 0, 0
    sec = math.floor(t)
    nanosec = round((t - sec) * 1e9)  # t - sec is exact for floats
    if nanosec >= 1_000_000_000:
        sec, nanosec = sec + 1, nanosec - 1_000_000_000
    return int(sec), int(nanosec)


def battery_fields(s: PackSample, frame_id: str = "", serial: str = "") -> BatteryFields:
    """Measured quantities only; NaN where unknown (estimates belong to battery_state)."""
    temps = s.cell_temperatures
    tmax = np.fmax.reduce(temps) if len(temps) else math.nan  # the hottest known sensor; NaN if none is known
    status = BatteryState.POWER_SUPPLY_STATUS_UNKNOWN
    if math.isfinite(s.pack_current):
        status = (BatteryState.POWER_SUPPLY_STATUS_CHARGING if s.pack_current > 0.5
                  else BatteryState.POWER_SUPPLY_STATUS_DISCHARGING if s.pack_current < -0.5
                  else BatteryState.POWER_SUPPLY_STATUS_NOT_CHARGING)
    nan = math.nan
    sec, nanosec = time_parts(s.stamp)
    return BatteryFields(sec, nanosec, frame_id, voltage=float(s.pack_voltage), temperature=float(tmax),
                         current=float(s.pack_current), charge=nan, capacity=nan, design_capacity=nan,
                         percentage=nan, power_supply_status=status,
                         power_supply_health=BatteryState.POWER_SUPPLY_HEALTH_UNKNOWN,
                         power_supply_technology=BatteryState.POWER_SUPPLY_TECHNOLOGY_LION, present=True,
                         cell_voltage=np.asarray(s.cell_voltages, dtype=np.float32),
                         cell_temperature=np.asarray(s.cell_temperatures, dtype=np.float32),
                         location="", serial_number=serial)


def fields_to_battery_state(f: BatteryFields) -> BatteryState:
    """The message form of ``f`` (for code that wants message objects; nodes publish the bytes)."""
    m = BatteryState()
    m.header.stamp = Time(sec=f.sec, nanosec=f.nanosec)
    m.header.frame_id = f.frame_id
    m.voltage, m.temperature, m.current = f.voltage, f.temperature, f.current
    m.charge, m.capacity, m.design_capacity, m.percentage = f.charge, f.capacity, f.design_capacity, f.percentage
    m.power_supply_status = f.power_supply_status
    m.power_supply_health = f.power_supply_health
    m.power_supply_technology = f.power_supply_technology
    m.present = f.present
    m.cell_voltage = float32_array(f.cell_voltage)
    m.cell_temperature = float32_array(f.cell_temperature)
    m.location = f.location
    m.serial_number = f.serial_number
    return m


def battery_state_fields(m: BatteryState) -> BatteryFields:
    """The fields of a BatteryState message (cells as float32 arrays), as :func:`read_battery_state` gives them."""
    return BatteryFields(
        m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id, m.voltage, m.temperature, m.current,
        m.charge, m.capacity, m.design_capacity, m.percentage, m.power_supply_status, m.power_supply_health,
        m.power_supply_technology, m.present, np.asarray(m.cell_voltage, dtype=np.float32),
        np.asarray(m.cell_temperature, dtype=np.float32), m.location, m.serial_number)


def battery_fields_from_bytes(data: bytes) -> BatteryFields:
    """A raw subscription's BatteryState: read directly, or through rclpy for an encoding :mod:`cdr` does not read."""
    try:
        return read_battery_state(data)
    except ValueError:
        return battery_state_fields(deserialize_message(data, BatteryState))


def sample_to_battery_state(s: PackSample, frame_id: str = "", serial: str = "") -> BatteryState:
    """Measured quantities only; NaN where unknown (estimates belong to battery_state)."""
    return fields_to_battery_state(battery_fields(s, frame_id, serial))


def fields_to_sample(f: BatteryFields) -> PackSample:
    """The library's view of a pack/measurements message: every value stamped with the header time."""
    t = f.stamp
    cv = np.asarray(f.cell_voltage, dtype=np.float64)
    ct = np.asarray(f.cell_temperature, dtype=np.float64)
    return PackSample(
        stamp=t, pack_voltage=float(f.voltage), pack_current=float(f.current),
        cell_voltages=cv, cell_temperatures=ct,
        pack_voltage_stamp=t, pack_current_stamp=t,
        cell_voltage_stamps=np.full(cv.shape, t), cell_temperature_stamps=np.full(ct.shape, t),
    )


def battery_state_to_sample(m: BatteryState) -> PackSample:
    """:func:`fields_to_sample` of a message object."""
    return fields_to_sample(battery_state_fields(m))
