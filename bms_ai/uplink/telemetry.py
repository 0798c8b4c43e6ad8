"""Live telemetry over MQTT (paho-mqtt): SOC, SOH, active faults at a fixed rate.

QoS 1, retained, so a dashboard subscribing late sees the last state at once;
a retained last will ("offline") marks a vehicle that vanished without a clean
disconnect. paho's network thread reconnects by itself after a broker restart;
publishes made while offline are queued (bounded) and flushed on reconnect.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from bms_ai.core.registry import Registry

TELEMETRY: Registry[type] = Registry("telemetry kind")


@TELEMETRY.register("mqtt", "MQTT (paho-mqtt): retained state, online/offline with last will")
class MqttTelemetry:
    """Publishes the latest state at a fixed rate from its own thread; never blocks the caller."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883, topic_prefix: str = "bms_ai/vehicle",
                 client_id: str = "", rate_hz: float = 1.0, qos: int = 1, retain: bool = True,
                 keepalive_s: int = 30, username: str | None = None, password: str | None = None,
                 tls: bool = False, ca_file: str | None = None, max_queued: int = 1000) -> None:
        import paho.mqtt.client as mqtt

        self.topic_prefix = topic_prefix.rstrip("/")
        self.state_topic = f"{self.topic_prefix}/state"
        self.status_topic = f"{self.topic_prefix}/status"
        self.period_s = 1.0 / rate_hz if rate_hz > 0 else 1.0
        self.qos = int(qos)
        self.retain = bool(retain)
        self.published = 0
        self.publish_errors = 0
        self.connects = 0
        self.connected = False
        self._state: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or "", clean_session=True)
        if username:
            c.username_pw_set(username, password)
        if tls:
            c.tls_set(ca_certs=ca_file)
        c.max_queued_messages_set(max_queued)
        c.reconnect_delay_set(min_delay=1, max_delay=30)
        c.will_set(self.status_topic, "offline", qos=1, retain=True)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        self._client = c
        self._host, self._port, self._keepalive = host, int(port), int(keepalive_s)

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        if not reason_code.is_failure:
            self.connected = True
            self.connects += 1
            client.publish(self.status_topic, "online", qos=1, retain=True)

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, reason_code: Any, properties: Any) -> None:
        self.connected = False

    def update(self, **values: Any) -> None:
        """Latest values (soc, soh, faults, ...); published at the next tick."""
        with self._lock:
            self._state.update(values)

    def publish_now(self) -> None:
        """Publish the current state now (the thread calls this at rate_hz)."""
        with self._lock:
            doc = dict(self._state, t=time.time())
        try:
            info = self._client.publish(self.state_topic, json.dumps(doc, default=str), qos=self.qos,
                                        retain=self.retain)
            if info.rc == 0:
                self.published += 1
            else:
                self.publish_errors += 1
        except (OSError, ValueError, RuntimeError):
            self.publish_errors += 1

    def _run(self) -> None:
        nxt = time.monotonic()
        while not self._stop.is_set():
            self.publish_now()
            nxt += self.period_s
            self._stop.wait(max(0.0, nxt - time.monotonic()))

    def start(self) -> MqttTelemetry:
        """Connect in the background and start publishing; returns self."""
        self._client.connect_async(self._host, self._port, self._keepalive)
        self._client.loop_start()
        self._thread = threading.Thread(target=self._run, name="bms_ai-mqtt", daemon=True)
        self._thread.start()
        return self

    def stop(self, clean: bool = True) -> None:
        """clean=True: publish 'offline' ourselves and disconnect (the will is not sent on a clean exit)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if clean and self.connected:
            self._client.publish(self.status_topic, "offline", qos=1, retain=True).wait_for_publish(2)
        self._client.disconnect()
        self._client.loop_stop()

    def stats(self) -> dict[str, Any]:
        """Connection and publish counters."""
        return {"connected": self.connected, "published": self.published, "publish_errors": self.publish_errors,
                "connects": self.connects}


def make_telemetry(config: dict[str, Any] | None) -> MqttTelemetry | None:
    """The telemetry publisher a config section names (``kind``, default mqtt); None when disabled.

    An unknown kind is a one-line ValueError listing the registered kinds.
    """
    cfg = dict(config or {})
    if not cfg or not cfg.pop("enabled", True):
        return None
    kind = cfg.pop("kind", "mqtt")
    return TELEMETRY.get(str(kind))(**cfg)
