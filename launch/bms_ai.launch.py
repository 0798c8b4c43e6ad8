"""Standard ROS 2 launch file for the bms_ai graph; the graph itself lives in bms_ai.graph.

    ros2 launch bms_ai bms_ai.launch.py namespace:=/bms interface:=socketcan channel:=can0
    ros2 launch bms_ai bms_ai.launch.py can_log:=/path/drive.blf use_sim_time:=true
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from bms_ai.graph import (
    DEFAULT_NAMESPACE,
    NODES,
    build_graph,
    default_params_file,
    launch_node_kwargs,
    merge_overrides,
    pack_overrides,
    replay_overrides,
)
from launch import LaunchDescription

ARGUMENTS = {
    "namespace": (DEFAULT_NAMESPACE, "namespace of this pack's nodes (one namespace per pack)"),
    "params_file": (str(default_params_file()), "ROS 2 params file"),
    "interface": ("", "python-can interface for can_bridge (empty: params file)"),
    "channel": ("", "CAN channel for can_bridge (empty: params file)"),
    "can_log": ("", "replay this CAN log instead of a bus"),
    "pack_config": ("", "pack config YAML: DBC signal map, pack id, chemistry, capacity for every node"),
    "use_sim_time": ("false", "use /clock"),
    "nodes": (",".join(n for n, _, _ in NODES), "comma-separated nodes to start"),
    "respawn": ("false", "restart nodes that exit"),
}


def _nodes(context):
    a = {k: LaunchConfiguration(k).perform(context) for k in ARGUMENTS}
    nodes = [n.strip() for n in a["nodes"].split(",") if n.strip()]
    bridge = {k: a[k] for k in ("interface", "channel") if a[k]}
    if a["can_log"]:
        bridge.update(replay_overrides(a["can_log"], 1.0, nodes))
        bridge["publish_clock"] = a["use_sim_time"].lower() == "true"
    overrides = merge_overrides(pack_overrides(a["pack_config"]) if a["pack_config"] else {}, {"can_bridge": bridge})
    specs = build_graph(
        namespace=a["namespace"],
        nodes=nodes,
        overrides=overrides,
        use_sim_time=a["use_sim_time"].lower() == "true",
        respawn=a["respawn"].lower() == "true",
    )
    return [Node(**launch_node_kwargs(s, a["params_file"] or None)) for s in specs]


def generate_launch_description():
    return LaunchDescription(
        [DeclareLaunchArgument(k, default_value=v, description=d) for k, (v, d) in ARGUMENTS.items()]
        + [OpaqueFunction(function=_nodes)]
    )
