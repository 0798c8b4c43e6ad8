"""MQTT live telemetry against a real mosquitto on 127.0.0.1: retained state, broker restart, last will."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from testutil import MOSQUITTO, Broker, Listener, free_port, wait_for

from bms_ai.uplink.telemetry import make_telemetry

pytestmark = pytest.mark.skipif(MOSQUITTO is None, reason="mosquitto broker not installed "
                                "(apt-get install mosquitto; .ci/run installs it)")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.drive
def test_telemetry_retained_and_survives_broker_restart(tmp_path: Path) -> None:
    """Retained state reaches late subscribers and publishing resumes after a broker restart."""
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


@pytest.mark.drive
def test_last_will_marks_vehicle_offline_after_kill9(tmp_path: Path) -> None:
    """A killed vehicle process is marked offline by its last will."""
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
