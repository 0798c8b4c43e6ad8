"""bms_ai.core.cdr against rclpy's own (de)serialization: the same fields both ways."""

import array
import math
import random

import numpy as np
import pytest

pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import BatteryState  # noqa: E402

from bms_ai.core import cdr  # noqa: E402
from bms_ai.nodes.convert import battery_fields, battery_state_fields, fields_to_battery_state  # noqa: E402
from bms_ai.pack import PackSample  # noqa: E402

FLOATS = ("voltage", "temperature", "current", "charge", "capacity", "design_capacity", "percentage")


def _text(rng: random.Random) -> str:
    """Strings of every length mod 4 (alignment), with multi-byte UTF-8."""
    return "".join(rng.choice("ab:é€ x") for _ in range(rng.choice([0, 1, 2, 3, 4, 5, 7, 13])))


def _battery(rng: random.Random, i: int) -> BatteryState:
    m = BatteryState()
    m.header.stamp.sec, m.header.stamp.nanosec = rng.randint(0, 2**31 - 1), rng.randint(0, 10**9 - 1)
    m.header.frame_id = _text(rng)
    for f in FLOATS:
        setattr(m, f, rng.choice([math.nan, math.inf, rng.uniform(-1e3, 1e3), 0.0]))
    m.power_supply_status, m.power_supply_health = rng.randint(0, 4), rng.randint(0, 8)
    m.power_supply_technology, m.present = rng.randint(0, 6), rng.random() < 0.5
    g = np.random.default_rng(i)
    m.cell_voltage = array.array("f", g.normal(3.7, 0.1, rng.randint(0, 97)).astype(np.float32).tobytes())
    m.cell_temperature = array.array("f", g.normal(25, 1, rng.randint(0, 33)).astype(np.float32).tobytes())
    m.location, m.serial_number = _text(rng), _text(rng)
    return m


def _same_battery(a: BatteryState, b: BatteryState) -> None:
    assert (a.header.stamp, a.header.frame_id) == (b.header.stamp, b.header.frame_id)
    for f in FLOATS:
        x, y = getattr(a, f), getattr(b, f)
        assert x == y or (math.isnan(x) and math.isnan(y)), f
    for f in ("power_supply_status", "power_supply_health", "power_supply_technology", "present", "location",
              "serial_number"):
        assert getattr(a, f) == getattr(b, f), f
    assert a.cell_voltage.tobytes() == b.cell_voltage.tobytes()
    assert a.cell_temperature.tobytes() == b.cell_temperature.tobytes()


def test_battery_state_reads_and_writes_as_rclpy_does():
    """Read rclpy's bytes, write them back: rclpy reads the same message (every length, NaN, inf, empty arrays)."""
    rng = random.Random(1)
    for i in range(200):
        wire = serialize_message(_battery(rng, i))
        ref = deserialize_message(wire, BatteryState)
        f = cdr.read_battery_state(wire)
        assert f.stamp == ref.header.stamp.sec + ref.header.stamp.nanosec / 1e9
        _same_battery(fields_to_battery_state(f), ref)
        _same_battery(deserialize_message(cdr.battery_state_bytes(f), BatteryState), ref)
        assert len(cdr.battery_state_bytes(f)) == len(wire)
        _same_battery(fields_to_battery_state(battery_state_fields(ref)), ref)


def test_a_measurement_goes_out_as_the_message_would():
    """The bridge's bytes are the serialized sample_to_battery_state message."""
    v = np.linspace(3.0, 4.2, 96)
    v[5] = np.nan
    s = PackSample(stamp=12.5, pack_voltage=380.0, pack_current=-3.0, cell_voltages=v, cell_temperatures=np.full(32, 25.5))
    f = battery_fields(s, "battery", "p")
    _same_battery(deserialize_message(cdr.battery_state_bytes(f), BatteryState), fields_to_battery_state(f))


def _diagnostics(rng: random.Random) -> DiagnosticArray:
    d = DiagnosticArray()
    d.header.stamp.sec, d.header.frame_id = rng.randint(0, 99), _text(rng)
    d.status = [DiagnosticStatus(level=bytes([rng.randint(0, 3)]), name=_text(rng), message=_text(rng),
                                 hardware_id=_text(rng),
                                 values=[KeyValue(key=_text(rng), value=_text(rng)) for _ in range(rng.randint(0, 4))])
                for _ in range(rng.randint(0, 5))]
    return d


def _statuses(d: DiagnosticArray) -> list:
    return [(s.level[0], s.name, s.message, s.hardware_id, [(kv.key, kv.value) for kv in s.values]) for s in d.status]


def test_diagnostic_arrays_read_and_write_as_rclpy_does():
    rng = random.Random(2)
    for _ in range(200):
        d = _diagnostics(rng)
        wire = serialize_message(d)
        got = cdr.read_diagnostic_statuses(wire)
        assert got == _statuses(d)
        assert cdr.read_diagnostic_levels(wire) == [(s[0], s[1], s[3]) for s in got]
        back = deserialize_message(cdr.diagnostic_array_bytes(d.header.stamp.sec, d.header.stamp.nanosec, got,
                                                              d.header.frame_id), DiagnosticArray)
        assert _statuses(back) == _statuses(d) and back.header == d.header


def test_strings_are_cut_at_a_nul_as_rclpy_cuts_them():
    d = DiagnosticArray()
    d.status = [DiagnosticStatus(name="a\0b", hardware_id="h")]
    wire = serialize_message(d)
    assert cdr.read_diagnostic_statuses(wire)[0][1] == deserialize_message(wire, DiagnosticArray).status[0].name
    ours = cdr.diagnostic_array_bytes(0, 0, [(0, "a\0b", "", "h", [])])
    assert deserialize_message(ours, DiagnosticArray).status[0].name == "a"


@pytest.mark.parametrize("cut", [3, 4, 10, 40, -1])
def test_a_cut_or_foreign_payload_is_a_value_error(cut):
    """The callers then fall back to rclpy (which raises its own error for a bad payload)."""
    wire = serialize_message(_battery(random.Random(3), 0))
    with pytest.raises(ValueError):
        cdr.read_battery_state(wire[:cut])
    diag = serialize_message(_diagnostics(random.Random(4)))
    with pytest.raises(ValueError):
        cdr.read_diagnostic_statuses(diag[:cut])
    with pytest.raises(ValueError):
        cdr.read_diagnostic_levels(diag[:cut])
    with pytest.raises(ValueError):
        cdr.read_battery_state(b"\x00\x00\x00\x00" + wire[4:])  # big-endian CDR: not read here
