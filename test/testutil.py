"""Helpers shared by tests: a free loopback port, polling with a deadline, a real mosquitto broker."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(step)
    return bool(cond())


MOSQUITTO = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if os.path.exists("/usr/sbin/mosquitto") else None)


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
        import paho.mqtt.client as mqtt

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
