"""can_bridge on real rclpy/DDS: replayed log and live virtual bus -> BatteryState + diagnostics."""

from __future__ import annotations

import math
import struct
import time
import zlib
from pathlib import Path

import can
import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter
from sensor_msgs.msg import BatteryState
from testutil import RosHarness, diag_levels, diag_values, status_level, synthetic_messages

from bms_ai.can.decoder import PackDecoder
from bms_ai.can.encoder import PackEncoder
from bms_ai.can.offline import decode_log
from bms_ai.can.packconfig import load_pack_config
from bms_ai.graph import graph_from_options
from bms_ai.nodes.can_bridge import READER_LEAD, CanBridgeNode
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
    """Live frames become samples; foreign ids are counted, bad lengths rejected on /diagnostics (WARN, then STALE)."""
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
        assert v["frames_foreign"] == "1" and "0x7AB:1" in v["unknown_ids"]
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


def test_paced_light_replay_equals_offline_decode_in_time(ros, drive_log, cfg, monkeypatch):
    """A BLF replayed at 3x: chunks decoded vectorised, the offline decoder's samples, spread over the
    log's duration / 3 (not sent at once), and each chunk's counts on /diagnostics once it is replayed."""
    import bms_ai.can.sources as sources
    from bms_ai.can.sampler import FixedRateSampler

    monkeypatch.setattr(sources, "PACED_ROWS", 500)  # a few chunks (whole BLF containers)
    chunks = []
    decode = FixedRateSampler.decode_arrays
    monkeypatch.setattr(FixedRateSampler, "decode_arrays", lambda self, f: chunks.append(len(f)) or decode(self, f))
    got, arrived = [], []
    ros.node.create_subscription(BatteryState, "/bms/pack/measurements",
                                 lambda m: (got.append(m), arrived.append(time.monotonic())), 1000)
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    time.sleep(0.3)
    node = _node(ros, can_log=str(drive_log), replay_speed=3.0)
    expected = decode_log(drive_log, cfg, rate=10.0, max_age=1.0)
    assert ros.wait_for(lambda: len(got) >= len(expected), timeout=10)
    np.testing.assert_array_equal([time_to_float(m.header.stamp) for m in got[: len(expected)]],
                                  np.round(expected.t, 9))
    np.testing.assert_allclose([m.voltage for m in got[: len(expected)]], expected.pack_voltage, rtol=1e-6)
    np.testing.assert_allclose(np.array([m.cell_voltage for m in got[: len(expected)]]),
                               expected.cell_voltages, atol=1e-6)
    span = (expected.t[-1] - expected.t[0]) / 3.0
    assert span * 0.8 < arrived[len(expected) - 1] - arrived[0] < span + 1.0
    assert ros.wait_for(lambda: diag_values(diags, "can_bridge: can_bus").get("rejected_crc_error") == "1", timeout=3)
    assert ros.wait_for(lambda: node.source.finished, timeout=3)
    assert len(chunks) >= 2 and sum(chunks) == expected.accepted + sum(expected.rejected.values())


def test_paced_replay_reports_its_messages_from_the_start(ros, drive_log):
    """At 1x the can_messages check is OK within 0.5 s of the first frame and stays OK until the log ends.

    A paced replay counts frames a chunk at a time; before its first chunk is taken over, no frame is
    counted and every message reads as timed out. The first chunk held this whole 3 s log (~6 s of
    traffic at nominal rate), so the check said "timeout" until the log ended; a pass's first chunk is
    now ~0.2 s of frames.
    """
    seen = []  # (arrival, level, message) of can_messages

    def on_diag(msg):
        now = time.monotonic()
        seen.extend((now, status_level(st), st.message)
                    for st in msg.status if st.name == "can_bridge: can_messages")

    ros.node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, 100)
    time.sleep(0.3)
    node = _node(ros, can_log=str(drive_log), replay_speed=1.0, stale_after=0.5)
    assert ros.wait_for(lambda: node.source.finished, timeout=10)
    assert ros.wait_for(lambda: seen and seen[-1][1] == 3, timeout=3)  # the log ended: STALE
    flowing = [s for s in seen if s[1] != 3]  # from the first frame due to the end of the log
    assert flowing, seen
    first_ok = next((t for t, level, _ in flowing if level == 0), None)
    assert first_ok is not None and first_ok - flowing[0][0] < 0.5, flowing
    assert all(level == 0 for t, level, _ in flowing if t >= first_ok), [(round(t - flowing[0][0], 3), lv, m[:60]) for t, lv, m in flowing]


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
    # the gap's count reaches /diagnostics with the next report, which may follow the one with the rejections
    assert ros.wait_for(lambda: int(diag_values(diags, "can_bridge: can_bus").get("samples_skipped_gaps", 0)) > 1e9,
                        timeout=5)
    assert ros.wait_for(lambda: node.lock.acquire(timeout=0.5) and (node.lock.release() or True), timeout=2)
    t0 = time.monotonic()
    node.destroy_node()
    ros.nodes.remove(node)
    assert time.monotonic() - t0 < 3.0


def test_a_1e9_s_gap_in_a_blf_replayed_in_time_is_bounded(ros, tmp_path):
    """The chunked real-time replay (BLF): a 1e9 s gap gives max_catchup samples after MAX_REPLAY_GAP of log
    time (0.6 s at 100x), the skipped instants reach /diagnostics, and the node stops promptly."""
    log = tmp_path / "gap.blf"
    with can.Logger(str(log)) as w:
        for t in (100.0, 100.05, 100.5, 1000000100.5, 1000000100.6):
            w.on_message_received(can.Message(timestamp=t, arbitration_id=0x120,
                                              data=bytes.fromhex("E0306097F8FFE1FF"), is_extended_id=False))
    got = ros.collect(BatteryState, "/bms/pack/measurements")
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    time.sleep(0.3)
    t0 = time.monotonic()
    node = _node(ros, can_log=str(log), replay_speed=100.0)
    assert ros.wait_for(lambda: len(got) >= 4 + 600, timeout=10)
    assert time.monotonic() - t0 > 0.5  # the gap was replayed, shortened, not skipped
    assert ros.wait_for(lambda: int(diag_values(diags, "can_bridge: can_bus").get("samples_skipped_gaps", 0)) > 1e9,
                        timeout=5)
    assert ros.wait_for(lambda: node.source.finished, timeout=3)
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


def _timed(ros, msg_type: type, topic: str) -> list[tuple[float, object]]:
    """Every message on ``topic`` with its steady-clock arrival time at the probe."""
    from rclpy.qos import QoSProfile, ReliabilityPolicy

    got: list[tuple[float, object]] = []
    ros.node.create_subscription(msg_type, topic, lambda m: got.append((time.monotonic(), m)),
                                 QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE))
    return got


def _levels_after(timed, name: str, t0: float) -> list[tuple[float, int]]:
    return [(t, st.level[0]) for t, a in timed if t > t0 for st in a.status if st.name == name]


def _send_paced(bus, msgs, t0: float) -> None:
    """Send frames at their schedule (relative to the first) on the steady clock."""
    start = time.monotonic()
    for m in msgs:
        while (d := start + m.timestamp - t0 - time.monotonic()) > 0.002:
            time.sleep(min(d, 0.01))
        bus.send(m)


def test_silence_goes_stale_within_stale_after_plus_one_watchdog_tick(ros, cfg):
    """The watchdog ticks at min(1/rate_hz, stale_after/10): STALE ~0.55 s after the last frame, not 0.56-0.68 s.

    Measured from the bridge's receipt of the last frame to the STALE DiagnosticArray at a reader, with a
    margin for a loaded machine (the exact decision is tested in test_can_health).
    """
    diags = _timed(ros, DiagnosticArray, "/diagnostics")
    node = _node(ros, interface="virtual", channel="stale_timing", stale_after=0.5)
    assert node.watchdog.timer_period_ns == 50_000_000
    bus = can.Bus(interface="virtual", channel="stale_timing")
    try:
        msgs = synthetic_messages(PackDecoder(cfg), 0.0, 0.3)
        for m in msgs:
            bus.send(m)
        assert ros.wait_for(lambda: node.asm.counters.accepted == len(msgs), timeout=5)
        t_last = node.last_rx_steady
        name = "can_bridge: can_bus"
        assert ros.wait_for(lambda: any(lv == 3 for _, lv in _levels_after(diags, name, t_last)), timeout=3)
        t_stale = next(t for t, lv in _levels_after(diags, name, t_last) if lv == 3)
        assert 0.5 < t_stale - t_last <= 0.5 + 0.25, t_stale - t_last
    finally:
        bus.shutdown()


def test_silence_publishes_every_instant_at_rate_hz_and_resumed_frames_continue_the_grid(ros, cfg):
    """A real bus gap: 10 Hz on the sampler's grid while silent (NaN past max_age), no repeated or back-filled
    stamp when frames resume, and the bus goes STALE -> OK with no WARN left once traffic is healthy.
    """
    timed = _timed(ros, BatteryState, "/bms/pack/measurements")
    diags = _timed(ros, DiagnosticArray, "/diagnostics")
    node = _node(ros, interface="virtual", channel="gap_test", stale_after=0.5)
    dec = PackDecoder(cfg)
    bus = can.Bus(interface="virtual", channel="gap_test")
    try:
        _send_paced(bus, synthetic_messages(dec, 0.0, 1.0), 0.0)
        assert ros.wait_for(lambda: node.asm.counters.accepted > 0 and node.silence() > 0.1, timeout=5)
        last_frame_can = node.last_rx_can
        time.sleep(1.6)  # the gap
        t_resume = time.monotonic()
        _send_paced(bus, synthetic_messages(dec, 2.6, 3.6), 2.6)
        t_end = time.monotonic()
        assert ros.wait_for(lambda: node.silence() > 0.7, timeout=5)  # the second stretch of traffic is over
    finally:
        bus.shutdown()
    stamps = np.array([time_to_float(m.header.stamp) for _, m in timed])
    assert np.all(np.diff(stamps) > 0)  # no stamp twice, none back-filled
    np.testing.assert_allclose(np.diff(stamps), 0.1, atol=1e-6)  # every instant of the grid, once
    in_gap = [(t, m) for t, m in timed if time_to_float(m.header.stamp) > last_frame_can and t < t_resume]
    assert len(in_gap) >= 8  # ~11 instants were due before the frames resumed (5 Hz gave ~5)
    assert math.isnan(in_gap[-1][1].voltage) and not math.isnan(in_gap[0][1].voltage)  # max_age: 1 s
    for check in ("can_bus", "can_messages"):  # after the gap: OK (a WARN only while messages are still missing),
        after = [lv for t, lv in _levels_after(diags, f"can_bridge: {check}", t_resume) if t <= t_end]
        assert 0 in after, after
        assert set(after[after.index(0):]) == {0}, after  # then nothing but OK while the traffic is healthy


# ----------------------------------------------------------------------------- long drives

HOUR = 3600.0
_BLF_CAN_OBJECT = np.dtype([  # a CAN_MESSAGE object as python-can writes it (BLF object header v1, 1 ns stamps)
    ("signature", "S4"), ("header_size", "<u2"), ("header_version", "<u2"), ("object_size", "<u4"),
    ("object_type", "<u4"), ("flags", "<u4"), ("client_index", "<u2"), ("object_version", "<u2"),
    ("timestamp", "<u8"), ("channel", "<u2"), ("msg_flags", "u1"), ("dlc", "u1"), ("id", "<u4"), ("data", "u1", (8,))])


def _drive_frames(decoder: PackDecoder, seconds: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every frame the reference pack sends in [0, seconds), encoded vectorised: a slow discharge."""
    enc = PackEncoder(decoder)
    parts = []
    for name in enc.messages():
        t, mux = enc.cycle_times(name, seconds)
        t, mux = t[t < seconds], mux[t < seconds]
        values = {"pack_voltage": 96 * (3.95 - 0.2 * t / HOUR), "pack_current": -20.0 + 15.0 * np.sin(t / 60.0),
                  "bms_state": 3, "contactor_plus": 1, "contactor_minus": 1,
                  "max_charge_current": 100.0, "max_discharge_current": 300.0}
        cells = enc.element_index(name, "cell_voltages", mux)
        if cells.shape[1]:
            values["cell_voltages"] = 3.95 - 0.2 * t[:, None] / HOUR + 0.002 * np.sin(cells)  # cells apart
        temps = enc.element_index(name, "cell_temperatures", mux)
        if temps.shape[1]:
            values["cell_temperatures"] = 25.0 + 0.1 * temps
        payload = enc.encode_rows(name, mux, values)
        data = np.zeros((len(t), 8), np.uint8)
        data[:, :payload.shape[1]] = payload
        parts.append((t, np.full(len(t), enc.frame_id(name)[0], np.uint32), data))
    t = np.concatenate([p[0] for p in parts])
    order = np.argsort(t, kind="stable")
    return t[order], np.concatenate([p[1] for p in parts])[order], np.concatenate([p[2] for p in parts])[order]


def _write_blf(path: Path, ts: np.ndarray, ids: np.ndarray, data: np.ndarray) -> None:
    """Frames (stamps from 0 s) as a BLF file in python-can's layout, packed with numpy (python-can's writer
    builds one object per frame: minutes for the 5 M frames of an hour).
    """
    per = 128 * 1024 // _BLF_CAN_OBJECT.itemsize  # objects per zlib container, as python-can fills them
    uncompressed = 144
    with open(path, "wb") as f:
        f.write(bytes(144))  # the file header, written last
        for a in range(0, len(ts), per):
            b = min(a + per, len(ts))
            rec = np.zeros(b - a, _BLF_CAN_OBJECT)
            rec["signature"], rec["header_size"], rec["header_version"] = b"LOBJ", 32, 1
            rec["object_size"], rec["object_type"], rec["flags"] = _BLF_CAN_OBJECT.itemsize, 1, 2  # CAN_MESSAGE, ns
            rec["timestamp"] = np.round(ts[a:b] * 1e9).astype(np.uint64)
            rec["channel"], rec["dlc"], rec["id"], rec["data"] = 1, 8, ids[a:b], data[a:b]
            body = rec.tobytes()
            packed = zlib.compress(body, 1)
            size = 32 + len(packed)
            f.write(struct.pack("<4sHHLL", b"LOBJ", 16, 1, size, 10) + struct.pack("<H6xL4x", 2, len(body)))
            f.write(packed + bytes(size % 4))
            uncompressed += 32 + len(body)
        end = f.tell()
        f.seek(0)  # no wall-clock start time (all zero): stamps read back as written
        f.write(struct.pack("<4sLBBBBBBBBQQLL8H8H", b"LOGG", 144, 5, 0, 0, 0, 2, 6, 8, 1, end, uncompressed,
                            len(ts), 0, *([0] * 16)))


@pytest.fixture(scope="session")
def hour_drive(tmp_path_factory, decoder) -> Path:
    """A 1 h drive of the reference pack (5 M frames, 36,000 sample instants at 10 Hz) as BLF, once per session."""
    path = tmp_path_factory.mktemp("long_drive") / "drive_1h.blf"
    _write_blf(path, *_drive_frames(decoder, HOUR + 0.05))
    return path


def _replay_graph(log: Path, nodes: str, speed: float, timeout: float,
                  overrides: dict[str, dict[str, object]] | None = None, upto: int = 0) -> dict[str, object]:
    """``bms-ai run --can-log LOG --speed SPEED`` in process until the estimator has every sample (or timeout);
    with ``upto`` > 0, until it has that many."""
    from bms_ai.ros.runner import GraphRunner

    runner = GraphRunner(graph_from_options({"nodes": nodes, "can_log": str(log), "replay_speed": str(speed)},
                                            overrides))
    try:
        b, est = runner.node("can_bridge"), runner.node("estimator")
        t0 = time.monotonic()
        runner.spin(until=lambda: bool(b.reader_failed) or 0 < upto <= est.steps
                    or (b.source.finished and est.steps + est.rejected >= b.samples_published), duration=timeout)
        got = {"failed": b.reader_failed, "published": b.samples_published, "steps": est.steps,
               "rejected": est.rejected, "wall_s": time.monotonic() - t0, "local": runner.local is not None,
               "progress_reader": b._progress is not None}
        if "cloud_uploader" in nodes:  # what it recorded once its inbox is empty
            up = runner.node("cloud_uploader")
            runner.spin(until=lambda: not up._inbox, duration=30)
            got.update(recorded=up.svc.recorder.stats.messages, inbox_dropped=up.inbox_dropped)
        return got
    finally:
        runner.shutdown()


@pytest.mark.parametrize("local, upto", [("1", 0), ("0", 12_000)])
def test_hour_drive_at_maximum_speed_reaches_the_estimator_whole(hour_drive, local, upto, monkeypatch):
    """`bms-ai run --can-log <1 h drive> --speed 0`: every one of the 36,000 instants reaches the estimator.

    Handed over in process (bms_ai.nodes.local), and through DDS as with one process per node
    (``BMS_AI_LOCAL_DELIVERY=0``): there the estimator takes a sample per executor turn, far slower than
    the bridge decodes; readers in one process get a sample once, and a KEEP_ALL reader history that
    filled (5000) used to lose samples for good, stall the writer and kill the reader thread (RCLError:
    cannot publish data) after ~5,000 samples. The replay is now held READER_LEAD samples ahead of its readers.
    Through DDS the first 12,000 instants, over twice the history that filled, show it at a third of the
    time: a lost sample never reaches the estimator, which then stalls short of 12,000.
    """
    monkeypatch.setenv("BMS_AI_LOCAL_DELIVERY", local)
    # the classical estimator: delivery is under test, not estimation (the ONNX step doubles its time)
    got = _replay_graph(hour_drive, "can_bridge,estimator", 0.0, timeout=300, overrides={"estimator": {"use_models": False}},
                        upto=upto)
    assert got["failed"] == "" and got["rejected"] == 0, got
    if upto:  # held READER_LEAD ahead of the readers: what is published and not yet stepped is in flight
        assert got["steps"] >= upto and 0 <= got["published"] - got["steps"] <= 2 * READER_LEAD, got
    else:
        assert got["published"] == 36_000 and got["steps"] == 36_000, got
    assert READER_LEAD < 5000 and got["local"] == (local == "1")
    # handed over locally, every reader here takes each sample on the bridge's thread: no progress reader
    assert got["progress_reader"] == (local == "0")


@pytest.mark.slow
@pytest.mark.parametrize("speed", [0.0, 30.0])
def test_hour_drive_through_the_whole_graph(hour_drive, speed):
    """The whole graph (every available node) replays the hour at maximum speed and at 30x, losing nothing."""
    from bms_ai.ros.demo import available_nodes

    nodes = ",".join(available_nodes()[0])
    got = _replay_graph(hour_drive, nodes, speed, timeout=900,
                        overrides={"can_bridge": {"stale_after": 30.0}})  # no silence samples after the drive
    assert got["failed"] == "" and got["published"] == 36_000, got
    assert got["steps"] == 36_000 and got["rejected"] == 0, got
    assert got["recorded"] >= 72_000 and got["inbox_dropped"] == 0, got  # every sample and estimate recorded


# ----------------------------------------------------------------------------- UDS polling in the bridge

def _polled_pack_config(tmp_path: Path, cfg) -> Path:
    """The reference DBC's pack voltage/current with a Kona-like BMS's 98 cells and 4 sensors polled over UDS."""
    import yaml
    from ecu_sim import KONA_CELLS, KONA_TEMPS, kona_poll

    doc = {"pack_id": "polled", "dbc": str(cfg.dbc_path), "cells": KONA_CELLS, "temperature_sensors": KONA_TEMPS,
           "pack_voltage": {"message": "BMS_PackMeas", "signal": "PackVoltage"},
           "pack_current": {"message": "BMS_PackMeas", "signal": "PackCurrent"},
           "poll": kona_poll(period=0.5, min_gap=0.01, timeout=0.3)}
    path = tmp_path / "polled.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _poll_round(poll, data: dict[int, bytes], t0: float) -> list[can.Message]:
    """One poll round as a logger in the car records it: request, first frame, flow control, consecutive frames."""
    out, t = [], t0
    for r in poll.requests:
        out.append(can.Message(timestamp=t, arbitration_id=r.request_id, is_extended_id=False,
                               data=bytes([len(r.payload)]) + r.payload + b"\xaa" * (7 - len(r.payload))))
        payload = r.header + data[r.did]
        frames = [bytes([0x10 | len(payload) >> 8, len(payload) & 0xFF]) + payload[:6]]
        rest, seq = payload[6:], 1
        while rest:
            frames.append(bytes([0x20 | seq]) + rest[:7].ljust(7, b"\xaa"))
            rest, seq = rest[7:], (seq + 1) & 0x0F
        out.append(can.Message(timestamp=t + 0.001, arbitration_id=r.response_id, data=frames[0], is_extended_id=False))
        out.append(can.Message(timestamp=t + 0.002, arbitration_id=r.request_id, data=b"\x30\x00\x00",
                               is_extended_id=False))
        out += [can.Message(timestamp=t + 0.003 + 0.0005 * k, arbitration_id=r.response_id, data=f,
                            is_extended_id=False) for k, f in enumerate(frames[1:])]
        t += 0.05
    return out


def test_live_uds_poll_from_a_simulated_bms_reaches_pack_measurements(ros, cfg, tmp_path):
    """The bridge polls a simulated BMS on the same virtual bus: its 98 cells and 4 sensors are published."""
    pytest.importorskip("isotp", reason="can-isotp is not installed")
    pytest.importorskip("udsoncan", reason="udsoncan is not installed")
    from ecu_sim import SimEcu, kona_cells, kona_data

    got = ros.collect(BatteryState, "/bms/pack/measurements")
    diags = ros.collect(DiagnosticArray, "/diagnostics")
    ecu = SimEcu("bridge_uds", kona_data(kona_cells()))
    try:
        _node(ros, interface="virtual", channel="bridge_uds", pack_config=str(_polled_pack_config(tmp_path, cfg)),
              stale_after=0.5)
        want = kona_cells().astype(np.float32)
        ok = ros.wait_for(lambda: any(np.array_equal(np.asarray(m.cell_voltage), want) for m in got), timeout=10)
        assert ok, diag_values(diags, "can_bridge: uds_poll")
        last = next(m for m in reversed(got) if np.isfinite(m.cell_temperature).all())
        assert list(last.cell_temperature) == [21, 22, 23, -4]
        assert ros.wait_for(lambda: int(diag_values(diags, "can_bridge: uds_poll").get("answers", 0)) >= 5, timeout=5)
        v = diag_values(diags, "can_bridge: uds_poll")
        assert diag_levels(diags, "can_bridge: uds_poll")[-1] == 0 and v["timeouts"] == "0" and v["rejected"] == "0"
        assert ecu.overlaps == 0  # one request in flight at a time
    finally:
        ecu.close()


def test_replayed_poll_traffic_gives_the_cells_the_offline_decoder_finds(ros, cfg, tmp_path):
    """A log recorded while polling: the bridge (frame by frame and at maximum speed) publishes the cells
    that the offline ISO-TP decoder finds in the same log; the polled values arrive from their answer's time."""
    from ecu_sim import kona_cells, kona_data

    from bms_ai.can.isotp_offline import decode_poll_log

    pcfg = load_pack_config(_polled_pack_config(tmp_path, cfg))
    enc = PackEncoder(PackDecoder(cfg))
    first, second = kona_cells(), kona_cells()[::-1].copy()
    pack = [can.Message(timestamp=t, arbitration_id=fid, is_extended_id=ext, data=enc.encode(name, mux, sample))
            for t, name, mux in enc.schedule(100.0, 102.0) if name == "BMS_PackMeas"
            for fid, ext in [enc.frame_id(name)] for sample in [_ref_sample(t)]]
    msgs = sorted(pack + _poll_round(pcfg.poll, kona_data(first), 100.2) + _poll_round(pcfg.poll, kona_data(second),
                                                                                       101.2),
                  key=lambda m: m.timestamp)
    log = tmp_path / "polled.blf"
    with can.Logger(str(log)) as w:
        for m in msgs:
            w.on_message_received(m)
    store, _ = decode_poll_log(msgs, pcfg.poll, pcfg.n_cells, pcfg.n_temps)
    np.testing.assert_allclose(store.latest()["cell_voltages"][0], second)
    for speed in (5.0, 0.0):
        got = ros.collect(BatteryState, f"/bms{int(speed)}/pack/measurements")
        overrides = [Parameter("can_log", value=str(log)), Parameter("replay_speed", value=speed),
                     Parameter("pack_config", value=str(tmp_path / "polled.yaml"))]
        ros.add(CanBridgeNode(context=ros.context, namespace=f"/bms{int(speed)}", parameter_overrides=overrides))
        assert ros.wait_for(lambda got=got: len(got) >= 19, timeout=10)
        t0 = time_to_float(got[0].header.stamp) - 0.1  # BLF keeps times from the log's start
        by_t = {round(time_to_float(m.header.stamp) - t0, 3): np.asarray(m.cell_voltage) for m in got}
        assert np.isnan(by_t[0.1]).all()  # before the first answer
        np.testing.assert_allclose(by_t[0.5], first, atol=1e-6)  # the first round's cells (float32)
        np.testing.assert_allclose(by_t[1.9], second, atol=1e-6)  # the second's, as found offline


def _ref_sample(t: float):
    from testutil import synthetic_sample

    return synthetic_sample(t)
