"""can_bridge on real rclpy/DDS: replayed log and live virtual bus -> BatteryState + diagnostics."""

from __future__ import annotations

import math
import time

import can
import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter
from sensor_msgs.msg import BatteryState
from testutil import RosHarness, diag_levels, diag_values, synthetic_messages

from bms_ai.can.decoder import PackDecoder
from bms_ai.can.offline import decode_log
from bms_ai.can.packconfig import load_pack_config
from bms_ai.nodes.can_bridge import CanBridgeNode
from bms_ai.nodes.convert import time_to_float

pytestmark = pytest.mark.ros


@pytest.fixture
def ros():
    """A private rclpy context with an executor thread, closed after the test."""
    h = RosHarness()
    yield h
    h.close()


@pytest.fixture(scope="module")
def cfg(pack_config_path):
    """The reference pack config."""
    return load_pack_config(pack_config_path)


@pytest.fixture(scope="module")
def drive_log(tmp_path_factory, cfg):
    """Three seconds of traffic as BLF, one frame with a corrupted checksum."""
    path = tmp_path_factory.mktemp("drive") / "drive.blf"
    msgs = synthetic_messages(PackDecoder(cfg), 1000.0, 1003.0)
    msgs[100].data[0] ^= 0x55  # one corrupted checksum
    with can.Logger(str(path)) as log:
        for m in msgs:
            log.on_message_received(m)
    return path


def _node(ros, **params) -> CanBridgeNode:
    overrides = [Parameter(k, value=v) for k, v in params.items()]
    return ros.add(CanBridgeNode(context=ros.context, namespace="/bms", parameter_overrides=overrides))


def test_replayed_log_published_values_and_stale_on_silence(ros, drive_log, cfg):
    """A 2x replay publishes the offline decoder's samples; the end of the log goes STALE within 1 s."""
    got = ros.collect(BatteryState, "/bms/pack/measurements")
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    time.sleep(0.5)  # discovery
    _node(ros, can_log=str(drive_log), replay_speed=2.0, stale_after=0.5)
    expected = decode_log(drive_log, cfg, rate=10.0, max_age=1.0)
    assert ros.wait_for(lambda: len(got) >= len(expected), timeout=10)
    replayed = got[: len(expected)]
    stamps = [time_to_float(m.header.stamp) for m in replayed]
    np.testing.assert_allclose(stamps, expected.t, atol=1e-6)
    np.testing.assert_allclose([m.voltage for m in replayed], expected.pack_voltage, rtol=1e-6)
    np.testing.assert_allclose([m.current for m in replayed], expected.pack_current, rtol=1e-6, atol=1e-6)
    cv = np.array([m.cell_voltage for m in replayed])
    np.testing.assert_allclose(cv, expected.cell_voltages, atol=1e-6)  # float32 on the wire
    assert len(replayed[-1].cell_temperature) == 32 and replayed[-1].serial_number == cfg.pack_id
    assert all(np.isfinite(m.cell_voltage).all() for m in replayed[5:])
    # the log ends: STALE within 1 s of silence, values age out to NaN
    t_end = time.monotonic()
    assert ros.wait_for(lambda: 3 in diag_levels(diags, "can_bridge: can_bus"), timeout=3)
    assert time.monotonic() - t_end < 1.5
    assert ros.wait_for(lambda: math.isnan(got[-1].voltage), timeout=4)
    vals = diag_values(diags, "can_bridge: can_bus")
    assert vals["rejected_crc_error"] == "1"
    assert all(st.hardware_id == cfg.pack_id for a in diags for st in a.status)


def test_live_virtual_bus_and_bad_frames_reported(ros, cfg):
    """Live frames become samples; unknown ids and bad lengths are counted on /diagnostics (WARN, then STALE)."""
    got = ros.collect(BatteryState, "/bms/pack/measurements")
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    _node(ros, interface="virtual", channel="bridge_test", stale_after=0.5)
    bus = can.Bus(interface="virtual", channel="bridge_test")
    try:
        msgs = synthetic_messages(PackDecoder(cfg), 0.0, 1.5)  # the virtual bus stamps receive time
        bus.send(can.Message(arbitration_id=0x7AB, data=b"\x01\x02", is_extended_id=False))  # unknown id
        bus.send(can.Message(arbitration_id=0x120, data=b"\x01\x02", is_extended_id=False))  # wrong DLC
        # > 1.2 s of traffic after the bad frames: a 1 Hz report falls inside it (WARN, not yet STALE)
        for i, m in enumerate(msgs):
            bus.send(m)
            if i % 50 == 0:
                time.sleep(0.03)
        assert ros.wait_for(lambda: any(np.isfinite(m.cell_voltage).all() for m in got), timeout=5)
        ok = ros.wait_for(lambda: diag_values(diags, "can_bridge: can_bus").get("rejected_dlc_error") == "1", timeout=3)
        assert ok, diag_values(diags, "can_bridge: can_bus")
        v = diag_values(diags, "can_bridge: can_bus")
        assert v["rejected_unknown_id"] == "1" and "0x7AB:1" in v["unknown_ids"]
        assert 1 in diag_levels(diags, "can_bridge: can_bus")  # WARN for the rejected frames
        assert ros.wait_for(lambda: diag_levels(diags, "can_bridge: can_bus")[-1:] == [3], timeout=3)  # silence
    finally:
        bus.shutdown()


def test_sim_time_clock_and_raw_log(ros, drive_log, tmp_path):
    """publish_clock drives /clock from CAN time; every frame lands in the rotating raw BLF."""
    from rosgraph_msgs.msg import Clock

    clocks = ros.collect(Clock, "/clock")
    got = ros.collect(BatteryState, "/bms/pack/measurements")
    time.sleep(0.3)
    node = _node(ros, can_log=str(drive_log), replay_speed=0.0, publish_clock=True, use_sim_time=True,
                 raw_log_dir=str(tmp_path / "raw"))
    assert ros.wait_for(lambda: len(got) >= 29, timeout=10)
    clock_t = [time_to_float(c.clock) for c in clocks]
    stamps = [time_to_float(m.header.stamp) for m in got[:29]]
    assert clock_t[: len(stamps)] == pytest.approx(stamps, abs=1e-6)
    assert ros.wait_for(lambda: abs(time_to_float(node.get_clock().now().to_msg()) - stamps[-1]) < 0.2, timeout=3)
    assert ros.wait_for(lambda: node.source.finished, timeout=10)  # every frame read (and logged)
    node.destroy_node()
    ros.nodes.remove(node)
    raw = sorted((tmp_path / "raw").glob("*.blf"))
    assert raw and sum(1 for _ in can.LogReader(str(raw[0]))) == sum(1 for _ in can.LogReader(str(drive_log)))


def test_max_speed_batch_replay_equals_offline_decode(ros, drive_log, cfg):
    """replay_speed 0: vectorised batch path, lossless, same samples as the offline decoder."""
    got = ros.collect(BatteryState, "/bms/pack/measurements")
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    time.sleep(0.3)
    _node(ros, can_log=str(drive_log), replay_speed=0.0)
    expected = decode_log(drive_log, cfg, rate=10.0, max_age=1.0)
    assert ros.wait_for(lambda: len(got) >= len(expected), timeout=10)
    np.testing.assert_allclose([m.voltage for m in got[: len(expected)]], expected.pack_voltage, rtol=1e-6)
    np.testing.assert_allclose(np.array([m.cell_temperature for m in got[: len(expected)]]),
                               expected.cell_temperatures, atol=1e-4)
    assert ros.wait_for(lambda: diag_values(diags, "can_bridge: can_bus").get("rejected_crc_error") == "1", timeout=3)


def _diag_message(diags, name: str) -> str:
    msgs = [st.message for a in diags for st in a.status if st.name == name]
    return msgs[-1] if msgs else ""


def test_reader_failure_is_error_with_reason_on_diagnostics(ros, drive_log, tmp_path):
    """The log disappears before the reader starts: /diagnostics says ERROR and why, not "no frame yet"."""
    log = tmp_path / "gone.blf"
    log.write_bytes(drive_log.read_bytes())
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    node = _node(ros, can_log=str(log), replay_speed=0.0, wait_for_subscribers=1)
    log.unlink()
    ros.collect(BatteryState, "/bms/pack/measurements")  # the reader the replay waits for
    assert ros.wait_for(lambda: node.reader_failed, timeout=10)
    assert ros.wait_for(lambda: 2 in diag_levels(diags, "can_bridge: can_bus"), timeout=3)
    msg = _diag_message(diags, "can_bridge: can_bus")
    assert msg.startswith("CAN reader stopped: FileNotFoundError") and "gone.blf" in msg


@pytest.mark.parametrize("speed", [0.0, 100.0])
def test_damaged_stamps_and_gaps_never_freeze_the_bridge(ros, tmp_path, speed):
    """1e300 / inf stamps and a 1e9 s gap: samples flow, rejections are counted, the node stops promptly.

    The gap gives at most max_catchup samples (600) and, replayed in time, lasts MAX_REPLAY_GAP (60 s of
    log time: 0.6 s at 100x).
    """
    log = tmp_path / "damaged.log"
    good = "120#E0306097F8FFE1FF"
    stamps = ["100.0", "1e300", "100.05", "inf", "100.5", "-3.0", "1000000100.5", "1000000100.6"]
    log.write_text("".join(f"({t}) can0 {good}\n" for t in stamps))
    got = ros.collect(BatteryState, "/bms/pack/measurements")
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    time.sleep(0.3)
    node = _node(ros, can_log=str(log), replay_speed=speed)
    assert ros.wait_for(lambda: len(got) >= 4 + 600, timeout=10)
    assert ros.wait_for(lambda: diag_values(diags, "can_bridge: can_bus").get("rejected_bad_time") == "3", timeout=5)
    assert int(diag_values(diags, "can_bridge: can_bus")["samples_skipped_gaps"]) > 1e9
    assert ros.wait_for(lambda: node.lock.acquire(timeout=0.5) and (node.lock.release() or True), timeout=2)
    t0 = time.monotonic()
    node.destroy_node()
    ros.nodes.remove(node)
    assert time.monotonic() - t0 < 3.0


def test_truncated_log_is_reported_once_replayed(ros, drive_log, tmp_path):
    """A BLF cut short: the frames before the cut are published, then ERROR naming the truncation."""
    log = tmp_path / "cut.blf"
    log.write_bytes(drive_log.read_bytes()[:-200])
    got = ros.collect(BatteryState, "/bms/pack/measurements")
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    time.sleep(0.3)
    _node(ros, can_log=str(log), replay_speed=0.0, stale_after=0.3)
    assert ros.wait_for(lambda: len(got) >= 10, timeout=10)
    assert ros.wait_for(lambda: "truncated" in _diag_message(diags, "can_bridge: can_bus"), timeout=5)
    assert 2 in diag_levels(diags, "can_bridge: can_bus")
