"""How other vehicle software consumes bms_ai: plain rclpy, standard messages only.

    ros2 run bms_ai consumer_example --ros-args -r __ns:=/bms

Subscribes to battery_state and /diagnostics and logs SOC, capacity and the
worst active diagnostic once per second. Only the stamp conversion, level and
status names and the graph's node names come from bms_ai (one home each);
everything else is standard rclpy. Statuses are named ``<node>: <check>``.
"""

from __future__ import annotations

import json
import math

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import BatteryState

from bms_ai.core.levels import ERROR, OK, STALE, WARN, level_name, split_status_name
from bms_ai.graph import NODE_NAMES
from bms_ai.nodes.common import spin_node
from bms_ai.nodes.convert import time_to_float

SEVERITY = {OK: 0, STALE: 1, WARN: 2, ERROR: 3}


class BatteryConsumer(Node):
    """Keeps the latest battery_state and every bms_ai diagnostic; reports once per second."""

    def __init__(self, **kwargs) -> None:
        super().__init__(kwargs.pop("node_name", "battery_consumer"), **kwargs)
        self.state: BatteryState | None = None
        self.diagnostics: dict[str, tuple[int, str]] = {}
        self.create_subscription(BatteryState, "battery_state", self._on_state, qos_profile_sensor_data)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        self.declare_parameter("json_output", False)  # one JSON line per report on stdout (for scripts)
        self.json_output = bool(self.get_parameter("json_output").value)
        self.create_timer(1.0, self._report)

    def _on_state(self, msg: BatteryState) -> None:
        self.state = msg

    def _on_diag(self, msg: DiagnosticArray) -> None:
        for st in msg.status:
            if split_status_name(st.name)[0] in NODE_NAMES:
                level = st.level[0] if isinstance(st.level, bytes) else int(st.level)
                self.diagnostics[st.name] = (level, st.message)

    def worst(self) -> tuple[int, str]:
        """The most severe diagnostic (ERROR > WARN > STALE > OK) as (level, 'name: message')."""
        if not self.diagnostics:
            return 0, "none"
        name, (level, msg) = max(self.diagnostics.items(), key=lambda kv: (SEVERITY.get(kv[1][0], 0), kv[0]))
        return level, f"{name}: {msg}"

    def _report(self) -> None:
        level, what = self.worst()
        if self.json_output:
            s = self.state
            print(json.dumps({
                "soc": None if s is None or math.isnan(s.percentage) else s.percentage,
                "capacity": None if s is None or math.isnan(s.capacity) else s.capacity,
                "stamp": None if s is None else time_to_float(s.header.stamp),
                "diagnostics": {n: lv for n, (lv, _m) in self.diagnostics.items()},
            }), flush=True)
            return
        if self.state is None:
            self.get_logger().info(f"waiting for battery_state; diagnostics {level_name(level)} ({what})")
            return
        s = self.state
        self.get_logger().info(
            f"SOC {100 * s.percentage:.1f} %  capacity {s.capacity:.1f} Ah  V {s.voltage:.1f}  I {s.current:.1f} A"
            f"  worst {level_name(level)} ({what})")


NODE_CLASS = BatteryConsumer


def main(args: list[str] | None = None) -> None:
    """Console script `consumer_example` (the shared entry point: survives a second Ctrl-C on shutdown)."""
    spin_node(BatteryConsumer, args)


if __name__ == "__main__":
    main()
