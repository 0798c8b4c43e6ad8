"""How other vehicle software consumes bms_ai: plain rclpy, standard messages only.

    ros2 run bms_ai consumer_example --ros-args -r __ns:=/bms

Subscribes to battery_state and /diagnostics and logs SOC, capacity and the
worst active diagnostic once per second. Nothing of bms_ai is imported.
"""

from __future__ import annotations

import json
import math

import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data
from sensor_msgs.msg import BatteryState

LEVELS = {0: "OK", 1: "WARN", 2: "ERROR", 3: "STALE"}
SEVERITY = {0: 0, 3: 1, 1: 2, 2: 3}  # OK < STALE < WARN < ERROR


class BatteryConsumer(Node):
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
            if st.name.startswith("bms_ai:"):
                level = st.level[0] if isinstance(st.level, bytes) else int(st.level)
                self.diagnostics[st.name] = (level, st.message)

    def worst(self) -> tuple[int, str]:
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
                "stamp": None if s is None else s.header.stamp.sec + s.header.stamp.nanosec * 1e-9,
                "diagnostics": {n: lv for n, (lv, _m) in self.diagnostics.items()},
            }), flush=True)
            return
        if self.state is None:
            self.get_logger().info(f"waiting for battery_state; diagnostics {LEVELS.get(level)} ({what})")
            return
        s = self.state
        self.get_logger().info(
            f"SOC {100 * s.percentage:.1f} %  capacity {s.capacity:.1f} Ah  V {s.voltage:.1f}  I {s.current:.1f} A"
            f"  worst {LEVELS.get(level)} ({what})")


NODE_CLASS = BatteryConsumer


def main(args: list[str] | None = None) -> None:
    rclpy.init(args=args)
    node = BatteryConsumer()
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, rclpy.executors.ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        if rclpy.ok():
            rclpy.shutdown()


if __name__ == "__main__":
    main()
