"""MCAP segment recording: CDR bytes in, rotating zstd-chunked MCAP files out, into the spool.

The library never deserialises: the node hands over CDR bytes (raw subscriptions)
with topic, type and schema text, so recording costs little more than a copy.
Segments are grouped by priority class, so eviction can drop raw data while
keeping diagnostics; a fault snapshot is its own high-priority segment.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from mcap.writer import CompressionType, Writer

from bms_ai.uplink.fsio import CountingFile, is_full
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
                 metadata: dict[str, str] | None = None, schema_lookup: Callable[[str], str] = full_definition,
                 opener: Callable[[Path], IO[bytes] | CountingFile] | None = None) -> None:
        self.path = Path(path)
        self._f = (opener or (lambda p: open(p, "wb")))(self.path)  # noqa: SIM115 - closed in close()/abort()
        comp = {"zstd": CompressionType.ZSTD, "lz4": CompressionType.LZ4, "none": CompressionType.NONE}[compression]
        self._w = Writer(self._f, chunk_size=chunk_size, compression=comp)
        self._w.start(profile="ros2", library="bms_ai.uplink")
        if metadata:
            self._w.add_metadata("bms_ai", {str(k): str(v) for k, v in metadata.items()})
        self._schema_lookup = schema_lookup
        self._chunk_size = chunk_size
        self._payload = 0  # uncompressed message bytes
        self._schema_bytes = 0
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
                text = self._schema_lookup(type_name).encode()
                sid = self._w.register_schema(type_name, "ros2msg", text)
                self._schemas[type_name] = sid
                self._schema_bytes += len(text) + len(topic) + 64
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
        self._payload += len(m.data) + 32
        if self.first_ns is None:
            self.first_ns = m.log_time_ns
        self.last_ns = m.log_time_ns

    def flush(self) -> None:
        """Hand finished chunks to the OS, so a crash of this process loses only the open chunk."""
        if not self.closed:
            self._f.flush()

    def close_reserve(self) -> int:
        """Bytes that closing may still write, at most: the open chunk, then the summary (schemas, channels,
        one index record per chunk, statistics) and footer."""
        return 4096 + 2 * self._schema_bytes + 96 * (self._payload // self._chunk_size + 1) + self._chunk_size

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
            with contextlib.suppress(OSError):  # buffered bytes may fail to flush (disk full): dropped anyway
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


SUMMARY_RESERVE = 16 << 10  # a new segment's summary and footer, before its schemas are known


def split_by_size(messages: list[Message], budget: int) -> list[list[Message]]:
    """Consecutive groups of messages whose payloads add up to at most ``budget`` (at least one each)."""
    groups: list[list[Message]] = []
    size = budget + 1
    for m in messages:
        if size + len(m.data) > budget:
            groups.append([])
            size = 0
        groups[-1].append(m)
        size += len(m.data)
    return groups


@dataclass
class RecorderStats:
    """What recording lost or held back, and why (reported in the uploader status)."""

    messages: int = 0
    segments_committed: int = 0
    snapshots: int = 0
    snapshot_parts: int = 0
    snapshot_truncated: int = 0
    dropped_messages: int = 0  # not recorded: class paused (no room) or its open segment lost to a write error
    write_errors: int = 0
    disk_full: int = 0  # out-of-space errors from the disk or the database
    pauses: int = 0
    resumes: int = 0
    last_error: str = ""


class Recorder:
    """Routes messages to one open segment per priority class; rotates; commits to the spool.

    Times are the caller's clock (node clock / sim time) in ns, so rotation and
    snapshots follow replays deterministically. ``tick(now_ns)`` closes segments
    that are due even when no message arrives, retries commits that found no
    room, and resumes paused classes once there is room again.

    Space is checked before writing: a message is written only while the spool
    has room for one more chunk plus a summary for every open segment (evicting
    lower-or-equal classes if needed). Otherwise that class's open segment is
    closed and acknowledged, and the class is *paused*: its messages are dropped
    and counted until ``tick`` finds room again. A disk or database that is full
    anyway (ENOSPC) pauses the class the same way; nothing is raised.
    Fault snapshots are split into parts that fit the quota; when room runs out
    the parts nearest the trigger are kept (``snapshot_truncated`` counts it).
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
        # a segment (and a snapshot part) never exceeds a quarter of the quota, so it always fits
        self.part_bytes = max(SUMMARY_RESERVE * 2, min(self.max_bytes, spool.quota_bytes // 4))
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
        self._snap_meta: dict[str, str] = {}
        self._snap_part = 0
        self.paused: dict[str, str] = {}  # class -> why
        self._unacked: list[tuple[Path, str, str]] = []  # finished files the spool could not take yet
        self.stats = RecorderStats()

    # counters read by the service and tests
    @property
    def messages(self) -> int:
        """Messages handed to the recorder."""
        return self.stats.messages

    @property
    def segments_committed(self) -> int:
        """Segments acknowledged by the spool."""
        return self.stats.segments_committed

    @property
    def snapshots(self) -> int:
        """Fault snapshots started."""
        return self.stats.snapshots

    @property
    def write_errors(self) -> int:
        """Write errors (disk full included)."""
        return self.stats.write_errors

    def _writer(self, cls: str, now_ns: int) -> SegmentWriter:
        w = self._open.get(cls)
        if w is None:
            extra: dict[str, str] = {}
            if cls == FAULT_SNAPSHOT:
                self._snap_part += 1
                extra = dict(self._snap_meta, part=str(self._snap_part))
            meta = dict(self.metadata, priority_class=cls, **extra)
            w = SegmentWriter(self.spool.new_part_path(cls=cls), self.compression, self.chunk_size, meta,
                              opener=self.spool.open_part)
            self._open[cls] = w
            self._opened_at[cls] = now_ns
        return w

    def class_of(self, topic: str) -> str:
        """The priority class a topic is recorded in."""
        return self.topic_classes.get(topic, self.default_class)

    def write(self, topic: str, type_name: str, data: bytes, log_time_ns: int, cls: str | None = None) -> None:
        """Record one CDR message; ``cls`` overrides the topic's class (e.g. topic recorded fully resolved)."""
        m = Message(topic, normalise_type(type_name), bytes(data), int(log_time_ns))
        self._close_due(m.log_time_ns)  # close what is due first, so a segment spans < max_duration
        self._write_to(cls or self.class_of(topic), m)
        if self.snapshot is not None:
            self.snapshot.add(m)
            if self._snap_end_ns is not None:
                self._write_to(FAULT_SNAPSHOT, m)
        self.stats.messages += 1

    def _room(self, cls: str, nbytes: int) -> bool:
        """Room for this message plus what closing every open segment may write (evicting if needed)."""
        need = nbytes + sum(w.close_reserve() for w in self._open.values())
        if cls not in self._open:
            need += self.chunk_size + SUMMARY_RESERVE
        return self.spool.room_for(need, RANK[cls])

    def _write_to(self, cls: str, m: Message) -> None:
        if cls in self.paused:
            self.stats.dropped_messages += 1
            return
        if not self._room(cls, len(m.data)):
            self._pause(cls, "spool full: quota or minimum free space reached")
            self.stats.dropped_messages += 1
            return
        try:
            w = self._writer(cls, m.log_time_ns)
            w.write(m)
        except OSError as exc:  # disk full / I/O error: drop this unacknowledged segment, pause the class
            self._failed(cls, exc, 1)
            return
        if w.bytes_written + w.close_reserve() >= self.part_bytes:  # closed, it stays within part_bytes
            self._close(cls)

    def _failed(self, cls: str, exc: OSError, extra_dropped: int = 0) -> None:
        """A write error on ``cls``'s open segment: it is dropped (counted) and the class pauses."""
        w = self._open.pop(cls, None)
        self._opened_at.pop(cls, None)
        lost = extra_dropped
        if w is not None:
            lost += w.messages
            w.abort()
        self.stats.dropped_messages += lost
        self.stats.write_errors += 1
        self.stats.last_error = f"{cls}: {exc}"
        full = is_full(exc)
        self.stats.disk_full += int(full)
        if full:  # the disk is fuller than measured: free a segment's worth, lowest priority first
            self.spool.evict_bytes(self.part_bytes, RANK[cls])
        self._pause(cls, f"disk full: {exc}" if full else f"write error: {exc}")

    def _pause(self, cls: str, why: str) -> None:
        """Stop recording ``cls`` until tick() finds room; its open segment is closed and acknowledged."""
        if cls in self._open:
            self._close(cls)
        if cls == FAULT_SNAPSHOT:  # a snapshot ends here: the parts nearest the trigger are kept
            if self._snap_end_ns is not None:
                self._snap_end_ns = None
                self.stats.snapshot_truncated += 1
            return
        if cls not in self.paused:
            self.stats.pauses += 1
        self.paused[cls] = why

    def trigger_snapshot(self, now_ns: int, reason: str = "") -> bool:
        """A diagnostic went ERROR: keep what is buffered and everything until now + post. Extends if active.

        The buffered window is split into parts that fit the quota; the part nearest the trigger stays open
        for the messages after it, the earlier ones are written nearest first while there is room.
        """
        if self.snapshot is None:
            return False
        end = now_ns + self.snapshot_post_ns
        if self._snap_end_ns is not None:
            self._snap_end_ns = max(self._snap_end_ns, end)
            return False
        self.stats.snapshots += 1
        self._snap_meta = {"reason": reason, "trigger_ns": str(now_ns), "snapshot": str(self.stats.snapshots)}
        self._snap_part = 0
        self._snap_end_ns = end
        groups = split_by_size(self.snapshot.drain(), self.part_bytes - SUMMARY_RESERVE)
        for m in groups[-1] if groups else []:
            self._write_to(FAULT_SNAPSHOT, m)
        for g in reversed(groups[:-1]):
            if self._snap_end_ns is None or not self._write_part(g):
                self.stats.snapshot_truncated += int(self._snap_end_ns is not None)
                break
        return True

    def _write_part(self, msgs: list[Message]) -> bool:
        """One complete snapshot part (earlier buffered messages); False when there is no room for it."""
        if not self.spool.room_for(sum(len(m.data) for m in msgs) + self.chunk_size + SUMMARY_RESERVE,
                                   RANK[FAULT_SNAPSHOT]):
            return False
        self._snap_part += 1
        meta = dict(self.metadata, priority_class=FAULT_SNAPSHOT, **self._snap_meta, part=str(self._snap_part))
        w = None
        try:
            w = SegmentWriter(self.spool.new_part_path(cls=FAULT_SNAPSHOT), self.compression, self.chunk_size, meta,
                              opener=self.spool.open_part)
            for m in msgs:
                w.write(m)
        except OSError as exc:
            self.stats.write_errors += 1
            self.stats.disk_full += int(is_full(exc))
            self.stats.last_error = f"{FAULT_SNAPSHOT}: {exc}"
            if w is not None:
                w.abort()
            return False
        return self._commit(FAULT_SNAPSHOT, w) is not None

    def _close_due(self, now_ns: int) -> None:
        for cls in list(self._open):
            if cls == FAULT_SNAPSHOT:
                if self._snap_end_ns is not None and now_ns >= self._snap_end_ns:
                    self._snap_end_ns = None
                    self._close(cls)
            elif not 0 <= now_ns - self._opened_at[cls] < self.max_duration_ns:  # due, or the clock jumped back
                self._close(cls)

    def tick(self, now_ns: int) -> None:
        """Close segments that are due (and an expired snapshot); retry held-back commits; resume paused classes."""
        self._close_due(now_ns)
        if self._snap_end_ns is not None and FAULT_SNAPSHOT not in self._open and now_ns >= self._snap_end_ns:
            self._snap_end_ns = None
        self._retry_unacked()
        for cls, why in list(self.paused.items()):
            if self._unacked and why.startswith("disk full"):
                continue  # finished segments first
            resume_need = 2 * (sum(w.close_reserve() for w in self._open.values()) + self.chunk_size
                               + SUMMARY_RESERVE)
            if self.spool.room_for(resume_need, RANK[cls]):
                del self.paused[cls]
                self.stats.resumes += 1

    def _retry_unacked(self) -> None:
        for item in list(self._unacked):
            path, cls, meta = item
            if not path.exists():
                self._unacked.remove(item)
                continue
            try:
                seg = self.spool.commit(path, cls, meta=meta, checked=True)
            except OSError as exc:
                self.stats.last_error = f"{cls}: {exc}"
                return
            self._unacked.remove(item)
            self._acked(seg, cls)

    def _close(self, cls: str) -> Segment | None:
        w = self._open.pop(cls)
        self._opened_at.pop(cls, None)
        if w.messages == 0:
            w.abort()
            return None
        return self._commit(cls, w)

    def _commit(self, cls: str, w: SegmentWriter) -> Segment | None:
        """Finish ``w`` and hand it to the spool; out of room while committing, it waits for tick()."""
        meta = json.dumps(dict(self.metadata, priority_class=cls, messages=w.messages, first_ns=w.first_ns,
                               last_ns=w.last_ns), sort_keys=True)
        try:
            w.close()
        except OSError as exc:  # could not even finish the file: its messages are lost (counted)
            self.stats.dropped_messages += w.messages
            self.stats.write_errors += 1
            self.stats.disk_full += int(is_full(exc))
            self.stats.last_error = f"{cls}: {exc}"
            w.abort()
            w.path.unlink(missing_ok=True)
            self._notify(None, f"write error: {exc}")
            return None
        try:
            seg = self.spool.commit(w.path, cls, meta=meta, checked=True)
        except OSError as exc:  # finished file, but no room to acknowledge it now (database or disk full)
            self.stats.disk_full += int(is_full(exc))
            self.stats.last_error = f"{cls}: {exc}"
            if is_full(exc):
                self.spool.evict_bytes(self.part_bytes, RANK[cls])
            self._unacked.append((w.path, cls, meta))
            if cls != FAULT_SNAPSHOT:
                if cls not in self.paused:
                    self.stats.pauses += 1
                self.paused[cls] = f"disk full: {exc}"
            return None
        return self._acked(seg, cls)

    def _acked(self, seg: Segment | None, cls: str) -> Segment | None:
        if seg is not None:
            self.stats.segments_committed += 1
            if cls == FAULT_SNAPSHOT:
                self.stats.snapshot_parts += 1
        self._notify(seg, cls)
        return seg

    def _notify(self, seg: Segment | None, what: str) -> None:
        if self.on_segment:
            self.on_segment(seg, what)

    def flush_files(self) -> None:
        """Hand finished chunks of open segments to the OS (a crash then loses only open chunks)."""
        for cls, w in list(self._open.items()):
            try:
                w.flush()
            except OSError as exc:
                self._failed(cls, exc)

    def flush(self) -> list[Segment]:
        """Close every open segment now (shutdown); a running snapshot is closed too. Never raises OSError.

        A finished segment the spool cannot take (no room) is left in ``incoming/`` for recovery to adopt.
        """
        out = []
        self._snap_end_ns = None
        for cls in list(self._open):
            seg = self._close(cls)
            if seg is not None:
                out.append(seg)
        self._retry_unacked()
        return out
