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
