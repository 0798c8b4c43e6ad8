"""cloud_uploader with real rclpy: publishers -> raw subscriptions -> MCAP segments -> ingest server."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue  # noqa: E402
from mcap.reader import make_reader  # noqa: E402
from mcap.stream_reader import StreamReader  # noqa: E402
from mcap_ros2.decoder import DecoderFactory  # noqa: E402
from rcl_interfaces.msg import Log  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import BatteryState  # noqa: E402

from bms_ai.nodes.cloud_uploader import CloudUploaderNode  # noqa: E402
from bms_ai.nodes.common import DIAG_QOS, PUB_QOS  # noqa: E402
from bms_ai.uplink.ingest_server import IngestServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from testutil import RosHarness  # noqa: E402

pytestmark = pytest.mark.ros

TOKEN = "node-token"
VIN = "WVWZZZ1JZXW000001"


def test_node_records_snapshots_and_uploads(tmp_path: Path) -> None:
    """Published topics are recorded, snapshotted on ERROR, uploaded once each, pseudonymised."""
    srv = IngestServer(tmp_path / "cloud", TOKEN).start()
    cfg = {"uplink": {
        "spool": {"dir": str(tmp_path / "spool"), "quota_mb": 64, "min_free_mb": 0},
        "segments": {"max_mb": 4, "max_duration_s": 1.0},
        "fault_snapshot": {"enabled": True, "pre_s": 0.5, "post_s": 0.5},
        "backend": {"kind": "http", "url": srv.url},
        "retry": {"base_s": 0.05, "max_s": 0.5},
        "privacy": {"enabled": True, "key": "fleet-key"},
        "vehicle_id": VIN,
    }}
    (tmp_path / "up.yaml").write_text(yaml.safe_dump(cfg))
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    h = RosHarness()
    try:
        node = h.add(CloudUploaderNode(namespace="/bms", context=h.context, parameter_overrides=[
            Parameter("config", value=str(tmp_path / "up.yaml")), Parameter("pack_id", value="PACK-SN-42"),
            Parameter("shutdown_drain_s", value=3.0), Parameter("token_file", value=str(token_file))]))
        # the token is never a parameter: not listed, not in any value (so not on /parameter_events either)
        params = node.get_parameters_by_prefix("")
        assert "token" not in params and not any(TOKEN in str(p.value) for p in params.values())
        pub_node = h.add(rclpy.node.Node("pub", namespace="/bms", context=h.context))
        pm = pub_node.create_publisher(BatteryState, "pack/measurements", PUB_QOS)
        pd = pub_node.create_publisher(DiagnosticArray, "/diagnostics", DIAG_QOS)
        pr = pub_node.create_publisher(Log, "/rosout", DIAG_QOS)
        diags = h.collect(DiagnosticArray, "/diagnostics")
        assert h.wait_for(lambda: pm.get_subscription_count() >= 1 and pd.get_subscription_count() >= 2, 10)
        sent = []
        t_end = time.monotonic() + 3.0
        i = 0
        while time.monotonic() < t_end:
            m = BatteryState()
            m.voltage = 300.0 + i
            m.cell_voltage = [3.3] * 96
            m.serial_number = "PACK-SN-42"
            pm.publish(m)
            sent.append(m.voltage)
            if i % 10 == 0:
                lvl = 2 if i == 10 else 0
                pd.publish(DiagnosticArray(status=[DiagnosticStatus(
                    level=bytes([lvl]), name="bms_ai: limits", hardware_id="PACK-SN-42",
                    message=f"vehicle {VIN}", values=[KeyValue(key="pack", value="PACK-SN-42")])]))
                pr.publish(Log(name="estimator", msg=f"pack PACK-SN-42 in {VIN}: cell 7 high", level=Log.WARN))
            i += 1
            time.sleep(0.05)

        def uploaded_classes() -> set[str]:
            return {d.get("class") for d in srv.store.list()}
        assert h.wait_for(lambda: {"raw", "diagnostics", "fault_snapshot"} <= uploaded_classes(), 10), \
            srv.store.list()
        def uploader_status() -> dict[str, str]:
            sts = [s for a in list(diags) for s in a.status if s.name == "cloud_uploader: uploader"]
            return {k.key: k.value for k in sts[-1].values} if sts else {}
        # the 1 Hz status lags the uploads by up to a second
        assert h.wait_for(lambda: int(uploader_status().get("uploaded", 0)) >= 3, 5), uploader_status()
        kv = uploader_status()
        assert int(kv["snapshots"]) == 1 and kv["lost"] == "0" and kv["corrupt"] == "0", kv
        assert node.rejected == 0, node.reject_reason
        assert "/rosout" in kv["subscribed"] and "pack/measurements" in kv["subscribed"]
    finally:
        h.close()  # destroy_node flushes open segments and drains for up to 3 s
        srv.stop()
    # nothing that left the vehicle carries the VIN or the pack id: every message, metadata and header
    uploaded = b""
    for d in srv.store.list():
        assert VIN not in json.dumps(d) and "PACK-SN-42" not in json.dumps(d)
        with open(srv.store.path(d["sha256"]), "rb") as f:
            for rec in StreamReader(f).records:
                uploaded += getattr(rec, "data", b"") + json.dumps(getattr(rec, "metadata", {})).encode()
    assert b"rosout" in uploaded or b"cell 7 high" in uploaded  # the /rosout lines were recorded ...
    assert VIN.encode() not in uploaded and b"PACK-SN-42" not in uploaded  # ... pseudonymised
    voltages = []
    for d in srv.store.list():
        if d.get("class") != "raw":
            continue
        with open(srv.store.path(d["sha256"]), "rb") as f:
            for _s, ch, _m, dec in make_reader(f, decoder_factories=[DecoderFactory()]).iter_decoded_messages():
                assert ch.topic == "/bms/pack/measurements"
                assert dec.serial_number.startswith("p-") and "PACK" not in dec.serial_number  # pseudonymised
                voltages.append(dec.voltage)
    # everything published (reliable, local) reached the cloud exactly once after the shutdown flush
    assert sorted(voltages) == sorted(sent)


def test_node_mqtt_telemetry_soc_soh_faults(tmp_path: Path) -> None:
    """battery_state and /diagnostics reach MQTT telemetry as SOC, SOH and active faults."""
    from testutil import MOSQUITTO, Broker, Listener, free_port

    if MOSQUITTO is None:
        pytest.skip("mosquitto broker not installed (apt-get install mosquitto)")
    port = free_port()
    broker = Broker(tmp_path, port).start()
    cfg = {"uplink": {
        "spool": {"dir": str(tmp_path / "spool"), "min_free_mb": 0, "fsync": False},
        "backend": {"kind": "none"},
        "vehicle_id": "WVWZZZ1JZXW000001",
        "privacy": {"enabled": True, "key": "k"},
        "telemetry": {"enabled": True, "port": port, "topic_prefix": "fleet/n1", "rate_hz": 5.0},
    }}
    (tmp_path / "up.yaml").write_text(yaml.safe_dump(cfg))
    lst = Listener(port, "fleet/n1")
    h = RosHarness()
    try:
        h.add(CloudUploaderNode(namespace="/bms", context=h.context, parameter_overrides=[
            Parameter("config", value=str(tmp_path / "up.yaml")), Parameter("shutdown_drain_s", value=0.0)]))
        pub_node = h.add(rclpy.node.Node("pub2", namespace="/bms", context=h.context))
        pb = pub_node.create_publisher(BatteryState, "battery_state", PUB_QOS)
        pd = pub_node.create_publisher(DiagnosticArray, "/diagnostics", DIAG_QOS)
        assert h.wait_for(lambda: pb.get_subscription_count() >= 1 and pd.get_subscription_count() >= 1, 10)

        def fleet_state() -> dict:
            st = lst.states()
            return st[-1] if st else {}

        end = time.monotonic() + 8
        while time.monotonic() < end:
            pb.publish(BatteryState(percentage=0.55, capacity=45.0, design_capacity=50.0))
            pd.publish(DiagnosticArray(status=[DiagnosticStatus(level=bytes([2]), name="bms_ai: limits")]))
            s = fleet_state()
            if s.get("faults") == ["bms_ai: limits"] and s.get("soc") is not None:
                break
            time.sleep(0.1)
        s = fleet_state()
        assert s.get("soc") == pytest.approx(0.55) and s.get("soh") == pytest.approx(0.9), s
        assert s["faults"] == ["bms_ai: limits"]
        assert s["vehicle"].startswith("p-") and "WVW" not in s["vehicle"]  # pseudonymised
    finally:
        h.close()
        lst.close()
        broker.stop()


def test_node_survives_a_full_disk_and_database_then_resumes(tmp_path: Path) -> None:
    """ENOSPC from the spool's file-system seam and SQLite's own "database or disk is full": the node keeps
    spinning and reports ERROR 'disk full' with counters; when space returns it records and uploads again.

    Before: the database error escaped a timer callback and the executor (the whole graph) stopped.
    """
    from test_uplink_service import FullDisk

    srv = IngestServer(tmp_path / "cloud", TOKEN).start()
    cfg = {"uplink": {
        "spool": {"dir": str(tmp_path / "spool"), "quota_mb": 64, "min_free_mb": 0},
        "segments": {"max_mb": 0.02, "max_duration_s": 0.3, "chunk_kb": 4},
        "fault_snapshot": {"enabled": False},
        "backend": {"kind": "http", "url": srv.url, "token": TOKEN},
        "retry": {"base_s": 0.05, "max_s": 0.3},
    }}
    (tmp_path / "up.yaml").write_text(yaml.safe_dump(cfg))
    h = RosHarness()
    try:
        node = h.add(CloudUploaderNode(namespace="/bms", context=h.context, parameter_overrides=[
            Parameter("config", value=str(tmp_path / "up.yaml")), Parameter("shutdown_drain_s", value=2.0)]))
        pub_node = h.add(rclpy.node.Node("pubfull", namespace="/bms", context=h.context))
        pm = pub_node.create_publisher(BatteryState, "pack/measurements", PUB_QOS)
        diags = h.collect(DiagnosticArray, "/diagnostics")
        assert h.wait_for(lambda: pm.get_subscription_count() >= 1, 10)

        def statuses() -> list:
            return [s for a in list(diags) for s in a.status if s.name == "cloud_uploader: uploader"]

        def publish_until(cond, timeout: float) -> bool:  # noqa: ANN001
            end = time.monotonic() + timeout
            v = 0.0
            while time.monotonic() < end:
                pm.publish(BatteryState(voltage=v, cell_voltage=[3.3] * 96))
                v += 1.0
                if cond():
                    return True
                time.sleep(0.01)
            return cond()

        assert h.wait_for(lambda: len(srv.store.list()) >= 1, 10) or publish_until(lambda: srv.store.list(), 10)
        disk = FullDisk()
        disk.full = True
        with node.svc.spool._lock:
            node.svc.spool.fs = disk
            pages = node.svc.spool._db.execute("PRAGMA page_count").fetchone()[0]
            node.svc.spool._db.execute(f"PRAGMA max_page_count={pages}")
        assert publish_until(lambda: any(s.level[0] == 2 and s.message.startswith("disk full") for s in statuses()),
                             15), [s.message for s in statuses()][-3:]
        seen = len(statuses())
        assert publish_until(lambda: len(statuses()) >= seen + 2, 10)  # still spinning, still reporting
        kv = {k.key: k.value for k in statuses()[-1].values}
        assert int(kv["disk_full"]) > 0 and int(kv["dropped_messages"]) > 0 and "raw" in kv["paused"]
        # space returns
        disk.full = False
        with node.svc.spool._lock:
            node.svc.spool._db.execute("PRAGMA max_page_count=1073741823")
        uploaded = len(srv.store.list())
        assert publish_until(lambda: statuses()[-1].level[0] == 0 and len(srv.store.list()) > uploaded, 20), \
            statuses()[-1].message
    finally:
        h.close()
        srv.stop()


SIGNAL_NODE = """
import sys, time
sys.path.insert(0, {root!r})
from bms_ai.nodes.common import spin_node
from bms_ai.nodes.{module} import NODE_CLASS

class Slow(NODE_CLASS):
    def __init__(self, **kw):
        super().__init__(**kw)
        self._said = False
        self.create_timer(0.1, self._ready)

    def _ready(self):
        if not self._said:
            self._said = True
            print("ready", flush=True)

    def destroy_node(self):
        t = time.monotonic()
        while time.monotonic() - t < {slow_s}:  # a shutdown that takes a while (flush, upload)
            time.sleep(0.01)
        super().destroy_node()
        print("destroyed", flush=True)

spin_node(Slow)
print("exited", flush=True)
"""


def _run_signalled(tmp_path: Path, module: str, sigs: list[int], slow_s: float = 1.5,
                   ros_args: list[str] | None = None) -> tuple[int, str, str]:
    script = tmp_path / f"node_{module}.py"
    script.write_text(SIGNAL_NODE.format(root=str(ROOT), module=module, slow_s=slow_s))
    proc = subprocess.Popen([sys.executable, str(script), "--ros-args", *(ros_args or [])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    for sig in sigs:
        proc.send_signal(sig)
        time.sleep(0.3)
    out, err = proc.communicate(timeout=60)
    return proc.returncode, out, err


ROOT = Path(__file__).resolve().parents[1]


INT, TERM = signal.SIGINT, signal.SIGTERM


@pytest.mark.e2e  # node processes
@pytest.mark.parametrize(("module", "sigs"), [
    ("can_bridge", [INT, INT, INT]), ("estimator", [INT, INT]), ("fault_monitor", [INT, INT]),
    ("consumer_example", [INT, INT]), ("cloud_uploader", [INT, INT, TERM]), ("cloud_uploader", [TERM, INT]),
], ids=["can_bridge", "estimator", "fault_monitor", "consumer_example", "uploader-int-int-term", "uploader-term-int"])
def test_every_node_shuts_down_cleanly_despite_repeated_signals(tmp_path: Path, module: str, sigs: list) -> None:
    """spin_node: Ctrl-C twice (or launch's SIGINT then SIGTERM) during a slow shutdown: it finishes, exit 0.

    Before: the second signal raised KeyboardInterrupt inside destroy_node; the process died with -2.
    """
    args = ["-p", f"spool_dir:={tmp_path / 'spool'}", "-p", "backend_url:=https://127.0.0.1:9"] \
        if module == "cloud_uploader" else []
    rc, out, err = _run_signalled(tmp_path, module, sigs, ros_args=args)
    assert rc == 0, err[-2000:]
    assert "destroyed" in out and "exited" in out
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "[bms_ai] shutting down:" in err  # the extra signals were seen and ignored


@pytest.mark.e2e  # the uploader as its own process
def test_uploader_process_keeps_its_spool_through_repeated_sigint(tmp_path: Path) -> None:
    """cloud_uploader killed with SIGINT x2 + SIGTERM mid-shutdown (drain against a dead server, fsync on):
    exit 0, no .part file left, every recorded segment acknowledged; the next start finds nothing to repair."""
    spool = tmp_path / "spool"
    cfg = {"uplink": {"spool": {"dir": str(spool), "min_free_mb": 0, "fsync": True},
                      "segments": {"max_duration_s": 60.0}, "backend": {"kind": "http", "url": "https://127.0.0.1:9"},
                      "retry": {"base_s": 0.5, "max_s": 1.0}}}
    (tmp_path / "up.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "bms_ai.nodes.cloud_uploader", "--ros-args", "-r", "__ns:=/bms",
                             "-p", f"config:={tmp_path / 'up.yaml'}", "-p", "shutdown_drain_s:=3.0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    h = RosHarness()
    try:
        diags = h.collect(DiagnosticArray, "/diagnostics")
        # its own status and /rosout lines are being recorded into open segments once it reports twice
        assert h.wait_for(lambda: sum(s.name == "cloud_uploader: uploader" for a in list(diags) for s in a.status) >= 3, 30)
        assert any(p.name.endswith(".part") for p in (spool / "incoming").iterdir())
        for sig in (signal.SIGINT, signal.SIGINT, signal.SIGTERM):
            proc.send_signal(sig)
            time.sleep(0.4)
        _out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
        h.close()
    assert proc.returncode == 0, err[-2000:]
    assert "KeyboardInterrupt" not in err and "Traceback" not in err
    assert not list((spool / "incoming").iterdir())  # every open segment finished and acknowledged
    with sqlite3.connect(f"file:{spool / 'spool.db'}?mode=ro", uri=True) as con:
        states = dict(con.execute("SELECT state, COUNT(*) FROM segments GROUP BY state").fetchall())
    assert states.get("pending", 0) >= 1
    from bms_ai.uplink.spool import Spool
    sp = Spool(spool, min_free_bytes=0)
    rep = sp.last_recovery
    assert (rep.partial_removed, rep.missing, rep.wrong_size, rep.orphans_adopted, rep.unsafe) == (0, 0, 0, 0, 0)
    sp.close()
