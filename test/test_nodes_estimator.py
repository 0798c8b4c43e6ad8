"""estimator node on real rclpy with use_sim_time and a /clock publisher."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import BatteryState
from testutil import RosHarness, diag_levels, diag_values, trap_soc_model

from bms_ai.nodes.common import LOSSLESS_QOS, PUB_QOS
from bms_ai.nodes.convert import sample_to_battery_state, stamp_to_time
from bms_ai.nodes.estimator import EstimatorNode
from bms_ai.pack import PackSample
from bms_ai.sim.dataset import load_drive

pytestmark = pytest.mark.ros

T0 = 1000.0
DRIVE = Path(__file__).resolve().parents[1] / "data" / "drives" / "nmc_udds"   # inside the shipped model's domain


def _replay(h: RosHarness, model_dir: Path, seconds: float, initial_soc: float = -1.0):
    d = load_drive(DRIVE)
    node = h.add(EstimatorNode(context=h.context, namespace="/bms", parameter_overrides=[
        Parameter("use_sim_time", value=True), Parameter("model_dir", value=str(model_dir)),
        Parameter("chemistry", value="nmc"), Parameter("capacity_ah", value=float(d.capacity_ah)),
        Parameter("health_period", value=5.0), Parameter("initial_soc", value=initial_soc)]))
    states = h.collect(BatteryState, "/bms/battery_state")
    diags = h.collect(DiagnosticArray, "/diagnostics")
    clock = h.node.create_publisher(Clock, "/clock", PUB_QOS)
    meas = h.node.create_publisher(BatteryState, "/bms/pack/measurements", LOSSLESS_QOS)
    assert h.wait_for(lambda: meas.get_subscription_count() > 0 and clock.get_subscription_count() > 0)
    n = int(seconds * 10)
    for k in range(n):
        t = T0 + float(d.t[k])
        clock.publish(Clock(clock=stamp_to_time(t)))
        s = PackSample(stamp=t, pack_voltage=float(np.sum(d.cell_v[k])), pack_current=float(d.current[k]),
                       cell_voltages=d.cell_v[k], cell_temperatures=d.cell_t[k])
        meas.publish(sample_to_battery_state(s))
        time.sleep(0.003)
    h.wait_for(lambda: len(states) >= node.est.steps and node.est.steps > n * 0.5, timeout=5)
    time.sleep(0.3)
    return node, d, states, diags


@pytest.fixture
def harness():
    h = RosHarness()
    yield h
    h.close()


def test_node_publishes_soc_and_diagnostics_on_sim_time(harness: RosHarness, root: Path) -> None:
    node, d, states, diags = _replay(harness, root / "models", 120.0)
    # sensor-data QoS may drop a few under load; every processed sample gives one battery_state
    assert len(states) >= 600 and len(states) == node.est.steps, (len(states), node.est.steps)
    stamps = np.array([m.header.stamp.sec + m.header.stamp.nanosec * 1e-9 for m in states])
    assert np.all(np.diff(stamps) > 0)
    truth = np.interp(stamps - T0, d.t, d.soc.mean(axis=1))
    pct = np.array([m.percentage for m in states])
    # no stored SOC: starts from the inverse OCV under load (sigma 0.3); the NN is trusted after its 60 s warm-up
    late = stamps - T0 > 80.0
    err = np.abs(pct - truth)[late]
    assert late.sum() > 100 and err.max() < 0.04, f"max SOC error {err.max():.3f} after 80 s"
    last = states[-1]
    assert 0.0 <= last.percentage <= 1.0
    assert last.design_capacity == pytest.approx(d.capacity_ah)
    assert np.isfinite(last.capacity) and last.capacity > 0
    assert last.power_supply_health == BatteryState.POWER_SUPPLY_HEALTH_GOOD
    soc_kv = diag_values(diags, "estimator: soc")
    assert soc_kv["method"] == "learned", soc_kv
    assert soc_kv["model"].startswith("soc_eta_nmc@")
    assert 0 < float(soc_kv["soc_sigma"]) < 0.05
    assert float(soc_kv["inference_ms"]) > 0
    assert diag_levels(diags, "estimator: soc")[-1] == 0
    assert diag_values(diags, "estimator: soh")
    assert all(st.hardware_id == "pack96-ref" for a in diags for st in a.status if st.name.startswith("estimator: so"))
    assert node.est.rejected == 0


def test_node_falls_back_on_corrupted_model_and_reports_it(harness: RosHarness, root: Path, tmp_path: Path) -> None:
    mdir = tmp_path / "models"
    shutil.copytree(root / "models", mdir)
    for f in mdir.glob("soc_eta_nmc_v*.onnx"):
        data = bytearray(f.read_bytes())
        data[-3] ^= 0xFF
        f.write_bytes(bytes(data))
    node, d, states, diags = _replay(harness, mdir, 30.0, initial_soc=float(d_soc0()))
    assert len(states) >= 150
    kv = diag_values(diags, "estimator: soc")
    assert kv["method"] == "classical" and "sha256 mismatch" in kv["fallback_reason"], kv
    assert diag_levels(diags, "estimator: soc")[-1] == 1        # WARN while on the fallback
    t_last = states[-1].header.stamp.sec + states[-1].header.stamp.nanosec * 1e-9 - T0
    assert abs(states[-1].percentage - np.interp(t_last, d.t, d.soc.mean(axis=1))) < 0.05


def d_soc0() -> float:
    return float(load_drive(DRIVE).soc[0].mean())


def test_node_never_publishes_nan_from_a_model_that_gives_nan(harness: RosHarness, tmp_path: Path) -> None:
    """A model that is NaN on every real input (fine on the smoke input): finite SOC, WARN with the reason, retired."""
    from bms_ai.models.manifest import write_manifest

    mdir = tmp_path / "models"
    mdir.mkdir()
    trap = trap_soc_model(mdir, "nan", 0.0, feature=7)     # NaN whenever the cell is above 0 degC
    write_manifest(mdir, [trap])
    node, d, states, diags = _replay(harness, mdir, 15.0, initial_soc=d_soc0())
    assert len(states) >= 75
    pct = np.array([m.percentage for m in states])
    assert np.isfinite(pct).all() and ((pct >= 0) & (pct <= 1)).all()
    kv = diag_values(diags, "estimator: soc")
    assert kv["method"] == "classical" and kv["model_fallback"] == "True", kv
    assert kv["fallback_reason"].startswith(f"{trap.name}@1 retired: output guard refused cells in 50 consecutive")
    assert "non-finite" in kv["fallback_reason"] and "non-finite" in kv["guard_last_reason"]
    assert kv["guard_rejected_steps"] == "50" and kv["guard_retirements"] == "1", kv
    assert diag_levels(diags, "estimator: soc")[-1] == 1        # WARN
    t_last = states[-1].header.stamp.sec + states[-1].header.stamp.nanosec * 1e-9 - T0
    assert abs(states[-1].percentage - np.interp(t_last, d.t, d.soc.mean(axis=1))) < 0.05


def test_node_hot_reloads_a_new_model_and_rejects_a_bad_one(harness: RosHarness, root: Path, tmp_path: Path) -> None:
    import json

    from bms_ai.models.manifest import read_manifest, write_manifest

    mdir = tmp_path / "models"
    mdir.mkdir()
    entries, _ = read_manifest(root / "models")
    nmc = next(e for e in entries if e.key == ("soc", "nmc"))
    shutil.copy(root / "models" / nmc.file, mdir / nmc.file)
    write_manifest(mdir, [nmc])
    d = load_drive(DRIVE)
    node = harness.add(EstimatorNode(context=harness.context, namespace="/bms", parameter_overrides=[
        Parameter("use_sim_time", value=True), Parameter("model_dir", value=str(mdir)),
        Parameter("capacity_ah", value=float(d.capacity_ah)), Parameter("model_poll_period", value=1.0)]))
    diags = harness.collect(DiagnosticArray, "/diagnostics")
    clock = harness.node.create_publisher(Clock, "/clock", PUB_QOS)
    meas = harness.node.create_publisher(BatteryState, "/bms/pack/measurements", PUB_QOS)
    assert harness.wait_for(lambda: meas.get_subscription_count() > 0 and clock.get_subscription_count() > 0)
    k = 0

    def play(seconds: float) -> None:
        nonlocal k
        for _ in range(int(seconds * 10)):
            t = T0 + float(d.t[k])
            clock.publish(Clock(clock=stamp_to_time(t)))
            meas.publish(sample_to_battery_state(PackSample(
                stamp=t, pack_voltage=float(np.sum(d.cell_v[k])), pack_current=float(d.current[k]),
                cell_voltages=d.cell_v[k], cell_temperatures=d.cell_t[k])))
            k += 1
            time.sleep(0.003)
        time.sleep(0.3)

    play(5.0)
    assert diag_values(diags, "estimator: soc")["model"] == f"{nmc.name}@{nmc.version}"
    # drop v2 (file first, then its sidecar entry)
    v2 = json.loads(json.dumps(nmc.to_dict()))
    v2["version"], v2["file"] = nmc.version + 1, f"{nmc.name}_v{nmc.version + 1}.onnx"
    shutil.copy(root / "models" / nmc.file, mdir / v2["file"])
    (mdir / (v2["file"] + ".json")).write_text(json.dumps(v2))
    play(5.0)
    assert diag_values(diags, "estimator: soc")["model"] == f"{nmc.name}@{nmc.version + 1}"
    # a bad v3 (hash mismatch) is rejected, v2 stays, estimates continue
    v3 = dict(v2, version=nmc.version + 2, file=f"{nmc.name}_v{nmc.version + 2}.onnx", sha256="0" * 64)
    shutil.copy(root / "models" / nmc.file, mdir / v3["file"])
    (mdir / (v3["file"] + ".json")).write_text(json.dumps(v3))
    steps = node.est.steps
    play(5.0)
    kv = diag_values(diags, "estimator: soc")
    assert kv["model"] == f"{nmc.name}@{nmc.version + 1}"
    assert "rejected" in kv["last_model_event"] and "sha256 mismatch" in kv["last_model_event"]
    assert kv["method"] == "learned" and node.est.steps > steps


# model_fallback (read by the fault monitor) and SOH/RUL diagnostics

def test_model_fallback_true_without_models(harness: RosHarness, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    node, _, states, diags = _replay(harness, tmp_path / "empty", 15.0)
    assert len(states) >= 75
    kv = diag_values(diags, "estimator: soc")
    assert kv["method"] == "classical"
    assert kv["model_fallback"] == "True", kv
    assert node.est.health.ocv is not None and node.est.health.rul_est is not None


def test_model_fallback_false_on_the_nn(harness: RosHarness, root: Path) -> None:
    node, _, _, diags = _replay(harness, root / "models", 120.0)
    kv = diag_values(diags, "estimator: soc")
    assert kv["method"] == "learned" and kv["model_fallback"] == "False", kv
    assert diag_values(diags, "estimator: rul")


def test_all_nan_measurements_hold_the_estimate(tmp_path):
    """After the bus goes silent can_bridge publishes aged-out NaN samples: SOC must not move."""
    import rclpy
    from rclpy.serialization import serialize_message

    from bms_ai.nodes.convert import sample_to_battery_state
    from bms_ai.nodes.estimator import EstimatorNode as Est
    from bms_ai.pack import PackSample

    def to_msg(s):  # what the node's raw subscription hands it
        return serialize_message(sample_to_battery_state(s))

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = Est(context=ctx, namespace="/bms")
    try:
        good = PackSample.empty(96, 32)
        good.cell_voltages[:] = 3.7
        good.cell_temperatures[:] = 25.0
        good.pack_current, good.pack_voltage = -10.0, 355.2
        for k in range(20):
            good.stamp = 100.0 + 0.1 * k
            node._on_meas(to_msg(good))
        soc_before, steps = node.est.last.soc, node.est.steps
        for k in range(20):
            lost = PackSample.empty(96, 32)
            lost.stamp = 110.0 + 0.1 * k
            node._on_meas(to_msg(lost))
        assert node.est.steps == steps and node.est.last.soc == soc_before
        assert node.est.rejected == 20 and "communication lost" in node.est.reject_reason
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)


def test_a_first_sample_without_the_current_then_a_clean_shutdown(tmp_path):
    """Seen in a composed-graph test: the bus's first sample without the current made the state NaN, and
    destroy_node raised when the state file refused it. That sample is now rejected and counted, the state
    saves; a state that still cannot be encoded is reported, never raised at shutdown."""
    import json

    import rclpy
    from rclpy.parameter import Parameter
    from rclpy.serialization import serialize_message

    from bms_ai.nodes.convert import sample_to_battery_state
    from bms_ai.nodes.estimator import EstimatorNode as Est
    from bms_ai.pack import PackSample

    state = tmp_path / "state.json"
    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    try:
        for broken in (False, True):
            node = Est(context=ctx, namespace="/bms", parameter_overrides=[Parameter("state_file", value=str(state))])
            s = PackSample.empty(96, 32)
            s.cell_voltages[:], s.cell_temperatures[:], s.pack_voltage = 3.7, 25.0, 355.2
            for k in range(10):
                s.stamp, s.pack_current = 100.0 + 0.1 * k, float("nan") if k == 0 else -10.0
                node._on_meas(serialize_message(sample_to_battery_state(s)))
            assert node.est.rejected == 1 and node.est.steps == 9 and 0.0 < node.est.last.soc < 1.0
            if broken:
                node.est.state_payload = lambda: {"soc": float("nan")}
            node.destroy_node()  # saves the state: raised ValueError before
            if broken:
                assert node.est.state_note.startswith("cannot save state: Out of range float")
            else:
                assert json.loads(state.read_text())  # a finite state, saved
    finally:
        rclpy.shutdown(context=ctx)


def test_library_health_codes_are_the_battery_state_codes() -> None:
    from bms_ai.estimation import status

    assert (status.HEALTH_UNKNOWN, status.HEALTH_GOOD, status.HEALTH_DEAD, status.HEALTH_UNSPEC_FAILURE) == (
        BatteryState.POWER_SUPPLY_HEALTH_UNKNOWN, BatteryState.POWER_SUPPLY_HEALTH_GOOD,
        BatteryState.POWER_SUPPLY_HEALTH_DEAD, BatteryState.POWER_SUPPLY_HEALTH_UNSPEC_FAILURE)
