"""Fleet edge: a drive through estimator and fault monitor into pseudonymised MCAP segments, read back without rclpy."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest

from bms_ai.core.cdr import (
    Status,
    decode_battery_state,
    decode_battery_states,
    decode_diagnostic_array,
    encode_battery_states,
    encode_diagnostic_array,
)
from bms_ai.fleet.edge import EdgeConfig, run_vehicle, segment_bounds
from bms_ai.fleet.store import open_store
from bms_ai.sim.dataset import RecordedDrive, load_drive
from bms_ai.uplink.privacy import Pseudonymizer

ROOT = Path(__file__).resolve().parents[1]
VID = "WVWZZZ1JZXW123456"
KEY = "fleet-test-key"


def test_battery_state_codec_round_trip_fast_and_slow_path() -> None:
    """Bulk encode -> bulk decode (one numpy view) equals the per-message reader; odd sizes take the slow path."""
    rng = np.random.default_rng(1)
    t = 1.767e9 + np.arange(5) * 1.1
    cv, ct = 3.6 + 0.1 * rng.random((5, 7)), 25 + rng.random((5, 3))
    msgs = encode_battery_states(t, cv, ct, current=np.linspace(-50, 50, 5), percentage=np.full(5, 0.5),
                                 capacity=np.full(5, 48.0), design_capacity=50.0, location="pack", serial="p-x")
    cols = decode_battery_states(msgs)
    np.testing.assert_allclose(cols["t"], t, atol=1e-6)
    np.testing.assert_allclose(cols["cell_voltage"], cv, rtol=1e-6)
    np.testing.assert_allclose(cols["cell_temperature"], ct, rtol=1e-6)
    one = decode_battery_state(msgs[2])
    assert one["serial_number"] == "p-x" and one["location"] == "pack" and one["percentage"] == 0.5
    other = encode_battery_states(t[:1] + 9, cv[:1], ct[:1], current=[1.0], serial="p-longer-serial")
    mixed = decode_battery_states([*msgs, *other])                    # another layout: message by message
    np.testing.assert_allclose(mixed["current"], [*np.linspace(-50, 50, 5), 1.0], rtol=1e-6)


def test_diagnostic_array_codec_round_trip() -> None:
    """DiagnosticArray bytes decode to the statuses they were built from."""
    sts = [Status(2, "fault_monitor: cell_voltage", "high", "p-x", (("cell", "3"), ("v", "4.3"))),
           Status(0, "estimator: soc", "", "p-x")]
    t, back = decode_diagnostic_array(encode_diagnostic_array(1.767e9 + 0.25, sts))
    assert t == pytest.approx(1.767e9 + 0.25) and back == sts


def test_segments_rotate_at_each_day_and_after_max_duration() -> None:
    """Like the Recorder: at most max_duration_s of message time per segment, and never across a UTC day."""
    day = 86400.0 * 20454
    t = np.concatenate([day - 100 + np.arange(50.0), day + np.arange(250.0)])
    b = segment_bounds(t, 100.0)
    assert b == [(0, 50), (50, 150), (150, 250), (250, 300)]


@pytest.fixture(scope="module")
def edge(tmp_path_factory):
    """The bundled NMC drive as one vehicle, run once for the module."""
    d = load_drive(ROOT / "data" / "drives" / "nmc_udds")
    d.meta.update(vehicle_id=VID, t0_unix=1767225600.0 + 86400.0 - 60.0)   # crosses midnight after 60 s
    d.t = d.t - d.t[0]
    store = open_store(str(tmp_path_factory.mktemp("fleet")))
    res = run_vehicle(d, store, EdgeConfig(key=KEY))
    return d, store, res


@pytest.mark.drive
def test_segments_read_by_mcap_ros2_with_the_graph_topics(edge) -> None:
    """Every segment is standard ROS 2 MCAP: mcap-ros2-support decodes every message with its embedded schema."""
    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    d, store, res = edge
    assert len(res.segments) == 2                                     # the UTC day changed after 60 s
    topics: dict[str, int] = {}
    pct = []
    for key in res.segments:
        reader = make_reader(io.BytesIO(store.get(key)), decoder_factories=[DecoderFactory()])
        for schema, channel, _message, msg in reader.iter_decoded_messages():
            topics[channel.topic] = topics.get(channel.topic, 0) + 1
            assert schema.encoding == "ros2msg" and channel.message_encoding == "cdr"
            if channel.topic == "/bms/battery_state":
                assert schema.name == "sensor_msgs/msg/BatteryState"
                assert msg.serial_number == res.pseudonym and len(msg.cell_voltage) == d.n_cells
                pct.append(msg.percentage)
            elif channel.topic == "/diagnostics":
                assert all(st.hardware_id == res.pseudonym for st in msg.status)
    assert topics["/bms/pack/measurements"] == res.samples
    assert topics["/bms/battery_state"] == res.samples - res.estimator_rejected > 0
    assert topics["/diagnostics"] == res.diagnostics > 0
    truth = float(np.mean(d.soc[0]))
    assert abs(np.mean(pct) - truth) < 0.05                           # the estimator ran (starts from stored SOC)


@pytest.mark.drive
def test_raw_vehicle_id_is_in_no_uploaded_byte(edge) -> None:
    """Keys, metadata, messages and truth carry the uplink's pseudonym; the raw id appears nowhere."""
    _d, store, res = edge
    assert res.pseudonym == Pseudonymizer(KEY)(VID)
    keys = list(store.list())
    assert keys and all(res.pseudonym in k for k in keys)
    assert {k.split("/")[0] for k in keys} == {"segments", "truth"}
    for k in keys:
        data = store.get(k)
        assert VID.encode() not in data and VID not in k
    assert res.pseudonym.encode() in store.get(res.segments[0])       # (the scan can find a string)


def test_no_key_or_no_vehicle_id_is_refused(tmp_path: Path, monkeypatch) -> None:
    """Without a fleet key (never upload raw ids) or a vehicle id: a one-line error, nothing written."""
    monkeypatch.delenv("BMS_AI_PSEUDONYM_KEY", raising=False)
    n = 5
    d = RecordedDrive("tiny", "nmc", 50.0, np.arange(n, dtype=float), np.zeros(n), np.full((n, 2), 3.7),
                      np.full((n, 1), 25.0), np.full((n, 2), 0.5), meta={})
    store = open_store(str(tmp_path))
    with pytest.raises(ValueError, match="vehicle_id"):
        run_vehicle(d, store, EdgeConfig(key=KEY))
    d.meta["vehicle_id"] = VID
    with pytest.raises(ValueError, match="pseudonym key"):
        run_vehicle(d, store, EdgeConfig())
    assert list(store.list()) == []


@pytest.mark.drive
def test_rerun_uploads_the_same_keys(edge) -> None:
    """Content-addressed and deterministic (no wall-clock figures in the segments): a re-run adds nothing."""
    d, store, res = edge
    before = sorted(store.list())
    again = run_vehicle(d, store, EdgeConfig(key=KEY))
    assert again.segments == res.segments and again.truth_key == res.truth_key
    assert sorted(store.list()) == before
