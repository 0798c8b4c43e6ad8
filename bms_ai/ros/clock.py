"""/clock from log time for `bms-ai replay --clock` (nodes with use_sim_time follow the drive)."""

from __future__ import annotations

import math

import rclpy
from rosgraph_msgs.msg import Clock

from bms_ai.nodes.convert import stamp_to_time


class ClockPublisher:
    """Publishes /clock at most once per millisecond of log time, from its own node and context."""

    def __init__(self) -> None:
        rclpy.init()
        self.node = rclpy.create_node("bms_ai_replay_clock")
        self.pub = self.node.create_publisher(Clock, "/clock", 10)
        self.last = -math.inf

    def publish(self, t: float) -> None:
        """Publish log time ``t`` unless less than 1 ms after the last one (bounded /clock rate)."""
        if t - self.last >= 0.001:
            self.pub.publish(Clock(clock=stamp_to_time(t)))
            self.last = t

    def close(self) -> None:
        """Destroy the node and shut its context down."""
        self.node.destroy_node()
        rclpy.shutdown()
