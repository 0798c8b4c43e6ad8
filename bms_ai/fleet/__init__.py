"""The fleet loop, cloud side and the vehicle's end of it: signed model distribution through a TUF repository.

``tufrepo`` keeps the repository (publisher), ``updater`` installs verified
models on the vehicle. Neither imports rclpy.
"""
