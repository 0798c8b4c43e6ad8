"""rclpy applications that are not nodes: in-process runner, demo, /clock publisher."""
