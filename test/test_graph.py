"""The graph is defined once: launch file and `bms-ai run` both build it from bms_ai.graph's option table."""

from __future__ import annotations

import shlex
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bms_ai.graph import (
    FALSE_WORDS,
    NODE_NAMES,
    OPTIONS,
    PARAMETER_LIMITS,
    TRUE_WORDS,
    build_graph,
    check_parameter,
    coerce_parameter,
    describe_limit,
    graph_from_options,
    launch_node_kwargs,
    load_params_file,
    node_parameters,
    parse_options,
    parse_sets,
    parse_value,
)


def test_build_graph_defaults_and_overrides():
    """Namespaces normalise, "*" reaches every node, a node the graph lacks is refused."""
    specs = build_graph()
    assert [s.name for s in specs] == ["can_bridge", "estimator", "fault_monitor", "cloud_uploader"]
    assert all(s.namespace == "/bms" for s in specs)
    specs = build_graph("pack2", ["can_bridge"], {"*": {"x": 1}, "can_bridge": {"channel": "can1"}}, use_sim_time=True)
    assert specs[0].fqn == "/pack2/can_bridge"
    assert specs[0].parameters == {"x": 1, "channel": "can1", "use_sim_time": True}
    with pytest.raises(ValueError, match="unknown node"):
        build_graph(nodes=["nope"])


def test_pack_config_sets_every_node(root):
    """One pack config makes every node agree on chemistry, capacity and pack id."""
    from bms_ai.graph import merge_overrides, pack_overrides

    o = merge_overrides(pack_overrides(root / "config" / "pack96_lfp.yaml"), {"estimator": {"capacity_ah": 40.0}})
    assert o["estimator"]["chemistry"] == "lfp" and o["fault_monitor"]["chemistry"] == "lfp"
    assert o["estimator"]["capacity_ah"] == 40.0 and o["fault_monitor"]["capacity_ah"] == 46.0
    assert o["can_bridge"]["pack_config"].endswith("pack96_lfp.yaml")
    assert len({o[n]["pack_id"] for n in ("estimator", "fault_monitor", "cloud_uploader")}) == 1


def test_params_file_wildcards_and_node_keys(tmp_path, root):
    """The runner reads a params file as ROS does: /** first, then the node's own keys, overrides on top."""
    p = tmp_path / "p.yaml"
    p.write_text("/**:\n  ros__parameters: {a: 1, b: 1}\n/**/can_bridge:\n  ros__parameters: {b: 2}\n"
                 "/other/can_bridge:\n  ros__parameters: {b: 3}\n")
    assert load_params_file(p, "can_bridge", "/bms") == {"a": 1, "b": 2}
    assert load_params_file(p, "can_bridge", "/other") == {"a": 1, "b": 3}
    assert load_params_file(p, "estimator") == {"a": 1, "b": 1}
    shipped = root / "config" / "bms_ai.yaml"
    assert load_params_file(shipped, "can_bridge") == {"interface": "socketcan", "channel": "can0"}
    spec = build_graph(nodes=["can_bridge"], overrides={"can_bridge": {"interface": "virtual"}}, params_file=shipped)[0]
    assert node_parameters(spec) == {"interface": "virtual", "channel": "can0"}
    with pytest.raises(FileNotFoundError, match="params file not found"):
        load_params_file(tmp_path / "missing.yaml", "can_bridge")


# ----------------------------------------------------------------------------- option values

def test_every_option_default_parses_and_gives_the_whole_graph():
    """The table's defaults are valid text: no launch argument and no run flag needs to be given."""
    values = parse_options({})
    assert values["nodes"] == list(NODE_NAMES) and values["namespace"] == "/bms" and values["replay_speed"] == 1.0
    assert values["use_sim_time"] is None and values["set"] == {} and values["respawn"] is False
    specs = graph_from_options({})
    assert [s.name for s in specs] == list(NODE_NAMES)
    assert all("use_sim_time" not in s.parameters for s in specs)  # no log: the params file decides
    assert all(s.params_file and s.params_file.endswith("bms_ai.yaml") for s in specs)
    assert all(o.name.isidentifier() and o.name.islower() for o in OPTIONS)
    flags = [f for o in OPTIONS if o.run for f in o.run_flags]
    assert len(flags) == len(set(flags))


@pytest.mark.parametrize("word", sorted(TRUE_WORDS | {w.upper() for w in TRUE_WORDS} | {"True", "Yes"}))
def test_true_words_as_ros_reads_them(word):
    """use_sim_time:=1 or :=True means true (once it silently meant false)."""
    specs = graph_from_options({"use_sim_time": word, "respawn": word, "nodes": "estimator"})
    assert specs[0].parameters["use_sim_time"] is True and specs[0].respawn is True


@pytest.mark.parametrize("word", sorted(FALSE_WORDS | {w.upper() for w in FALSE_WORDS} | {"False", "No"}))
def test_false_words_as_ros_reads_them(word):
    """Every spelling of false that ROS tools accept."""
    specs = graph_from_options({"use_sim_time": word, "respawn": word, "nodes": "estimator"})
    assert specs[0].parameters["use_sim_time"] is False and specs[0].respawn is False


@pytest.mark.parametrize(("options", "names"), [
    ({"use_sim_time": "maybe"}, "use_sim_time (--use-sim-time)"),
    ({"respawn": "2"}, "respawn"),
    ({"replay_speed": "fast"}, "replay_speed (--speed)"),
    ({"replay_speed": "-1"}, "replay_speed (--speed)"),
    ({"replay_speed": "nan"}, "replay_speed (--speed)"),
    ({"replay_speed": "1e-308"}, "replay_speed (--speed): expected 0 or >= 0.01"),   # a replay that never ends
    ({"duration": "inf"}, "duration (--duration)"),
    ({"nodes": "can_bridge,nope"}, "nodes (--nodes): unknown node(s) nope"),
    ({"nodes": " , "}, "nodes (--nodes): no node"),
    ({"namespace": "/9pack"}, "namespace (--namespace)"),
    ({"set": "can_bridge.rate_hz"}, "set (--set): expected NODE.PARAM=VALUE"),
    ({"set": "nope.x=1"}, "set (--set): unknown node 'nope'"),
    ({"set": "can_bridge.channel='can0"}, "set (--set)"),
    ({"speed": "2"}, "unknown option(s) speed"),
])
def test_bad_option_is_one_line_error_naming_it(options, names):
    """What a user mistyped is named in one line, never a traceback deep in a node."""
    with pytest.raises(ValueError) as exc:
        graph_from_options(options)
    msg = str(exc.value)
    assert names in msg and "\n" not in msg


def test_replay_puts_the_graph_on_sim_time_at_the_given_speed(tmp_path):
    """can_log: the replay publishes /clock and every node follows it, unless use_sim_time says otherwise."""
    log = str(tmp_path / "drive.blf")
    specs = graph_from_options({"can_log": log, "replay_speed": "0", "nodes": "can_bridge,estimator"})
    bridge = specs[0].parameters
    assert bridge["can_log"] == log and bridge["replay_speed"] == 0.0 and isinstance(bridge["replay_speed"], float)
    assert bridge["publish_clock"] is True and bridge["wait_for_subscribers"] == 1
    assert all(s.parameters["use_sim_time"] is True for s in specs)
    specs = graph_from_options({"can_log": log, "use_sim_time": "false", "nodes": "can_bridge"})
    assert specs[0].parameters["publish_clock"] is False and specs[0].parameters["use_sim_time"] is False


def test_set_is_the_most_specific_layer(root):
    """--set beats the pack config and interface/channel; values read as ros2 -p reads them."""
    specs = graph_from_options({"pack_config": str(root / "config" / "pack96_lfp.yaml"), "interface": "virtual",
                                "set": "estimator.chemistry=nmc can_bridge.interface=socketcan '*.frame_id=b 1'"})
    p = {s.name: s.parameters for s in specs}
    assert p["estimator"]["chemistry"] == "nmc" and p["fault_monitor"]["chemistry"] == "lfp"
    assert p["can_bridge"]["interface"] == "socketcan"
    assert all(p[n]["frame_id"] == "b 1" for n in NODE_NAMES)


@pytest.mark.parametrize(("raw", "value"), [
    ("20", 20), ("20.5", 20.5), ("1e3", 1000.0), ("true", True), ("False", False), ("can0", "can0"),
    ("'123'", "123"), ("", ""), ("null", "null"), ('{"bitrate": 500000}', '{"bitrate": 500000}'),
    ("[1, 2.5]", [1.0, 2.5]), ("[a, b]", ["a", "b"]), ("[1, 2]", [1, 2]),
])
def test_set_values_read_as_ros_reads_them(raw, value):
    """YAML like `ros2 run -p`, except text that no ROS parameter could hold as a mapping or null."""
    got = parse_value(raw)
    assert got == value and type(got) is type(value)
    assert parse_sets(shlex.quote(f"can_bridge.x={raw}"))["can_bridge"]["x"] == value


# ----------------------------------------------------------------------------- declared types

@given(st.integers(min_value=-(2**53), max_value=2**53))
def test_an_integer_for_a_double_parameter_becomes_a_double(i):
    """rate_hz:=20 for a double: the widening every ROS user expects."""
    got = coerce_parameter("rate_hz", i, 10.0)
    assert type(got) is float and got == i


@given(st.one_of(st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5),
                 st.lists(st.text(max_size=3), max_size=3)))
def test_a_value_of_the_declared_type_passes_unchanged(value):
    """Coercion never alters a value that already has the declared type."""
    assert coerce_parameter("p", value, value) == value


@pytest.mark.parametrize(("value", "default", "says"), [
    ("abc", 10.0, "expects double, got 'abc' (string)"),
    (1.5, 10, "expects integer, got 1.5 (double)"),
    (True, 10, "expects integer, got True (bool)"),
    (1, True, "expects bool, got 1 (integer)"),
    (123, "can0", "expects string, got 123 (integer) (quote it to pass text)"),
    ("a", [""], "expects string_array, got 'a' (string)"),
    ([1, "a"], [1.0], "expects double, got 'a' (string)"),
])
def test_a_value_of_another_type_is_one_line_error(value, default, says):
    """Rejected with the parameter's name and both types, in one line."""
    with pytest.raises(ValueError, match="parameter p ") as exc:
        coerce_parameter("p", value, default)
    assert says in str(exc.value) and "\n" not in str(exc.value)


def test_integer_lists_for_double_arrays():
    """Element-wise widening for arrays; an empty list passes for any array type."""
    assert coerce_parameter("p", [1, 2], [0.5]) == [1.0, 2.0]
    assert coerce_parameter("p", [], [""]) == []


# ----------------------------------------------------------------------------- launch file

class _Recorded:
    """What a stand-in action was built with."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs


class _DeclareLaunchArgument(_Recorded):
    def __init__(self, name, *, default_value=None, description=None, choices=None, **kwargs) -> None:
        assert isinstance(default_value, str), f"{name}: launch defaults are text"
        super().__init__(name=name, default_value=default_value, description=description)


class _OpaqueFunction(_Recorded):
    def __init__(self, *, function, args=None, kwargs=None) -> None:
        super().__init__(function=function)


class _LaunchConfiguration:
    def __init__(self, variable_name, *, default=None) -> None:
        self.variable_name = variable_name

    def perform(self, context) -> str:
        return context.launch_configurations[self.variable_name]  # KeyError for an undeclared argument


_PARAM_VALUE_TYPES = (str, int, float, bool)


class _Node(_Recorded):
    """launch_ros.actions.Node's keyword-only signature; ExecuteProcess takes the rest."""

    def __init__(self, *, executable, package=None, name=None, namespace=None, exec_name=None, parameters=None,
                 remappings=None, ros_arguments=None, arguments=None, output="log", emulate_tty=False,
                 respawn=False, respawn_delay=None) -> None:
        for p in parameters or []:  # launch_ros accepts params file paths and flat dicts of ROS values
            assert isinstance(p, (str, Path, dict)), p
            if isinstance(p, dict):
                for k, v in p.items():
                    items = v if isinstance(v, list) else [v]
                    assert all(isinstance(x, _PARAM_VALUE_TYPES) for x in items), (k, v)
        super().__init__(executable=executable, package=package, name=name, namespace=namespace,
                         parameters=parameters, remappings=remappings, output=output, emulate_tty=emulate_tty,
                         **({"respawn": respawn, "respawn_delay": respawn_delay} if respawn else {}))


def _ros2_launch(root, monkeypatch, command_line: dict[str, str]) -> tuple[list, list]:
    """Run the real launch file as `ros2 launch` would: declared defaults, then name:=value from the command line.

    launch/launch_ros are not installable here (PyPI's `launch` is unrelated), so
    stand-ins with their real keyword signatures record what the file builds.
    """
    launch = types.ModuleType("launch")
    launch.LaunchDescription = lambda items: items
    actions = types.ModuleType("launch.actions")
    actions.DeclareLaunchArgument = _DeclareLaunchArgument
    actions.OpaqueFunction = _OpaqueFunction
    subs = types.ModuleType("launch.substitutions")
    subs.LaunchConfiguration = _LaunchConfiguration
    lros = types.ModuleType("launch_ros")
    lros_actions = types.ModuleType("launch_ros.actions")
    lros_actions.Node = _Node
    for name, mod in {"launch": launch, "launch.actions": actions, "launch.substitutions": subs,
                      "launch_ros": lros, "launch_ros.actions": lros_actions}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    ns: dict = {}
    src = Path(root / "launch" / "bms_ai.launch.py").read_text()
    exec(compile(src, "bms_ai.launch.py", "exec"), ns)
    items = ns["generate_launch_description"]()
    declared = [i for i in items if isinstance(i, _DeclareLaunchArgument)]
    unknown = set(command_line) - {d.kwargs["name"] for d in declared}
    assert not unknown, f"ros2 launch would refuse undeclared arguments {unknown}"
    context = SimpleNamespace(launch_configurations=dict(command_line))
    for d in declared:
        context.launch_configurations.setdefault(d.kwargs["name"], d.kwargs["default_value"])
    opaque = [i for i in items if isinstance(i, _OpaqueFunction)]
    assert len(opaque) == 1 and items[-1] is opaque[0]
    return declared, opaque[0].kwargs["function"](context)


def test_launch_arguments_are_the_option_table(root, monkeypatch):
    """Every launch argument is a row of graph.OPTIONS with the same default, replay_speed and set included."""
    declared, nodes = _ros2_launch(root, monkeypatch, {})
    assert [(d.kwargs["name"], d.kwargs["default_value"]) for d in declared] == \
        [(o.name, o.default) for o in OPTIONS if o.launch]
    assert {"replay_speed", "set", "use_sim_time", "respawn", "pack_config"} <= {d.kwargs["name"] for d in declared}
    assert [n.kwargs for n in nodes] == [launch_node_kwargs(s) for s in graph_from_options({})]


def test_launch_file_composes_the_graph(root, monkeypatch):
    """ros2 launch ... name:=value gives exactly the graph graph_from_options builds, values typed as ROS reads them."""
    line = {"namespace": "/pack7", "params_file": "/tmp/p.yaml", "interface": "socketcan", "channel": "can3",
            "can_log": "/logs/drive.blf", "replay_speed": "0", "use_sim_time": "1",
            "nodes": "can_bridge,estimator", "respawn": "true", "set": "can_bridge.rate_hz=20 estimator.efc0=3"}
    _declared, nodes = _ros2_launch(root, monkeypatch, line)
    kw = [n.kwargs for n in nodes]
    assert kw == [launch_node_kwargs(s) for s in graph_from_options(line)]
    assert [k["executable"] for k in kw] == ["can_bridge", "estimator"]
    assert all(k["namespace"] == "/pack7" and k["respawn"] is True for k in kw)
    bridge = kw[0]["parameters"]
    assert bridge[0] == "/tmp/p.yaml"
    assert bridge[1] == {"interface": "socketcan", "channel": "can3", "can_log": "/logs/drive.blf",
                         "replay_speed": 0.0, "publish_clock": True, "wait_for_subscribers": 1, "rate_hz": 20,
                         "use_sim_time": True}
    assert kw[1]["parameters"][1] == {"efc0": 3, "use_sim_time": True, "state_file": ""}  # a replay keeps no state


def test_launch_and_run_build_the_same_graph(root, monkeypatch):
    """The same choices spelled as launch arguments and as `bms-ai run` flags give the same nodes."""
    from bms_ai.cli import build_parser
    from bms_ai.ros.runner import options_from_args

    argv = ["run", "--namespace", "pack3", "--params", "", "--can-log", "/logs/d.blf", "--speed", "0.5",
            "--use-sim-time", "yes", "--nodes", "can_bridge,fault_monitor", "--set", "can_bridge.rate_hz=20",
            "--set", "fault_monitor.limits_file=/etc/my limits.yaml", "--duration", "3"]
    args = build_parser(only="run").parse_args(argv)
    from_run = graph_from_options(options_from_args(args))
    line = {"namespace": "pack3", "params_file": "", "can_log": "/logs/d.blf", "replay_speed": "0.5",
            "use_sim_time": "yes", "nodes": "can_bridge,fault_monitor",
            "set": "can_bridge.rate_hz=20 'fault_monitor.limits_file=/etc/my limits.yaml'"}
    _declared, nodes = _ros2_launch(root, monkeypatch, line)
    assert [n.kwargs for n in nodes] == [launch_node_kwargs(s) for s in from_run]
    assert from_run[1].parameters["limits_file"] == "/etc/my limits.yaml"
    assert parse_options(options_from_args(args))["duration"] == 3.0


def test_entry_points_match_graph(root):
    """Every node of the graph is an installed console script (ros2 run / launch find it)."""
    setup = (root / "setup.py").read_text()
    from bms_ai.graph import NODES

    for _name, exe, module in NODES:
        assert f'"{exe} = {module}:main"' in setup


# ----------------------------------------------------------------------------- parameter limits

@pytest.mark.parametrize(("item", "says"), [
    ("can_bridge.rate_hz=0.0", "can_bridge: parameter rate_hz must be > 0 and <= 1000, got 0.0"),
    ("can_bridge.rate_hz=-5", "parameter rate_hz must be > 0"),
    ("can_bridge.rate_hz=nan", "parameter rate_hz must be a finite number, got nan"),
    ("fault_monitor.rate_hz=0", "fault_monitor: parameter rate_hz must be > 0"),
    ("estimator.initial_soc=1.5", "estimator: parameter initial_soc must be <= 1, got 1.5"),
    ("estimator.efc0=inf", "parameter efc0 must be a finite number"),
    ("*.stale_after=0", "*: parameter stale_after must be > 0"),
    ("can_bridge.replay_speed=1e-9", "can_bridge: parameter replay_speed must be 0 or >= 0.01, got 1e-09"),
])
def test_out_of_range_set_values_stop_the_graph_before_it_starts(item, says):
    """rate_hz=0.0 would divide by zero in can_bridge: one line naming node, parameter and span instead."""
    with pytest.raises(ValueError) as ei:
        graph_from_options({"set": item})
    assert str(ei.value).startswith("set (--set): ") and says in str(ei.value) and "\n" not in str(ei.value)


def test_in_range_values_pass_unchanged():
    """The --help example and the boundary values that are allowed."""
    specs = graph_from_options({"set": "can_bridge.rate_hz=20 estimator.initial_soc=1 can_bridge.replay_speed=0"})
    assert {s.name: s.parameters for s in specs}["can_bridge"]["rate_hz"] == 20
    assert check_parameter("rate_hz", 1000.0) == 1000.0 and check_parameter("initial_soc", -1.0) == -1.0
    assert check_parameter("topics", ["a=b"]) == ["a=b"] and check_parameter("replay_loop", True) is True
    assert check_parameter("replay_speed", 0.0) == 0.0 and check_parameter("replay_speed", 0.01) == 0.01
    assert describe_limit("rate_hz", "rate") == "rate (range: > 0 and <= 1000)"
    assert describe_limit("frame_id", "frame") == "frame"
    assert all(lim.text for lim in PARAMETER_LIMITS.values())


def test_cli_run_with_zero_rate_is_one_line_error(capsys):
    """`bms-ai run --set can_bridge.rate_hz=0.0`: exit 1 and one line, no ZeroDivisionError traceback."""
    from bms_ai.cli import main

    rc = main(["run", "--nodes", "can_bridge", "--params", "", "--set", "can_bridge.rate_hz=0.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and err == ["bms-ai run: error: set (--set): can_bridge: parameter rate_hz must be > 0 and <= 1000, "
                               "got 0.0"]


def test_hardware_id_is_unique_per_namespace():
    """The default namespace keeps the pack id; any other qualifies it, so two packs never share one."""
    from bms_ai.graph import pack_hardware_id

    assert pack_hardware_id("pack96-ref", "/bms") == "pack96-ref" == pack_hardware_id("pack96-ref", "/")
    ids = {pack_hardware_id("pack96-ref", ns) for ns in ("/bms", "/pack_a", "/pack_b", "/fleet/pack_a")}
    assert ids == {"pack96-ref", "pack_a/pack96-ref", "pack_b/pack96-ref", "fleet/pack_a/pack96-ref"}


def test_spool_is_one_per_namespace():
    """Packs in other namespaces get a sub-folder of the spool dir, so two packs never share a spool."""
    from bms_ai.graph import pack_spool_dir

    assert pack_spool_dir("/var/spool", "/bms") == "/var/spool" == pack_spool_dir("/var/spool", "/")
    dirs = {pack_spool_dir("/var/spool", ns) for ns in ("/bms", "/pack_a", "/pack_b", "/fleet/pack_a")}
    assert dirs == {"/var/spool", "/var/spool/pack_a", "/var/spool/pack_b", "/var/spool/fleet/pack_a"}


def test_status_names_follow_diagnostic_updater():
    """``<node>: <check>`` both ways; a name without a node part has none."""
    from bms_ai.core.levels import split_status_name, status_name

    assert status_name("estimator", "soc") == "estimator: soc"
    assert split_status_name("fault_monitor: cell overvoltage") == ("fault_monitor", "cell overvoltage")
    assert split_status_name("plain") == ("", "plain") and split_status_name(": x") == ("", ": x")
