"""fault_monitor: three-tier limits, plausibility and incipient-fault detectors -> /diagnostics.

Rules step once per pack/measurements message, with the message's header
stamp as time: can_bridge publishes at fixed 10 Hz instants of CAN time, so
results are the same at any replay speed. A node-clock watchdog at
``rate_hz`` steps the rules on the last sample when messages stop, so the
stale-data (CAN timeout) check fires even when the bridge goes silent.
One DiagnosticStatus per check (``fault_monitor: <check>``), 1 Hz and at once on
a level change; latched MSL events clear only on a reset message.
"""

from __future__ import annotations

import math
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.serialization import deserialize_message
from sensor_msgs.msg import BatteryState
from std_msgs.msg import Empty

from bms_ai.can.assembler import PACK_LEVEL, PACK_LEVEL_KEY
from bms_ai.can.health import watchdog_delay
from bms_ai.can.packconfig import load_pack_config
from bms_ai.core.cdr import read_diagnostic_statuses
from bms_ai.diagnostics.monitor import FaultMonitor
from bms_ai.diagnostics.rules import CheckResult
from bms_ai.estimation import status
from bms_ai.nodes.common import GRAPH_SUB_QOS, Diagnostics, declare, spin_node
from bms_ai.nodes.convert import battery_fields_from_bytes, fields_to_sample, time_to_float
from bms_ai.nodes.local import graph_subscription, guarded


class FaultMonitorNode(Node):
    """ROS side of :class:`bms_ai.diagnostics.monitor.FaultMonitor`: messages in, DiagnosticStatus out."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs.pop("node_name", "fault_monitor"), **kwargs)
        self.p = {
            "pack_id": declare(self, "pack_id", "pack96-ref", "hardware_id for diagnostics"),
            "chemistry": declare(self, "chemistry", "nmc", "selects config/limits_<chemistry>.yaml when limits_file is empty"),
            "limits_file": declare(self, "limits_file", "", "limits YAML (three-tier limits, plausibility, derating)"),
            "rate_hz": declare(self, "rate_hz", 4.0, "watchdog tick on the node clock while measurements are missing (rules step per measurement)"),
            "stale_after": declare(self, "stale_after", 1.0, "no measurement for this long (node clock, s) -> timeout"),
            "capacity_ah": declare(self, "capacity_ah", 50.0, "pack capacity for the SOC-jump check (overridden by battery_state)"),
            "detectors": declare(self, "detectors", True, "run the incipient-fault detectors"),
            "max_events": declare(self, "max_events", 8, "latched events listed in the 'events' status"),
            "pack_config": declare(self, "pack_config", "", "pack config YAML whose 'limits:' override the chemistry's"),
        }
        self.diag = Diagnostics(self, self.p["pack_id"])
        overrides = load_pack_config(self.p["pack_config"]).limits if self.p["pack_config"] else None
        self.monitor = FaultMonitor.load(
            self.p["limits_file"], self.p["chemistry"], self.diag.hardware_id, detectors=self.p["detectors"],
            stale_after=self.p["stale_after"], capacity_ah=self.p["capacity_ah"], max_events=self.p["max_events"],
            limits_overrides=overrides)
        # raw: the fields are read from the bytes (bms_ai.core.cdr), not through rclpy's message objects
        # in a composed graph the publishers' threads call these (bms_ai.nodes.local): the rest holds the lock
        graph_subscription(self, BatteryState, "pack/measurements", self._on_meas, GRAPH_SUB_QOS)
        graph_subscription(self, BatteryState, "battery_state", self._on_state, GRAPH_SUB_QOS)
        # /diagnostics carries every pack's statuses; only this pack's are decoded (a byte search first)
        self._own_id = self.diag.hardware_id.encode()
        self._peer_check = f": {status.SOC_CHECK}".encode() + b"\0"
        self.create_subscription(DiagnosticArray, "/diagnostics", guarded(self, self._on_diag_raw), 50, raw=True)
        self.create_subscription(Empty, "fault_monitor/reset", guarded(self, self._on_reset), 10)
        self._tick = 1.0 / float(self.p["rate_hz"])
        self._watchdog_timer = self.create_timer(self._tick, guarded(self, self._watchdog))
        self._publish(self.monitor.startup_status())

    def _now(self) -> float:
        """The node clock; NaN while it reads 0: on sim time, before the first /clock message.

        A 0 there is no time: the watchdog's silence measured from it to the first real clock reading
        (decades) pushed the rule time decades ahead, and every check read the samples as stale.
        """
        t = time_to_float(self.get_clock().now().to_msg())
        return t if t > 0 else math.nan

    def _publish(self, results: list[CheckResult]) -> None:
        """Every status whose level changed goes out in one DiagnosticArray (not one message per check)."""
        with self.diag.batch():
            for r in results:
                self.diag.update(r.check, r.level, r.message, r.values)

    def _on_meas(self, data: bytes) -> None:
        try:
            meas = battery_fields_from_bytes(data)
            s = fields_to_sample(meas)
            if meas.location == PACK_LEVEL:  # the bridge's average cell: cell checks are not monitored
                s.status[PACK_LEVEL_KEY] = 1.0
        except Exception as exc:  # malformed message: count and report, never crash
            self.monitor.reject(f"unconvertible message: {exc}")
            return
        self._publish(self.monitor.on_sample(s, self._now()))

    def _on_state(self, data: bytes) -> None:
        f = battery_fields_from_bytes(data)
        self.monitor.on_estimate(f.percentage, f.stamp, f.capacity)

    def _on_diag_raw(self, data: bytes) -> None:
        # CDR strings are plain NUL-terminated bytes: without this pack's id and a '<node>: soc' name in
        # them, the message has no status the monitor takes (FaultMonitor.on_peer_status), so it is not read
        if self._own_id not in data or self._peer_check not in data:
            return
        try:
            statuses = read_diagnostic_statuses(data)
        except ValueError:  # an encoding bms_ai.core.cdr does not read: through rclpy
            msg = deserialize_message(data, DiagnosticArray)
            statuses = [(0, st.name, "", st.hardware_id, [(kv.key, kv.value) for kv in st.values])
                        for st in msg.status]
        for _level, name, _message, hardware_id, values in statuses:
            self.monitor.on_peer_status(hardware_id, name, values)

    def _on_reset(self, _msg: Empty) -> None:
        if self.monitor.reset(self._now()):
            self.get_logger().info("latched diagnostic events reset")

    def _watchdog(self) -> None:
        """The timeout check on silence; while measurements flow, the next tick is when silence could be stale.

        Ticking at ``rate_hz`` regardless woke the executor 4 times a second for nothing; the timeout
        still fires within ``stale_after`` + one tick of the last measurement.
        """
        now = self._now()
        self._publish(self.monitor.watchdog(now))
        delay = watchdog_delay(now - self.monitor.last_rx, self.monitor.stale_after, self._tick)
        self._watchdog_timer.timer_period_ns = int(delay * 1e9)
        self._watchdog_timer.reset()


NODE_CLASS = FaultMonitorNode


def main(args: list[str] | None = None) -> None:
    """Entry point of the fault_monitor executable."""
    spin_node(FaultMonitorNode, args)


if __name__ == "__main__":
    main()
