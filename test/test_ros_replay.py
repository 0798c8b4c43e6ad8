"""`bms-ai replay`: a recorded log onto a python-can bus in log time, optionally with /clock."""

from __future__ import annotations

import threading
import time
from argparse import Namespace

import can
import pytest
from testutil import synthetic_messages, write_log

from bms_ai.can.decoder import PackDecoder
from bms_ai.can.packconfig import load_pack_config
from bms_ai.ros.replay import replay, run


@pytest.fixture(scope="module")
def messages(pack_config_path):
    """One second of the reference pack's traffic."""
    return synthetic_messages(PackDecoder(load_pack_config(pack_config_path)), 100.0, 101.0)


def test_replay_puts_log_on_a_bus_in_time(tmp_path, messages):
    """Every frame reaches the bus in order, paced by log time x speed."""
    log = write_log(tmp_path / "d.asc", messages)
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
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rosgraph_msgs.msg import Clock

    from bms_ai.nodes.convert import time_to_float

    log = write_log(tmp_path / "d.blf", messages)
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
        deadline = time.monotonic() + 3
        while len(got) < 500 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        ex.shutdown()
        node.destroy_node()
        rclpy.shutdown(context=ctx)
    t = [time_to_float(c.clock) for c in got]
    assert len(t) >= 500  # one per millisecond of log time at most, 1 s of log
    span = messages[-1].timestamp - messages[0].timestamp
    assert t == sorted(t) and t[-1] - t[0] == pytest.approx(span, abs=0.01)


def test_replay_of_a_missing_log_is_one_line(tmp_path, capsys):
    """A log that is not there: exit status 1 and the reason, before any bus is opened."""
    args = Namespace(log=str(tmp_path / "nope.blf"), interface="virtual", channel="replay_missing",
                     bus_options="{}", speed=1.0, loop=False, clock=False, start_delay=0.0)
    assert run(args) == 1
    assert "CAN log not found" in capsys.readouterr().err


def test_replay_of_damaged_stamps_only_is_exit_1(tmp_path, capsys):
    """inf stamps: the frames go out unpaced and counted; nothing valid replayed is exit status 1, said in a line."""
    log = tmp_path / "inf.log"
    log.write_text("(inf) can0 120#E0306097F8FFE1FF\n(1e300) can0 120#E0306097F8FFE1FF\n")
    args = Namespace(log=str(log), interface="virtual", channel="replay_inf", bus_options="{}",
                     speed=1.0, loop=False, clock=False, start_delay=0.0)
    assert run(args) == 1
    err = capsys.readouterr().err
    assert '"bad_stamps": 2' in err and "nothing valid replayed" in err


def test_replay_of_a_truncated_log_warns_and_is_exit_1(tmp_path, messages, capsys):
    """A BLF cut short: the frames before the cut are sent, a warning names the truncation."""
    log = write_log(tmp_path / "cut.blf", messages)
    log.write_bytes(log.read_bytes()[:-50])
    args = Namespace(log=str(log), interface="virtual", channel="replay_cut", bus_options="{}",
                     speed=0.0, loop=False, clock=False, start_delay=0.0)
    assert run(args) == 1
    err = capsys.readouterr().err
    assert "warning:" in err and "truncated" in err
