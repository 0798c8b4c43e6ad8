"""bms_ai: AI battery management for vehicles, as a ROS 2 package.

The library (everything except :mod:`bms_ai.nodes`) never imports rclpy, so it
runs in training pipelines, offline tools and tests without ROS.
"""

__version__ = "0.1.0"
