"""Recorded CAN logs: one suffix table of readers, messages one by one or a whole log as arrays.

Every reader of a log file goes through :data:`LOG_FORMATS`, in the style of
python-can's ``LogReader``: a new format is one entry (a :class:`LogFormat`
that opens the file) and is then available to the decode CLI, the offline
decoder, log replays and the bridge. A format may also bring a faster
whole-file array reader (BLF does).
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import can

from bms_ai.can.frames import FrameArrays
from bms_ai.core.registry import Registry, UnknownName

#: frames per chunk when a log is streamed (a few MB of arrays, whatever the drive's length)
CHUNK_ROWS = 65536


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


LOG_FORMATS: Registry[LogFormat] = Registry("log format")
LOG_FORMATS.add(".asc", PythonCanLog("ASCReader", text=True, end_marker=b"end triggerblock"), "Vector ASCII")
LOG_FORMATS.add(".blf", "bms_ai.can.blf_fast:BLF", "Vector binary logging format (fast array reader)")
LOG_FORMATS.add(".csv", PythonCanLog("CSVReader", text=True), "python-can CSV")
LOG_FORMATS.add(".db", PythonCanLog("SqliteReader"), "python-can SQLite")
LOG_FORMATS.add(".log", PythonCanLog("CanutilsLogReader", text=True), "SocketCAN candump -l")
LOG_FORMATS.add(".mf4", PythonCanLog("MF4Reader"), "ASAM MDF 4 (needs asammdf)")
LOG_FORMATS.add(".trc", PythonCanLog("TRCReader", text=True), "PEAK trace")


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


def iter_log(path: str | Path, errors: list[str] | None = None) -> Iterator[can.Message]:
    """Messages of any log in :data:`LOG_FORMATS` (.asc .blf .log .trc .csv .mf4 ...).

    A damaged file yields every frame before the damage; the reason goes into
    ``errors`` (or raises :class:`LogError` when no list is given).
    """
    p = _existing(path)
    yield from messages(log_format(p), p, errors)


def read_log_chunks(path: str | Path, rows: int = CHUNK_ROWS,
                    errors: list[str] | None = None) -> Iterator[FrameArrays]:
    """A log's frames as arrays, ``rows`` at a time: memory bounded by a chunk, not by the log.

    Damage ends the stream with its reason in ``errors`` (LogError without a list).
    """
    p = _existing(path)
    return log_format(p).array_chunks(p, max(1, int(rows)), errors)


def read_log(path: str | Path) -> FrameArrays:
    """All frames of a log as arrays; ``.error`` says if the file was cut short."""
    p = _existing(path)
    return log_format(p).arrays(p)
