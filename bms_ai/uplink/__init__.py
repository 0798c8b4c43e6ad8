"""Cloud uplink: MCAP segments, durable spool, upload backends, telemetry (no rclpy here)."""

from bms_ai.uplink.backends import BACKENDS, Backend, UploadError, make_backend
from bms_ai.uplink.segment import Recorder, SegmentWriter
from bms_ai.uplink.spool import PRIORITY_CLASSES, Spool

__all__ = ["BACKENDS", "PRIORITY_CLASSES", "Backend", "Recorder", "SegmentWriter", "Spool", "UploadError",
           "make_backend"]
