"""MQTT live telemetry against a real mosquitto on 127.0.0.1: retained state, broker restart, last will."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from testutil import free_port, wait_for

mqtt = pytest.importorskip("paho.mqtt.client")

from bms_ai.uplink.telemetry import make_telemetry  # noqa: E402

MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)
pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto broker not installed "
                                "(apt-get install mosquitto; .ci/run installs it)")
ROOT = Path(__file__).resolve().parents[1]


class Broker:
    def __init__(self, tmp: Path, port: int) -> None:
        self.port = port
        self.conf = tmp / "mosquitto.conf"
        self.conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen([MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)

        def up() -> bool:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return True
            except OSError:
                return False
        assert wait_for(up, 10), "mosquitto did not start"
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self.proc = None


class Listener:
    """A dashboard: subscribes to everything under the prefix and keeps (topic, payload, retained)."""

    def __init__(self, port: int, prefix: str) -> None:
        self.got: list[tuple[str, str, bool]] = []
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2)
        c.on_connect = lambda cl, u, f, rc, p: cl.subscribe(f"{prefix}/#", qos=1)
        c.on_message = lambda cl, u, m: self.got.append((m.topic, m.payload.decode(), bool(m.retain)))
        c.reconnect_delay_set(1, 2)
        c.connect("127.0.0.1", port, 5)
        c.loop_start()
        self.c = c

    def states(self) -> list[dict]:
        return [json.loads(p) for t, p, _ in self.got if t.endswith("/state")]

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def test_telemetry_retained_and_survives_broker_restart(tmp_path: Path) -> None:
    port = free_port()
    broker = Broker(tmp_path, port).start()
    tel = make_telemetry({"enabled": True, "kind": "mqtt", "port": port, "topic_prefix": "fleet/v1",
                          "rate_hz": 10.0, "client_id": "veh-test"})
    assert tel is not None
    tel.update(soc=0.42, soh=0.97, faults=[])
    tel.start()
    try:
        assert wait_for(lambda: tel.published >= 3, 5)
        late = Listener(port, "fleet/v1")  # subscribes after the fact: retained state arrives at once
        assert wait_for(lambda: any(r for t, _, r in late.got if t == "fleet/v1/state"), 5)
        assert ("fleet/v1/status", "online", True) in late.got
        s = late.states()[0]
        assert s["soc"] == 0.42 and s["soh"] == 0.97 and s["faults"] == []
        late.close()

        broker.stop()
        assert wait_for(lambda: not tel.connected, 5)
        tel.update(faults=["bms_ai: limits"])
        time.sleep(0.5)  # publishes while the broker is down must not crash (queued or counted)
        broker.start()
        assert wait_for(lambda: tel.connected and tel.connects >= 2, 15), tel.stats()
        after = Listener(port, "fleet/v1")
        assert wait_for(lambda: any(st.get("faults") == ["bms_ai: limits"] for st in after.states()), 5)
        assert wait_for(lambda: ("fleet/v1/status", "online", True) in after.got, 5)
        after.close()
    finally:
        tel.stop()
        broker.stop()


CHILD = textwrap.dedent('''
    import sys, time
    sys.path.insert(0, {root!r})
    from bms_ai.uplink.telemetry import make_telemetry
    tel = make_telemetry({{"kind": "mqtt", "port": {port}, "topic_prefix": "fleet/v2", "rate_hz": 5.0}})
    tel.update(soc=0.5, soh=0.9, faults=[])
    tel.start()
    while True:
        if tel.published >= 2 and tel.connected:
            print("up", flush=True)
        time.sleep(0.1)
''')


def test_last_will_marks_vehicle_offline_after_kill9(tmp_path: Path) -> None:
    port = free_port()
    broker = Broker(tmp_path, port).start()
    script = tmp_path / "veh.py"
    script.write_text(CHILD.format(root=str(ROOT), port=port))
    child = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        import select
        assert child.stdout is not None
        assert select.select([child.stdout], [], [], 15)[0], "telemetry child never connected"
        assert child.stdout.readline().strip() == "up"
        lst = Listener(port, "fleet/v2")
        assert wait_for(lambda: ("fleet/v2/status", "online", True) in lst.got, 5)
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        assert wait_for(lambda: any(t == "fleet/v2/status" and p == "offline" for t, p, _ in lst.got), 10)
        lst.close()
        late = Listener(port, "fleet/v2")  # the will was retained
        assert wait_for(lambda: ("fleet/v2/status", "offline", True) in late.got, 5)
        late.close()
    finally:
        if child.poll() is None:
            child.kill()
        broker.stop()
