"""Real rclpy in tests: a private context, an executor thread, collecting subscribers."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from testutil import wait_for


class RosHarness:
    def __init__(self) -> None:
        self.context = Context()
        rclpy.init(context=self.context)
        self.executor = SingleThreadedExecutor(context=self.context)
        self.nodes: list[Node] = []
        self.node = self.add(Node("test_probe", context=self.context))
        self._thread = threading.Thread(target=self._spin, daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        with contextlib.suppress(Exception):  # shutdown races
            self.executor.spin()

    def add(self, node: Node) -> Node:
        self.nodes.append(node)
        self.executor.add_node(node)
        return node

    def collect(self, msg_type, topic: str) -> list:
        got: list = []
        qos = QoSProfile(depth=1000, reliability=ReliabilityPolicy.RELIABLE)
        self.node.create_subscription(msg_type, topic, got.append, qos)
        return got

    @staticmethod
    def wait_for(pred: Callable[[], bool], timeout: float = 10.0, step: float = 0.02) -> bool:
        return wait_for(pred, timeout, step)

    def close(self) -> None:
        self.executor.shutdown(timeout_sec=2.0)
        for n in self.nodes:
            n.destroy_node()
        rclpy.shutdown(context=self.context)
        self._thread.join(timeout=2.0)


def diag_levels(arrays, name: str) -> list[int]:
    out = []
    for a in arrays:
        for st in a.status:
            if st.name == name:
                lv = st.level
                out.append(lv[0] if isinstance(lv, (bytes, bytearray)) else int(lv))
    return out


def diag_values(arrays, name: str) -> dict[str, str]:
    for a in reversed(arrays):
        for st in a.status:
            if st.name == name:
                return {kv.key: kv.value for kv in st.values}
    return {}
