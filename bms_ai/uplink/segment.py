"""MCAP segment recording: CDR bytes in, rotating zstd-chunked MCAP files out, into the spool.

The library never deserialises: the node hands over CDR bytes (raw subscriptions)
with topic, type and schema text, so recording costs little more than a copy.
Segments are grouped by priority class, so eviction can drop raw data while
keeping diagnostics; a fault snapshot is its own high-priority segment.
"""

from __future__ import annotations

import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mcap.writer import CompressionType, Writer

from bms_ai.uplink.schemas import full_definition, normalise_type
from bms_ai.uplink.spool import RANK, Segment, Spool

FAULT_SNAPSHOT = "fault_snapshot"


@dataclass(frozen=True)
class Message:
    """One recorded message: CDR bytes with topic, type and times."""

    topic: str
    type_name: str  # pkg/msg/Name
    data: bytes  # CDR
    log_time_ns: int
    publish_time_ns: int = 0


class SegmentWriter:
    """One MCAP file in the ROS 2 profile (schemas 'ros2msg', channels 'cdr'), like rosbag2 writes."""

    def __init__(self, path: str | os.PathLike[str], compression: str = "zstd", chunk_size: int = 1 << 20,
                 metadata: dict[str, str] | None = None, schema_lookup: Callable[[str], str] = full_definition) -> None:
        self.path = Path(path)
        self._f: IO[bytes] = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        comp = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}[compression]
        self._w = Writer(self._f, chunk_size=chunk_size, compression=comp)
        self._w.start(profile="ros2", library="bms_ai.uplink")
        if metadata:
            self._w.add_metadata("bms_ai", {str(k): str(v) for k, v in metadata.items()})
        self._schema_lookup = schema_lookup
        self._schemas: dict[str, int] = {}
        self._channels: dict[tuple[str, str], int] = {}
        self._seq: dict[int, int] = {}
        self.messages = 0
        self.first_ns: int | None = None
        self.last_ns: int | None = None
        self.closed = False

    def _channel(self, topic: str, type_name: str) -> int:
        key = (topic, type_name)
        cid = self._channels.get(key)
        if cid is None:
            sid = self._schemas.get(type_name)
            if sid is None:
                sid = self._w.register_schema(type_name, "ros2msg", self._schema_lookup(type_name).encode())
                self._schemas[type_name] = sid
            cid = self._w.register_channel(topic, "cdr", sid, {"offered_qos_profiles": ""})
            self._channels[key] = cid
            self._seq[cid] = 0
        return cid

    def write(self, m: Message) -> None:
        """Append a message (channels and schemas are registered on first use)."""
        cid = self._channel(m.topic, m.type_name)
        self._seq[cid] += 1
        self._w.add_message(cid, log_time=m.log_time_ns, data=m.data,
                            publish_time=m.publish_time_ns or m.log_time_ns, sequence=self._seq[cid])
        self.messages += 1
        if self.first_ns is None:
            self.first_ns = m.log_time_ns
        self.last_ns = m.log_time_ns

    def flush(self) -> None:
        """Hand finished chunks to the OS, so a crash of this process loses only the open chunk."""
        if not self.closed:
            self._f.flush()

    @property
    def bytes_written(self) -> int:
        """Bytes on disk so far (rotation by size)."""
        return self._f.tell()

    def close(self) -> None:
        """Finish the file (summary, footer); it is then a complete MCAP."""
        if not self.closed:
            self._w.finish()
            self._f.flush()
            self._f.close()
            self.closed = True

    def abort(self) -> None:
        """Drop the file (write error): an unacknowledged segment leaves nothing behind."""
        if not self.closed:
            self._f.close()
            self.closed = True
        self.path.unlink(missing_ok=True)


class SnapshotBuffer:
    """Ring of the last ``pre_s`` seconds of every recorded message (by log time)."""

    def __init__(self, pre_s: float) -> None:
        self.pre_ns = int(pre_s * 1e9)
        self._buf: deque[Message] = deque()

    def add(self, m: Message) -> None:
        """Remember a message; older ones drop out of the window."""
        if self._buf and m.log_time_ns < self._buf[-1].log_time_ns - self.pre_ns:
            self._buf.clear()  # clock jumped back (replay restarted): the old window is not "before" anything
        self._buf.append(m)
        limit = m.log_time_ns - self.pre_ns
        while self._buf and self._buf[0].log_time_ns < limit:
            self._buf.popleft()

    def drain(self) -> list[Message]:
        """The messages in the window, oldest first."""
        out = list(self._buf)
        return out


class Recorder:
    """Routes messages to one open segment per priority class; rotates; commits to the spool.

    Times are the caller's clock (node clock / sim time) in ns, so rotation and
    snapshots follow replays deterministically. ``tick(now_ns)`` closes segments
    that are due even when no message arrives.
    """

    def __init__(self, spool: Spool, topic_classes: dict[str, str], default_class: str = "raw",
                 max_bytes: int = 8 << 20, max_duration_s: float = 60.0, compression: str = "zstd",
                 chunk_size: int = 1 << 20, snapshot_pre_s: float = 30.0, snapshot_post_s: float = 30.0,
                 metadata: dict[str, str] | None = None,
                 on_segment: Callable[[Segment | None, str], None] | None = None) -> None:
        for c in [*topic_classes.values(), default_class]:
            if c not in RANK or c == FAULT_SNAPSHOT:
                raise ValueError(f"topic class {c!r} invalid; use one of {[k for k in RANK if k != FAULT_SNAPSHOT]}")
        self.spool = spool
        self.topic_classes = dict(topic_classes)
        self.default_class = default_class
        self.max_bytes = int(max_bytes)
        self.max_duration_ns = int(max_duration_s * 1e9)
        self.compression = compression
        self.chunk_size = chunk_size
        self.metadata = dict(metadata or {})
        self.on_segment = on_segment
        self._open: dict[str, SegmentWriter] = {}
        self._opened_at: dict[str, int] = {}
        self.snapshot = SnapshotBuffer(snapshot_pre_s) if snapshot_pre_s >= 0 else None
        self.snapshot_post_ns = int(snapshot_post_s * 1e9)
        self._snap_end_ns: int | None = None
        self.snapshots = 0
        self.segments_committed = 0
        self.messages = 0
        self.write_errors = 0

    def _writer(self, cls: str, now_ns: int, extra: dict[str, str] | None = None) -> SegmentWriter:
        w = self._open.get(cls)
        if w is None:
            meta = dict(self.metadata, priority_class=cls, **(extra or {}))
            w = SegmentWriter(self.spool.new_part_path(cls=cls), self.compression, self.chunk_size, meta)
            self._open[cls] = w
            self._opened_at[cls] = now_ns
        return w

    def class_of(self, topic: str) -> str:
        """The priority class a topic is recorded in."""
        return self.topic_classes.get(topic, self.default_class)

    def write(self, topic: str, type_name: str, data: bytes, log_time_ns: int, cls: str | None = None) -> None:
        """Record one CDR message; ``cls`` overrides the topic's class (e.g. topic recorded fully resolved)."""
        m = Message(topic, normalise_type(type_name), bytes(data), int(log_time_ns))
        self.tick(m.log_time_ns)  # close what is due first, so a segment spans < max_duration
        cls = cls or self.class_of(topic)
        self._write_to(cls, m)
        if self.snapshot is not None:
            self.snapshot.add(m)
            if self._snap_end_ns is not None:
                self._write_to(FAULT_SNAPSHOT, m)
        self.messages += 1

    def _write_to(self, cls: str, m: Message) -> None:
        w = self._writer(cls, m.log_time_ns)
        try:
            w.write(m)
        except OSError:  # disk full / I/O error: drop this unacknowledged segment, start afresh next time
            self.write_errors += 1
            self._open.pop(cls, None)
            self._opened_at.pop(cls, None)
            w.abort()
            raise
        if cls != FAULT_SNAPSHOT and w.bytes_written >= self.max_bytes:
            self._close(cls)

    def trigger_snapshot(self, now_ns: int, reason: str = "") -> bool:
        """A diagnostic went ERROR: keep what is buffered and everything until now + post. Extends if active."""
        if self.snapshot is None:
            return False
        end = now_ns + self.snapshot_post_ns
        if self._snap_end_ns is None:
            w = self._writer(FAULT_SNAPSHOT, now_ns, {"reason": reason, "trigger_ns": str(now_ns)})
            for m in self.snapshot.drain():
                w.write(m)
            self.snapshots += 1
            self._snap_end_ns = end
            return True
        self._snap_end_ns = max(self._snap_end_ns, end)
        return False

    def tick(self, now_ns: int) -> None:
        """Close segments that are due by time (and an expired snapshot), even when no message arrives."""
        for cls in list(self._open):
            if cls == FAULT_SNAPSHOT:
                if self._snap_end_ns is not None and now_ns >= self._snap_end_ns:
                    self._snap_end_ns = None
                    self._close(cls)
            elif not 0 <= now_ns - self._opened_at[cls] < self.max_duration_ns:  # due, or the clock jumped back
                self._close(cls)

    def _close(self, cls: str) -> Segment | None:
        w = self._open.pop(cls)
        self._opened_at.pop(cls, None)
        if w.messages == 0:
            w.abort()
            return None
        meta = dict(self.metadata, priority_class=cls, messages=w.messages, first_ns=w.first_ns, last_ns=w.last_ns)
        try:
            w.close()
            seg = self.spool.commit(w.path, cls, meta=json.dumps(meta, sort_keys=True))
        except OSError as exc:  # disk error: counted, recording goes on with a new segment
            self.write_errors += 1
            w.path.unlink(missing_ok=True)
            if self.on_segment:
                self.on_segment(None, f"write error: {exc}")
            return None
        if seg is not None:  # None: no room, counted by the spool as 'rejected'
            self.segments_committed += 1
        if self.on_segment:
            self.on_segment(seg, cls)
        return seg

    def flush_files(self) -> None:
        """Hand finished chunks of open segments to the OS (a crash then loses only open chunks)."""
        for w in self._open.values():
            w.flush()

    def flush(self) -> list[Segment]:
        """Close every open segment now (shutdown); a running snapshot is closed too."""
        out = []
        self._snap_end_ns = None
        for cls in list(self._open):
            seg = self._close(cls)
            if seg is not None:
                out.append(seg)
        return out
