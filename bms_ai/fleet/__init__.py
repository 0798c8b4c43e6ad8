"""The fleet loop, cloud side and the vehicle's end of it.

``labels`` turns a vehicle's recorded timeline into SOC pseudo-labels with
their uncertainty (anchors + a two-sided smoother); ``tufrepo`` keeps the
signed model repository (publisher), ``updater`` installs verified models on
the vehicle. None of them imports rclpy.
"""
