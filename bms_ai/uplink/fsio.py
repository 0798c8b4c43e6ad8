"""The file-system calls through which the spool writes: one narrow seam for space accounting and faults.

Every byte the uploader writes to its spool (segments while recorded, copies of
CAN logs, salvaged segments) goes through :class:`SpoolFS`, so the spool can
count it against the quota as it is written, and tests can make the disk "full"
here (raise ENOSPC) without filling a real disk. SQLite writes its own files;
those are counted by size (see :meth:`bms_ai.uplink.spool.Spool.usage_bytes`).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import IO


class SpoolFullError(OSError):
    """No room: the disk is full (ENOSPC), the database is full, or the spool's quota would be exceeded."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


def is_full(exc: BaseException) -> bool:
    """Whether an error means "out of space" (ENOSPC, EDQUOT, EFBIG, or SQLite's 'database or disk is full')."""
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return "full" in str(exc).lower()


def is_regular(path: Path) -> bool:
    """A regular file, not followed through a symlink (symlinks, FIFOs, devices, folders are not)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def open_regular(path: Path) -> IO[bytes]:
    """Open for reading without following a symlink; OSError unless it is a regular file."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: {path.name}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


class CountingFile:
    """A file being written whose every write is reported (space accounting) before it reaches the disk."""

    def __init__(self, f: IO[bytes], on_write: Callable[[int], None]) -> None:
        self._f = f
        self._on_write = on_write

    def write(self, data: bytes) -> int:
        """Write and account for ``data``."""
        n = self._f.write(data)
        self._on_write(len(data))
        return n

    def tell(self) -> int:
        """Position (bytes written so far)."""
        return self._f.tell()

    def flush(self) -> None:
        """Hand buffered bytes to the OS."""
        self._f.flush()

    def fileno(self) -> int:
        """The OS file descriptor (fsync)."""
        return self._f.fileno()

    def close(self) -> None:
        """Close the file."""
        self._f.close()

    @property
    def closed(self) -> bool:
        """Whether it is closed."""
        return self._f.closed


class SpoolFS:
    """Real file-system calls. Subclass to inject faults (tests); the spool never writes around it."""

    def open_write(self, path: Path) -> IO[bytes]:
        """A new file for writing (an existing one, e.g. a symlink planted there, is an error, never followed)."""
        return open(path, "xb")  # noqa: SIM115 - the caller owns it

    def copy(self, src: Path, dst: Path, on_write: Callable[[int], None]) -> None:
        """Copy a regular file (never through a symlink) into the spool."""
        with open_regular(src) as fin, self.open_write(dst) as fout:
            while chunk := fin.read(1 << 20):
                fout.write(chunk)
                on_write(len(chunk))

    def fsync(self, f: IO[bytes] | CountingFile) -> None:
        """Flush and fsync an open file (delayed allocation can report ENOSPC only here)."""
        f.flush()
        os.fsync(f.fileno())

    def fsync_path(self, path: Path) -> None:
        """fsync a finished file by name."""
        with open(path, "rb+") as f:
            os.fsync(f.fileno())

    def free_bytes(self, path: Path) -> int:
        """Free bytes on the file system holding ``path``."""
        return shutil.disk_usage(path).free
