"""Recorded CAN logs: one suffix table of readers, messages one by one or a whole log as arrays.

Every reader of a log file goes through :data:`LOG_FORMATS`, in the style of
python-can's ``LogReader``: a new format is one entry (a :class:`LogFormat`
that opens the file) and is then available to the decode CLI, the offline
decoder, log replays and the bridge. A format may also bring a faster
whole-file array reader (BLF does).
"""

from __future__ import annotations

import gzip
import io
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import can
import numpy as np

from bms_ai.can.frames import FrameArrays, stamp_ok, stamps_ok
from bms_ai.core.registry import Registry, UnknownName

#: frames per chunk when a log is streamed (a few MB of arrays, whatever the drive's length)
CHUNK_ROWS = 65536
#: a pause in a log longer than this (s) starts a new segment; the replay clock shortens such a
#: pause to the same length (``sources.MAX_REPLAY_GAP``) and the samplers skip past it
MAX_GAP = 60.0
#: a step back in time larger than this (s) starts a new, rebased segment: the log was restarted or
#: concatenated. Smaller steps are jitter between interleaved buses (22 ms in a real two-bus
#: SavvyCAN log): left as they are, the decoders reject such a frame as ``time_backwards``.
MAX_BACKSTEP = 1.0
#: a rebased segment starts this long after the latest frame before it
SEGMENT_STEP = 0.01


class LogError(ValueError):
    """A CAN log that cannot be read; the message is one line naming the file and the reason."""


class LogFormat:
    """How to read one log format; subclass :meth:`open`, optionally :meth:`arrays`."""

    #: :meth:`arrays` is much cheaper per frame than reading messages (replays then use it)
    fast_arrays = False

    def open(self, path: Path):
        """A reader of ``path``: an iterable of python-can messages that is also a context manager.

        Raising here means "not a log of this format" (reported as cannot open);
        raising while iterating means damage after the frames already read.
        """
        raise NotImplementedError

    def cut_short(self, path: Path) -> str | None:
        """Why a file that read without error still looks truncated (None: it looks whole).

        Readers of line formats stop quietly at the end of the data; a missing
        end marker or a last line without its newline is how a cut shows.
        """
        return None

    def arrays(self, path: Path) -> FrameArrays:
        """All frames as columns; ``.error`` says why reading stopped early."""
        errors: list[str] = []
        frames = FrameArrays.from_messages(messages(self, path, errors))
        frames.error = errors[0] if errors else None
        return frames

    def array_chunks(self, path: Path, rows: int, errors: list[str] | None, skip: int = 0) -> Iterator[FrameArrays]:
        """The frames after the first ``skip`` as columns, ``rows`` at a time (damage as in :func:`messages`)."""
        it = islice(messages(self, path, errors), skip, None)
        while batch := list(islice(it, rows)):
            yield FrameArrays.from_messages(batch)


class PythonCanLog(LogFormat):
    """A format python-can reads with the reader class ``can.<reader>`` (gzip-compressed files too)."""

    def __init__(self, reader: str, text: bool = False, end_marker: bytes = b"") -> None:
        self.reader = reader
        self.text = text  # a line format: every line ends with a newline
        self.end_marker = end_marker  # the last line a whole file carries (lower case)

    def open(self, path: Path):
        """python-can's reader (its ``LogReader`` for ``.gz``, which decompresses)."""
        if Path(path).suffix.lower() == ".gz":
            return can.LogReader(str(path))
        return getattr(can, self.reader)(str(path))

    def cut_short(self, path: Path) -> str | None:
        """A text log whose last line is incomplete or lacks the format's end marker."""
        if not self.text or Path(path).suffix.lower() == ".gz":
            return None
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, 2) - 256))
            tail = f.read()
        if not tail:
            return None
        if not tail.endswith((b"\n", b"\r")):
            return f"{path}: truncated: the last line is incomplete"
        if self.end_marker and self.end_marker not in tail.lower():
            return f"{path}: truncated: no '{self.end_marker.decode()}' line at the end"
        return None


def _open_text(path: Path):
    """A text log for reading (decompressed when it ends in ``.gz``); undecodable bytes stay visible."""
    if Path(path).suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


class _LineReader:
    """A text log read line by line; a line that does not parse is damage naming its number (or a cut last line)."""

    first_line = 1

    def __init__(self, path: Path) -> None:
        self._f = _open_text(path)

    def __enter__(self) -> _LineReader:
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def _message(self, line: str) -> can.Message | None:
        """The frame of one line (None: a line without a frame); raises ValueError/IndexError on a bad one."""
        raise NotImplementedError

    def __iter__(self) -> Iterator[can.Message]:
        for lineno, line in enumerate(self._f, start=self.first_line):
            try:
                msg = self._message(line)
            except (ValueError, IndexError, OverflowError) as exc:
                if not line.endswith("\n"):
                    raise ValueError(f"truncated: the last line ({lineno}) is incomplete") from None
                raise ValueError(f"line {lineno}: {exc}") from None
            if msg is not None:
                yield msg


class GvretCsvReader(_LineReader):
    """SavvyCAN's GVRET CSV: ``Time Stamp,ID,Extended,[Dir,]Bus,LEN,D1..Dn``, time in microseconds, hex fields.

    Columns are found by the header's names, so the variants with and without
    ``Dir`` (and CAN FD exports with more data columns) read alike.
    """

    REQUIRED = ("time stamp", "id", "extended", "len")
    first_line = 2

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        names = [c.strip().lower() for c in self._f.readline().split(",")]
        missing = [c for c in self.REQUIRED if c not in names]
        if missing:
            self._f.close()
            raise ValueError(f"not a GVRET CSV header (no {', '.join(missing)} column)")
        col = {n: i for i, n in enumerate(names)}
        self._cols = (col["time stamp"], col["id"], col["extended"], col["len"], col.get("bus"), col.get("dir"))
        self._data = [i for i, n in enumerate(names) if n[:1] == "d" and n[1:].isdigit()]

    def _message(self, line: str) -> can.Message | None:
        """One CSV row (None for a blank line)."""
        f = line.rstrip("\r\n").split(",")
        if f == [""]:
            return None
        ts, fid, ext, n, bus, direction = self._cols
        size = int(f[n])
        return can.Message(
            timestamp=float(f[ts]) / 1e6, arbitration_id=int(f[fid], 16),
            is_extended_id=f[ext].strip().lower() == "true",
            channel=int(f[bus]) if bus is not None and f[bus].strip() else None,
            is_rx=direction is None or f[direction].strip().lower() != "tx",
            dlc=size, data=bytes(int(f[i], 16) for i in self._data[:size]), check=True)


class CsvLog(PythonCanLog):
    """``.csv``: SavvyCAN GVRET CSV or python-can CSV, told apart by the header line."""

    def __init__(self) -> None:
        super().__init__("CSVReader", text=True)

    def open(self, path: Path):
        """The GVRET reader when the first line names ``Time Stamp`` and ``ID``, else python-can's."""
        with _open_text(path) as f:
            header = f.readline(4096).strip().lower()
        if header.startswith("time stamp,id,"):
            return GvretCsvReader(path)
        if header and not header.startswith("timestamp,"):
            raise ValueError(f"neither a python-can CSV (timestamp,arbitration_id,...) nor a SavvyCAN GVRET CSV "
                             f"(Time Stamp,ID,...) header: {header[:60]!r}")
        return super().open(path)


class CandumpReader(_LineReader):
    """SocketCAN candump text: ``(TS) [IFACE] ID#DATA`` (``candump -l``) or ``(TS) IFACE ID [N] B0 B1 ..``.

    The interface is optional (logs written without it, or rewritten by tools
    that drop it); ``ID##F DATA`` is a CAN FD frame, ``ID#R`` a remote frame.
    Console output without timestamps cannot be placed in time and raises
    (record with ``candump -l`` or ``candump -ta``).
    """

    @staticmethod
    def _frame(ts: float, channel: str | None, fields: list[str]) -> can.Message:
        """One frame from the fields after the timestamp and interface."""
        if "#" in fields[0]:
            ident, _, payload = fields[0].partition("#")
            fd = payload.startswith("#")
            if fd:
                payload = payload[2:]  # the flags nibble after "##"
            remote = payload[:1].upper() == "R"
            data = b"" if remote else bytes.fromhex(payload)
        else:  # ID [N] B0 B1 ..
            ident, fd, remote = fields[0], False, False
            n = int(fields[1].strip("[]"))
            data = bytes(int(b, 16) for b in fields[2:2 + n])
            if len(data) != n:
                raise ValueError(f"{n} data bytes announced, {len(data)} given")
        msg = can.Message(arbitration_id=int(ident, 16), is_extended_id=len(ident) > 3, channel=channel,
                          is_remote_frame=remote, is_fd=fd, data=data, check=True)
        msg.timestamp = ts  # damaged stamps (inf, nan) pass on: the decoders count them as bad_time
        return msg

    def _message(self, line: str) -> can.Message | None:
        """One candump line (None for a blank one)."""
        f = line.split()
        if not f:
            return None
        if not f[0].startswith("("):
            raise ValueError("no timestamp: candump console output cannot be placed in time "
                             "(record with `candump -l` or `candump -ta`)")
        ts = float(f[0].strip("()"))
        # no interface column: the frame starts right after the stamp (ID#.. or ID [N] ..)
        bare = "#" in f[1] or f[2].startswith("[")
        return self._frame(ts, None if bare else f[1], f[1:] if bare else f[2:])


class CandumpLog(PythonCanLog):
    """``.log``: candump text with or without the interface column (see :class:`CandumpReader`)."""

    def __init__(self) -> None:
        super().__init__("CanutilsLogReader", text=True)

    def open(self, path: Path):
        """The project's candump reader (python-can's needs the interface column)."""
        return CandumpReader(path)


LOG_FORMATS: Registry[LogFormat] = Registry("log format")
LOG_FORMATS.add(".asc", PythonCanLog("ASCReader", text=True, end_marker=b"end triggerblock"), "Vector ASCII")
LOG_FORMATS.add(".blf", "bms_ai.can.blf_fast:BLF", "Vector binary logging format (fast array reader)")
LOG_FORMATS.add(".csv", CsvLog(), "python-can CSV or SavvyCAN GVRET CSV (by the header line)")
LOG_FORMATS.add(".db", PythonCanLog("SqliteReader"), "python-can SQLite")
LOG_FORMATS.add(".log", CandumpLog(), "SocketCAN candump (-l, or -ta console lines), interface column optional")
LOG_FORMATS.add(".mf4", PythonCanLog("MF4Reader"), "ASAM MDF 4 (needs asammdf)")
LOG_FORMATS.add(".trc", PythonCanLog("TRCReader", text=True), "PEAK trace")


class Timeline:
    """Log time made usable in one place, for every reader: segments instead of lost frames.

    A jump back by more than :data:`MAX_BACKSTEP` (a restarted logger, logs
    joined end to end) starts a new segment that is shifted to begin
    :data:`SEGMENT_STEP` after the latest frame so far, so the rest of the log
    keeps its frames and time keeps increasing. A pause over ``max_gap`` also
    starts a segment (counted; its stamps stay: the decoders and the replay
    clock bound what a pause costs). Damaged stamps (:func:`frames.stamp_ok`:
    NaN, inf, negative, >= 2^32 s) pass through untouched, so the decoders
    reject and count each of them as ``bad_time``; they never start a segment.
    """

    def __init__(self, max_gap: float = MAX_GAP, max_backstep: float = MAX_BACKSTEP) -> None:
        self.max_gap, self.max_backstep = max_gap, max_backstep
        self.offset = 0.0  # added to the raw stamps of the current segment
        self.latest = -np.inf  # latest raw stamp of the current segment
        self.rebased = 0  # segments started by a jump back
        self.gaps = 0  # segments started by a pause over max_gap

    @property
    def segments(self) -> int:
        """Stretches of continuous time seen so far (0 before the first usable stamp)."""
        return 0 if self.latest == -np.inf else 1 + self.rebased + self.gaps

    def summary(self) -> str:
        """One phrase for a report; empty when the log is one segment."""
        if self.segments <= 1:
            return ""
        return (f"{self.segments} time segments ({self.rebased} jumps back rebased, "
                f"{self.gaps} pauses over {self.max_gap:g} s)")

    def stamp(self, ts: float) -> float:
        """The stamp of the next frame on the log's continuous time."""
        if not stamp_ok(ts):
            return ts
        if self.latest == -np.inf:
            self.latest = ts
        elif ts < self.latest - self.max_backstep:
            self.rebased += 1
            self.offset += self.latest + SEGMENT_STEP - ts
            self.latest = ts
        elif ts > self.latest:
            self.gaps += ts - self.latest > self.max_gap
            self.latest = ts
        return ts + self.offset

    def arrays(self, frames: FrameArrays) -> FrameArrays:
        """``frames`` (the next chunk of the log) with their stamps on continuous time, in place."""
        ts = frames.ts
        ok = stamps_ok(ts)
        raw = ts[ok]
        if raw.size == 0:
            return frames
        run = np.maximum.accumulate(np.concatenate(([self.latest], raw)))
        if (raw >= run[:-1] - self.max_backstep).all():  # no jump back: one offset (the common case)
            first = 1 if self.latest == -np.inf else 0  # the log's first stamp is no pause
            self.gaps += int((raw - run[:-1] > self.max_gap)[first:].sum())
            self.latest = float(run[-1])
            ts[ok] = raw + self.offset
        else:
            ts[ok] = [self.stamp(t) for t in raw.tolist()]
        return frames


def log_suffix(path: str | Path) -> str:
    """The table key of a log file: its suffix, lower case, looking through a final ``.gz``."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if len(suffixes) >= 2 and suffixes[-1] == ".gz":
        return suffixes[-2]
    return suffixes[-1] if suffixes else ""


def log_format(path: str | Path) -> LogFormat:
    """The reader for ``path`` by its suffix; LogError naming the file and the known formats."""
    try:
        return LOG_FORMATS.get(log_suffix(path))
    except UnknownName as exc:
        raise LogError(f"{path}: cannot open as a CAN log ({exc})") from None


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"CAN log not found: {p}")
    return p


def messages(fmt: LogFormat, path: Path, errors: list[str] | None = None) -> Iterator[can.Message]:
    """Messages of ``path`` read as ``fmt``; damage ends the stream with its reason in ``errors``.

    Without an ``errors`` list, damage raises :class:`LogError` instead.
    """
    try:
        reader = fmt.open(path)
    except Exception as exc:  # bad header, missing optional reader: python-can raises many types
        raise LogError(f"{path}: cannot open as a CAN log ({type(exc).__name__}: {exc})") from exc
    n = 0
    try:
        with reader:
            for msg in reader:
                n += 1
                yield msg
        reason = fmt.cut_short(path)
    except MemoryError:  # out of memory is not damage of the file
        raise
    except Exception as exc:  # corrupt content
        reason = f"{path}: unreadable after {n} frames ({type(exc).__name__}: {exc})"
    if reason is None:
        return
    if errors is None:
        raise LogError(reason)
    errors.append(reason)


def _on_channel(msgs: Iterator[can.Message], channel: str | None) -> Iterator[can.Message]:
    """Only the frames of one bus (``str(message.channel)``: ``0`` in a GVRET CSV, ``can0`` in candump)."""
    if channel is None:
        return msgs
    return (m for m in msgs if str(m.channel) == channel)


def iter_log(path: str | Path, errors: list[str] | None = None,
             timeline: Timeline | None = None, channel: str | None = None) -> Iterator[can.Message]:
    """Messages of any log in :data:`LOG_FORMATS` (.asc .blf .log .trc .csv .mf4 ...), on continuous time.

    A damaged file yields every frame before the damage; the reason goes into
    ``errors`` (or raises :class:`LogError` when no list is given). Stamps go
    through ``timeline`` (a fresh :class:`Timeline` by default; pass one to
    read its segment counts). ``channel`` keeps one bus of a multi-bus log.
    """
    p = _existing(path)
    timeline = timeline or Timeline()
    for msg in _on_channel(messages(log_format(p), p, errors), channel):
        msg.timestamp = timeline.stamp(msg.timestamp)
        yield msg


def read_log_chunks(path: str | Path, rows: int = CHUNK_ROWS, errors: list[str] | None = None,
                    timeline: Timeline | None = None, channel: str | None = None) -> Iterator[FrameArrays]:
    """A log's frames as arrays, ``rows`` at a time: memory bounded by a chunk, not by the log.

    Damage ends the stream with its reason in ``errors`` (LogError without a list);
    stamps go through ``timeline`` and ``channel`` selects a bus as in :func:`iter_log`.
    """
    p = _existing(path)
    rows = max(1, int(rows))
    if channel is not None:  # the bus is a message field: read messages, not a format's arrays
        it = iter_log(p, errors, timeline, channel)
        return (FrameArrays.from_messages(b) for b in iter(lambda: list(islice(it, rows)), []))
    timeline = timeline or Timeline()
    return map(timeline.arrays, log_format(p).array_chunks(p, rows, errors))


def read_log(path: str | Path, timeline: Timeline | None = None) -> FrameArrays:
    """All frames of a log as arrays on continuous time; ``.error`` says if the file was cut short."""
    p = _existing(path)
    return (timeline or Timeline()).arrays(log_format(p).arrays(p))
