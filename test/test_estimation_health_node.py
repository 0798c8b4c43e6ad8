"""estimator node: `model_fallback` in `bms_ai: soc` (read by the fault monitor) and SOH/RUL diagnostics."""

from __future__ import annotations

from pathlib import Path

import pytest
from rosutil import RosHarness, diag_values
from test_estimation_node import _replay


@pytest.fixture
def harness():
    h = RosHarness()
    yield h
    h.close()


def test_model_fallback_true_without_models(harness: RosHarness, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    node, _, states, diags = _replay(harness, tmp_path / "empty", 15.0)
    assert len(states) >= 75
    kv = diag_values(diags, "bms_ai: soc")
    assert kv["method"] == "ekf"
    assert kv["model_fallback"] == "True", kv
    assert node.health.ocv is not None and node.health.rul_est is not None


def test_model_fallback_false_on_the_nn(harness: RosHarness, root: Path) -> None:
    node, _, _, diags = _replay(harness, root / "models", 120.0)
    kv = diag_values(diags, "bms_ai: soc")
    assert kv["method"] == "nn+cc" and kv["model_fallback"] == "False", kv
    assert diag_values(diags, "bms_ai: rul")


def test_all_nan_measurements_hold_the_estimate(tmp_path):
    """After the bus goes silent can_bridge publishes aged-out NaN samples: SOC must not move."""
    import rclpy

    from bms_ai.nodes.convert import sample_to_battery_state as to_msg
    from bms_ai.nodes.estimator import EstimatorNode as Est
    from bms_ai.pack import PackSample as PS

    ctx = rclpy.Context()
    rclpy.init(context=ctx)
    node = Est(context=ctx, namespace="/bms")
    try:
        good = PS.empty(96, 32)
        good.cell_voltages[:] = 3.7
        good.cell_temperatures[:] = 25.0
        good.pack_current, good.pack_voltage = -10.0, 355.2
        for k in range(20):
            good.stamp = 100.0 + 0.1 * k
            node._on_meas(to_msg(good))
        soc_before, steps = node.last.soc, node.steps
        for k in range(20):
            lost = PS.empty(96, 32)
            lost.stamp = 110.0 + 0.1 * k
            node._on_meas(to_msg(lost))
        assert node.steps == steps and node.last.soc == soc_before
        assert node.rejected == 20 and "communication lost" in node.reject_reason
    finally:
        node.destroy_node()
        rclpy.shutdown(context=ctx)
