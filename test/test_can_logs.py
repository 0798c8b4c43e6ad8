"""Log formats: round trips through every writer/reader, fuzzed readers, decode/replay CLIs."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import can
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from testutil import synthetic_messages

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.decoder import PackDecoder
from bms_ai.can.offline import decode_log, read_log
from bms_ai.can.packconfig import load_pack_config

FORMATS = [".asc", ".blf", ".log", ".trc", ".csv"]


@pytest.fixture(scope="module")
def decoder(pack_config_path):
    return PackDecoder(load_pack_config(pack_config_path))


@pytest.fixture(scope="module")
def messages(decoder):
    return synthetic_messages(decoder, 100.0, 101.0)


def _write(path, msgs):
    with can.Logger(str(path)) as log:
        for m in msgs:
            log.on_message_received(m)


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_every_format(tmp_path, decoder, messages, suffix):
    path = tmp_path / f"drive{suffix}"
    _write(path, messages)
    frames = read_log(path)
    assert frames.error is None
    assert len(frames) == len(messages)
    np.testing.assert_array_equal(frames.ids, [m.arbitration_id for m in messages])
    ts = np.array([m.timestamp for m in messages])
    np.testing.assert_allclose(frames.ts - frames.ts[0], ts - ts[0], atol=1e-4)  # ASC/TRC store relative time
    for i in (0, 7, len(messages) - 1):
        assert bytes(frames.data[i, : frames.dlc[i]]) == bytes(messages[i].data)
    table = decode_log(path, decoder.cfg, rate=10.0)
    assert table.rejected == dict.fromkeys(table.rejected, 0)
    assert len(table) >= 9 and np.isfinite(table.cell_voltages[-1]).all()


@pytest.mark.parametrize("suffix", FORMATS)
def test_truncated_log_keeps_frames_before_damage(tmp_path, messages, suffix):
    path = tmp_path / f"cut{suffix}"
    _write(path, messages)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) * 2 // 3] + b"\x00\xff garbage \x13")
    frames = read_log(path)  # never raises on damage; keeps what was readable
    assert 0 < len(frames) <= len(messages) + 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=st.binary(max_size=600), suffix=st.sampled_from(FORMATS))
def test_fuzzed_log_files_never_escape(tmp_path, blob, suffix):
    path = tmp_path / f"fuzz{suffix}"
    path.write_bytes(blob)
    try:
        frames = read_log(path)
    except ValueError as exc:  # the one documented error: cannot open as a CAN log
        assert str(path) in str(exc)
        return
    assert len(frames) >= 0


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from([0x120, 0x121, 0x122, 0x130, 0x131, 0x7FF, 0x1FFFFFFF]),
    st.binary(min_size=0, max_size=12),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1e6)),
    st.booleans()), max_size=40))
def test_fuzzed_frames_are_counted_never_raised(pack_config_path, frames):
    asm = PackAssembler(PackDecoder(load_pack_config(pack_config_path)))
    for fid, data, ts, ext in frames:
        asm.feed(fid, data, ts, ext)
    assert asm.counters.accepted + asm.counters.total_rejected == len(frames)


def test_decode_cli_csv_and_jsonl(tmp_path, messages, pack_config_path):
    log = tmp_path / "d.blf"
    _write(log, messages)
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"out.{fmt}"
        r = subprocess.run([sys.executable, "-m", "bms_ai.cli", "decode", str(log), "--pack-config",
                            str(pack_config_path), "--format", fmt, "-o", str(out)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert "rejected none" in r.stderr
        lines = out.read_text().splitlines()
        if fmt == "csv":
            assert lines[0].startswith("t,pack_voltage,pack_current,cell_v_000")
            assert len(lines) == 10  # header + instants 100.1 .. 100.9
        else:
            rec = json.loads(lines[-1])
            assert len(rec["cell_voltages"]) == 96 and rec["status"]["bms_state"] == 3.0


def test_decode_cli_errors_are_clear(tmp_path, pack_config_path):
    r = subprocess.run([sys.executable, "-m", "bms_ai.cli", "decode", str(tmp_path / "missing.blf"),
                        "--pack-config", str(pack_config_path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "CAN log not found" in r.stderr and "Traceback" not in r.stderr


def test_replay_puts_log_on_a_bus_in_time(tmp_path, messages):
    from argparse import Namespace

    from bms_ai.ros.replay import replay

    log = tmp_path / "d.asc"
    _write(log, messages)
    rx = can.Bus(interface="virtual", channel="replay_test")
    got = []
    stop = threading.Event()
    reader = threading.Thread(target=lambda: [got.append(m) for m in iter(lambda: rx.recv(0.2) or (
        None if stop.is_set() else False), None) if m is not False], daemon=True)
    reader.start()
    args = Namespace(log=str(log), interface="virtual", channel="replay_test", bus_options="{}",
                     speed=4.0, loop=False, clock=False, start_delay=0.0)
    stats = replay(args)
    stop.set()
    reader.join(2)
    rx.shutdown()
    assert stats["sent"] == len(messages) and not stats["read_errors"]
    assert 0.2 <= stats["seconds"] < 1.0  # 1 s of log at 4x
    assert [m.arbitration_id for m in got] == [m.arbitration_id for m in messages]


@pytest.mark.ros
def test_replay_publishes_clock_from_log_time(tmp_path, messages):
    """`bms-ai replay --clock`: /clock follows the log's timestamps."""
    from argparse import Namespace

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rosgraph_msgs.msg import Clock

    from bms_ai.ros.replay import replay

    log = tmp_path / "d.blf"
    _write(log, messages)
    ctx = Context()
    rclpy.init(context=ctx)
    node = rclpy.create_node("clock_probe", context=ctx)
    got = []
    node.create_subscription(Clock, "/clock", got.append, 1000)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    th = threading.Thread(target=ex.spin, daemon=True)
    th.start()
    try:
        args = Namespace(log=str(log), interface="virtual", channel="clock_test", bus_options="{}",
                         speed=1.0, loop=False, clock=True, start_delay=1.0)
        replay(args)
        deadline = __import__("time").monotonic() + 3
        while len(got) < 500 and __import__("time").monotonic() < deadline:
            __import__("time").sleep(0.05)
    finally:
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    t = [c.clock.sec + c.clock.nanosec * 1e-9 for c in got]
    assert len(t) >= 500  # one per millisecond of log time at most, 1 s of log
    span = messages[-1].timestamp - messages[0].timestamp
    assert t == sorted(t) and t[-1] - t[0] == pytest.approx(span, abs=0.01)


def _mixed_messages(messages, error_frame: bool):
    extra = [can.Message(timestamp=messages[-1].timestamp + 0.001 * k, arbitration_id=0x18FF50E5 + k,
                         is_extended_id=True, data=bytes(range(k % 9))) for k in range(20)]
    extra.append(can.Message(timestamp=extra[-1].timestamp + 0.001, arbitration_id=0x123, is_extended_id=False,
                             is_remote_frame=True, dlc=0))
    if error_frame:
        extra.append(can.Message(timestamp=extra[-1].timestamp + 0.001, is_error_frame=True))
    return list(messages) + extra


@pytest.mark.parametrize("error_frame", [False, True])
def test_fast_blf_reader_is_bit_identical_to_python_can(tmp_path, messages, error_frame):
    from bms_ai.can.offline import FrameArrays, iter_log

    path = tmp_path / "mixed.blf"
    _write(path, _mixed_messages(messages * 60, error_frame))  # several zlib containers
    fast = read_log(path)  # fast path, or python-can when the file has error frames
    ref = FrameArrays.from_messages(iter_log(path))
    assert len(fast) == len(ref) > 80000
    for f in ("ts", "ids", "ext", "dlc", "data", "bad"):
        np.testing.assert_array_equal(getattr(fast, f), getattr(ref, f), err_msg=f)
    if not error_frame:
        from bms_ai.can.blf_fast import read_blf_arrays

        assert len(read_blf_arrays(path)) == len(ref)


def test_lightweight_replay_source_yields_the_same_frames(tmp_path, messages, decoder):
    """The fast array path for replays gives the decoder exactly what python-can's messages give."""
    from bms_ai.can.sampler import FixedRateSampler
    from bms_ai.can.sources import LogReplaySource

    path = tmp_path / "d.blf"
    _write(path, messages)

    def samples(lightweight: bool):
        src = LogReplaySource(path, speed=0.0, lightweight=lightweight)
        sampler = FixedRateSampler(PackAssembler(decoder), 0.1)
        out = []
        for m in src.frames(threading.Event()):
            if src.finished:
                break
            if m is not None:
                out.extend(sampler.feed_message(m))
        return out, sampler.asm.counters

    fast, c_fast = samples(True)
    ref, c_ref = samples(False)
    assert len(fast) == len(ref) > 5 and c_fast == c_ref
    for a, b in zip(fast, ref):
        assert a.stamp == b.stamp
        np.testing.assert_array_equal(a.cell_voltages, b.cell_voltages)
