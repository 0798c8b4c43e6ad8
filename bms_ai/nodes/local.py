"""Process-local delivery between the nodes of one composed graph (the in-process runner).

rclpy has no intra-process communication: a sample that the bridge publishes
reaches the estimator and the fault monitor in the same process through DDS,
one copy, one middleware event and one executor turn per reader, and the
estimator's step then runs on a thread that woke only for it. Measured at
nominal traffic (BENCHMARKS.md) that was about a fifth of the graph's CPU and
a quarter of its frame -> battery_state latency.

In a graph composed by :class:`bms_ai.ros.runner.GraphRunner`, a topic that a
node of the same graph publishes is therefore handed to that graph's readers
directly: :meth:`LocalPublisher.publish` still publishes through DDS (tools,
recorders and other processes see every message) and calls each local
reader's callback with the same CDR bytes on the publishing thread (after
the DDS write, or before it for the bridge's measurements: the estimator's
battery_state then does not wait for that write), holding
that reader's node lock; the node's executor callbacks hold it too
(:func:`guarded`), so each node's callbacks stay mutually exclusive as under
a single-threaded executor. A callback that publishes (the estimator's)
takes its readers' locks inside its own, and no reader publishes back to its
publisher, so the locks never form a cycle. Outside a composed graph
(``ros2 run``, ``ros2 launch``: one node per process) nothing changes: every
reader is a DDS subscription.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import Any

from rclpy.node import Node
from rclpy.qos import QoSProfile

Handler = Callable[[bytes], None]

_GRAPHS: dict[int, LocalTopics] = {}  # id(context) -> the composed graph using it
LOCAL_ENV = "BMS_AI_LOCAL_DELIVERY"  # '0': every reader through DDS, as in one process per node (comparison, debugging)


class LocalTopics:
    """The local readers of one composed graph, resolved once every node exists."""

    def __init__(self) -> None:
        self._locks: dict[Node, threading.RLock] = {}
        self.final = False
        self._published: dict[str, LocalPublisher] = {}  # resolved topic -> its publisher in this graph
        self._wanted: list[tuple[Node, Any, str, str, Handler, Handler, QoSProfile]] = []
        self.failures = 0  # local callbacks that raised (logged; the publisher goes on)

    @staticmethod
    def attach(context: Any) -> LocalTopics | None:
        """Start composing a graph on ``context``: nodes made from now on register here (None: switched off)."""
        if os.environ.get(LOCAL_ENV, "1") == "0":
            return None
        graph = _GRAPHS[id(context)] = LocalTopics()
        return graph

    @staticmethod
    def detach(context: Any) -> None:
        """The graph on ``context`` is gone."""
        _GRAPHS.pop(id(context), None)

    @staticmethod
    def of(node: Node) -> LocalTopics | None:
        """The composed graph ``node`` belongs to, None for a node on its own."""
        return _GRAPHS.get(id(node.context))

    def finalize(self) -> None:
        """Every node exists: a wanted topic with a publisher here is delivered locally, any other by DDS."""
        for wanted in self._wanted:
            self.subscribe(*wanted)
        self._wanted.clear()
        self.final = True

    def subscribe(self, node: Node, msg_type: Any, resolved: str, topic: str, callback: Handler, local: Handler,
                  qos: QoSProfile) -> Any:
        """``local`` on the publishing thread where this graph publishes ``resolved`` (True), else a DDS reader.

        Also once the graph runs (a reader made late, e.g. the uploader's for a topic whose type it
        learns later): no reader of a topic published here is ever served by the executor, so a replay
        need not hold back for such readers (bms_ai.nodes.can_bridge).
        """
        pub = self._published.get(resolved)
        if pub is None:
            return node.create_subscription(msg_type, topic, callback, qos, raw=True)
        pub.local.append((node, local, self.lock_of(node)))  # a list: the publisher's loop may run meanwhile
        return True

    def lock_of(self, node: Node) -> threading.RLock:
        """The lock ``node``'s callbacks hold, on the executor and when a local publisher calls them."""
        lock = self._locks.get(node)
        if lock is None:
            lock = self._locks[node] = threading.RLock()
        return lock


class LocalPublisher:
    """A DDS publisher of CDR bytes that also calls the graph's local readers of its topic."""

    def __init__(self, node: Node, msg_type: Any, topic: str, qos: QoSProfile, local_first: bool = False) -> None:
        self.dds = node.create_publisher(msg_type, topic, qos)
        self.local_first = local_first
        self.topic = self.dds.topic_name
        self.local: list[tuple[Node, Handler, threading.RLock]] = []  # reader node, callback, its lock
        self._graph = LocalTopics.of(node)
        if self._graph is not None:
            self._graph._published[self.topic] = self

    def publish(self, data: bytes) -> None:
        """Publish to DDS and hand the bytes to each local reader (in order, on this thread).

        DDS first, unless ``local_first``: then the graph's readers come first,
        and the sample reaches other processes after them. Where the graph's
        readers make the product's output (the bridge's measurements feed the
        estimator, whose battery_state is what consumers wait for), the
        ~0.3 ms of a DDS write then is not on that path.
        """
        if not self.local_first:
            self.dds.publish(data)
        self._deliver(data)
        if self.local_first:
            self.dds.publish(data)

    def _deliver(self, data: bytes) -> None:
        for node, callback, lock in self.local:
            with lock:
                try:
                    callback(data)
                except Exception as exc:  # noqa: BLE001  (a reader's fault must not stop the publisher)
                    self._graph.failures += 1
                    node.get_logger().error(f"{self.topic}: callback failed: {type(exc).__name__}: {exc}",
                                            throttle_duration_sec=5.0)

    def get_subscription_count(self) -> int:
        """Readers of this topic: DDS subscriptions plus this graph's local readers."""
        return self.dds.get_subscription_count() + len(self.local)

    def wait_for_all_acked(self, timeout: Any) -> bool:
        """DDS readers' acknowledgements (local readers have taken the message when publish returns)."""
        return self.dds.wait_for_all_acked(timeout)


def graph_subscription(node: Node, msg_type: Any, topic: str, callback: Handler, qos: QoSProfile,
                       local: Handler | None = None) -> Any:
    """Read ``topic`` as CDR bytes: locally when a node of the same composed graph publishes it, else by DDS.

    ``local`` replaces ``callback`` for local delivery (it then runs on the
    publisher's thread). Returns the DDS subscription, or True where it is
    delivered locally or the graph is still being composed.
    """
    graph = LocalTopics.of(node)
    if graph is None:
        return node.create_subscription(msg_type, topic, callback, qos, raw=True)
    wanted = (node, msg_type, node.resolve_topic_name(topic), topic, callback, local or callback, qos)
    if graph.final:
        return graph.subscribe(*wanted)
    graph._wanted.append(wanted)
    return True


def guarded(node: Node, callback: Callable[..., Any]) -> Callable[..., Any]:
    """``callback`` holding ``node``'s lock in a composed graph (its timers and DDS readers); as is alone."""
    graph = LocalTopics.of(node)
    if graph is None:
        return callback
    lock = graph.lock_of(node)

    def locked(*args: Any) -> Any:
        with lock:
            return callback(*args)

    return locked
