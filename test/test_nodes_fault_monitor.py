"""fault_monitor on real rclpy: /diagnostics names, levels, debounce, hysteresis, latch + reset."""

from __future__ import annotations

import time

import numpy as np
import pytest

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.node import Node  # noqa: E402
from sensor_msgs.msg import BatteryState  # noqa: E402
from std_msgs.msg import Empty  # noqa: E402
from testutil import status_level  # noqa: E402

from bms_ai.nodes.common import PUB_QOS  # noqa: E402
from bms_ai.nodes.convert import sample_to_battery_state  # noqa: E402
from bms_ai.nodes.fault_monitor import FaultMonitorNode  # noqa: E402
from bms_ai.pack import PackSample  # noqa: E402

pytestmark = pytest.mark.ros

OVER = "fault_monitor: cell overvoltage"


class Harness:
    """fault_monitor and a publisher node in one executor, with every /diagnostics status seen."""

    def __init__(self) -> None:
        self.ctx = rclpy.Context()
        rclpy.init(context=self.ctx)
        self.mon = FaultMonitorNode(namespace="bms", context=self.ctx,
                                    parameter_overrides=[rclpy.parameter.Parameter("pack_id", value="packT")])
        self.io = Node("diag_test_io", namespace="bms", context=self.ctx)
        self.pub = self.io.create_publisher(BatteryState, "pack/measurements", PUB_QOS)
        self.reset_pub = self.io.create_publisher(Empty, "fault_monitor/reset", 10)
        self.seen: list[tuple[float, str, int, str, dict[str, str]]] = []
        self.published = 0
        self.io.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 200)
        self.ex = SingleThreadedExecutor(context=self.ctx)
        self.ex.add_node(self.mon)
        self.ex.add_node(self.io)
        self.v = np.full(96, 3.80)
        end = time.monotonic() + 5.0
        while time.monotonic() < end and (self.pub.get_subscription_count() < 1 or
                                          self.io.count_publishers("/diagnostics") < 1):
            self.ex.spin_once(timeout_sec=0.05)

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for st in msg.status:
            self.seen.append((time.monotonic(), st.name, status_level(st),
                              st.hardware_id, {kv.key: kv.value for kv in st.values}))

    def ticks(self, n: int, all_nan: bool = False) -> None:
        """Publish n measurements at 10 Hz (stamped with the node clock) and spin.

        all_nan: what can_bridge publishes once the CAN log has ended (every value aged out).
        """
        for _ in range(n):
            t = self.io.get_clock().now().nanoseconds * 1e-9
            s = PackSample(stamp=t, pack_voltage=float(self.v.sum()), pack_current=-10.0,
                           cell_voltages=self.v.copy(), cell_temperatures=np.full(32, 25.0))
            if all_nan:
                s = PackSample.empty(96, 32)
                s.stamp = t
            self.pub.publish(sample_to_battery_state(s))
            self.published += 1
            end = time.monotonic() + 0.1
            while time.monotonic() < end:
                self.ex.spin_once(timeout_sec=0.01)
        # under load DDS may deliver late: the rules count samples, so wait until each one was handled
        end = time.monotonic() + 5.0
        while self.mon.monitor.received < self.published and time.monotonic() < end:
            self.ex.spin_once(timeout_sec=0.01)
        end = time.monotonic() + 0.1                       # and the statuses it published reach us
        while time.monotonic() < end:
            self.ex.spin_once(timeout_sec=0.01)

    def level(self, name: str) -> int | None:
        """Last published level of a status, None if never seen."""
        lv = [x[2] for x in self.seen if x[1] == name]
        return lv[-1] if lv else None

    def close(self) -> None:
        """Tear down nodes and context."""
        self.ex.shutdown()
        self.mon.destroy_node()
        self.io.destroy_node()
        rclpy.shutdown(context=self.ctx)


@pytest.fixture
def h():
    """A fresh harness per test."""
    hh = Harness()
    yield hh
    hh.close()


def test_fault_monitor_overvoltage_debounce_latch_reset(h: Harness) -> None:
    """Overvoltage through ROS: debounce, MSL latch, reset message, hysteresis."""
    h.ticks(8)
    assert h.level(OVER) == 0
    names = {x[1] for x in h.seen}
    for check in ("cell undervoltage", "cell overtemperature", "charge overcurrent", "pack voltage plausibility",
                  "open wire", "stuck signal", "can timeout", "current derating", "events", "fault monitor"):
        assert f"fault_monitor: {check}" in names
    assert {x[3] for x in h.seen} == {"packT"}

    # MOL (4.21 V) exceeded by cell 7: WARN only after the MOL debounce (10 ticks), not before
    h.v[7] = 4.22
    h.ticks(6)
    assert h.level(OVER) == 0
    h.ticks(8)
    assert h.level(OVER) == 1
    last = [x for x in h.seen if x[1] == OVER][-1]
    assert last[4]["tier"] == "MOL" and last[4]["cell_index"] == "7"

    # beyond MSL (4.25 V): ERROR after the MSL debounce (3 ticks); latched
    h.v[7] = 4.30
    h.ticks(5)
    assert h.level(OVER) == 2
    h.v[7] = 3.80
    h.ticks(15)
    assert h.level(OVER) == 2, "MSL is latched until reset"
    ev = [x for x in h.seen if x[1] == "fault_monitor: events"][-1]
    # every active event is listed (event0, event1, ...): the spread plausibility and the MOL of the same cell
    # may come first, depending on how the ticks fell
    listed = [v for k, v in ev[4].items() if k.startswith("event")]
    assert ev[2] == 2 and any("cell overvoltage MSL #7" in e for e in listed), listed

    h.reset_pub.publish(Empty())
    h.ticks(3)
    assert h.level(OVER) == 0

    # hysteresis: after a MOL WARN, 4.20 V (inside the limit but within 30 mV) keeps WARN; 4.17 V clears it
    h.v[7] = 4.22
    h.ticks(14)
    assert h.level(OVER) == 1
    h.v[7] = 4.20
    h.ticks(15)
    assert h.level(OVER) == 1
    h.v[7] = 4.17
    h.ticks(13)
    assert h.level(OVER) == 0


def test_fault_monitor_rejects_bad_shape_and_reports_timeout(h: Harness) -> None:
    """A wrong-shape message is counted; silence fires can timeout via the watchdog."""
    h.ticks(3)
    bad = BatteryState()
    bad.header.stamp = h.io.get_clock().now().to_msg()
    bad.cell_voltage = [3.8] * 10
    bad.cell_temperature = [25.0] * 32
    h.pub.publish(bad)
    h.ticks(2)
    fm = [x for x in h.seen if x[1] == "fault_monitor: fault monitor"][-1]
    assert int(fm[4]["rejected"]) >= 1 and "shape" in fm[4]["last_reject"]
    # silence: the watchdog steps the rules on stale data -> can timeout ERROR within ~stale_after + 0.2 s
    end = time.monotonic() + 1.6
    while time.monotonic() < end:
        h.ex.spin_once(timeout_sec=0.02)
    assert h.level("fault_monitor: can timeout") == 2


def test_fault_monitor_watchdog_sleeps_while_measurements_flow(h: Harness) -> None:
    """While measurements come, the watchdog ticks about once per stale_after (1 s), not at rate_hz (4 Hz);
    once they stop it ticks at rate_hz again and the timeout fires within stale_after + one tick."""
    calls: list[float] = []
    check = h.mon.monitor.watchdog
    h.mon.monitor.watchdog = lambda now: calls.append(now) or check(now)
    h.ticks(30)  # 3 s at 10 Hz
    assert 1 <= len(calls) <= 5, calls  # at 4 Hz: 12
    end = time.monotonic() + 1.5
    while time.monotonic() < end and h.level("fault_monitor: can timeout") != 2:
        h.ex.spin_once(timeout_sec=0.02)
    assert h.level("fault_monitor: can timeout") == 2


def test_fault_monitor_all_nan_stream_is_timeout_not_open_wire(h: Harness) -> None:
    """An all-NaN stream is a timeout, not open wires or detector alarms."""
    h.ticks(10)
    assert h.level("fault_monitor: open wire") == 0
    h.ticks(20, all_nan=True)
    assert h.level("fault_monitor: can timeout") == 2
    to = [x for x in h.seen if x[1] == "fault_monitor: can timeout"][-1]
    assert to[4]["communication_lost"] == "True"
    for check in ("open wire", "stuck signal", "cell voltage spread", "temperature spread", "lithium plating",
                  "internal short", "thermal anomaly", "anomaly score"):
        assert h.level(f"fault_monitor: {check}") == 0, check
    assert h.level("fault_monitor: current derating") == 3  # STALE: no data to derate from
    ev = [x for x in h.seen if x[1] == "fault_monitor: events"][-1]
    assert "open wire" not in ev[4].get("event0", "") and "can timeout" in ev[4].get("event0", "")


def test_on_sim_time_samples_before_the_first_clock_message_raise_no_timeout() -> None:
    """A replay's first samples can reach the monitor before its sim clock has a time (it reads 0).

    The watchdog's silence from that 0 to the first /clock reading is no silence: it used to put the
    rule time decades ahead, after which every sample looked stale (can timeout ERROR for good) and a
    stop at a small load looked like a long rest (a current-sensor offset WARN).
    """
    from rclpy.parameter import Parameter
    from rosgraph_msgs.msg import Clock

    from bms_ai.nodes.common import LOSSLESS_QOS
    from bms_ai.nodes.convert import stamp_to_time

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    mon = FaultMonitorNode(namespace="bms", context=ctx, parameter_overrides=[
        Parameter("pack_id", value="packS"), Parameter("use_sim_time", value=True)])
    io = Node("diag_sim_io", namespace="bms", context=ctx)
    pub = io.create_publisher(BatteryState, "pack/measurements", PUB_QOS)
    clock = io.create_publisher(Clock, "/clock", LOSSLESS_QOS)
    seen: list[tuple[str, int]] = []
    io.create_subscription(DiagnosticArray, "/diagnostics", lambda m: seen.extend(
        (st.name, status_level(st)) for st in m.status), 500)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(mon)
    ex.add_node(io)

    def spin(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            ex.spin_once(timeout_sec=0.01)

    def measurement(t: float) -> BatteryState:
        v = np.full(96, 3.8)
        return sample_to_battery_state(PackSample(stamp=t, pack_voltage=float(v.sum()), pack_current=-0.8,
                                                  cell_voltages=v, cell_temperatures=np.full(32, 25.0)))

    try:
        end = time.monotonic() + 5.0
        while time.monotonic() < end and (pub.get_subscription_count() < 1 or clock.get_subscription_count() < 1):
            spin(0.05)
        t0 = 1767225600.0
        for k in range(3):                       # before any /clock: the monitor's clock reads 0
            pub.publish(measurement(t0 + 0.1 * k))
            spin(0.05)
        assert mon.monitor.received == 3
        clock.publish(Clock(clock=stamp_to_time(t0 + 0.3)))   # the clock starts; the watchdog ticks before a sample
        spin(0.5)
        for k in range(3, 80):                   # the replay's clock starts; a stop at 0.8 A
            t = t0 + 0.1 * k
            clock.publish(Clock(clock=stamp_to_time(t)))
            pub.publish(measurement(t))
            spin(0.03)
        spin(0.3)
        last = {name: level for name, level in seen}
        assert last["fault_monitor: can timeout"] == 0, [x for x in seen if x[0].endswith("can timeout")][-3:]
        assert all(level == 0 for name, level in seen if name == "fault_monitor: current sensor offset")
        assert mon.monitor.last_t - t0 < 60.0
    finally:
        ex.shutdown()
        mon.destroy_node()
        io.destroy_node()
        rclpy.shutdown(context=ctx)
