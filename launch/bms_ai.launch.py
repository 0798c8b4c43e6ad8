"""Standard ROS 2 launch file for the bms_ai graph; the graph and its options live in bms_ai.graph.

    ros2 launch bms_ai bms_ai.launch.py namespace:=/bms interface:=socketcan channel:=can0
    ros2 launch bms_ai bms_ai.launch.py can_log:=/path/drive.blf replay_speed:=0
    ros2 launch bms_ai bms_ai.launch.py set:="can_bridge.rate_hz=20 estimator.use_models=false"

The launch arguments are the rows of ``bms_ai.graph.OPTIONS`` (the same table
as `bms-ai run`'s flags); ``ros2 launch bms_ai bms_ai.launch.py --show-args``
lists them.
"""

from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

from bms_ai.graph import OPTIONS, graph_from_options, launch_node_kwargs
from launch import LaunchDescription

LAUNCH_OPTIONS = [o for o in OPTIONS if o.launch]


def _nodes(context):
    values = {o.name: LaunchConfiguration(o.name).perform(context) for o in LAUNCH_OPTIONS}
    return [Node(**launch_node_kwargs(spec)) for spec in graph_from_options(values)]


def generate_launch_description():
    """Entry point of ros2 launch: the declared arguments, then the nodes they select."""
    return LaunchDescription(
        [DeclareLaunchArgument(o.name, default_value=o.default, description=o.help) for o in LAUNCH_OPTIONS]
        + [OpaqueFunction(function=_nodes)]
    )
