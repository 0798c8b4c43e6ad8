"""The graph is defined once: launch file and in-process runner both build from bms_ai.graph."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest
from canutil import synthetic_messages

from bms_ai.graph import build_graph, launch_node_kwargs, load_params_file, node_parameters


def test_build_graph_defaults_and_overrides(root):
    specs = build_graph()
    assert [s.name for s in specs] == ["can_bridge", "estimator", "fault_monitor", "cloud_uploader"]
    assert all(s.namespace == "/bms" for s in specs)
    specs = build_graph("pack2", ["can_bridge"], {"*": {"x": 1}, "can_bridge": {"channel": "can1"}}, use_sim_time=True)
    assert specs[0].fqn == "/pack2/can_bridge"
    assert specs[0].parameters == {"x": 1, "channel": "can1", "use_sim_time": True}
    with pytest.raises(ValueError, match="unknown node"):
        build_graph(nodes=["nope"])


def test_pack_config_sets_every_node(root):
    from bms_ai.graph import merge_overrides, pack_overrides

    o = merge_overrides(pack_overrides(root / "config" / "pack96_lfp.yaml"), {"estimator": {"capacity_ah": 40.0}})
    assert o["estimator"]["chemistry"] == "lfp" and o["fault_monitor"]["chemistry"] == "lfp"
    assert o["estimator"]["capacity_ah"] == 40.0 and o["fault_monitor"]["capacity_ah"] == 46.0
    assert o["can_bridge"]["pack_config"].endswith("pack96_lfp.yaml")
    assert len({o[n]["pack_id"] for n in ("estimator", "fault_monitor", "cloud_uploader")}) == 1


def test_params_file_wildcards_and_node_keys(tmp_path, root):
    p = tmp_path / "p.yaml"
    p.write_text("/**:\n  ros__parameters: {a: 1, b: 1}\n/**/can_bridge:\n  ros__parameters: {b: 2}\n"
                 "/other/can_bridge:\n  ros__parameters: {b: 3}\n")
    assert load_params_file(p, "can_bridge", "/bms") == {"a": 1, "b": 2}
    assert load_params_file(p, "can_bridge", "/other") == {"a": 1, "b": 3}
    assert load_params_file(p, "estimator") == {"a": 1, "b": 1}
    defaults = load_params_file(root / "config" / "bms_ai.yaml", "can_bridge")
    assert defaults["interface"] == "socketcan" and defaults["use_sim_time"] is False
    spec = build_graph(nodes=["can_bridge"], overrides={"can_bridge": {"interface": "virtual"}})[0]
    assert node_parameters(spec, root / "config" / "bms_ai.yaml")["interface"] == "virtual"


class _Recorder:
    def __init__(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def test_launch_file_composes_the_graph(root, monkeypatch):
    """Execute the real launch file against minimal stand-ins for launch/launch_ros.

    launch is not installable here (PyPI's `launch` is unrelated), so the
    stand-ins only record what the file builds; the node list and parameters
    must be exactly the graph's.
    """
    performed = {"namespace": "/pack7", "params_file": "/tmp/p.yaml", "interface": "socketcan",
                 "channel": "can3", "can_log": "", "use_sim_time": "false", "pack_config": "",
                 "nodes": "can_bridge,estimator", "respawn": "true"}

    class LaunchConfiguration:
        def __init__(self, name):
            self.name = name

        def perform(self, context):
            return performed[self.name]

    launch = types.ModuleType("launch")
    launch.LaunchDescription = lambda items: items
    actions = types.ModuleType("launch.actions")
    actions.DeclareLaunchArgument = _Recorder
    actions.OpaqueFunction = _Recorder
    subs = types.ModuleType("launch.substitutions")
    subs.LaunchConfiguration = LaunchConfiguration
    lros = types.ModuleType("launch_ros")
    lros_actions = types.ModuleType("launch_ros.actions")
    lros_actions.Node = _Recorder
    for name, mod in {"launch": launch, "launch.actions": actions, "launch.substitutions": subs,
                      "launch_ros": lros, "launch_ros.actions": lros_actions}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    ns: dict = {}
    src = Path(root / "launch" / "bms_ai.launch.py").read_text()
    exec(compile(src, "bms_ai.launch.py", "exec"), ns)
    items = ns["generate_launch_description"]()
    declared = {i.args[0] for i in items if i.args}
    assert {"namespace", "params_file", "interface", "channel", "use_sim_time", "nodes", "respawn"} <= declared
    nodes = items[-1].kwargs["function"](context=None)
    kw = [n.kwargs for n in nodes]
    expected = [launch_node_kwargs(s, "/tmp/p.yaml") for s in build_graph(
        "/pack7", ["can_bridge", "estimator"], {"can_bridge": {"interface": "socketcan", "channel": "can3"}},
        use_sim_time=False, respawn=True)]
    assert kw == expected
    assert kw[0]["executable"] == "can_bridge" and kw[0]["namespace"] == "/pack7" and kw[0]["respawn"] is True
    assert kw[0]["parameters"][0] == "/tmp/p.yaml"


def test_entry_points_match_graph(root):
    setup = (root / "setup.py").read_text()
    from bms_ai.graph import NODES

    for _name, exe, module in NODES:
        assert f'"{exe} = {module}:main"' in setup


def _feeder(bus, pack_config_path, seconds: float):
    """A thread sending `seconds` of the synthetic pack onto a virtual bus, after the graph is up."""
    import threading
    import time

    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.packconfig import load_pack_config

    def feed() -> None:
        time.sleep(0.3)
        for m in synthetic_messages(PackDecoder(load_pack_config(pack_config_path)), 0, seconds):
            bus.send(m)
            time.sleep(0.0005)

    t = threading.Thread(target=feed)
    t.start()
    return t


@pytest.mark.ros
def test_in_process_runner_on_virtual_bus(pack_config_path, root):
    """`bms-ai run` code path: GraphRunner builds nodes from the graph and they talk over DDS."""
    import can
    from sensor_msgs.msg import BatteryState

    from bms_ai.ros.runner import GraphRunner

    specs = build_graph(nodes=["can_bridge"], overrides={"can_bridge": {"interface": "virtual", "channel": "runner"}})
    runner = GraphRunner(specs, str(root / "config" / "bms_ai.yaml"))
    got = []
    probe = runner.nodes[0].create_subscription(BatteryState, "/bms/pack/measurements", got.append, 100)
    bus = can.Bus(interface="virtual", channel="runner")
    try:
        t = _feeder(bus, pack_config_path, 1.0)
        runner.spin(until=lambda: len(got) >= 3, duration=10)
        t.join()
    finally:
        bus.shutdown()
        runner.node("can_bridge").destroy_subscription(probe)
        runner.shutdown()
    assert len(got) >= 3 and len(got[-1].cell_voltage) == 96


@pytest.mark.ros
def test_two_packs_as_two_namespaces(pack_config_path, root):
    """Multiple packs = the same graph in two namespaces; topics stay apart."""

    import can
    from sensor_msgs.msg import BatteryState

    from bms_ai.ros.runner import GraphRunner

    specs = (build_graph("/pack_a", ["can_bridge"], {"can_bridge": {"interface": "virtual", "channel": "ns_a",
                                                                    "pack_id": "A"}})
             + build_graph("/pack_b", ["can_bridge"], {"can_bridge": {"interface": "virtual", "channel": "ns_b",
                                                                      "pack_id": "B"}}))
    runner = GraphRunner(specs, None)
    got: dict[str, list] = {"a": [], "b": []}
    node = runner.nodes[0]
    subs = [node.create_subscription(BatteryState, f"/pack_{k}/pack/measurements", got[k].append, 100) for k in got]
    bus = can.Bus(interface="virtual", channel="ns_a")  # only pack A has traffic
    try:
        t = _feeder(bus, pack_config_path, 0.6)
        runner.spin(until=lambda: len(got["a"]) >= 2, duration=10)
        t.join()
    finally:
        bus.shutdown()
        for s in subs:
            node.destroy_subscription(s)
        runner.shutdown()
    assert len(got["a"]) >= 2 and got["a"][-1].serial_number == "A"
    assert all(m.serial_number == "B" for m in got["b"])  # B is silent: only NaN watchdog samples, if any
    assert all(all(v != v for v in m.cell_voltage) for m in got["b"])
