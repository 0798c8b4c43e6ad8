"""Cloud uplink: MCAP segments, durable spool, upload backends, telemetry (no rclpy here)."""

from .backends import BACKENDS, Backend, UploadError, make_backend
from .segment import Recorder, SegmentWriter
from .spool import PRIORITY_CLASSES, Spool

__all__ = ["BACKENDS", "PRIORITY_CLASSES", "Backend", "Recorder", "SegmentWriter", "Spool", "UploadError",
           "make_backend"]
