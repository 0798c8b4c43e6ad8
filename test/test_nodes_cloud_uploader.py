"""cloud_uploader with real rclpy: publishers -> raw subscriptions -> MCAP segments -> ingest server."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import yaml

rclpy = pytest.importorskip("rclpy")

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from mcap.reader import make_reader  # noqa: E402
from mcap_ros2.decoder import DecoderFactory  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import BatteryState  # noqa: E402

from bms_ai.nodes.cloud_uploader import CloudUploaderNode  # noqa: E402
from bms_ai.nodes.common import DIAG_QOS, PUB_QOS  # noqa: E402
from bms_ai.uplink.ingest_server import IngestServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from testutil import RosHarness  # noqa: E402

pytestmark = pytest.mark.ros

TOKEN = "node-token"


def test_node_records_snapshots_and_uploads(tmp_path: Path) -> None:
    """Published topics are recorded, snapshotted on ERROR, uploaded once each, pseudonymised."""
    srv = IngestServer(tmp_path / "cloud", TOKEN).start()
    cfg = {"uplink": {
        "spool": {"dir": str(tmp_path / "spool"), "quota_mb": 64, "min_free_mb": 0},
        "segments": {"max_mb": 4, "max_duration_s": 1.0},
        "fault_snapshot": {"enabled": True, "pre_s": 0.5, "post_s": 0.5},
        "backend": {"kind": "http", "url": srv.url, "token": TOKEN},
        "retry": {"base_s": 0.05, "max_s": 0.5},
        "privacy": {"enabled": True, "key": "fleet-key"},
    }}
    (tmp_path / "up.yaml").write_text(yaml.safe_dump(cfg))
    h = RosHarness()
    try:
        node = h.add(CloudUploaderNode(namespace="/bms", context=h.context, parameter_overrides=[
            Parameter("config", value=str(tmp_path / "up.yaml")), Parameter("pack_id", value="PACK-SN-42"),
            Parameter("shutdown_drain_s", value=3.0)]))
        pub_node = h.add(rclpy.node.Node("pub", namespace="/bms", context=h.context))
        pm = pub_node.create_publisher(BatteryState, "pack/measurements", PUB_QOS)
        pd = pub_node.create_publisher(DiagnosticArray, "/diagnostics", DIAG_QOS)
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
                pd.publish(DiagnosticArray(status=[DiagnosticStatus(level=bytes([lvl]), name="bms_ai: limits",
                                                                    hardware_id="PACK-SN-42")]))
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
