"""`bms-ai run`: the graph in one process, parameters taking the types their nodes declare."""

from __future__ import annotations

import argparse
import threading
import time

import numpy as np
import pytest
from testutil import synthetic_messages

from bms_ai.cli import main
from bms_ai.graph import build_graph, coerce_parameter, graph_from_options, load_params_file, ros_type_name

pytestmark = pytest.mark.ros


def _feeder(bus, pack_config_path, seconds: float) -> threading.Thread:
    """A thread sending `seconds` of the synthetic pack onto a virtual bus, after the graph is up."""
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


def test_in_process_runner_on_virtual_bus(pack_config_path):
    """`bms-ai run` code path: GraphRunner builds nodes from the graph and they talk over DDS."""
    import can
    from sensor_msgs.msg import BatteryState

    from bms_ai.ros.runner import GraphRunner

    runner = GraphRunner(graph_from_options({"nodes": "can_bridge", "interface": "virtual", "channel": "runner"}))
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


def test_composed_graph_fires_its_timers_of_one_period_together(tmp_path):
    """The nodes of a composed graph are made hundreds of ms apart (the estimator loads its models); their
    periodic timers are restarted together once all exist, so each period's timers take one executor
    wake-up (BENCHMARKS.md, graph)."""
    from bms_ai.ros.runner import GraphRunner

    runner = GraphRunner(graph_from_options({"nodes": "can_bridge,estimator,fault_monitor,cloud_uploader",
                                             "interface": "virtual", "channel": "timers"},
                                            overrides={"cloud_uploader": {"spool_dir": str(tmp_path)}}))
    try:
        due: dict[int, list[int]] = {}
        for node in runner.nodes:
            for timer in node.timers:
                if not timer.is_canceled():
                    due.setdefault(timer.timer_period_ns, []).append(timer.time_until_next_call())
    finally:
        runner.shutdown()
    second = due[1_000_000_000]
    assert len(second) >= 4, due  # each node's diagnostics, and more
    assert max(second) - min(second) < 20_000_000, second  # due within 20 ms of each other


def test_composed_graph_hands_its_own_topics_to_its_readers_without_dds(pack_config_path, tmp_path):
    """In one process the bridge's thread steps the estimator and the fault monitor (bms_ai.nodes.local).

    None of them (nor the uploader) reads pack/measurements or battery_state through DDS, yet each takes
    every sample, the uploader through its inbox; a reader in another context still gets both topics
    through DDS; a local reader that raises is logged and counted, and the bridge goes on. The bridge's
    readers take a sample before DDS does (the estimator's battery_state does not wait for that write);
    battery_state goes to DDS before the estimator's local readers.
    """
    import can
    import rclpy
    from rclpy.context import Context
    from rclpy.node import Node
    from sensor_msgs.msg import BatteryState

    from bms_ai.nodes.common import make_executor, spin_executor
    from bms_ai.ros.runner import GraphRunner

    runner = GraphRunner(graph_from_options({"nodes": "can_bridge,estimator,fault_monitor,cloud_uploader",
                                             "params_file": "", "interface": "virtual", "channel": "local"},
                                            overrides={"cloud_uploader": {"spool_dir": str(tmp_path)}}))
    bridge, est, fm, up = (runner.node(n) for n in ("can_bridge", "estimator", "fault_monitor", "cloud_uploader"))
    dds_topics = {s.topic_name for n in (est, fm, up) for s in n.subscriptions}
    assert not dds_topics & {"/bms/pack/measurements", "/bms/battery_state"}, dds_topics
    assert [n for n, *_ in bridge.pub.local] == [est, fm, up] and [n for n, *_ in est.pub.local] == [fm, up]
    # a reader made once the graph runs (the uploader's for a topic whose type it learns late) is local too
    from bms_ai.nodes.local import graph_subscription

    late = []
    before = len(list(up.subscriptions))
    assert graph_subscription(up, BatteryState, "battery_state", late.append, 10) is True
    assert est.pub.local[-1][0] is up and len(list(up.subscriptions)) == before

    def broken(_data: bytes) -> None:
        raise ValueError("reader fault")

    bridge.pub.local.append((fm, broken, runner.local.lock_of(fm)))
    order: list[str] = []

    class Recorded:  # the DDS publisher, noting when it writes
        def __init__(self, pub, name: str) -> None:
            self.pub, self.name = pub, name

        def publish(self, data: bytes) -> None:
            order.append(self.name)
            self.pub.publish(data)

        def __getattr__(self, attr: str):
            return getattr(self.pub, attr)

    bridge.pub.dds, est.pub.dds = Recorded(bridge.pub.dds, "measurements to DDS"), Recorded(est.pub.dds,
                                                                                            "battery_state to DDS")
    est.pub.local.append((fm, lambda _d: order.append("battery_state to a local reader"), runner.local.lock_of(fm)))
    ctx = Context()
    rclpy.init(context=ctx)
    probe = Node("local_probe", context=ctx)
    got: dict[str, list] = {"pack/measurements": [], "battery_state": []}
    for topic, lst in got.items():
        probe.create_subscription(BatteryState, "/bms/" + topic, lst.append, 1000)
    pex = make_executor(ctx)
    pex.add_node(probe)
    stop = threading.Event()
    th = threading.Thread(target=spin_executor, args=(pex, ctx, stop.is_set), daemon=True)
    th.start()
    bus = can.Bus(interface="virtual", channel="local")
    try:
        assert runner.local.final and bridge.pub.get_subscription_count() >= 3  # the local readers count
        t = _feeder(bus, pack_config_path, 1.5)
        runner.spin(until=lambda: est.steps >= 10 and len(got["battery_state"]) >= 10, duration=15)
        t.join()
        # the inbox empties on the uploader's next DDS message or tick (silence samples keep coming meanwhile)
        seen = len(got["pack/measurements"]) + len(got["battery_state"])
        runner.spin(until=lambda: up.svc.recorder.stats.messages >= seen + 20, duration=10)
    finally:
        bus.shutdown()
        stop.set()
        th.join(5)
        probe.destroy_node()
        rclpy.shutdown(context=ctx)
        runner.shutdown()
    assert est.steps >= 10 and fm.monitor.steps >= 10 and 0.0 <= fm.monitor.soc <= 1.0  # both topics arrived
    assert len(late) == est.steps  # the late reader took every battery_state, on the estimator's thread
    assert len(got["pack/measurements"]) >= 10 and len(got["battery_state"]) >= 10
    assert runner.local.failures >= 10 and bridge.reader_failed == ""
    assert up.svc.recorder.stats.messages >= seen + 20 and up.inbox_dropped == 0
    pairs = [order[i:i + 3] for i, o in enumerate(order) if o == "battery_state to DDS"]
    assert len(pairs) >= 10 and all(p == ["battery_state to DDS", "battery_state to a local reader",
                                          "measurements to DDS"] for p in pairs), order[:12]


def test_two_packs_as_two_namespaces(pack_config_path):
    """Multiple packs = the same graph in two namespaces; topics stay apart."""
    import can
    from sensor_msgs.msg import BatteryState

    from bms_ai.ros.runner import GraphRunner

    specs = (build_graph("/pack_a", ["can_bridge"], {"can_bridge": {"interface": "virtual", "channel": "ns_a",
                                                                    "pack_id": "A"}})
             + build_graph("/pack_b", ["can_bridge"], {"can_bridge": {"interface": "virtual", "channel": "ns_b",
                                                                      "pack_id": "B"}}))
    runner = GraphRunner(specs)
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


def test_spin_goes_on_after_a_stop_and_raises_what_the_condition_raises(pack_config_path):
    """`spin` can be called again (a program checks something, then goes on); a failing condition is raised."""
    from bms_ai.ros.runner import GraphRunner

    runner = GraphRunner(build_graph("/spin", ["fault_monitor"]))
    try:
        for _ in range(2):
            calls = []
            runner.spin(until=lambda calls=calls: calls.append(1) or len(calls) >= 3, duration=10)
            assert len(calls) == 3

        def broken() -> bool:
            raise RuntimeError("watcher failed")

        with pytest.raises(RuntimeError, match="watcher failed"):
            runner.spin(until=broken, duration=10)
    finally:
        runner.shutdown()


def test_integers_for_double_parameters_become_doubles(tmp_path):
    """--set can_bridge.rate_hz=20 (the --help example) and `max_age: 2` in a params file both work."""
    from rclpy.parameter import Parameter

    from bms_ai.ros.runner import GraphRunner, add_arguments

    params = tmp_path / "p.yaml"
    params.write_text("/**/can_bridge:\n  ros__parameters:\n    max_age: 2\n")
    runner = GraphRunner(graph_from_options({"nodes": "can_bridge", "params_file": str(params), "interface": "virtual",
                                             "channel": "coerce", "set": "can_bridge.rate_hz=20"}))
    try:
        node = runner.node("can_bridge")
        rate, age = node.get_parameter("rate_hz"), node.get_parameter("max_age")
        assert (rate.value, rate.type_) == (20.0, Parameter.Type.DOUBLE)
        assert (age.value, age.type_) == (2.0, Parameter.Type.DOUBLE)
        assert node.sampler.period == pytest.approx(0.05) and node.sampler.max_age == 2.0
        described = node.describe_parameter("rate_hz")
        assert described.read_only and described.description  # the declared descriptor, not the probe's
    finally:
        runner.shutdown()
    parser = argparse.ArgumentParser(prog="bms-ai run")
    add_arguments(parser)
    assert "can_bridge.rate_hz=20" in " ".join(parser.format_help().split())


def test_the_help_example_runs(capsys):
    """`bms-ai run --set can_bridge.rate_hz=20` starts and stops cleanly."""
    rc = main(["run", "--nodes", "can_bridge", "--params", "", "--interface", "virtual", "--channel", "help",
               "--set", "can_bridge.rate_hz=20", "--duration", "0.3"])
    assert rc == 0, capsys.readouterr().err


@pytest.mark.parametrize(("extra", "says"), [
    (["--set", "can_bridge.rate_hz=fast"], "/bms/can_bridge: parameter rate_hz expects double, got 'fast' (string)"),
    (["--set", "can_bridge.rate_hx=20"], "/bms/can_bridge has no parameter rate_hx"),
    (["--set", "can_bridge.frame_id=[1, a]"], "/bms/can_bridge: parameter frame_id: "),
    (["--use-sim-time", "maybe"], "use_sim_time (--use-sim-time): expected a boolean"),
    (["--speed", "-2"], "replay_speed (--speed): expected a finite number >= 0"),
])
def test_bad_run_options_are_one_line_errors(capsys, extra, says):
    """A mistyped option or parameter stops `bms-ai run` with one line naming it, exit code 1."""
    rc = main(["run", "--nodes", "can_bridge", "--params", "", "--interface", "virtual", "--channel", "bad", *extra])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("bms-ai run")]
    assert rc == 1 and len(err) == 1 and says in err[0], err


def test_out_of_range_params_file_value_is_one_line_error(tmp_path, capsys):
    """A params file (not only --set) giving rate_hz: 0 stops at the node's declare(), one line naming it."""
    params = tmp_path / "p.yaml"
    params.write_text("/**:\n  ros__parameters:\n    rate_hz: 0\n")
    rc = main(["run", "--nodes", "fault_monitor", "--params", str(params), "--duration", "0.3"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("bms-ai run")]
    assert rc == 1 and err == ["bms-ai run: error: /bms/fault_monitor: parameter rate_hz must be > 0 and <= 1000, got 0.0"]


def _mismatches(runner, params_file) -> list[str]:
    """Keys of a params file that are no declared parameter of the node, or whose value has another type."""
    out = []
    for node in runner.nodes:
        for key, value in load_params_file(params_file, node.get_name(), node.get_namespace()).items():
            if not node.has_parameter(key):
                out.append(f"{node.get_name()}.{key}: not declared")
                continue
            declared = node.get_parameter(key).value
            try:
                ok = ros_type_name(coerce_parameter(key, value, declared)) == ros_type_name(declared)
            except ValueError:
                ok = False
            if not ok:
                out.append(f"{node.get_name()}.{key}: {value!r} is not {ros_type_name(declared)}")
    return out


def test_shipped_params_file_sets_only_declared_parameters(root, tmp_path):
    """Typo guard: every key in config/bms_ai.yaml is a declared parameter of its node, with the declared type."""
    from bms_ai.ros.demo import available_nodes
    from bms_ai.ros.runner import GraphRunner

    nodes, _missing = available_nodes()
    runner = GraphRunner(graph_from_options({"nodes": ",".join(nodes), "params_file": "",
                                             "set": f"'cloud_uploader.spool_dir={tmp_path / 'spool'}'"}))
    try:
        assert [n.get_name() for n in runner.nodes] == nodes
        shipped = root / "config" / "bms_ai.yaml"
        assert load_params_file(shipped, "can_bridge"), "the shipped file sets can_bridge's bus"
        assert _mismatches(runner, shipped) == []
        typo = tmp_path / "typo.yaml"
        typo.write_text("/**/can_bridge:\n  ros__parameters: {rate_hx: 10.0, channel: 5}\n"
                        "/**:\n  ros__parameters: {frame_id: battery}\n")
        found = _mismatches(runner, typo)
        assert "can_bridge.rate_hx: not declared" in found and "can_bridge.channel: 5 is not string" in found
        assert not any("frame_id" in f for f in found if f.startswith("can_bridge"))
    finally:
        runner.shutdown()


def test_two_packs_on_defaults_report_apart_on_diagnostics():
    """Two namespaces, both on the default pack id: status names carry the node, hardware ids the namespace."""
    from diagnostic_msgs.msg import DiagnosticArray

    from bms_ai.ros.runner import GraphRunner

    runner = GraphRunner(build_graph("/pack_a", ["fault_monitor"]) + build_graph("/pack_b", ["fault_monitor"]))
    seen: set[tuple[str, str]] = set()
    node = runner.nodes[0]
    sub = node.create_subscription(DiagnosticArray, "/diagnostics",
                                   lambda m: seen.update((s.name, s.hardware_id) for s in m.status), 50)
    want = {("fault_monitor: fault monitor", "pack_a/pack96-ref"), ("fault_monitor: fault monitor", "pack_b/pack96-ref")}
    try:
        runner.spin(until=lambda: want <= seen, duration=10)
    finally:
        node.destroy_subscription(sub)
        runner.shutdown()
    assert want <= seen and not any(name.startswith("bms_ai: ") for name, _ in seen)


def test_run_with_a_missing_can_log_is_one_line_exit_2(tmp_path, capsys):
    """`bms-ai run --can-log /nonexistent.blf`: a usage error in one line, no traceback."""
    code = main(["run", "--can-log", str(tmp_path / "nonexistent.blf"), "--duration", "1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == f"bms-ai run: error: CAN log not found: {tmp_path / 'nonexistent.blf'}"


def test_run_on_an_unreadable_can_log_fails_in_one_line(tmp_path, capsys):
    """A log the reader cannot open (random bytes named .blf) ends the run with exit 1, not a clean 0."""
    log = tmp_path / "damaged.blf"
    log.write_bytes(np.random.default_rng(1).bytes(4096))
    code = main(["run", "--can-log", str(log), "--duration", "3", "--speed", "0"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("bms-ai run: error: /bms/can_bridge: CAN reader stopped: LogError:")


def test_ctrl_c_twice_stops_the_run_cleanly(tmp_path):
    """Ctrl-C (then another, as an impatient user or launch does) ends `bms-ai run` with exit 0 and no
    traceback: the first signal stops the spin between callbacks, never inside one."""
    import os
    import signal
    import subprocess
    import sys

    env = dict(os.environ, ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST", PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, "-m", "bms_ai.cli", "run", "--nodes", "can_bridge,estimator,fault_monitor",
                          "--duration", "60"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env)
    try:
        line = ""
        while "bms-ai run: /" not in line:
            line = p.stderr.readline()
            assert line, "bms-ai run ended before it started spinning"
        time.sleep(1.0)
        p.send_signal(signal.SIGINT)
        time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        rc = p.wait(20)
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 0, err
    assert "Traceback" not in err and "FATAL" not in err and "KeyboardInterrupt" not in err, err


def test_fault_monitor_reads_its_own_packs_estimator_only():
    """The fault monitor takes the model-fallback flag from its own pack's estimator status on /diagnostics;
    another pack's statuses on the same topic are skipped without being decoded."""
    from bms_ai.ros.runner import GraphRunner

    specs = (build_graph("/bms", ["estimator", "fault_monitor"], {"estimator": {"use_models": False}})
             + build_graph("/pack_b", ["fault_monitor"]))
    runner = GraphRunner(specs)
    ours = next(n for n in runner.nodes if n.get_fully_qualified_name() == "/bms/fault_monitor")
    theirs = next(n for n in runner.nodes if n.get_fully_qualified_name() == "/pack_b/fault_monitor")
    try:
        runner.spin(until=lambda: ours.monitor.model_fallback is True, duration=15)
        runner.spin(duration=1.5)  # a few more rounds of /diagnostics
    finally:
        runner.shutdown()
    assert ours.monitor.model_fallback is True
    assert theirs.monitor.model_fallback is not True
