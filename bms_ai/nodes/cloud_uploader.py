"""cloud_uploader: record topics + /rosout + /diagnostics into MCAP segments, spool, upload.

Subscriptions are raw (CDR bytes, no deserialisation); the library
(bms_ai.uplink) writes segments, keeps them in a durable spool and uploads
them in its own thread. Only /diagnostics (fault snapshots, active faults) and,
for MQTT telemetry or pseudonymisation, a few messages are deserialised.
Its own health goes out as ``cloud_uploader: uploader``. In a composed graph
(bms_ai.nodes.local) the graph's own topics arrive on their publisher's
thread and wait in a bounded inbox for the executor (the next DDS message,
the 1 Hz tick, shutdown): the CAN reader thread never waits for spool I/O.
"""

from __future__ import annotations

import collections
import functools
import importlib
import os
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.serialization import deserialize_message, serialize_message

from bms_ai.core.cdr import read_diagnostic_levels
from bms_ai.diagnostics.rules import CheckResult
from bms_ai.graph import pack_spool_dir
from bms_ai.nodes.common import GRAPH_SUB_QOS, Diagnostics, declare, spin_node
from bms_ai.nodes.convert import battery_fields_from_bytes
from bms_ai.nodes.local import graph_subscription
from bms_ai.uplink.config import default_config_path, load_config, parameter_overrides
from bms_ai.uplink.schemas import normalise_type
from bms_ai.uplink.service import UplinkService

BATTERY = "sensor_msgs/msg/BatteryState"
DIAG = "diagnostic_msgs/msg/DiagnosticArray"
# Reliable and deep: the recorder must not drop what it is meant to keep (file replays wait for it).
RECORD_QOS = GRAPH_SUB_QOS
#: messages from the graph's own publishers waiting for the executor (10 s of a 100x replay's 2,000 a second)
INBOX_MAX = 20_000


@functools.lru_cache(maxsize=256)
def message_class(type_name: str) -> type:
    """The Python class of a ROS message type name (for a raw subscription)."""
    pkg, _, name = normalise_type(type_name).split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


class CloudUploaderNode(Node):
    """ROS side of :class:`bms_ai.uplink.service.UplinkService`: raw subscriptions in, its health out."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs.pop("node_name", "cloud_uploader"), **kwargs)
        self.p = {
            "pack_id": declare(self, "pack_id", "pack96-ref", "hardware_id for diagnostics"),
            "config": declare(self, "config", default_config_path(), "uploader YAML (see docs/uplink.md)"),
            "spool_dir": declare(self, "spool_dir", "", "overrides spool.dir"),
            "backend_url": declare(self, "backend_url", "", "overrides backend.url (https; plain http warns)"),
            # the token itself is never a parameter (visible on /parameter_events and via get_parameters)
            "token_file": declare(self, "token_file", "", "file holding the ingest token (overrides the YAML)"),
            "token_env": declare(self, "token_env", "", "environment variable holding the ingest token"),
            "vehicle_id": declare(self, "vehicle_id", "", "pack serial / VIN (pseudonymised when privacy is on)"),
            "topics": declare(self, "topics", [""], "override topics as 'topic=class' (empty: from config)"),
            "shutdown_drain_s": declare(self, "shutdown_drain_s", 2.0, "upload for up to this long on shutdown"),
        }
        over = parameter_overrides(self.p["spool_dir"], self.p["backend_url"], self.p["token_file"],
                                   self.p["token_env"], self.p["vehicle_id"], self.p["topics"])
        self.cfg = load_config(self.p["config"] or None, over)
        if not self.p["spool_dir"]:  # one spool per pack (namespace) unless a parameter names it
            self.cfg["spool"]["dir"] = pack_spool_dir(os.path.expanduser(self.cfg["spool"]["dir"]), self.get_namespace())
        self.svc = UplinkService(self.cfg, identifiers=[self.p["pack_id"]])
        started = self.svc.started_status()
        if started.level:
            self.get_logger().warning(started.message)
        self.diag = Diagnostics(self, self.p["pack_id"])
        self.rejected = 0
        self.reject_reason = ""
        self._last_battery: bytes | None = None
        self._subs: dict[str, Any] = {}
        self._wanted = self.svc.topics
        self._inbox: collections.deque = collections.deque()  # (topic, type, data, class, receipt ns)
        self.inbox_dropped = 0
        self._subscribe_known()
        self.create_timer(1.0, self._tick)
        if self.svc.telemetry is not None:
            self.create_timer(self.svc.telemetry.period_s, self._telemetry)
        self._publish(started)

    def _publish(self, r: CheckResult) -> None:
        self.diag.update(r.check, r.level, r.message, r.values)

    # ---------------------------------------------------------------- subscriptions
    def _subscribe_known(self) -> None:
        for topic in self._wanted:
            if topic in self._subs:
                continue
            full = self.resolve_topic_name(topic)
            tname = self.svc.topic_type(topic, full, self.get_topic_names_and_types)
            if tname is None:
                continue
            try:
                cls = message_class(tname)
            except (ImportError, AttributeError, ValueError) as exc:
                self._reject(f"{topic}: type {tname} not importable ({exc})")
                self._subs[topic] = None
                continue
            tname = normalise_type(tname)
            pcls = self.svc.recorder.class_of(topic)
            self._subs[topic] = graph_subscription(
                self, cls, topic, lambda data, t=full, n=tname, c=pcls: self._on_raw(t, n, data, c), RECORD_QOS,
                local=lambda data, t=full, n=tname, c=pcls: self._enqueue(t, n, data, c))

    def _enqueue(self, topic: str, type_name: str, data: bytes, cls: str) -> None:
        """A local message (publisher's thread): stamped now, recorded by the executor (:meth:`_drain`)."""
        if len(self._inbox) >= INBOX_MAX:
            self.inbox_dropped += 1
            self._reject(f"{topic}: recording inbox full ({INBOX_MAX} messages)")
            return
        self._inbox.append((topic, type_name, data, cls, self.get_clock().now().nanoseconds))

    def _drain(self) -> None:
        """Record what waits in the inbox, in arrival order (before any newer DDS message)."""
        inbox = self._inbox
        while inbox:
            self._on_raw(*inbox.popleft())

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.reject_reason = reason

    def _on_raw(self, topic: str, type_name: str, data: bytes, cls: str, now: int | None = None) -> None:
        if now is None:  # a DDS message: what the inbox holds is older
            self._drain()
            now = self.get_clock().now().nanoseconds
        try:
            if type_name == DIAG:
                self._on_diagnostics(data, now)
            elif type_name == BATTERY:
                self._on_battery(topic, data)
            kept = self._private(type_name, data)
        except Exception as exc:  # noqa: BLE001 - malformed input is counted, never fatal, never recorded raw
            self._reject(f"{topic}: {type(exc).__name__}: {exc}")
            kept = None if self.svc.scrubber.enabled else data
        if kept is not None:
            self.svc.record(topic, type_name, kept, now, cls)

    def _private(self, type_name: str, data: bytes) -> bytes | None:
        """With privacy on: every string field carrying a known identifier pseudonymised (None: drop it)."""
        return self.svc.private(data, lambda b: deserialize_message(b, message_class(type_name)), serialize_message)

    def _on_diagnostics(self, data: bytes, now_ns: int) -> None:
        """Levels to the service (fault snapshots, active faults); hardware ids become known identifiers."""
        try:
            statuses = [(name, level, hw) for level, name, hw in read_diagnostic_levels(data)]
        except ValueError:  # an encoding bms_ai.core.cdr does not read: through rclpy
            msg = deserialize_message(data, DiagnosticArray)
            statuses = [(s.name, s.level[0] if isinstance(s.level, bytes) else int(s.level), s.hardware_id)
                        for s in msg.status]
        self.svc.diagnostics([(name, level) for name, level, _ in statuses], now_ns)
        if self.svc.scrubber.enabled:  # learn() keeps nothing otherwise
            for _, _, hardware_id in statuses:
                self.svc.scrubber.learn(hardware_id)

    def _on_battery(self, topic: str, data: bytes) -> None:
        """Keep the last battery_state for telemetry; its serial number becomes a known identifier."""
        if topic.endswith("battery_state"):
            self._last_battery = data
        if self.svc.scrubber.enabled:
            self.svc.scrubber.learn(battery_fields_from_bytes(data).serial_number)

    # ---------------------------------------------------------------- timers
    def _tick(self) -> None:
        self._drain()
        if len(self._subs) < len(self._wanted):
            self._subscribe_known()
        self.svc.tick(self.get_clock().now().nanoseconds)
        self._publish(self.svc.health(self.rejected, self.reject_reason,
                                      (t for t, v in self._subs.items() if v is not None)))

    def _telemetry(self) -> None:
        tel = self.svc.telemetry
        if tel is None:
            return
        battery = None
        if self._last_battery is not None:
            try:
                m = battery_fields_from_bytes(self._last_battery)
                battery = (m.percentage, m.capacity, m.design_capacity)
            except Exception as exc:  # noqa: BLE001
                self._reject(f"battery_state: {exc}")
        tel.update(**self.svc.telemetry_state(self.p["pack_id"], battery))

    def destroy_node(self) -> None:
        """Commit open segments and upload for up to shutdown_drain_s before the node goes (never raises)."""
        try:
            self._drain()
            self.svc.close(drain_s=float(self.p["shutdown_drain_s"]))
        finally:
            super().destroy_node()


NODE_CLASS = CloudUploaderNode


def main(args: list[str] | None = None) -> None:
    """Entry point of the cloud_uploader executable."""
    spin_node(CloudUploaderNode, args)


if __name__ == "__main__":
    main()
