"""Durable store-and-forward spool: segment files + one SQLite (WAL) row each.

"Acknowledged" means durable: the file is fsynced, renamed into ``segments/``
(directory fsynced) and its row committed with ``synchronous=FULL``. From then
on the segment leaves the spool only by upload, or by eviction, expiry or a
permanent refusal by the server (quarantined), all counted. Recovery on start
never raises on damaged state: half-written files, orphan files, rows whose
file is missing or wrong, and symlinks or other non-regular files are counted.

Space: ``quota_bytes`` bounds every file under the spool folder (segments,
segments being written, quarantine, the database with its WAL and shm; the
database counts as at least ``db_reserve_bytes``), and ``min_free_bytes`` is
kept free on the file system. Both are checked *before* writing
(:meth:`Spool.room_for`), evicting lower-or-equal priority segments when that
makes enough room, and never after. Writes go through :class:`SpoolFS`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bms_ai.core.files import sha256_file
from bms_ai.uplink.fsio import CountingFile, SpoolFS, SpoolFullError, is_full, is_regular

# Highest priority first. Eviction takes the lowest class, oldest first.
PRIORITY_CLASSES: tuple[str, ...] = ("fault_snapshot", "diagnostics", "estimates", "raw")
RANK = {c: i for i, c in enumerate(PRIORITY_CLASSES)}  # 0 = most important

PENDING, UPLOADED, EVICTED, EXPIRED, CORRUPT, LOST, REFUSED = (
    "pending", "uploaded", "evicted", "expired", "corrupt", "lost", "refused")
FINISHED = (UPLOADED, EVICTED, EXPIRED, CORRUPT, LOST, REFUSED)

COUNTERS = ("acknowledged", "uploaded", "evicted", "evicted_bytes", "expired", "rejected", "corrupt", "lost",
            "refused", "quarantine_dropped", "unsafe_files", "recovered_partial", "salvaged_messages",
            "recovered_orphan", "removed_orphan", "db_rebuilt")

DB_RESERVE = 512 << 10  # the database (+ WAL + shm) is counted as at least this much
WAL_PAGES = 64  # checkpoint the WAL every 64 pages (256 KiB) and truncate it to this size after
KEEP_FINISHED_S = 7 * 86400.0  # rows of finished segments are kept this long (inspection), then pruned

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
    unsafe: int = 0
    details: list[str] = field(default_factory=list)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _evictable(rank: int) -> int:
    """Lowest rank a newcomer of ``rank`` may evict: its own class and below, but a fault snapshot never
    pushes out another (or its own earlier parts): it is cut short instead, keeping what is nearest the fault."""
    return max(rank, RANK["fault_snapshot"] + 1)


def _tree_bytes(root: str, depth: int = 0) -> Iterator[tuple[str, int, int]]:
    """(name, size, depth below ``root``) of every file under ``root``; symlinks are counted as links, never
    followed. Plain strings: a spool of thousands of segments is walked every second."""
    try:
        entries = list(os.scandir(root))
    except OSError:
        return
    for e in entries:
        try:
            st = e.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            yield from _tree_bytes(e.path, depth + 1)
        else:
            yield e.name, st.st_size, depth


class SpoolInUseError(ValueError):
    """Another uploader holds this spool: a configuration error (two packs given one spool dir)."""


def _own(root: Path):  # noqa: ANN202 - an open file whose lock marks the spool as taken
    """An exclusive lock on ``root``: two uploaders on one spool would adopt and delete each other's segments."""
    f = open(root / ".owner", "a+")  # noqa: SIM115 - held open for the spool's life
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip()[:64] or "another process"
        f.close()
        raise SpoolInUseError(f"spool {root} is in use by {holder} (give each pack its own spool.dir)") from None
    f.truncate(0)
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    return f


class Spool:
    """Segment store with quota, minimum free space and priority eviction. Thread-safe."""

    def __init__(self, root: str | os.PathLike[str], quota_bytes: int = 1 << 30, min_free_bytes: int = 256 << 20,
                 fsync: bool = True, fs: SpoolFS | None = None, db_reserve_bytes: int = DB_RESERVE) -> None:
        self.root = Path(root)
        self.quota_bytes = int(quota_bytes)
        self.min_free_bytes = int(min_free_bytes)
        self.db_reserve_bytes = int(db_reserve_bytes)
        self.fsync = fsync
        self.fs = fs or SpoolFS()
        self.incoming = self.root / "incoming"
        self.segments_dir = self.root / "segments"
        self.quarantine = self.root / "quarantine"
        for d in (self.incoming, self.segments_dir, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._owner = _own(self.root)
        self._lock = threading.RLock()
        self._busy: set[int] = set()
        self._usage = 0
        self._free = 0
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
        self.refresh()
        self.last_recovery = self.recover()
        if self.db_rebuilt:
            with self._tx():
                self._bump("db_rebuilt")
        self.refresh()

    @contextlib.contextmanager
    def _tx(self):  # noqa: ANN202 - a row change and its counter commit together or not at all
        """One transaction; SQLite's "database or disk is full" comes out as SpoolFullError (an OSError)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise (SpoolFullError(f"spool database: {exc}") if is_full(exc)
                   else OSError(f"spool database: {exc}")) from exc
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.OperationalError):
                raise (SpoolFullError(f"spool database: {exc}") if is_full(exc)
                       else OSError(f"spool database: {exc}")) from exc
            raise

    def _open_db(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.root / "spool.db", check_same_thread=False, isolation_level=None)
        try:
            db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect on a new database only
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL" if self.fsync else "PRAGMA synchronous=OFF")
            db.execute(f"PRAGMA wal_autocheckpoint={WAL_PAGES}")
            db.execute(f"PRAGMA journal_size_limit={WAL_PAGES * 4096}")
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

    # -- space ------------------------------------------------------------------------------
    def usage_bytes(self) -> int:
        """Bytes of every file under the spool folder; the database counts as at least ``db_reserve_bytes``."""
        db = files = 0
        for name, size, depth in _tree_bytes(str(self.root)):
            if depth == 0 and name.startswith("spool.db"):
                db += size
            else:
                files += size
        return files + max(db, self.db_reserve_bytes)

    def refresh(self) -> None:
        """Measure usage and free space again (called at start, each second, and before any refusal)."""
        with self._lock:
            self._usage = self.usage_bytes()
            self._free = self.fs.free_bytes(self.root)

    def _account(self, n: int) -> None:
        """Bytes just written (positive) or deleted (negative), between two measurements."""
        with self._lock:
            self._usage += n
            self._free -= n

    def free_bytes(self) -> int:
        """Free bytes on the spool's file system (as last measured, minus what was written since)."""
        return self._free

    def spool_bytes(self) -> int:
        """Bytes counted against the quota (as last measured, plus what was written since)."""
        return self._usage

    def used_bytes(self) -> int:
        """Bytes of pending segments (the backlog; the quota covers more, see :meth:`spool_bytes`)."""
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(size), 0) FROM segments WHERE state=?",
                                        (PENDING,)).fetchone()[0])

    def _fits(self, need: int, reclaim: int = 0) -> bool:
        return (self._usage - reclaim + need <= self.quota_bytes
                and self._free + reclaim - need >= self.min_free_bytes)

    def room_for(self, need: int, rank: int, evict: bool = True) -> bool:
        """Whether ``need`` more bytes may be written for a class of ``rank``, before writing them.

        If not, and ``evict``: measure again, then evict quarantined files and pending segments of the same
        or lower priority (lowest class first, oldest first) if that makes enough room; else evict nothing.
        """
        with self._lock:
            if self._fits(need):
                return True
            self.refresh()
            if self._fits(need):
                return True
            if not evict:
                return False
            return self._make_room(need, rank)

    def _make_room(self, need: int, rank: int) -> bool:
        """Evict quarantine, then pending segments ``rank`` may evict (lowest class, oldest first) until it fits."""
        quarantined = sorted(((p.stat(follow_symlinks=False).st_mtime, p) for p in self.quarantine.iterdir()),
                             key=lambda t: t[0]) if self.quarantine.is_dir() else []
        q_plan: list[tuple[Path, int]] = []
        reclaimed = 0
        for _mt, p in quarantined:
            if self._fits(need, reclaimed):
                break
            size = p.lstat().st_size
            q_plan.append((p, size))
            reclaimed += size
        victims = self._db.execute(
            "SELECT id, file, size FROM segments WHERE state=? AND rank>=? ORDER BY rank DESC, created ASC, id ASC",
            (PENDING, _evictable(rank))).fetchall()
        plan: list[tuple[int, str, int]] = []
        for vid, vfile, vsize in victims:
            if self._fits(need, reclaimed):
                break
            if vid not in self._busy:
                plan.append((vid, vfile, vsize))
                reclaimed += vsize
        if not self._fits(need, reclaimed):
            return False  # evicting would not help: keep what we have, refuse the newcomer
        self._evict(plan, q_plan)
        return True

    def evict_bytes(self, nbytes: int, rank: int) -> int:
        """Free at least ``nbytes`` now: the disk is full although the measurement said otherwise (another
        writer, a stale reading). Quarantine first, then pending segments of rank >= ``rank``, lowest class
        and oldest first. Returns the bytes freed (0 when nothing of that priority is left)."""
        with self._lock:
            q_plan: list[tuple[Path, int]] = []
            plan: list[tuple[int, str, int]] = []
            freed = 0
            for p in sorted(self.quarantine.iterdir(), key=lambda p: p.lstat().st_mtime):
                if freed >= nbytes:
                    break
                q_plan.append((p, p.lstat().st_size))
                freed += q_plan[-1][1]
            rows = self._db.execute("SELECT id, file, size FROM segments WHERE state=? AND rank>=? "
                                    "ORDER BY rank DESC, created ASC, id ASC", (PENDING, _evictable(rank))).fetchall()
            for vid, vfile, vsize in rows:
                if freed >= nbytes:
                    break
                if vid not in self._busy:
                    plan.append((vid, vfile, vsize))
                    freed += vsize
            self._evict(plan, q_plan)
            return freed

    def _evict(self, plan: list[tuple[int, str, int]], q_plan: list[tuple[Path, int]]) -> None:
        now = time.time()
        try:
            with self._tx():
                for vid, _vfile, vsize in plan:
                    self._db.execute("UPDATE segments SET state=?, done=? WHERE id=?", (EVICTED, now, vid))
                    self._bump("evicted")
                    self._bump("evicted_bytes", vsize)
                if q_plan:
                    self._bump("quarantine_dropped", len(q_plan))
        except SpoolFullError:
            # The database cannot record it (disk full): free the space anyway. The rows stay pending,
            # so the uploader finds the files gone and counts them 'lost' instead of 'evicted'.
            pass
        for p, size in q_plan:
            p.unlink(missing_ok=True)
            self._account(-size)
        for _vid, vfile, vsize in plan:
            (self.segments_dir / vfile).unlink(missing_ok=True)
            self._account(-vsize)

    # -- writing ----------------------------------------------------------------------------
    def new_part_path(self, suffix: str = ".mcap", cls: str = "") -> Path:
        """Where a writer puts a segment while it is being written (never uploaded from here).

        The class in the name lets recovery salvage a crashed MCAP segment into the right class.
        """
        tag = f".{cls}" if cls in RANK else ""
        return self.incoming / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}{tag}{suffix}.part"

    def open_part(self, path: Path) -> CountingFile:
        """A new file in ``incoming/`` whose writes are counted against the quota as they happen."""
        return CountingFile(self.fs.open_write(path), self._account)

    def commit(self, part: str | os.PathLike[str], cls: str, meta: str = "", created: float | None = None,
               suffix: str | None = None, checked: bool = False) -> Segment | None:
        """Make a finished file durable and acknowledge it; None (counted 'rejected') if no room.

        ``checked``: room was checked before the file was written (the recorder), so it is not refused now.
        Out of space while committing (fsync, database) raises SpoolFullError and leaves ``part`` in place,
        so the caller can try again later; recovery salvages it after a crash.
        """
        if cls not in RANK:
            raise ValueError(f"unknown priority class {cls!r}; expected one of {PRIORITY_CLASSES}")
        part = Path(part)
        if not is_regular(part):
            raise OSError(f"not a regular file: {part.name}")
        if self.fsync:
            self.fs.fsync_path(part)
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
                self._account(-size)
                return self._row(same)
            if not checked:
                self.refresh()  # the part was written outside our accounting: measure it
            if not checked and not self.room_for(0, RANK[cls]):
                with self._tx():
                    self._bump("rejected")
                part.unlink(missing_ok=True)
                self._account(-size)
                return None
            return self._acknowledge(part, cls, digest, size, created, suffix, meta)

    def _acknowledge(self, part: Path, cls: str, digest: str, size: int, created: float, suffix: str,
                     meta: str) -> Segment:
        final = self.segments_dir / f"{digest}.{cls}{suffix}"
        renamed = False
        try:
            with self._tx():  # rename inside the transaction: a crash in between leaves an orphan recovery adopts
                os.replace(part, final)
                renamed = True
                if self.fsync:
                    _fsync_dir(self.segments_dir)
                cur = self._db.execute(
                    "INSERT INTO segments(file, cls, rank, sha256, size, created, state, meta) VALUES(?,?,?,?,?,?,?,?)",
                    (final.name, cls, RANK[cls], digest, size, created, PENDING, meta))
                self._bump("acknowledged")
        except BaseException:
            if renamed:
                os.replace(final, part)  # not acknowledged: back where the caller (or recovery) finds it
            raise
        return Segment(int(cur.lastrowid or 0), final, cls, digest, size, created, 0, meta)

    def add_file(self, src: str | os.PathLike[str], cls: str, meta: str = "") -> Segment | None:
        """Copy an external regular file (e.g. a closed CAN log) into the spool and acknowledge it.

        Room is checked before copying; None (counted 'rejected') when there is none.
        """
        src = Path(src)
        size = os.lstat(src).st_size
        if not self.room_for(size, RANK[cls]):
            with self._lock, self._tx():
                self._bump("rejected")
            return None
        part = self.incoming / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.part"
        try:
            self.fs.copy(src, part, self._account)
        except BaseException:
            part.unlink(missing_ok=True)
            raise
        return self.commit(part, cls, meta=meta, suffix="".join(src.suffixes) or ".bin", checked=True)

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
                with contextlib.suppress(sqlite3.Error):
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
                self._account(-seg.size)

    def _set_aside(self, seg: Segment, state: str, counter: str, reason: str) -> None:
        """Move a segment's file to quarantine/ (kept for inspection, counted in the quota) and end its row."""
        with self._lock:
            self._busy.discard(seg.id)
            with contextlib.suppress(OSError):
                os.replace(seg.path, self.quarantine / seg.path.name)
            with self._tx():
                self._db.execute("UPDATE segments SET state=?, done=?, last_error=? WHERE id=?",
                                 (state, time.time(), reason[:500], seg.id))
                self._bump(counter)

    def mark_corrupt(self, seg: Segment, reason: str) -> None:
        """A damaged file: moved aside and counted; it is never uploaded."""
        self._set_aside(seg, CORRUPT, "corrupt", reason)

    def mark_refused(self, seg: Segment, reason: str) -> None:
        """The server refuses it for good (e.g. HTTP 413): quarantined, counted, the rest keep flowing."""
        self._set_aside(seg, REFUSED, "refused", reason)

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
                rows = self._db.execute("SELECT id, file, size FROM segments WHERE state=? AND cls=? AND created<?",
                                        (PENDING, cls, now - age)).fetchall()
                gone = []
                with self._tx():
                    for sid, f, size in rows:
                        if sid in self._busy:
                            continue
                        self._db.execute("UPDATE segments SET state=?, done=? WHERE id=?", (EXPIRED, now, sid))
                        self._bump("expired")
                        gone.append((f, size))
                for f, size in gone:
                    (self.segments_dir / f).unlink(missing_ok=True)
                    self._account(-size)
                n += len(gone)
        return n

    def prune(self, keep_s: float = KEEP_FINISHED_S, now: float | None = None) -> int:
        """Forget rows of segments finished more than ``keep_s`` ago (counters keep the totals)."""
        now = time.time() if now is None else now
        marks = ",".join("?" * len(FINISHED))
        with self._lock, self._tx():
            cur = self._db.execute(f"DELETE FROM segments WHERE state IN ({marks}) AND done < ?",
                                   (*FINISHED, now - keep_s))
        if cur.rowcount:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA incremental_vacuum")
        return int(cur.rowcount or 0)

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
        """Backlog, space and counters in one dict."""
        with self._lock:
            n, b = self._db.execute("SELECT COUNT(*), COALESCE(SUM(size),0) FROM segments WHERE state=?",
                                    (PENDING,)).fetchone()
        out: dict[str, float | int] = {"backlog_segments": int(n), "backlog_bytes": int(b),
                                       "backlog_age_s": self.oldest_pending_age(), "quota_bytes": self.quota_bytes,
                                       "spool_bytes": self._usage, "free_bytes": self._free}
        out.update(self.counters())
        return out

    # -- recovery ---------------------------------------------------------------------------
    def _set_unsafe_aside(self, p: Path, rep: RecoveryReport) -> None:
        """A symlink, FIFO, device or folder where a segment should be: moved aside unfollowed, counted."""
        with contextlib.suppress(OSError):
            os.replace(p, self.quarantine / f"unsafe.{p.name}")
        self._bump("unsafe_files")
        rep.unsafe += 1
        rep.details.append(f"not a regular file {p.name}")

    def recover(self) -> RecoveryReport:
        """Bring files and rows back into agreement after a crash or power loss."""
        rep = RecoveryReport()
        with self._lock:
            self._salvage_partials(rep)
        with self._lock, self._tx():
            known = self._check_rows(rep)
            self._adopt_orphans(known, rep)
        return rep

    def _check_rows(self, rep: RecoveryReport) -> set[str]:
        """Pending rows whose file is missing (lost), wrong or not a regular file (corrupt)."""
        rows = self._db.execute("SELECT id, file, size FROM segments WHERE state=?", (PENDING,)).fetchall()
        known = set()
        for sid, fname, size in rows:
            known.add(fname)
            p = self.segments_dir / fname
            if not os.path.lexists(p):
                self._db.execute("UPDATE segments SET state=?, done=?, last_error=? WHERE id=?",
                                 (LOST, time.time(), "file missing at recovery", sid))
                self._bump("lost")
                rep.missing += 1
                rep.details.append(f"missing {fname}")
            elif not is_regular(p) or p.lstat().st_size != size:
                with contextlib.suppress(OSError):
                    os.replace(p, self.quarantine / fname)
                self._db.execute("UPDATE segments SET state=?, done=?, last_error=? WHERE id=?",
                                 (CORRUPT, time.time(), "size mismatch or not a regular file at recovery", sid))
                self._bump("corrupt")
                rep.wrong_size += 1
                rep.details.append(f"wrong size {fname}")
        return known

    def _adopt_orphans(self, known: set[str], rep: RecoveryReport) -> None:
        """Files in segments/ without a pending row: adopt if the name checks out, else move aside."""
        all_rows = {r[0] for r in self._db.execute("SELECT file FROM segments").fetchall()}
        for p in self.segments_dir.iterdir():
            if p.name in known:
                continue
            if not is_regular(p):  # never follow or adopt a symlink or special file
                self._set_unsafe_aside(p, rep)
                continue
            if p.name in all_rows:  # file of a finished row (e.g. delete interrupted)
                p.unlink(missing_ok=True)
                continue
            # Renamed but the row never committed (crash in between): adopt it if its name checks out.
            parts = p.name.split(".")
            if len(parts) >= 2 and parts[1] in RANK and len(parts[0]) == 64 and sha256_file(p) == parts[0]:
                st = p.lstat()
                self._db.execute(
                    "INSERT INTO segments(file, cls, rank, sha256, size, created, state) VALUES(?,?,?,?,?,?,?)",
                    (p.name, parts[1], RANK[parts[1]], parts[0], st.st_size, st.st_mtime, PENDING))
                self._bump("recovered_orphan")
                rep.orphans_adopted += 1
            else:
                with contextlib.suppress(OSError):
                    os.replace(p, self.quarantine / p.name)
                self._bump("removed_orphan")
                rep.orphans_removed += 1
            rep.details.append(f"orphan {p.name}")

    def _salvage_partials(self, rep: RecoveryReport) -> None:
        """Unfinished segments (writer died): keep their complete chunks as a new segment, count the rest."""
        for p in sorted(self.incoming.iterdir()):
            if not is_regular(p):
                with self._tx():
                    self._set_unsafe_aside(p, rep)
                continue
            if p.name.endswith(".salvage"):  # a salvage interrupted by another crash: redo from the .part
                p.unlink(missing_ok=True)
                continue
            self._salvage_one(p, rep)
            p.unlink(missing_ok=True)
            rep.partial_removed += 1
            rep.details.append(f"partial {p.name}")
        if rep.partial_removed:
            with self._tx():
                self._bump("recovered_partial", rep.partial_removed)

    def _salvage_one(self, p: Path, rep: RecoveryReport) -> None:
        from bms_ai.uplink.salvage import salvage_mcap  # mcap is only needed when there is something to salvage

        parts = p.name.split(".")
        cls = parts[1] if len(parts) >= 4 and parts[1] in RANK else ""
        if not (cls and p.name.endswith(".mcap.part")):
            return
        tmp = p.with_name(p.name + ".salvage")
        try:
            n = salvage_mcap(p, tmp, self.open_part)
            if n and self.commit(tmp, cls, meta=f'{{"salvaged_from": "{p.name}", "messages": {n}}}',
                                 suffix=".mcap", checked=True) is not None:
                rep.salvaged_messages += n
                with self._tx():
                    self._bump("salvaged_messages", n)
        except OSError as exc:
            rep.details.append(f"salvage failed {p.name}: {exc}")
        tmp.unlink(missing_ok=True)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            self._db.close()
            self._owner.close()  # releases the spool for the next uploader
