"""Durable store-and-forward spool: segment files + one SQLite (WAL) row each.

"Acknowledged" means durable: the file is fsynced, renamed into ``segments/``
(directory fsynced) and its row committed with ``synchronous=FULL``. From then
on the segment leaves the spool only by upload, or by eviction/expiry, which
are counted. Recovery on start never raises on damaged state: half-written
files, orphan files and rows whose file is missing or wrong are counted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from bms_ai.core.files import sha256_file

# Highest priority first. Eviction takes the lowest class, oldest first.
PRIORITY_CLASSES: tuple[str, ...] = ("fault_snapshot", "diagnostics", "estimates", "raw")
RANK = {c: i for i, c in enumerate(PRIORITY_CLASSES)}  # 0 = most important

PENDING, UPLOADED, EVICTED, EXPIRED, CORRUPT, LOST = "pending", "uploaded", "evicted", "expired", "corrupt", "lost"

COUNTERS = ("acknowledged", "uploaded", "evicted", "evicted_bytes", "expired", "rejected", "corrupt", "lost",
            "recovered_partial", "salvaged_messages", "recovered_orphan", "removed_orphan", "db_rebuilt")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS segments (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  file TEXT NOT NULL,
  cls TEXT NOT NULL,
  rank INTEGER NOT NULL,
  sha256 TEXT NOT NULL,
  size INTEGER NOT NULL,
  created REAL NOT NULL,
  state TEXT NOT NULL,
  attempts INTEGER NOT NULL DEFAULT 0,
  last_error TEXT NOT NULL DEFAULT '',
  done REAL,
  meta TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS seg_state ON segments(state, rank, created);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Segment:
    """An acknowledged segment: its file, class, hash and upload attempts."""

    id: int
    path: Path
    cls: str
    sha256: str
    size: int
    created: float
    attempts: int
    meta: str = ""


@dataclass
class RecoveryReport:
    """What recovery found and did at start."""

    partial_removed: int = 0
    orphans_adopted: int = 0
    orphans_removed: int = 0
    missing: int = 0
    wrong_size: int = 0
    salvaged_messages: int = 0
    details: list[str] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """Segment store with quota, minimum free space and priority eviction. Thread-safe."""

    def __init__(self, root: str | os.PathLike[str], quota_bytes: int = 1 << 30, min_free_bytes: int = 256 << 20,
                 fsync: bool = True) -> None:
        self.root = Path(root)
        self.quota_bytes = int(quota_bytes)
        self.min_free_bytes = int(min_free_bytes)
        self.fsync = fsync
        self.incoming = self.root / "incoming"
        self.segments_dir = self.root / "segments"
        self.quarantine = self.root / "quarantine"
        for d in (self.incoming, self.segments_dir, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._busy: set[int] = set()
        self.db_rebuilt = False
        try:
            self._db = self._open_db()
        except sqlite3.DatabaseError:
            # Damaged database: keep it for inspection and rebuild from the files, whose names carry
            # sha256 and class, so every intact segment is adopted again by recover().
            stamp = time.strftime("%Y%m%dT%H%M%S")
            for suffix in ("", "-wal", "-shm"):
                f = self.root / f"spool.db{suffix}"
                if f.exists():
                    os.replace(f, self.quarantine / f"spool.db{suffix}.{stamp}")
            self._db = self._open_db()
            self.db_rebuilt = True
        self.last_recovery = self.recover()
        if self.db_rebuilt:
            with self._tx():
                self._bump("db_rebuilt")

    @contextlib.contextmanager
    def _tx(self):  # noqa: ANN202 - a row change and its counter commit together or not at all
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "spool.db", check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL" if self.fsync else "PRAGMA synchronous=OFF")
            db.executescript(_SCHEMA)
            if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("quick_check failed")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    # -- counters ---------------------------------------------------------------------------
    def _bump(self, name: str, n: int = 1) -> None:
        self._db.execute("INSERT INTO counters(name, value) VALUES(?, ?) "
                         "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value", (name, n))

    def counters(self) -> dict[str, int]:
        """Lifetime counters (survive restarts: they live in the database)."""
        with self._lock:
            got = dict(self._db.execute("SELECT name, value FROM counters").fetchall())
        return {k: int(got.get(k, 0)) for k in COUNTERS}

    # -- writing ----------------------------------------------------------------------------
    def new_part_path(self, suffix: str = ".mcap", cls: str = "") -> Path:
        """Where a writer puts a segment while it is being written (never uploaded from here).

        The class in the name lets recovery salvage a crashed MCAP segment into the right class.
        """
        tag = f".{cls}" if cls in RANK else ""
        return self.incoming / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}{tag}{suffix}.part"

    def commit(self, part: str | os.PathLike[str], cls: str, meta: str = "", created: float | None = None,
               suffix: str | None = None) -> Segment | None:
        """Make a finished file durable and acknowledge it; None (counted 'rejected') if no room."""
        if cls not in RANK:
            raise ValueError(f"unknown priority class {cls!r}; expected one of {PRIORITY_CLASSES}")
        part = Path(part)
        if self.fsync:
            with open(part, "rb+") as f:
                os.fsync(f.fileno())
        digest = sha256_file(part)
        size = part.stat().st_size
        if suffix is None:
            name = part.name[:-5] if part.name.endswith(".part") else part.name
            suffix = "".join(Path(name).suffixes) or ".bin"
        created = time.time() if created is None else created
        with self._lock:
            same = self._db.execute("SELECT id, file, cls, sha256, size, created, attempts, meta FROM segments "
                                    "WHERE sha256=? AND state=?", (digest, PENDING)).fetchone()
            if same is not None:  # identical content already waiting (e.g. a log picked up twice): one copy
                part.unlink(missing_ok=True)
                return self._row(same)
            with self._tx():
                victims = self._make_room(size, RANK[cls])
                if victims is None:
                    self._bump("rejected")
                else:
                    final = self.segments_dir / f"{digest}.{cls}{suffix}"
                    os.replace(part, final)
                    if self.fsync:
                        _fsync_dir(self.segments_dir)
                    cur = self._db.execute(
                        "INSERT INTO segments(file, cls, rank, sha256, size, created, state, meta) "
                        "VALUES(?,?,?,?,?,?,?,?)", (final.name, cls, RANK[cls], digest, size, created, PENDING, meta))
                    self._bump("acknowledged")
            if victims is None:
                part.unlink(missing_ok=True)
                return None
            self._unlink(victims)
            return Segment(int(cur.lastrowid or 0), final, cls, digest, size, created, 0, meta)

    def _unlink(self, files: list[str]) -> None:
        """Delete files of rows already committed as gone (a crash here leaves orphans recovery removes)."""
        for f in files:
            (self.segments_dir / f).unlink(missing_ok=True)

    def add_file(self, src: str | os.PathLike[str], cls: str, meta: str = "") -> Segment | None:
        """Copy an external file (e.g. a closed CAN log) into the spool and acknowledge it."""
        src = Path(src)
        part = self.incoming / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.part"
        shutil.copyfile(src, part)
        return self.commit(part, cls, meta=meta, suffix="".join(src.suffixes) or ".bin")

    # -- space ------------------------------------------------------------------------------
    def used_bytes(self) -> int:
        """Bytes of pending segments (what the quota counts)."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM segments WHERE state=?",
                                        (PENDING,)).fetchone()[0])

    def free_bytes(self) -> int:
        """Free bytes on the spool's file system."""
        return shutil.disk_usage(self.root).free

    def _make_room(self, size: int, rank: int) -> list[str] | None:
        """Evict lowest-priority, oldest-first segments of priority <= the newcomer's until it fits.

        Runs inside the caller's transaction; returns the files to delete after commit, or None if no room.
        """
        used0, free0 = self.used_bytes(), self.free_bytes()

        def room_ok(reclaimed: int) -> bool:
            return (used0 - reclaimed + size <= self.quota_bytes
                    and free0 + reclaimed - size >= self.min_free_bytes)

        if room_ok(0):
            return []
        victims = self._db.execute(
            "SELECT id, file, size FROM segments WHERE state=? AND rank>=? ORDER BY rank DESC, created ASC, id ASC",
            (PENDING, rank)).fetchall()
        plan: list[tuple[int, str, int]] = []
        reclaimed = 0
        for vid, vfile, vsize in victims:
            if vid in self._busy:
                continue
            plan.append((vid, vfile, vsize))
            reclaimed += vsize
            if room_ok(reclaimed):
                break
        if not room_ok(reclaimed):
            return None  # evicting would not help: keep what we have, refuse the newcomer
        now = time.time()
        for vid, _vfile, vsize in plan:
            self._db.execute("UPDATE segments SET state=?, done=? WHERE id=?", (EVICTED, now, vid))
            self._bump("evicted")
            self._bump("evicted_bytes", vsize)
        return [vfile for _vid, vfile, _vsize in plan]

    # -- reading / state changes ------------------------------------------------------------
    def _row(self, r: tuple) -> Segment:
        return Segment(int(r[0]), self.segments_dir / r[1], r[2], r[3], int(r[4]), float(r[5]), int(r[6]), r[7])

    def pending(self, newest_first: bool = False, limit: int = 1000) -> list[Segment]:
        """Pending segments in upload order: class first, then age."""
        order = "DESC" if newest_first else "ASC"
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, file, cls, sha256, size, created, attempts, meta FROM segments WHERE state=? "
                f"ORDER BY rank ASC, created {order}, id {order} LIMIT ?", (PENDING, limit)).fetchall()
        return [self._row(r) for r in rows]

    def claim(self, newest_first: bool = False) -> Segment | None:
        """Next segment to upload (highest class first); it is protected from eviction until released."""
        with self._lock:
            for seg in self.pending(newest_first, limit=len(self._busy) + 1):
                if seg.id not in self._busy:
                    self._busy.add(seg.id)
                    return seg
        return None

    def release(self, seg: Segment, error: str = "") -> None:
        """Give a claimed segment back (upload failed: the error is recorded, the segment stays pending)."""
        with self._lock:
            self._busy.discard(seg.id)
            if error:
                self._db.execute("UPDATE segments SET attempts=attempts+1, last_error=? WHERE id=?",
                                 (error[:500], seg.id))

    def mark_uploaded(self, seg: Segment, delete: bool = True) -> None:
        """The backend confirmed it: the row is done and the file goes."""
        with self._lock:
            self._busy.discard(seg.id)
            with self._tx():
                cur = self._db.execute("UPDATE segments SET state=?, done=?, attempts=attempts+1 "
                                       "WHERE id=? AND state=?", (UPLOADED, time.time(), seg.id, PENDING))
                if cur.rowcount:
                    self._bump("uploaded")
            if delete:
                seg.path.unlink(missing_ok=True)

    def mark_corrupt(self, seg: Segment, reason: str) -> None:
        """Move a damaged file aside (kept for inspection) and count it; it is never uploaded."""
        with self._lock:
            self._busy.discard(seg.id)
            if seg.path.exists():
                with contextlib.suppress(OSError):
                    os.replace(seg.path, self.quarantine / seg.path.name)
            with self._tx():
                self._db.execute("UPDATE segments SET state=?, done=?, last_error=? WHERE id=?",
                                 (CORRUPT, time.time(), reason[:500], seg.id))
                self._bump("corrupt")

    def mark_lost(self, seg: Segment, reason: str) -> None:
        """The file vanished: counted, never retried."""
        with self._lock:
            self._busy.discard(seg.id)
            with self._tx():
                self._db.execute("UPDATE segments SET state=?, done=?, last_error=? WHERE id=?",
                                 (LOST, time.time(), reason[:500], seg.id))
                self._bump("lost")

    def expire(self, max_age_s: dict[str, float], now: float | None = None) -> int:
        """Backlog-age policy: drop pending segments older than their class limit (counted 'expired')."""
        now = time.time() if now is None else now
        n = 0
        with self._lock:
            for cls, age in max_age_s.items():
                if not age or age <= 0:
                    continue
                rows = self._db.execute("SELECT id, file FROM segments WHERE state=? AND cls=? AND created<?",
                                        (PENDING, cls, now - age)).fetchall()
                gone = []
                with self._tx():
                    for sid, f in rows:
                        if sid in self._busy:
                            continue
                        self._db.execute("UPDATE segments SET state=?, done=? WHERE id=?", (EXPIRED, now, sid))
                        self._bump("expired")
                        gone.append(f)
                self._unlink(gone)
                n += len(gone)
        return n

    def states(self) -> dict[str, int]:
        """Row count per state."""
        with self._lock:
            return dict(self._db.execute("SELECT state, COUNT(*) FROM segments GROUP BY state").fetchall())

    def hashes(self, states: Iterable[str] = (PENDING, UPLOADED)) -> list[str]:
        """Content hashes of segments in the given states."""
        st = list(states)
        with self._lock:
            q = f"SELECT sha256 FROM segments WHERE state IN ({','.join('?' * len(st))})"
            return [r[0] for r in self._db.execute(q, st).fetchall()]

    def rows(self) -> list[dict]:
        """Every row as a dict (inspection and tests)."""
        with self._lock:
            cur = self._db.execute("SELECT id, file, cls, sha256, size, created, state, attempts FROM segments")
            names = [d[0] for d in cur.description]
            return [dict(zip(names, r)) for r in cur.fetchall()]

    def oldest_pending_age(self, now: float | None = None) -> float:
        """Age of the oldest pending segment in seconds (0 when none)."""
        now = time.time() if now is None else now
        with self._lock:
            r = self._db.execute("SELECT MIN(created) FROM segments WHERE state=?", (PENDING,)).fetchone()[0]
        return 0.0 if r is None else max(0.0, now - float(r))

    def stats(self) -> dict[str, float | int]:
        """Backlog and counters in one dict."""
        with self._lock:
            n, b = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size),0) FROM segments WHERE state=?",
                                    (PENDING,)).fetchone()
        out: dict[str, float | int] = {"backlog_segments": int(n), "backlog_bytes": int(b),
                                       "backlog_age_s": self.oldest_pending_age(), "quota_bytes": self.quota_bytes}
        out.update(self.counters())
        return out

    # -- recovery ---------------------------------------------------------------------------
    def recover(self) -> RecoveryReport:
        """Bring files and rows back into agreement after a crash or power loss."""
        rep = RecoveryReport()
        with self._lock:
            self._salvage_partials(rep)
        with self._lock, self._tx():
            rows = self._db.execute("SELECT id, file, size FROM segments WHERE state=?", (PENDING,)).fetchall()
            known = set()
            for sid, fname, size in rows:
                known.add(fname)
                p = self.segments_dir / fname
                if not p.exists():
                    self._db.execute("UPDATE segments SET state=?, done=?, last_error=? WHERE id=?",
                                     (LOST, time.time(), "file missing at recovery", sid))
                    self._bump("lost")
                    rep.missing += 1
                    rep.details.append(f"missing {fname}")
                elif p.stat().st_size != size:
                    with contextlib.suppress(OSError):
                        os.replace(p, self.quarantine / fname)
                    self._db.execute("UPDATE segments SET state=?, done=?, last_error=? WHERE id=?",
                                     (CORRUPT, time.time(), "size mismatch at recovery", sid))
                    self._bump("corrupt")
                    rep.wrong_size += 1
                    rep.details.append(f"wrong size {fname}")
            all_rows = {r[0]: r[1] for r in self._db.execute("SELECT file, state FROM segments").fetchall()}
            for p in self.segments_dir.iterdir():
                if p.name in known:
                    continue
                if all_rows.get(p.name) not in (None,):  # file of a finished row (e.g. delete interrupted)
                    p.unlink(missing_ok=True)
                    continue
                # Renamed but the row never committed (crash in between): adopt it if its name checks out.
                parts = p.name.split(".")
                if len(parts) >= 2 and parts[1] in RANK and len(parts[0]) == 64 and sha256_file(p) == parts[0]:
                    self._db.execute(
                        "INSERT INTO segments(file, cls, rank, sha256, size, created, state) VALUES(?,?,?,?,?,?,?)",
                        (p.name, parts[1], RANK[parts[1]], parts[0], p.stat().st_size, p.stat().st_mtime, PENDING))
                    self._bump("recovered_orphan")
                    rep.orphans_adopted += 1
                else:
                    with contextlib.suppress(OSError):
                        os.replace(p, self.quarantine / p.name)
                    self._bump("removed_orphan")
                    rep.orphans_removed += 1
                rep.details.append(f"orphan {p.name}")
        return rep

    def _salvage_partials(self, rep: RecoveryReport) -> None:
        """Unfinished segments (writer died): keep their complete chunks as a new segment, count the rest."""
        from bms_ai.uplink.salvage import salvage_mcap  # mcap is only needed when there is something to salvage

        for p in sorted(self.incoming.iterdir()):
            if p.name.endswith(".salvage"):  # a salvage interrupted by another crash: redo from the .part
                p.unlink(missing_ok=True)
                continue
            parts = p.name.split(".")
            cls = parts[1] if len(parts) >= 4 and parts[1] in RANK else ""
            if cls and p.name.endswith(".mcap.part"):
                tmp = p.with_name(p.name + ".salvage")
                try:
                    n = salvage_mcap(p, tmp)
                    if n and self.commit(tmp, cls, meta=f'{{"salvaged_from": "{p.name}", "messages": {n}}}',
                                         suffix=".mcap") is not None:
                        rep.salvaged_messages += n
                        with self._tx():
                            self._bump("salvaged_messages", n)
                except OSError as exc:
                    rep.details.append(f"salvage failed {p.name}: {exc}")
                tmp.unlink(missing_ok=True)
            p.unlink(missing_ok=True)
            rep.partial_removed += 1
            rep.details.append(f"partial {p.name}")
        if rep.partial_removed:
            with self._tx():
                self._bump("recovered_partial", rep.partial_removed)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()
