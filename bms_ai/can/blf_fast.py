"""Fast BLF reading into arrays for offline decode and training-data prep.

python-can's BLFReader builds a ``Message`` and a ``Decimal`` per frame, which
caps offline decoding near 120k frames/s. This reader keeps python-can's file
and container handling and only replaces the inner object loop with one that
collects raw fields; timestamps are computed so that they equal python-can's
bit for bit (``raw / 10**k`` is the correctly rounded quotient, exactly what
``float(Decimal(raw) * Decimal('1e-k'))`` gives). Files holding anything but
classic CAN frames fall back to python-can.

:data:`BLF` is the ``.blf`` entry of :data:`bms_ai.can.logs.LOG_FORMATS`.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from can.io.blf import LOG_CONTAINER, LOG_CONTAINER_STRUCT, NO_COMPRESSION, ZLIB_DEFLATE, BLFParseError, BLFReader

from bms_ai.can.frames import FrameArrays
from bms_ai.can.logs import PythonCanLog

_BASE = struct.Struct("<4sHHLL")
_V1 = struct.Struct("<LHHQ")
_V2 = struct.Struct("<LBxHQ8x")
_CAN = struct.Struct("<HBBL8s")
_CAN_TYPES = (1, 86)  # CAN_MESSAGE, CAN_MESSAGE2
_REMOTE = 0x80


class UnsupportedContentError(Exception):
    """The file holds objects this fast path does not handle (CAN FD, error frames, ...)."""


#: no BLF object is smaller than its base and version-1 headers; a smaller size field
#: (0 in a damaged file) would make a reader step on the spot forever
_MIN_OBJ = _BASE.size + _V1.size
_FILE_HEAD = struct.Struct("<4sL")  # signature and header size of a BLF file
#: a BLF file header is 144 bytes; a larger size field is damage (python-can would read that many)
_MAX_HEADER = 2**16
#: the most one container may inflate to (writers use 128 KiB): a damaged one cannot eat the memory
_MAX_CONTAINER = 16 * 2**20


def _check_object_sizes(data: bytes) -> None:
    """Walk a container's objects as python-can's parser does; raise on a size that cannot advance it."""
    pos, n = 0, len(data)
    while True:
        j = data.find(b"LOBJ", pos, pos + 8)
        if j < 0 or j + 16 > n:
            return  # the parser decides: damage or the rest in the next container
        size = int.from_bytes(data[j + 8:j + 12], "little")
        if size < _MIN_OBJ:
            raise BLFParseError(f"object size {size} in a container (damaged file)")
        pos = j + size
        if pos > n:
            return


class SafeBLFReader(BLFReader):
    """python-can's BLF reader that stops on damage instead of looping, and says when a file is cut short.

    python-can trusts the object size fields: a size of 0 makes it parse the
    same bytes forever, and a truncated file ends silently. Here a damaged
    size, a truncated object or container, and an over-large container raise
    ``BLFParseError`` naming the byte offset.
    """

    def __init__(self, file) -> None:
        path = Path(file)
        # the reader owns the file and closes it in stop()
        f = gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")  # noqa: SIM115
        try:
            head = f.read(_FILE_HEAD.size)
            if len(head) == _FILE_HEAD.size and not _FILE_HEAD.size <= _FILE_HEAD.unpack(head)[1] <= _MAX_HEADER:
                raise BLFParseError(f"file header size {_FILE_HEAD.unpack(head)[1]} (damaged file)")
            f.seek(0)
            super().__init__(f)
        except BaseException:
            f.close()
            raise

    def __iter__(self):
        """Messages of each container in turn; BLFParseError on damage or truncation."""
        while True:
            offset = self.file.tell()
            head = self.file.read(_BASE.size)
            if not head:
                break
            if len(head) < _BASE.size:
                raise BLFParseError(f"truncated: object header at byte {offset} cut off")
            sig, _, _, size, otype = _BASE.unpack(head)
            if sig != b"LOBJ":
                raise BLFParseError(f"no object signature at byte {offset}")
            if size < _BASE.size:
                raise BLFParseError(f"object size {size} at byte {offset}")
            body = _read(self.file, size - _BASE.size)
            short = len(body) < size - _BASE.size  # the frames before the cut are still read
            self.file.read(size % 4)
            if otype == LOG_CONTAINER:
                yield from self._parse_container(_inflate(body, offset, partial=short))
            if short:
                raise BLFParseError(f"truncated: object at byte {offset} needs {size} bytes, "
                                    f"the file ends {len(body) + _BASE.size} bytes into it")
        if b"LOBJ" in self._tail:
            raise BLFParseError("truncated: the last object in the file is incomplete")
        self.stop()

    def _parse_data(self, data: bytes):
        """python-can's object loop, after checking that every size field moves it forward."""
        _check_object_sizes(data)
        return super()._parse_data(data)


def _read(f, n: int) -> bytes:
    """Up to ``n`` bytes, read in pieces: a damaged size field costs what the file holds, not what it claims."""
    parts = []
    while n > 0 and (part := f.read(min(n, 2**20))):
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _inflate(body: bytes, offset: int, partial: bool = False) -> bytes:
    """A container's objects, bounded in size; BLFParseError if unreadable or (unless ``partial``) cut short."""
    if len(body) < LOG_CONTAINER_STRUCT.size:
        raise BLFParseError(f"container at byte {offset} too short")
    method, _ = LOG_CONTAINER_STRUCT.unpack_from(body)
    data = body[LOG_CONTAINER_STRUCT.size:]
    if method == NO_COMPRESSION:
        return data
    if method != ZLIB_DEFLATE:
        return b""  # unknown compression: skipped, as python-can does
    z = zlib.decompressobj()
    try:
        out = z.decompress(data, _MAX_CONTAINER)
    except zlib.error as exc:
        raise BLFParseError(f"container at byte {offset}: {exc}") from None
    if not z.eof and not (partial and len(out) < _MAX_CONTAINER):
        raise BLFParseError(f"truncated: compressed container at byte {offset} is incomplete or over "
                            f"{_MAX_CONTAINER} bytes")
    return out


# A CAN_MESSAGE object with a version-1 header: 48 bytes, no padding.
_REC = np.dtype([("sig", "S4"), ("hsize", "<u2"), ("hver", "<u2"), ("osize", "<u4"), ("otype", "<u4"),
                 ("flags", "<u4"), ("client", "<u2"), ("over", "<u2"), ("ts", "<u8"), ("chan", "<u2"),
                 ("mflags", "u1"), ("dlc", "u1"), ("id", "<u4"), ("data", "u1", (8,))])
assert _REC.itemsize == 48


class _CollectingReader(SafeBLFReader):
    """python-can's BLF container handling, collecting raw rows instead of building messages."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.parts: list[np.ndarray] = []

    def _parse_data(self, data: bytes):
        """Whole containers of plain CAN objects in one numpy view; anything else object by object."""
        n = len(data) // 48
        if n:
            rec = np.frombuffer(data, dtype=_REC, count=n)
            if ((rec["sig"] == b"LOBJ") & (rec["osize"] == 48) & (rec["hver"] == 1)
                    & ((rec["otype"] == 1) | (rec["otype"] == 86))).all():
                self.parts.append(rec)
                self._pos = n * 48
                yield None  # a container read: the caller may hand out a chunk
                return
        rows: list[tuple] = []
        try:
            yield from self._parse_objects(data, rows)
        finally:
            if rows:
                part = np.zeros(len(rows), dtype=_REC)
                for name, col in zip(("flags", "ts", "chan", "mflags", "dlc", "id"), zip(*rows)):
                    part[name] = col
                part["data"] = np.frombuffer(b"".join(r[6] for r in rows), np.uint8).reshape(-1, 8)
                self.parts.append(part)
        yield None

    def _parse_objects(self, data: bytes, rows: list[tuple]):  # python-can's loop, collecting tuples
        base, v1, v2, canm = _BASE.unpack_from, _V1.unpack_from, _V2.unpack_from, _CAN.unpack_from
        max_pos = len(data)
        pos = 0
        while True:
            self._pos = pos
            try:
                pos = data.index(b"LOBJ", pos, pos + 8)
            except ValueError:
                if pos + 8 > max_pos:
                    return
                raise UnsupportedContentError("could not find next object") from None
            sig, _hsize, hver, obj_size, obj_type = base(data, pos)
            if obj_size < _MIN_OBJ:
                raise BLFParseError(f"object size {obj_size} in a container (damaged file)")
            next_pos = pos + obj_size
            if next_pos > max_pos:
                return
            pos += 16
            if hver == 1:
                flags, _, _, ts = v1(data, pos)
                pos += 16
            elif hver == 2:
                flags, _, _, ts = v2(data, pos)
                pos += 24
            else:
                raise UnsupportedContentError(f"object header version {hver}")
            if obj_type in _CAN_TYPES:
                rows.append((flags, ts) + canm(data, pos))
            elif obj_type != 96:  # 96 = GLOBAL_MARKER (ignored by python-can's CAN view too)
                raise UnsupportedContentError(f"object type {obj_type}")
            pos = next_pos
            yield from ()


def _to_frames(parts: list[np.ndarray], start_timestamp: float) -> FrameArrays:
    """Collected raw rows as columns, stamps bit-identical to python-can's."""
    rec = np.concatenate(parts) if parts else np.zeros(0, dtype=_REC)
    n = len(rec)
    raw = rec["ts"]
    if n and raw.max() >= 2**53:
        raise UnsupportedContentError("timestamps beyond float precision")
    tenmics = rec["flags"] == 1
    ts = np.where(tenmics, raw.astype(np.float64) / 1e5, raw.astype(np.float64) / 1e9) + start_timestamp
    cid = rec["id"].astype(np.uint32)
    dl = rec["dlc"].astype(np.int16)
    if (dl > 8).any():
        raise UnsupportedContentError("DLC above 8 in a classic CAN object")
    # python-can truncates data to the DLC; zero the bytes beyond it the same way
    buf = np.where(np.arange(8)[None, :] < dl[:, None], rec["data"], 0).astype(np.uint8)
    remote = (rec["mflags"] & _REMOTE) != 0
    return FrameArrays(ts, cid & np.uint32(0x1FFFFFFF), (cid & np.uint32(0x80000000)) != 0, dl, buf, remote)


def iter_blf_arrays(path: str | Path, rows: int) -> Iterator[FrameArrays]:
    """Frames of a BLF file, about ``rows`` at a time (whole containers); raises like :func:`read_blf_arrays`."""
    reader = _CollectingReader(str(path))
    try:
        for _ in reader:
            if sum(len(p) for p in reader.parts) >= rows:
                parts, reader.parts = reader.parts, []
                yield _to_frames(parts, reader.start_timestamp)
        if reader.parts:
            yield _to_frames(reader.parts, reader.start_timestamp)
    finally:
        reader.stop()


def read_blf_arrays(path: str | Path) -> FrameArrays:
    """Frames of a BLF file as :class:`FrameArrays`; raises UnsupportedContentError (and python-can's errors)."""
    reader = _CollectingReader(str(path))
    try:
        for _ in reader:
            pass
    finally:
        reader.stop()
    return _to_frames(reader.parts, reader.start_timestamp)


class BlfLog(PythonCanLog):
    """BLF: whole files through the array reader, python-can for messages and for anything unusual."""

    fast_arrays = True

    def open(self, path: Path) -> SafeBLFReader:
        """python-can's reader made safe against damaged size fields (gzip-compressed files too)."""
        return SafeBLFReader(path)

    def arrays(self, path: Path) -> FrameArrays:
        """The fast reader; on anything it does not handle, python-can's reader decides (and reports damage)."""
        if Path(path).suffix.lower() == ".blf":  # not gzip-compressed
            try:
                return read_blf_arrays(path)
            except MemoryError:
                raise
            except Exception:  # noqa: BLE001, S110  (the fallback reads, and reports, the same file)
                pass
        return super().arrays(path)

    def array_chunks(self, path: Path, rows: int, errors: list[str] | None, skip: int = 0) -> Iterator[FrameArrays]:
        """The fast reader in chunks; where it stops, python-can's reader goes on from the same frame.

        Everything before the point the fast reader gives up on is plain CAN
        frames, which python-can yields one for one, so skipping the frames
        already handed out continues the stream exactly.
        """
        if Path(path).suffix.lower() == ".blf" and skip == 0:
            try:
                for chunk in iter_blf_arrays(path, rows):
                    yield chunk
                    skip += len(chunk)
                return
            except MemoryError:
                raise
            except Exception:  # noqa: BLE001, S110  (the fallback reads, and reports, the same file)
                pass
        yield from super().array_chunks(path, rows, errors, skip)


BLF = BlfLog("BLFReader")
