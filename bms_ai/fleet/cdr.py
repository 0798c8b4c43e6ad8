"""CDR (ROS 2 wire format) of BatteryState and DiagnosticArray without rclpy, vectorised where it pays.

The cloud side has no ROS installed, and the fleet budget leaves ~50 us per
sample for decode, timeline and labels together. A vehicle's BatteryState
messages all have one layout (same cell count, same strings), so a whole
segment's messages are one numpy structured array: encoding fills it and
slices rows, decoding is one ``np.frombuffer`` over the joined payloads plus a
check that every row's length fields are the expected ones. Messages with
another layout go through the plain per-message reader. The bytes are exactly
what rclpy writes (CDR little endian, alignment relative to the payload after
the 4-byte encapsulation header), so rosbag2, Foxglove and ``mcap-ros2-support``
read them.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

import numpy as np

BATTERY_STATE = "sensor_msgs/msg/BatteryState"
DIAGNOSTIC_ARRAY = "diagnostic_msgs/msg/DiagnosticArray"
ENCAPSULATION = b"\x00\x01\x00\x00"  # CDR little endian, no options
FLOATS = ("voltage", "temperature", "current", "charge", "capacity", "design_capacity", "percentage")
BYTES = ("power_supply_status", "power_supply_health", "power_supply_technology", "present")


class CdrError(ValueError):
    """Bytes that are not the expected message (truncated, wrong lengths)."""


def _align(pos: int, n: int) -> int:
    return (pos + n - 1) // n * n


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
        tmpl = bytearray(ENCAPSULATION)

        def field(name: str, fmt: str, size: int, align: int) -> None:
            pos = 4 + _align(len(tmpl) - 4, align)
            tmpl.extend(b"\0" * (pos - len(tmpl) + size))
            names.append(name)
            formats.append(fmt)
            offsets.append(pos)

        def const(data: bytes, align: int) -> None:
            pos = 4 + _align(len(tmpl) - 4, align)
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


class _Reader:
    """Sequential CDR reader over one payload (alignment relative to the data after the header)."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 4 or data[:2] != b"\x00\x01":
            raise CdrError("not little-endian CDR")
        self.b, self.p = memoryview(data), 4

    def _take(self, fmt: str, size: int) -> tuple:
        self.p = 4 + _align(self.p - 4, size if size in (2, 4, 8) else 1)
        if self.p + struct.calcsize(fmt) > len(self.b):
            raise CdrError("truncated message")
        out = struct.unpack_from(fmt, self.b, self.p)
        self.p += struct.calcsize(fmt)
        return out

    def u32(self) -> int:
        return self._take("<I", 4)[0]

    def string(self) -> str:
        n = self.u32()
        if n == 0 or self.p + n > len(self.b):
            raise CdrError("bad string length")
        s = bytes(self.b[self.p:self.p + n - 1]).decode("utf-8", "replace")
        self.p += n
        return s

    def floats(self) -> np.ndarray:
        n = self.u32()
        if self.p + 4 * n > len(self.b):
            raise CdrError("bad array length")
        out = np.frombuffer(self.b, "<f4", n, self.p).copy()
        self.p += 4 * n
        return out


def decode_battery_state(data: bytes) -> dict:
    """One BatteryState as a dict of fields (cell arrays as float32); CdrError when malformed."""
    r = _Reader(data)
    sec, nsec = r._take("<iI", 4)
    out: dict = {"t": sec + nsec * 1e-9, "frame_id": r.string()}
    out.update(zip(FLOATS, r._take("<7f", 4)))
    out.update(zip(BYTES, r._take("<4B", 1)))
    out["cell_voltage"], out["cell_temperature"] = r.floats(), r.floats()
    out["location"], out["serial_number"] = r.string(), r.string()
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


# -- DiagnosticArray (on change: a few messages per hour, plain Python) -----------------------------


class _Writer:
    def __init__(self) -> None:
        self.b = bytearray(ENCAPSULATION)

    def _pad(self, n: int) -> None:
        self.b.extend(b"\0" * (4 + _align(len(self.b) - 4, n) - len(self.b)))

    def u32(self, v: int) -> None:
        self._pad(4)
        self.b.extend(struct.pack("<I", v))

    def i32(self, v: int) -> None:
        self._pad(4)
        self.b.extend(struct.pack("<i", v))

    def string(self, s: str) -> None:
        data = s.encode()
        self.u32(len(data) + 1)
        self.b.extend(data + b"\0")


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
    w = _Writer()
    sec = math.floor(t)
    w.i32(sec)
    w.u32(min(round((t - sec) * 1e9), 999_999_999))
    w.string(frame_id)
    w.u32(len(statuses))
    for st in statuses:
        w.b.append(st.level & 0xFF)     # byte: no alignment
        for s in (st.name, st.message, st.hardware_id):
            w.string(s)
        w.u32(len(st.values))
        for k, v in st.values:
            w.string(k)
            w.string(v)
    return bytes(w.b)


def decode_diagnostic_array(data: bytes) -> tuple[float, list[Status]]:
    """Stamp (s) and statuses of a DiagnosticArray; CdrError when malformed."""
    r = _Reader(data)
    sec, nsec = r._take("<iI", 4)
    r.string()
    n = r.u32()
    if n > len(data):
        raise CdrError("bad status count")
    out = []
    for _ in range(n):
        (level,) = r._take("<B", 1)
        name, message, hw = r.string(), r.string(), r.string()
        k = r.u32()
        if k > len(data):
            raise CdrError("bad key/value count")
        out.append(Status(level, name, message, hw, tuple((r.string(), r.string()) for _ in range(k))))
    return sec + nsec * 1e-9, out
