"""The node graph, defined once: used by launch/bms_ai.launch.py and by `bms-ai run`.

``OPTIONS`` is the one table of graph options: each row is a launch argument
(``name:=value``) and a `bms-ai run` flag with the same default, and
:func:`graph_from_options` is the one function that turns their text into the
nodes to start. Values are read as ROS reads them (booleans ``true/false/1/0/
yes/no/on/off``, parameter values as YAML); a bad value is a one-line
ValueError naming the option.

Neither ``launch`` nor rclpy is imported here, so the graph can be built and
tested anywhere.
"""

from __future__ import annotations

import math
import os
import shlex
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bms_ai.core.cliargs import MIN_REPLAY_SPEED
from bms_ai.core.paths import share_path
from bms_ai.core.yamlfile import load_yaml

# (name, console script / executable, module exposing NODE_CLASS)
NODES: tuple[tuple[str, str, str], ...] = (
    ("can_bridge", "can_bridge", "bms_ai.nodes.can_bridge"),
    ("estimator", "estimator", "bms_ai.nodes.estimator"),
    ("fault_monitor", "fault_monitor", "bms_ai.nodes.fault_monitor"),
    ("cloud_uploader", "cloud_uploader", "bms_ai.nodes.cloud_uploader"),
)
NODE_NAMES: tuple[str, ...] = tuple(n for n, _, _ in NODES)
# Started when named in ``nodes``, or with the default graph when the parameter that enables them is configured
# (``set`` or the params file): model_updater runs when it has a repo_url.
OPTIONAL_NODES: tuple[tuple[str, str, str], ...] = (
    ("model_updater", "model_updater", "bms_ai.nodes.model_updater"),
)
ENABLED_BY: dict[str, str] = {"model_updater": "repo_url"}
ALL_NODES = NODES + OPTIONAL_NODES
ALL_NODE_NAMES: tuple[str, ...] = tuple(n for n, _, _ in ALL_NODES)
DEFAULT_NAMESPACE = "/bms"


def default_params_file() -> Path:
    """The shipped params file: this deployment's choices on top of the declared defaults."""
    return share_path("config", "bms_ai.yaml")


@dataclass(frozen=True)
class NodeSpec:
    """One node to start: where, and which parameters it gets on top of its params file."""

    name: str
    executable: str
    module: str
    namespace: str
    parameters: dict[str, Any] = field(default_factory=dict)  # overrides on top of the params file
    remappings: tuple[tuple[str, str], ...] = ()
    respawn: bool = False
    params_file: str | None = None

    @property
    def fqn(self) -> str:
        """Fully qualified node name, as ROS tools show it."""
        return f"{self.namespace.rstrip('/')}/{self.name}"


# ----------------------------------------------------------------------------- option values

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


def parse_bool(text: str, name: str) -> bool:
    """A boolean as ROS tools accept it (launch conditions, YAML 1.1), case-insensitive."""
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ValueError(f"{name}: expected a boolean (true/false, 1/0, yes/no, on/off), got {text!r}")


def parse_optional_bool(text: str, name: str) -> bool | None:
    """Like :func:`parse_bool`, but empty text means "not given" (None)."""
    return None if not text.strip() else parse_bool(text, name)


def parse_seconds(text: str, name: str) -> float:
    """A finite number >= 0 (durations, replay speed factors)."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}: expected a number, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: expected a finite number >= 0, got {text!r}")
    return value


def parse_speed(text: str, name: str) -> float:
    """A replay speed factor: 0 (as fast as possible) or within ``PARAMETER_LIMITS['replay_speed']``."""
    value = parse_seconds(text, name)
    limit = PARAMETER_LIMITS["replay_speed"]
    if not limit.holds(value):
        raise ValueError(f"{name}: expected {limit.text}, got {text!r}")
    return value


def parse_text(text: str, name: str) -> str:
    """Text as given, surrounding blanks removed."""
    return text.strip()


def parse_namespace(text: str, name: str) -> str:
    """An absolute namespace; ``pack2`` and ``/pack2/`` both mean ``/pack2``."""
    ns = text.strip().strip("/")
    if ns and not all(part and (part[0].isalpha() or part[0] == "_") and part.replace("_", "").isalnum()
                      for part in ns.split("/")):
        raise ValueError(f"{name}: not a ROS namespace: {text!r}")
    return "/" + ns


def parse_node_list(text: str, name: str) -> list[str]:
    """Comma-separated node names of the graph, at least one."""
    nodes = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in nodes if n not in ALL_NODE_NAMES]
    if bad:
        raise ValueError(f"{name}: unknown node(s) {', '.join(bad)}; the graph has {', '.join(ALL_NODE_NAMES)}")
    if not nodes:
        raise ValueError(f"{name}: no node to start; the graph has {', '.join(ALL_NODE_NAMES)}")
    return nodes


def parse_value(raw: str) -> Any:
    """A parameter value written on a command line, read as ``ros2 run ... -p name:=value`` reads it.

    YAML, plus what ROS's parameter parser adds: unquoted ``1e3`` is a double.
    Text that YAML would make a mapping or null stays text (a ROS parameter is
    neither), so JSON-valued string parameters such as ``bus_options`` work
    unquoted; a list of numbers with any float in it is a list of floats.
    """
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if value is None or isinstance(value, dict):
        return raw
    if isinstance(value, str) and value == raw.strip():  # unquoted text: a number in C notation is one
        try:
            return float(value)
        except ValueError:
            return value
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                 for v in value) and any(isinstance(v, float) for v in value):
        return [float(v) for v in value]
    return value


def parse_sets(text: str, name: str = "set") -> dict[str, dict[str, Any]]:
    """``NODE.PARAM=VALUE`` items (shell-quoted, space-separated) -> overrides per node (``*`` = every node)."""
    try:
        items = shlex.split(text)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        node, dot, param = key.partition(".")
        if not sep or not dot or not node or not param:
            raise ValueError(f"{name}: expected NODE.PARAM=VALUE, got {item!r}")
        if node != "*" and node not in ALL_NODE_NAMES:
            raise ValueError(f"{name}: unknown node {node!r} in {item!r}; the graph has {', '.join(ALL_NODE_NAMES)}")
        out.setdefault(node, {})[param] = parse_value(raw)
    return out


# ----------------------------------------------------------------------------- the option table

@dataclass(frozen=True)
class Option:
    """One graph option: launch argument ``name:=value`` and `bms-ai run` flag(s), one default, one parser."""

    name: str
    default: str
    help: str
    parse: Callable[[str, str], Any] = parse_text
    flags: tuple[str, ...] = ()  # bms-ai run flags; () = --name-with-dashes
    launch: bool = True  # a launch argument
    run: bool = True  # a bms-ai run option
    repeat: bool = False  # bms-ai run: the flag may be given several times (items joined shell-quoted)

    @property
    def run_flags(self) -> tuple[str, ...]:
        """The `bms-ai run` spelling(s); the first one is the documented one."""
        return self.flags or ("--" + self.name.replace("_", "-"),)

    @property
    def label(self) -> str:
        """How an error message names this option: the launch name and the run flag."""
        return f"{self.name} ({self.run_flags[0]})" if self.run else self.name


OPTIONS: tuple[Option, ...] = (
    Option("namespace", DEFAULT_NAMESPACE, "namespace of this pack's nodes (one namespace per pack)",
           parse_namespace),
    Option("params_file", str(default_params_file()), "ROS 2 params file ('' = none: the declared defaults)",
           flags=("--params", "--params-file")),
    Option("nodes", ",".join(NODE_NAMES), "comma-separated nodes to start (optional: model_updater, which the "
           "default graph starts when its repo_url is set)", parse_node_list),
    Option("pack_config", "", "pack config YAML: DBC signal map, pack id, chemistry, capacity for every node"),
    Option("interface", "", "python-can interface for can_bridge ('' = params file)"),
    Option("channel", "", "CAN channel for can_bridge ('' = params file)"),
    Option("can_log", "", "replay this CAN log through can_bridge instead of reading a bus"),
    Option("replay_speed", "1.0", "replay speed factor with can_log; 0 = as fast as the graph consumes "
           "(lossless, deterministic on sim time)", parse_speed, flags=("--speed", "--replay-speed")),
    Option("use_sim_time", "", "nodes follow /clock ('' = true when replaying can_log, which then publishes "
           "/clock)", parse_optional_bool),
    Option("set", "", "parameter overrides NODE.PARAM=VALUE, value as in ros2 -p (launch: space-separated; "
           "run: repeat the flag), e.g. can_bridge.rate_hz=20", parse_sets, repeat=True),
    Option("respawn", "false", "restart nodes that exit", parse_bool, run=False),
    Option("duration", "0", "stop after this many seconds (0 = run until Ctrl-C)", parse_seconds, launch=False),
)
OPTION_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


def parse_options(options: Mapping[str, str | None]) -> dict[str, Any]:
    """Typed values of every option; a missing or None value takes the table's default."""
    unknown = sorted(set(options) - set(OPTION_BY_NAME))
    if unknown:
        raise ValueError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(OPTION_BY_NAME)}")
    out: dict[str, Any] = {}
    for opt in OPTIONS:
        raw = options.get(opt.name)
        out[opt.name] = opt.parse(opt.default if raw is None else str(raw), opt.label)
    return out


def graph_from_options(options: Mapping[str, str | None],
                       overrides: dict[str, dict[str, Any]] | None = None) -> list[NodeSpec]:
    """The nodes that launch arguments or `bms-ai run` options ask for (the one translation of both).

    Parameters are layered, later wins: pack config, then interface/channel/
    replay for can_bridge, then ``set``, then ``overrides`` (for programs that
    compose the graph, such as the demo).
    """
    v = parse_options(options)
    nodes = v["nodes"]
    bridge: dict[str, Any] = {k: v[k] for k in ("interface", "channel") if v[k]}
    sim_time = v["use_sim_time"]
    replay: dict[str, dict[str, Any]] = {}
    if v["can_log"]:
        sim_time = True if sim_time is None else sim_time
        bridge.update(replay_overrides(v["can_log"], v["replay_speed"], nodes))
        bridge["publish_clock"] = sim_time
        # a recorded drive is not this vehicle: it neither restores nor overwrites the stored estimator state
        replay = {"estimator": {"state_file": ""}}
    layers = [pack_overrides(v["pack_config"]) if v["pack_config"] else {}, {"can_bridge": bridge}, replay,
              v["set"], overrides or {}]
    merged = merge_overrides(*layers)
    for node, params in merged.items():
        for key, value in params.items():
            try:
                check_parameter(key, value)
            except ValueError as exc:  # before any node starts (launch would otherwise lose one node late)
                raise ValueError(f"{OPTION_BY_NAME['set'].label}: {node}: {exc}") from None
    if nodes == list(NODE_NAMES):  # the default graph: optional nodes join when configured
        nodes = nodes + [n for n in ENABLED_BY if _configured(n, merged, v["params_file"], v["namespace"])]
    return build_graph(v["namespace"], nodes, merged, use_sim_time=sim_time,
                       respawn=v["respawn"], params_file=v["params_file"] or None)


def _configured(node: str, overrides: dict[str, dict[str, Any]], params_file: str, namespace: str) -> bool:
    """An optional node's enabling parameter is set (overrides first, else the params file)."""
    key = ENABLED_BY[node]
    given = {**overrides.get("*", {}), **overrides.get(node, {})}
    if key in given:
        return bool(given[key])
    return bool(params_file and load_params_file(params_file, node, namespace).get(key))


# ----------------------------------------------------------------------------- parameters

def ros_type_name(value: Any) -> str:
    """The ROS parameter type a Python value maps to (bool, integer, double, string, <type>_array)."""
    if isinstance(value, (list, tuple)):
        return (ros_type_name(value[0]) if value else "empty") + "_array"
    for py, ros in ((bool, "bool"), (int, "integer"), (float, "double"), (str, "string")):
        if isinstance(value, py):
            return ros
    return type(value).__name__


def coerce_parameter(name: str, value: Any, default: Any) -> Any:
    """``value`` as the type of the declared ``default``, or a one-line ValueError.

    The one widening users expect is allowed (an integer for a double, so
    ``rate_hz:=20`` works); anything else must already have the declared type.
    """
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        if default and value:
            return [coerce_parameter(name, v, default[0]) for v in value]
        return list(value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is type(default):
        return value
    hint = " (quote it to pass text)" if isinstance(default, str) else ""
    raise ValueError(f"parameter {name} expects {ros_type_name(default)}, got {value!r} "
                     f"({ros_type_name(value)}){hint}")


@dataclass(frozen=True)
class Limit:
    """The span of sensible values of a numeric parameter; ``low_open``: the low end itself is refused.

    ``zero_ok``: 0 is a setting of its own besides the span (a replay speed of 0 = as fast as possible).
    """

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    zero_ok: bool = False

    @property
    def text(self) -> str:
        """The span as users read it, e.g. ``> 0`` or ``0 .. 1000``."""
        low = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        high = "" if self.high is None else f"<= {self.high:g}"
        span = " and ".join(t for t in (low, high) if t)
        return f"0 or {span}" if self.zero_ok else span

    def holds(self, v: float) -> bool:
        """True when ``v`` lies in the span."""
        if self.zero_ok and v == 0:
            return True
        if self.low is not None and (v <= self.low if self.low_open else v < self.low):
            return False
        return self.high is None or v <= self.high


# Numeric parameters of the graph's nodes with a limited span, by parameter name (the same name means the
# same thing in every node: a rate, a duration, a capacity). Outside the span a node would divide by zero,
# spin a zero-period timer or wait forever, so the value is refused with one line before anything starts.
PARAMETER_LIMITS: dict[str, Limit] = {
    "rate_hz": Limit(0.0, 1000.0, low_open=True),
    "max_age": Limit(0.0, low_open=True),
    "stale_after": Limit(0.0, low_open=True),
    "replay_speed": Limit(MIN_REPLAY_SPEED, zero_ok=True),
    "wait_for_subscribers": Limit(0),
    "raw_log_max_bytes": Limit(1),
    "capacity_ah": Limit(0.0, low_open=True),
    "initial_soc": Limit(high=1.0),
    "health_period": Limit(0.0, low_open=True),
    "model_poll_period": Limit(0.0, low_open=True),
    "period": Limit(0.0, low_open=True),
    "efc0": Limit(0.0),
    "max_events": Limit(0),
    "shutdown_drain_s": Limit(0.0),
    "update_period": Limit(0.0, 10.0),
}


def check_parameter(name: str, value: Any) -> Any:
    """``value`` unchanged if it is finite and within ``name``'s limit, else a one-line ValueError."""
    items = value if isinstance(value, (list, tuple)) else [value]
    limit = PARAMETER_LIMITS.get(name)
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v):
            raise ValueError(f"parameter {name} must be a finite number, got {v!r}")
        if limit is not None and not limit.holds(v):
            raise ValueError(f"parameter {name} must be {limit.text}, got {v!r}")
    return value


def describe_limit(name: str, description: str) -> str:
    """The parameter's description with its limit appended (what `ros2 param describe` shows)."""
    limit = PARAMETER_LIMITS.get(name)
    return f"{description} (range: {limit.text})" if limit is not None else description


def load_params_file(path: str | Path | None, node_name: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """Parameters a ROS 2 params file gives one node (``/**`` first, then matching node keys)."""
    if not path:
        return {}
    data = load_yaml(path, "params file") or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a ROS 2 params file is a mapping of node names")
    fqn = f"{namespace.rstrip('/')}/{node_name}"
    out: dict[str, Any] = {}
    for key in sorted(data, key=lambda k: k != "/**"):  # wildcard first, specific keys override
        if key in ("/**", "**") or key in (node_name, fqn, f"/**/{node_name}", fqn.lstrip("/")):
            block = data[key] or {}
            params = block.get("ros__parameters", {}) if isinstance(block, dict) else {}
            if not isinstance(params, dict):
                raise ValueError(f"{path}: '{key}.ros__parameters' must be a mapping")
            out.update(params)
    return out


def build_graph(
    namespace: str = DEFAULT_NAMESPACE,
    nodes: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    use_sim_time: bool | None = None,
    respawn: bool = False,
    params_file: str | Path | None = None,
) -> list[NodeSpec]:
    """The nodes to start and the parameters each gets on top of the params file.

    ``overrides`` maps a node name (or ``"*"`` for all) to parameter values.
    """
    wanted = list(NODE_NAMES) if not nodes else list(nodes)
    bad = [n for n in wanted if n not in ALL_NODE_NAMES]
    if bad:
        raise ValueError(f"unknown node(s) {bad}; the graph has {list(ALL_NODE_NAMES)}")
    overrides = overrides or {}
    ns = "/" + namespace.strip("/") if namespace.strip("/") else "/"
    specs = []
    for name, exe, module in ALL_NODES:
        if name not in wanted:
            continue
        params = dict(overrides.get("*", {}))
        params.update(overrides.get(name, {}))
        if use_sim_time is not None:
            params["use_sim_time"] = bool(use_sim_time)
        specs.append(NodeSpec(name, exe, module, ns, params, respawn=respawn,
                              params_file=str(params_file) if params_file else None))
    return specs


def pack_overrides(pack_config: str | Path) -> dict[str, dict[str, Any]]:
    """Per-node parameters that follow from one pack config, so every node agrees on the pack.

    can_bridge reads the DBC signal map; estimator and fault_monitor need the
    chemistry and design capacity; all report the same hardware_id (:func:`pack_hardware_id`).
    """
    from bms_ai.can.packconfig import load_pack_config

    cfg = load_pack_config(pack_config)
    pack = {"pack_id": cfg.pack_id, "chemistry": cfg.chemistry}
    if cfg.design_capacity_ah == cfg.design_capacity_ah:  # not NaN
        pack["capacity_ah"] = float(cfg.design_capacity_ah)
    estimator = dict(pack)
    if cfg.ocv_file is not None:
        estimator.update(ocv_file=str(cfg.ocv_file), ocv_sigma_v=float(cfg.ocv_sigma_v))
    return {"can_bridge": {"pack_config": str(pack_config)}, "estimator": estimator,
            "fault_monitor": {**pack, "pack_config": str(pack_config)},
            "cloud_uploader": {"pack_id": cfg.pack_id}}


def pack_hardware_id(pack_id: str, namespace: str) -> str:
    """The diagnostics hardware_id of a pack's nodes: its pack id, qualified by the namespace outside ``/bms``.

    Two packs started from the same pack config (or both on the defaults) in
    two namespaces would otherwise report the same hardware_id, and every
    consumer of /diagnostics (aggregator, fault_monitor, uploader) would mix
    them up: ``/pack2`` + ``pack96-ref`` gives ``pack2/pack96-ref``.
    """
    ns = _pack_qualifier(namespace)
    return f"{ns}/{pack_id}" if ns else pack_id


def pack_spool_dir(spool_dir: str, namespace: str) -> str:
    """The uploader's spool of a pack: ``spool_dir`` itself in ``/bms``, a sub-folder per other namespace.

    Two packs on the default config would otherwise share one spool (the
    spool's lock refuses the second uploader): ``/pack2`` gives ``<dir>/pack2``.
    """
    ns = _pack_qualifier(namespace)
    return os.path.join(spool_dir, ns) if ns else spool_dir


def _pack_qualifier(namespace: str) -> str:
    """'' for the default namespace, else the namespace without its slashes at the ends."""
    ns = namespace.strip("/")
    return "" if ns == DEFAULT_NAMESPACE.strip("/") else ns


def merge_overrides(*layers: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Later layers win, parameter by parameter."""
    out: dict[str, dict[str, Any]] = {}
    for layer in layers:
        for node, params in layer.items():
            out.setdefault(node, {}).update(params)
    return out


def replay_overrides(can_log: str, speed: float, specs_nodes: list[str]) -> dict[str, Any]:
    """can_bridge parameters for replaying a file through the graph on sim time.

    The replay waits until every other node of the graph reads pack/measurements,
    so no sample is published before its readers are discovered.
    """
    return {"can_log": str(can_log), "replay_speed": float(speed), "publish_clock": True,
            "wait_for_subscribers": len([n for n in specs_nodes if n != "can_bridge" and n not in ENABLED_BY])}


def launch_node_kwargs(spec: NodeSpec) -> dict[str, Any]:
    """Keyword arguments for ``launch_ros.actions.Node`` (the launch file uses exactly this)."""
    params: list[Any] = [spec.params_file] if spec.params_file else []
    if spec.parameters:
        params.append(dict(spec.parameters))
    kw: dict[str, Any] = {
        "package": "bms_ai",
        "executable": spec.executable,
        "name": spec.name,
        "namespace": spec.namespace,
        "parameters": params,
        "remappings": list(spec.remappings),
        "output": "screen",
        "emulate_tty": True,
    }
    if spec.respawn:
        kw.update(respawn=True, respawn_delay=2.0)
    return kw


def node_parameters(spec: NodeSpec) -> dict[str, Any]:
    """Effective parameter values for the in-process runner (params file, then overrides)."""
    params = load_params_file(spec.params_file, spec.name, spec.namespace)
    params.update(spec.parameters)
    return params
