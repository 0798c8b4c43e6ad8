"""The node graph, defined once: used by launch/bms_ai.launch.py and by `bms-ai run`.

Neither ``launch`` nor rclpy is imported here, so the graph can be built and
tested anywhere.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bms_ai.core.paths import share_path

# (name, console script / executable, module exposing NODE_CLASS)
NODES: tuple[tuple[str, str, str], ...] = (
    ("can_bridge", "can_bridge", "bms_ai.nodes.can_bridge"),
    ("estimator", "estimator", "bms_ai.nodes.estimator"),
    ("fault_monitor", "fault_monitor", "bms_ai.nodes.fault_monitor"),
    ("cloud_uploader", "cloud_uploader", "bms_ai.nodes.cloud_uploader"),
)
DEFAULT_NAMESPACE = "/bms"


def default_params_file() -> Path:
    return share_path("config", "bms_ai.yaml")


@dataclass(frozen=True)
class NodeSpec:
    name: str
    executable: str
    module: str
    namespace: str
    parameters: dict[str, Any] = field(default_factory=dict)  # overrides on top of the params file
    remappings: tuple[tuple[str, str], ...] = ()
    respawn: bool = False

    @property
    def fqn(self) -> str:
        return f"{self.namespace.rstrip('/')}/{self.name}"


def load_params_file(path: str | Path | None, node_name: str, namespace: str = DEFAULT_NAMESPACE) -> dict[str, Any]:
    """Parameters a ROS 2 params file gives one node (``/**`` first, then matching node keys)."""
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"params file not found: {p}")
    data = yaml.safe_load(p.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a ROS 2 params file is a mapping of node names")
    fqn = f"{namespace.rstrip('/')}/{node_name}"
    out: dict[str, Any] = {}
    for key in sorted(data, key=lambda k: k != "/**"):  # wildcard first, specific keys override
        if key in ("/**", "**") or key in (node_name, fqn, f"/**/{node_name}", fqn.lstrip("/")):
            block = data[key] or {}
            params = block.get("ros__parameters", {}) if isinstance(block, dict) else {}
            if not isinstance(params, dict):
                raise ValueError(f"{p}: '{key}.ros__parameters' must be a mapping")
            out.update(params)
    return out


def build_graph(
    namespace: str = DEFAULT_NAMESPACE,
    nodes: list[str] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    use_sim_time: bool | None = None,
    respawn: bool = False,
) -> list[NodeSpec]:
    """The nodes to start and the parameters each gets on top of the params file.

    ``overrides`` maps a node name (or ``"*"`` for all) to parameter values.
    """
    known = [n for n, _, _ in NODES]
    wanted = known if not nodes else list(nodes)
    bad = [n for n in wanted if n not in known]
    if bad:
        raise ValueError(f"unknown node(s) {bad}; the graph has {known}")
    overrides = overrides or {}
    ns = "/" + namespace.strip("/") if namespace.strip("/") else "/"
    specs = []
    for name, exe, module in NODES:
        if name not in wanted:
            continue
        params = dict(overrides.get("*", {}))
        params.update(overrides.get(name, {}))
        if use_sim_time is not None:
            params["use_sim_time"] = bool(use_sim_time)
        specs.append(NodeSpec(name, exe, module, ns, params, respawn=respawn))
    return specs


def pack_overrides(pack_config: str | Path) -> dict[str, dict[str, Any]]:
    """Per-node parameters that follow from one pack config, so every node agrees on the pack.

    can_bridge reads the DBC signal map; estimator and fault_monitor need the
    chemistry and design capacity; all report the same hardware_id.
    """
    from bms_ai.can.packconfig import load_pack_config

    cfg = load_pack_config(pack_config)
    pack = {"pack_id": cfg.pack_id, "chemistry": cfg.chemistry}
    if cfg.design_capacity_ah == cfg.design_capacity_ah:  # not NaN
        pack["capacity_ah"] = float(cfg.design_capacity_ah)
    return {"can_bridge": {"pack_config": str(pack_config)}, "estimator": dict(pack), "fault_monitor": dict(pack),
            "cloud_uploader": {"pack_id": cfg.pack_id}}


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
            "wait_for_subscribers": len([n for n in specs_nodes if n != "can_bridge"])}


def launch_node_kwargs(spec: NodeSpec, params_file: str | None) -> dict[str, Any]:
    """Keyword arguments for ``launch_ros.actions.Node`` (the launch file uses exactly this)."""
    params: list[Any] = [params_file] if params_file else []
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


def node_parameters(spec: NodeSpec, params_file: str | Path | None) -> dict[str, Any]:
    """Effective parameter values for the in-process runner (file, then overrides)."""
    params = load_params_file(params_file, spec.name, spec.namespace)
    params.update(spec.parameters)
    return params
