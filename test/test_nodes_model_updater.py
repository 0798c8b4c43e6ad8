"""model_updater node with the estimator on real rclpy: a published model reaches the estimator; a tampered one does not.

Also: the node is an optional part of the graph, started when its repo_url is set.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from testutil import RosHarness, diag_levels, diag_values

from bms_ai.core.levels import OK, WARN
from bms_ai.graph import OPTIONAL_NODES, graph_from_options

EST = "estimator: soc"
UPD = "model_updater: updates"


@pytest.fixture
def fleet(tmp_path: Path):
    from test_fleet_updater import Fleet

    f = Fleet(tmp_path)
    yield f
    f.close()


@pytest.mark.ros
def test_published_model_reaches_the_estimator_and_a_tampered_one_does_not(fleet, tmp_path: Path) -> None:
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.parameter import Parameter

    from bms_ai.nodes.estimator import EstimatorNode
    from bms_ai.nodes.model_updater import ModelUpdaterNode

    h = RosHarness()
    try:
        diags = h.collect(DiagnosticArray, "/diagnostics")
        h.add(EstimatorNode(context=h.context, namespace="/bms", parameter_overrides=[
            Parameter("model_dir", value=str(fleet.model_dir)), Parameter("model_poll_period", value=0.5)]))
        upd = h.add(ModelUpdaterNode(context=h.context, namespace="/bms", parameter_overrides=[
            Parameter("repo_url", value=fleet.url), Parameter("trusted_root", value=str(fleet.root_file)),
            Parameter("model_dir", value=str(fleet.model_dir)), Parameter("period", value=0.5)]))
        assert h.wait_for(lambda: diag_values(diags, EST).get("model") == "soc_eta_nmc@1"
                          and int(diag_values(diags, UPD).get("polls", 0)) >= 1, timeout=15)
        assert diag_levels(diags, UPD)[-1] == OK
        # the fleet publishes v2: the updater installs it, the estimator hot-swaps to it
        fleet.publish(2)
        assert h.wait_for(lambda: diag_values(diags, EST).get("model") == "soc_eta_nmc@2", timeout=15), \
            diag_values(diags, EST)
        kv = diag_values(diags, UPD)
        assert h.wait_for(lambda: diag_values(diags, UPD).get("installed") == "soc/nmc=soc_eta_nmc@2", timeout=5)
        assert diag_values(diags, UPD)["rejected"] == "0" and diag_levels(diags, UPD)[-1] == OK, kv
        # v3 is tampered with on the server: rejected (WARN with the reason), the estimator keeps v2
        entry = fleet.publish(3)
        served = next(fleet.pub.targets_dir.glob(f"*.{entry.file}"))
        served.write_bytes(served.read_bytes()[:-8] + b"\0" * 8)
        assert h.wait_for(lambda: int(diag_values(diags, UPD).get("rejected_tampered", 0)) >= 1, timeout=15)
        assert h.wait_for(lambda: diag_levels(diags, UPD)[-1] == WARN, timeout=5)
        kv = diag_values(diags, UPD)
        assert entry.file in kv["last_reason"] and "hash" in kv["last_reason"], kv
        assert diag_values(diags, EST)["model"] == "soc_eta_nmc@2"
        assert entry.file not in {p.name for p in fleet.model_dir.iterdir()}
        assert upd.polls >= 3
    finally:
        h.close()


@pytest.mark.ros
def test_without_repo_url_the_node_only_reports_disabled(tmp_path: Path) -> None:
    from diagnostic_msgs.msg import DiagnosticArray

    from bms_ai.nodes.model_updater import ModelUpdaterNode

    h = RosHarness()
    try:
        diags = h.collect(DiagnosticArray, "/diagnostics")
        node = h.add(ModelUpdaterNode(context=h.context, namespace="/bms"))
        assert h.wait_for(lambda: bool(diag_values(diags, UPD)), timeout=10)
        assert diag_levels(diags, UPD)[-1] == OK and node.polls == 0
    finally:
        h.close()


def test_graph_starts_model_updater_only_when_configured(root: Path, tmp_path: Path) -> None:
    names = [s.name for s in graph_from_options({})]
    assert "model_updater" not in names
    specs = graph_from_options({"set": "model_updater.repo_url=http://127.0.0.1:8080"})
    assert [s.name for s in specs][-1] == "model_updater"
    assert specs[-1].parameters["repo_url"] == "http://127.0.0.1:8080"
    params = tmp_path / "params.yaml"
    params.write_text("/**:\n  ros__parameters:\n    pack_id: p\nmodel_updater:\n  ros__parameters:\n"
                      "    repo_url: http://127.0.0.1:8080\n")
    assert "model_updater" in [s.name for s in graph_from_options({"params_file": str(params)})]
    # an explicit node list is taken as it is
    assert [s.name for s in graph_from_options({"params_file": str(params), "nodes": "estimator"})] == ["estimator"]
    assert [s.name for s in graph_from_options({"nodes": "estimator,model_updater"})] == ["estimator", "model_updater"]
    with pytest.raises(ValueError, match="parameter period must be > 0"):
        graph_from_options({"set": "model_updater.period=0"})
    setup = (root / "setup.py").read_text()
    for _name, exe, module in OPTIONAL_NODES:
        assert f'"{exe} = {module}:main"' in setup
