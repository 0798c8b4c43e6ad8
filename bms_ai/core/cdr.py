"""CDR (the ROS 2 wire format) of BatteryState and DiagnosticArray without rclpy: one home for both sides.

- Per message (the graph, at its sample rate): rclpy turns every field into a Python object
  through generated setters (a 96-cell BatteryState ~30 us to take, ~35 us to build and
  convert; a DiagnosticArray ~3 us per key/value pair), which this skips: publishers hand
  rclpy the bytes, raw subscriptions read only the fields they need
  (``battery_state_bytes``/``read_battery_state``, ``diagnostic_array_bytes``/
  ``read_diagnostic_statuses``/``read_diagnostic_levels``).
- Vectorised (the fleet: a vehicle's segment of messages, the cloud without ROS): every
  BatteryState of one vehicle has one layout (same cell count, same strings), so a whole
  segment is one numpy structured array: encoding fills it and slices rows, decoding is one
  ``np.frombuffer`` over the joined payloads plus a check that every row's length fields are
  the expected ones (``encode_battery_states``/``decode_battery_states``); other layouts go
  through the per-message reader.

Plain CDR, little endian (XCDR1, what rmw_fastrtps writes), alignment counted from the end of
the 4-byte encapsulation header, padding written as zeros: the bytes are rclpy's, so rosbag2,
Foxglove and ``mcap-ros2-support`` read them. Anything else (another encoding, a malformed
payload) raises ValueError (``CdrError``) and a node caller deserializes through rclpy instead.
Strings read as rclpy reads them (UTF-8 with replacement, cut at a NUL).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

BATTERY_STATE = "sensor_msgs/msg/BatteryState"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"
#: encapsulation header of plain little-endian CDR
CDR_LE = b"\x00\x01\x00\x00"
_BASE = len(CDR_LE)  # alignment counts from the end of the encapsulation header
FLOATS = ("voltage", "temperature", "current", "charge", "capacity", "design_capacity", "percentage")
BYTES = ("power_supply_status", "power_supply_health", "power_supply_technology", "present")

_U32 = struct.Struct("<I")
_STAMP = struct.Struct("<iI")
_BATTERY_SCALARS = struct.Struct("<7f4B")  # voltage .. percentage, status, health, technology, present


class CdrError(ValueError):
    """Bytes that are not the expected message (another encoding, truncated, wrong lengths)."""


def _check(data: bytes) -> None:
    if data[:4] != CDR_LE:
        raise CdrError(f"not little-endian CDR (encapsulation {bytes(data[:4]).hex()})")


def _align(pos: int, n: int = 4) -> int:
    """``pos`` padded to a multiple of ``n`` (1, 2, 4 or 8) counted from the end of the encapsulation header."""
    return pos + (-(pos - _BASE) & (n - 1))


def _string(data: bytes, pos: int) -> tuple[str, int]:
    pos = _align(pos)
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if n > len(data) - pos:
        raise CdrError("string runs past the end of the message")
    raw = data[pos:pos + n - 1] if n else b""
    nul = raw.find(b"\0")
    return (raw if nul < 0 else raw[:nul]).decode("utf-8", "replace"), pos + n


def _skip_pairs(data: bytes, pos: int, n: int) -> int:
    """Past ``n`` pairs of strings (key/value): only their lengths are read."""
    u32 = _U32.unpack_from
    for _ in range(n):
        pos = (pos + 3) & ~3  # _align: the header is 4 bytes, so alignment is absolute
        pos = (pos + 7 + u32(data, pos)[0]) & ~3
        pos += 4 + u32(data, pos)[0]
    if pos > len(data):
        raise CdrError("string runs past the end of the message")
    return pos


def _floats(data: bytes, pos: int) -> tuple[np.ndarray, int]:
    """A float32[] as a read-only float32 array over ``data`` (no copy)."""
    pos = _align(pos)
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if 4 * n > len(data) - pos:
        raise CdrError("array runs past the end of the message")
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
        """header.stamp in seconds (as ``bms_ai.nodes.convert.time_to_float``)."""
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
        pos = _align(pos)
        scalars = _BATTERY_SCALARS.unpack_from(data, pos)
        cv, pos = _floats(data, pos + _BATTERY_SCALARS.size)
        ct, pos = _floats(data, pos)
        location, pos = _string(data, pos)
        serial, pos = _string(data, pos)
    except struct.error as exc:
        raise CdrError(f"BatteryState cut short: {exc}") from None
    return BatteryFields(sec, nanosec, frame_id, *scalars[:10], bool(scalars[10]), cv, ct, location, serial)


# ---------------------------------------------------------------------------------------------- DiagnosticArray

#: one DiagnosticStatus as the graph builds it: (level, name, message, hardware_id, ((key, value), ...))
StatusTuple = tuple[int, str, str, str, Sequence[tuple[str, str]]]


def diagnostic_array_bytes(sec: int, nanosec: int, statuses: Iterable[StatusTuple], frame_id: str = "") -> bytes:
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


def read_diagnostic_statuses(data: bytes) -> list[StatusTuple]:
    """The statuses of a serialized DiagnosticArray; ValueError for another encoding or a malformed payload."""
    try:
        _check(data)
        _, pos = _string(data, _BASE + 8)
        pos = _align(pos)
        (n,) = _U32.unpack_from(data, pos)
        pos += 4
        if n > len(data) - pos:
            raise CdrError("status count runs past the end of the message")
        out: list[StatusTuple] = []
        for _ in range(n):
            level = data[pos]
            name, pos = _string(data, pos + 1)
            message, pos = _string(data, pos)
            hardware_id, pos = _string(data, pos)
            pos = _align(pos)
            (nv,) = _U32.unpack_from(data, pos)
            pos += 4
            if nv > len(data) - pos:
                raise CdrError("value count runs past the end of the message")
            values = []
            for _ in range(nv):
                key, pos = _string(data, pos)
                value, pos = _string(data, pos)
                values.append((key, value))
            out.append((level, name, message, hardware_id, values))
    except (struct.error, IndexError) as exc:
        raise CdrError(f"DiagnosticArray cut short: {exc}") from None
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
            raise CdrError("status count runs past the end of the message")
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
                raise CdrError("value count runs past the end of the message")
            pos = _skip_pairs(data, pos + 4, nv)
            out.append((level, name, hardware_id))
    except (struct.error, IndexError) as exc:
        raise CdrError(f"DiagnosticArray cut short: {exc}") from None
    return out


# ---------------------------------------------------------------------------------------------- whole segments

@dataclass(frozen=True)
class BatteryLayout:
    """Byte layout of BatteryState with fixed cell counts and strings: a numpy structured dtype."""

    n_v: int
    n_t: int
    frame_id: bytes
    location: bytes
    serial: bytes

    def build(self) -> tuple[np.dtype, bytes]:
        """The dtype of one message (with its encapsulation header) and the bytes of its constant parts."""
        names, formats, offsets = [], [], []
        tmpl = bytearray(CDR_LE)

        def field(name: str, fmt: str, size: int, align: int) -> None:
            pos = _align(len(tmpl), align)
            tmpl.extend(b"\0" * (pos - len(tmpl) + size))
            names.append(name)
            formats.append(fmt)
            offsets.append(pos)

        def const(data: bytes, align: int) -> None:
            pos = _align(len(tmpl), align)
            tmpl.extend(b"\0" * (pos - len(tmpl)))
            tmpl.extend(data)

        def string(name: str, s: bytes) -> None:
            const(struct.pack("<I", len(s) + 1), 4)
            field(name, f"S{len(s) + 1}", len(s) + 1, 1)
            tmpl[-len(s) - 1:] = s + b"\0"

        field("sec", "<i4", 4, 4)
        field("nanosec", "<u4", 4, 4)
        string("frame_id", self.frame_id)
        for f in FLOATS:
            field(f, "<f4", 4, 4)
        for f in BYTES:
            field(f, "u1", 1, 1)
        field("n_v", "<u4", 4, 4)
        field("cell_voltage", ("<f4", (self.n_v,)) if self.n_v else "V0", 4 * self.n_v, 4)
        field("n_t", "<u4", 4, 4)
        field("cell_temperature", ("<f4", (self.n_t,)) if self.n_t else "V0", 4 * self.n_t, 4)
        string("location", self.location)
        string("serial_number", self.serial)
        dt = np.dtype({"names": names, "formats": formats, "offsets": offsets, "itemsize": len(tmpl)})
        struct.pack_into("<I", tmpl, dt.fields["n_v"][1], self.n_v)
        struct.pack_into("<I", tmpl, dt.fields["n_t"][1], self.n_t)
        return dt, bytes(tmpl)


def encode_battery_states(t: np.ndarray, cell_v: np.ndarray, cell_t: np.ndarray, *, current: np.ndarray,
                          voltage: np.ndarray | None = None, temperature: np.ndarray | None = None,
                          percentage: np.ndarray | None = None, capacity: np.ndarray | None = None,
                          design_capacity: float = math.nan, health: np.ndarray | int = 0,
                          status: np.ndarray | int = 0, frame_id: str = "battery", location: str = "",
                          serial: str = "") -> list[bytes]:
    """One CDR BatteryState per row; t in s (header stamp), NaN where a field is unknown (as the nodes do)."""
    t = np.asarray(t, np.float64)
    cell_v = np.asarray(cell_v, np.float32).reshape(len(t), -1)
    cell_t = np.asarray(cell_t, np.float32).reshape(len(t), -1)
    lay = BatteryLayout(cell_v.shape[1], cell_t.shape[1], frame_id.encode(), location.encode(), serial.encode())
    dt, tmpl = lay.build()
    buf = bytearray(tmpl * len(t))   # constant parts (lengths, strings, padding) stay as in the template
    a = np.frombuffer(buf, dtype=dt)
    sec = np.floor(t)
    a["sec"], a["nanosec"] = sec, np.minimum(np.round((t - sec) * 1e9), 999_999_999)
    nan = np.float32(np.nan)
    a["voltage"] = cell_v.sum(axis=1) if voltage is None else voltage
    with np.errstate(invalid="ignore"):
        a["temperature"] = (np.nanmax(np.where(np.isfinite(cell_t), cell_t, -np.inf), axis=1) if temperature is None
                            else temperature) if cell_t.shape[1] or temperature is not None else nan
    a["current"] = current
    a["percentage"] = nan if percentage is None else percentage
    a["capacity"] = nan if capacity is None else capacity
    a["charge"] = a["percentage"] * a["capacity"]
    a["design_capacity"] = design_capacity
    a["power_supply_status"], a["power_supply_health"] = status, health
    a["power_supply_technology"], a["present"] = 2, 1   # LION, present
    if lay.n_v:
        a["cell_voltage"] = cell_v
    if lay.n_t:
        a["cell_temperature"] = cell_t
    raw = bytes(buf)
    n = dt.itemsize
    return [raw[i:i + n] for i in range(0, len(raw), n)]


def charging_status(current: np.ndarray) -> np.ndarray:
    """BatteryState power_supply_status from the current, as the bridge sets it (1 charging, 2 dis-, 3 not)."""
    c = np.asarray(current, float)
    return np.where(c > 0.5, 1, np.where(c < -0.5, 2, np.where(np.isfinite(c), 3, 0))).astype(np.uint8)


def decode_battery_state(data: bytes) -> dict:
    """One BatteryState as a dict of fields (cell arrays as float32 copies); CdrError when malformed."""
    f = read_battery_state(data)
    out: dict = {"t": f.stamp, "frame_id": f.frame_id}
    out.update((k, getattr(f, k)) for k in (*FLOATS, *BYTES))
    out["present"] = int(f.present)
    out["cell_voltage"], out["cell_temperature"] = f.cell_voltage.copy(), f.cell_temperature.copy()
    out["location"], out["serial_number"] = f.location, f.serial_number
    return out


def decode_battery_states(payloads: list[bytes]) -> dict[str, np.ndarray]:
    """Columns (t, current, percentage, capacity, cell_voltage (N, n), ...) of many BatteryState messages.

    Fast path: every payload has the first one's size and layout (one numpy view); otherwise
    message by message. Raises CdrError for a malformed message (the caller counts it).
    """
    if not payloads:
        return {}
    first = decode_battery_state(payloads[0])
    lay = BatteryLayout(len(first["cell_voltage"]), len(first["cell_temperature"]), first["frame_id"].encode(),
                        first["location"].encode(), first["serial_number"].encode())
    dt, _ = lay.build()
    if all(len(p) == dt.itemsize for p in payloads):
        a = np.frombuffer(b"".join(payloads), dtype=dt)
        if (a["n_v"] == lay.n_v).all() and (a["n_t"] == lay.n_t).all():
            cols = {f: a[f].astype(np.float64) for f in FLOATS}
            cols["t"] = a["sec"].astype(np.float64) + a["nanosec"] * 1e-9
            cols["cell_voltage"] = a["cell_voltage"].reshape(len(a), lay.n_v) if lay.n_v else np.empty((len(a), 0))
            cols["cell_temperature"] = (a["cell_temperature"].reshape(len(a), lay.n_t) if lay.n_t
                                        else np.empty((len(a), 0)))
            return cols
    rows = [decode_battery_state(p) for p in payloads]
    n_v = {len(r["cell_voltage"]) for r in rows}
    n_t = {len(r["cell_temperature"]) for r in rows}
    if len(n_v) != 1 or len(n_t) != 1:
        raise CdrError(f"cell counts change within one segment: {sorted(n_v)} / {sorted(n_t)}")
    cols = {f: np.array([r[f] for r in rows], np.float64) for f in ("t", *FLOATS)}
    cols["cell_voltage"] = np.stack([r["cell_voltage"] for r in rows])
    cols["cell_temperature"] = np.stack([r["cell_temperature"] for r in rows])
    return cols


# -- DiagnosticArray as records (the fleet's segments: a few messages per hour) ------------------------


@dataclass(frozen=True)
class Status:
    """One DiagnosticStatus (level as in ``bms_ai.core.levels``)."""

    level: int
    name: str
    message: str
    hardware_id: str
    values: tuple[tuple[str, str], ...] = ()


def encode_diagnostic_array(t: float, statuses: list[Status], frame_id: str = "") -> bytes:
    """A DiagnosticArray with header stamp ``t`` s."""
    sec = math.floor(t)
    return diagnostic_array_bytes(sec, min(round((t - sec) * 1e9), 999_999_999),
                                  [(s.level, s.name, s.message, s.hardware_id, s.values) for s in statuses], frame_id)


def decode_diagnostic_array(data: bytes) -> tuple[float, list[Status]]:
    """Stamp (s) and statuses of a DiagnosticArray; CdrError when malformed."""
    statuses = read_diagnostic_statuses(data)
    sec, nsec = _STAMP.unpack_from(data, _BASE)
    return sec + nsec * 1e-9, [Status(lv, n, m, hw, tuple(map(tuple, kv))) for lv, n, m, hw, kv in statuses]
