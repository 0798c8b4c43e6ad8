"""Serialized (CDR) BatteryState and DiagnosticArray, read and written without rclpy's message objects.

The graph publishes and reads these at its sample rate. rclpy turns every
field into a Python object through generated setters (a 96-cell BatteryState
~30 µs to take, ~35 µs to build and convert; a DiagnosticArray ~3 µs per
key/value pair), which this module skips: publishers hand rclpy the bytes,
raw subscriptions read only the fields they need. Plain CDR, little endian
(XCDR1, what rmw_fastrtps writes); anything else (another encoding, a
malformed payload) raises ValueError and the caller deserializes as before.
Strings read as rclpy reads them (UTF-8 with replacement, cut at a NUL).
Alignment padding is written as zeros.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

#: encapsulation header of plain little-endian CDR
CDR_LE = b"\x00\x01\x00\x00"
_BASE = len(CDR_LE)  # alignment counts from the end of the encapsulation header

_U32 = struct.Struct("<I")
_STAMP = struct.Struct("<iI")
_BATTERY_SCALARS = struct.Struct("<7f4B")  # voltage .. percentage, status, health, technology, present


def _check(data: bytes) -> None:
    if data[:4] != CDR_LE:
        raise ValueError(f"not little-endian CDR (encapsulation {bytes(data[:4]).hex()})")


def _align4(pos: int) -> int:
    return pos + (-(pos - _BASE) & 3)


def _string(data: bytes, pos: int) -> tuple[str, int]:
    pos = _align4(pos)
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if n > len(data) - pos:
        raise ValueError("string runs past the end of the message")
    raw = data[pos:pos + n - 1] if n else b""
    nul = raw.find(b"\0")
    return (raw if nul < 0 else raw[:nul]).decode("utf-8", "replace"), pos + n


def _skip_pairs(data: bytes, pos: int, n: int) -> int:
    """Past ``n`` pairs of strings (key/value): only their lengths are read."""
    u32 = _U32.unpack_from
    for _ in range(n):
        pos = (pos + 3) & ~3  # _align4: the header is 4 bytes, so alignment is absolute
        pos = (pos + 7 + u32(data, pos)[0]) & ~3
        pos += 4 + u32(data, pos)[0]
    if pos > len(data):
        raise ValueError("string runs past the end of the message")
    return pos


def _floats(data: bytes, pos: int) -> tuple[np.ndarray, int]:
    """A float32[] as a read-only float32 array over ``data`` (no copy)."""
    pos = _align4(pos)
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if 4 * n > len(data) - pos:
        raise ValueError("array runs past the end of the message")
    return np.frombuffer(data, dtype="<f4", count=n, offset=pos), pos + 4 * n


class _Writer:
    """Appends CDR fields to a bytearray, alignment padding as zeros."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = bytearray(CDR_LE)

    def align4(self) -> None:
        """Pad to the next 4-byte boundary (counted from the end of the encapsulation header)."""
        pad = -(len(self.buf) - _BASE) & 3
        if pad:
            self.buf += bytes(pad)

    def string(self, text: str) -> None:
        """A string as rclpy writes one: UTF-8, cut at a NUL, NUL-terminated."""
        raw = text.encode()
        nul = raw.find(b"\0")
        if nul >= 0:
            raw = raw[:nul]
        self.align4()
        self.buf += _U32.pack(len(raw) + 1)
        self.buf += raw
        self.buf.append(0)

    def floats(self, values: bytes, n: int) -> None:
        """A float32[] from its little-endian float32 bytes."""
        self.align4()
        self.buf += _U32.pack(n)
        self.buf += values


def f32_bytes(values) -> tuple[bytes, int]:
    """Little-endian float32 bytes of an array-like (as a float32[] field stores it) and its length."""
    a = np.ascontiguousarray(values, dtype="<f4")
    return a.tobytes(), int(a.size)


# ---------------------------------------------------------------------------------------------- BatteryState

@dataclass
class BatteryFields:
    """The fields of a sensor_msgs/BatteryState; cells as float32 arrays (read-only views when read)."""

    sec: int
    nanosec: int
    frame_id: str
    voltage: float
    temperature: float
    current: float
    charge: float
    capacity: float
    design_capacity: float
    percentage: float
    power_supply_status: int
    power_supply_health: int
    power_supply_technology: int
    present: bool
    cell_voltage: np.ndarray
    cell_temperature: np.ndarray
    location: str
    serial_number: str

    @property
    def stamp(self) -> float:
        """header.stamp in seconds (as :func:`bms_ai.nodes.convert.time_to_float`)."""
        return self.sec + self.nanosec / 1e9


def battery_state_bytes(f: BatteryFields) -> bytes:
    """Serialized BatteryState: what ``serialize_message`` gives for the same fields (padding zeroed)."""
    w = _Writer()
    w.buf += _STAMP.pack(f.sec, f.nanosec)
    w.string(f.frame_id)
    w.align4()
    w.buf += _BATTERY_SCALARS.pack(f.voltage, f.temperature, f.current, f.charge, f.capacity, f.design_capacity,
                                   f.percentage, f.power_supply_status, f.power_supply_health,
                                   f.power_supply_technology, 1 if f.present else 0)
    w.floats(*f32_bytes(f.cell_voltage))
    w.floats(*f32_bytes(f.cell_temperature))
    w.string(f.location)
    w.string(f.serial_number)
    return bytes(w.buf)


def read_battery_state(data: bytes) -> BatteryFields:
    """The fields of a serialized BatteryState; ValueError for another encoding or a malformed payload."""
    try:
        _check(data)
        sec, nanosec = _STAMP.unpack_from(data, _BASE)
        frame_id, pos = _string(data, _BASE + 8)
        pos = _align4(pos)
        scalars = _BATTERY_SCALARS.unpack_from(data, pos)
        cv, pos = _floats(data, pos + _BATTERY_SCALARS.size)
        ct, pos = _floats(data, pos)
        location, pos = _string(data, pos)
        serial, pos = _string(data, pos)
    except struct.error as exc:
        raise ValueError(f"BatteryState cut short: {exc}") from None
    return BatteryFields(sec, nanosec, frame_id, *scalars[:10], bool(scalars[10]), cv, ct, location, serial)


# ---------------------------------------------------------------------------------------------- DiagnosticArray

#: one DiagnosticStatus: (level, name, message, hardware_id, ((key, value), ...))
Status = tuple[int, str, str, str, Sequence[tuple[str, str]]]


def diagnostic_array_bytes(sec: int, nanosec: int, statuses: Iterable[Status], frame_id: str = "") -> bytes:
    """Serialized DiagnosticArray of ``statuses`` (padding zeroed)."""
    w = _Writer()
    w.buf += _STAMP.pack(sec, nanosec)
    w.string(frame_id)
    statuses = list(statuses)
    w.align4()
    w.buf += _U32.pack(len(statuses))
    for level, name, message, hardware_id, values in statuses:
        w.buf.append(level)
        w.string(name)
        w.string(message)
        w.string(hardware_id)
        w.align4()
        w.buf += _U32.pack(len(values))
        for key, value in values:
            w.string(key)
            w.string(value)
    return bytes(w.buf)


def read_diagnostic_statuses(data: bytes) -> list[Status]:
    """The statuses of a serialized DiagnosticArray; ValueError for another encoding or a malformed payload."""
    try:
        _check(data)
        _, pos = _string(data, _BASE + 8)
        pos = _align4(pos)
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise ValueError("status count runs past the end of the message")
        out: list[Status] = []
        for _ in range(n):
            level = data[pos]
            name, pos = _string(data, pos + 1)
            message, pos = _string(data, pos)
            hardware_id, pos = _string(data, pos)
            pos = _align4(pos)
            (nv,) = _U32.unpack_from(data, pos)
            pos += 4
            if nv > len(data) - pos:
                raise ValueError("value count runs past the end of the message")
            values = []
            for _ in range(nv):
                key, pos = _string(data, pos)
                value, pos = _string(data, pos)
                values.append((key, value))
            out.append((level, name, message, hardware_id, values))
    except (struct.error, IndexError) as exc:
        raise ValueError(f"DiagnosticArray cut short: {exc}") from None
    return out


def read_diagnostic_levels(data: bytes) -> list[tuple[int, str, str]]:
    """(level, name, hardware_id) of each status of a serialized DiagnosticArray, the rest skipped unread.

    What a recorder needs of every /diagnostics message, at a fraction of
    :func:`read_diagnostic_statuses`. ValueError as there.
    """
    try:
        _check(data)
        u32 = _U32.unpack_from
        pos = (_BASE + 8 + 7 + u32(data, _BASE + 8)[0]) & ~3  # past header.frame_id
        (n,) = u32(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise ValueError("status count runs past the end of the message")
        out = []
        for _ in range(n):
            level = data[pos]
            name, pos = _string(data, pos + 1)
            pos = (pos + 3) & ~3
            pos = (pos + 7 + u32(data, pos)[0]) & ~3  # past the message text
            hardware_id, pos = _string(data, pos)
            pos = (pos + 3) & ~3
            (nv,) = u32(data, pos)
            if nv > len(data) - pos:
                raise ValueError("value count runs past the end of the message")
            pos = _skip_pairs(data, pos + 4, nv)
            out.append((level, name, hardware_id))
    except (struct.error, IndexError) as exc:
        raise ValueError(f"DiagnosticArray cut short: {exc}") from None
    return out
