"""cloud_uploader: record topics + /rosout + /diagnostics into MCAP segments, spool, upload.

Subscriptions are raw (CDR bytes, no deserialisation); the library
(bms_ai.uplink) writes segments, keeps them in a durable spool and uploads
them in its own thread. Only /diagnostics (fault snapshots, active faults) and,
for MQTT telemetry or pseudonymisation, a few messages are deserialised.
Its own health goes out as ``bms_ai: uploader``.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from rclpy.serialization import deserialize_message, serialize_message
from sensor_msgs.msg import BatteryState

from bms_ai.core.levels import ERROR, OK, WARN
from bms_ai.nodes.common import GRAPH_SUB_QOS, Diagnostics, declare, spin_node
from bms_ai.uplink.config import load_config
from bms_ai.uplink.schemas import normalise_type
from bms_ai.uplink.service import UplinkService

KNOWN_TYPES = {
    "pack/measurements": "sensor_msgs/msg/BatteryState",
    "battery_state": "sensor_msgs/msg/BatteryState",
    "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
    "/rosout": "rcl_interfaces/msg/Log",
}
BATTERY = "sensor_msgs/msg/BatteryState"
DIAG = "diagnostic_msgs/msg/DiagnosticArray"
# Reliable and deep: the recorder must not drop what it is meant to keep (file replays wait for it).
RECORD_QOS = GRAPH_SUB_QOS


def default_config_path() -> str:
    p = Path(__file__).resolve().parents[2] / "config" / "uploader.yaml"
    return str(p) if p.exists() else ""


def message_class(type_name: str) -> type:
    pkg, _, name = normalise_type(type_name).split("/")
    return getattr(importlib.import_module(f"{pkg}.msg"), name)


class CloudUploaderNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs.pop("node_name", "cloud_uploader"), **kwargs)
        self.p = {
            "pack_id": declare(self, "pack_id", "pack96-ref", "hardware_id for diagnostics"),
            "config": declare(self, "config", default_config_path(), "uploader YAML (see docs/uplink.md)"),
            "spool_dir": declare(self, "spool_dir", "", "overrides spool.dir"),
            "backend_url": declare(self, "backend_url", "", "overrides backend.url (http/https backends)"),
            "token": declare(self, "token", "", "ingest token (prefer backend.token_env in the YAML)"),
            "vehicle_id": declare(self, "vehicle_id", "", "pack serial / VIN (pseudonymised when privacy is on)"),
            "topics": declare(self, "topics", [""], "override topics as 'topic=class' (empty: from config)"),
            "shutdown_drain_s": declare(self, "shutdown_drain_s", 2.0, "upload for up to this long on shutdown"),
        }
        over: dict[str, Any] = {}
        if self.p["spool_dir"]:
            over["spool"] = {"dir": self.p["spool_dir"]}
        if self.p["backend_url"] or self.p["token"]:
            over["backend"] = {k: v for k, v in (("url", self.p["backend_url"]), ("token", self.p["token"])) if v}
        if self.p["vehicle_id"]:
            over["vehicle_id"] = self.p["vehicle_id"]
        topics = [t for t in self.p["topics"] if t]
        if topics:
            over["topics"] = dict(t.split("=", 1) if "=" in t else (t, "raw") for t in topics)
        self.cfg = load_config(self.p["config"] or None, over)
        self.svc = UplinkService(self.cfg)
        self.diag = Diagnostics(self, self.p["pack_id"])
        self.rejected = 0
        self.reject_reason = ""
        self._last_battery: bytes | None = None
        self._evicted_seen = self.svc.spool.counters()["evicted"]
        self._types: dict[str, str] = dict(self.cfg.get("topic_types") or {})
        self._subs: dict[str, Any] = {}
        self._wanted = list(self.cfg["topics"])
        self._subscribe_known()
        self.create_timer(1.0, self._tick)
        if self.svc.telemetry is not None:
            self.create_timer(self.svc.telemetry.period_s, self._telemetry)
        rec = self.svc.spool.last_recovery
        self.diag.update("uploader", OK, "started", {"recovered_partial": rec.partial_removed,
                                                     "recovery_missing": rec.missing,
                                                     "recovery_orphans": rec.orphans_adopted + rec.orphans_removed})

    # ---------------------------------------------------------------- subscriptions
    def _resolve(self, topic: str) -> str | None:
        full = self.resolve_topic_name(topic)
        if topic in self._types:
            return self._types[topic]
        if topic in KNOWN_TYPES:
            return KNOWN_TYPES[topic]
        for name, types in self.get_topic_names_and_types():  # discover other topics' types from the graph
            if name == full and types:
                return types[0]
        return None

    def _subscribe_known(self) -> None:
        for topic in self._wanted:
            if topic in self._subs:
                continue
            tname = self._resolve(topic)
            if tname is None:
                continue
            try:
                cls = message_class(tname)
            except (ImportError, AttributeError, ValueError) as exc:
                self._reject(f"{topic}: type {tname} not importable ({exc})")
                self._subs[topic] = None
                continue
            tname = normalise_type(tname)
            full, pcls = self.resolve_topic_name(topic), self.svc.recorder.class_of(topic)
            self._subs[topic] = self.create_subscription(
                cls, topic, lambda data, t=full, n=tname, c=pcls: self._on_raw(t, n, data, c), RECORD_QOS, raw=True)

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.reject_reason = reason

    def _on_raw(self, topic: str, type_name: str, data: bytes, cls: str) -> None:
        now = self.get_clock().now().nanoseconds
        try:
            if type_name == DIAG:
                msg = deserialize_message(data, DiagnosticArray)
                self.svc.diagnostics([(s.name, s.level[0] if isinstance(s.level, bytes) else int(s.level))
                                      for s in msg.status], now)
                if self.svc.pseudonymize.enabled:
                    for s in msg.status:
                        s.hardware_id = self.svc.pseudonymize(s.hardware_id)
                    data = serialize_message(msg)
            elif type_name == BATTERY:
                if topic.endswith("battery_state"):
                    self._last_battery = data
                if self.svc.pseudonymize.enabled:
                    msg = deserialize_message(data, BatteryState)
                    msg.serial_number = self.svc.pseudonymize(msg.serial_number)
                    data = serialize_message(msg)
        except Exception as exc:  # noqa: BLE001 - malformed input is counted, never fatal
            self._reject(f"{topic}: {type(exc).__name__}: {exc}")
        self.svc.record(topic, type_name, data, now, cls)

    # ---------------------------------------------------------------- timers
    def _tick(self) -> None:
        if len(self._subs) < len(self._wanted):
            self._subscribe_known()
        self.svc.tick(self.get_clock().now().nanoseconds)
        s = self.svc.stats()
        evicted_new = s["evicted"] - self._evicted_seen
        self._evicted_seen = s["evicted"]
        level, msg = OK, "uploading" if s["backlog_segments"] else "idle, backlog empty"
        if evicted_new > 0:
            level, msg = WARN, f"spool full: evicted {evicted_new} segment(s)"
        if s.get("upload_consecutive_failures", 0):
            level, msg = WARN, f"upload failing: {s.get('upload_last_error', '')[:120]}"
        warn_age = float(self.cfg.get("backlog", {}).get("warn_age_s", 86400.0))
        if warn_age > 0 and s["backlog_age_s"] > warn_age:
            level, msg = WARN, f"oldest pending segment is {s['backlog_age_s'] / 3600:.1f} h old"
        if s.get("upload_last_error_auth") and s.get("upload_consecutive_failures", 0):
            level, msg = ERROR, "ingest rejects our credentials"
        keep = ("backlog_segments", "backlog_bytes", "backlog_age_s", "acknowledged", "uploaded", "evicted",
                "evicted_bytes", "expired", "rejected", "corrupt", "lost", "messages", "segments_committed",
                "snapshots", "upload_last_upload_age_s", "upload_failures", "upload_consecutive_failures",
                "upload_bytes", "mqtt_connected", "mqtt_published", "can_logs_picked")
        vals = {k: s[k] for k in keep if k in s}
        vals.update(rejected_messages=self.rejected + s["rejected_messages"], reject_reason=self.reject_reason,
                    subscribed=",".join(t for t, v in self._subs.items() if v is not None))
        self.diag.update("uploader", level, msg, vals)

    def _telemetry(self) -> None:
        tel = self.svc.telemetry
        if tel is None:
            return
        vals: dict[str, Any] = {"vehicle": self.svc.vehicle or self.svc.pseudonymize(self.p["pack_id"]),
                                "faults": self.svc.active_faults}
        if self._last_battery is not None:
            try:
                m = deserialize_message(self._last_battery, BatteryState)
                vals["soc"] = None if math.isnan(m.percentage) else float(m.percentage)
                soh = m.capacity / m.design_capacity if m.design_capacity and math.isfinite(m.capacity) else math.nan
                vals["soh"] = None if not math.isfinite(soh) else float(soh)
            except Exception as exc:  # noqa: BLE001
                self._reject(f"battery_state: {exc}")
        tel.update(**vals)

    def destroy_node(self) -> None:
        try:
            self.svc.close(drain_s=float(self.p["shutdown_drain_s"]))
        finally:
            super().destroy_node()


NODE_CLASS = CloudUploaderNode


def main(args: list[str] | None = None) -> None:
    spin_node(CloudUploaderNode, args)


if __name__ == "__main__":
    main()
