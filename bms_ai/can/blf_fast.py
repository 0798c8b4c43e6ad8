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

import contextlib
import struct
from pathlib import Path

import numpy as np
from can.io.blf import BLFReader

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


# A CAN_MESSAGE object with a version-1 header: 48 bytes, no padding.
_REC = np.dtype([("sig", "S4"), ("hsize", "<u2"), ("hver", "<u2"), ("osize", "<u4"), ("otype", "<u4"),
                 ("flags", "<u4"), ("client", "<u2"), ("over", "<u2"), ("ts", "<u8"), ("chan", "<u2"),
                 ("mflags", "u1"), ("dlc", "u1"), ("id", "<u4"), ("data", "u1", (8,))])
assert _REC.itemsize == 48


class _CollectingReader(BLFReader):
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


def read_blf_arrays(path: str | Path) -> FrameArrays:
    """Frames of a BLF file as :class:`FrameArrays`; raises UnsupportedContentError (and python-can's errors)."""
    reader = _CollectingReader(str(path))
    try:
        for _ in reader:
            pass
    finally:
        reader.stop()
    rec = np.concatenate(reader.parts) if reader.parts else np.zeros(0, dtype=_REC)
    n = len(rec)
    raw = rec["ts"]
    if n and raw.max() >= 2**53:
        raise UnsupportedContentError("timestamps beyond float precision")
    tenmics = rec["flags"] == 1
    ts = np.where(tenmics, raw.astype(np.float64) / 1e5, raw.astype(np.float64) / 1e9) + reader.start_timestamp
    cid = rec["id"].astype(np.uint32)
    dl = rec["dlc"].astype(np.int16)
    if (dl > 8).any():
        raise UnsupportedContentError("DLC above 8 in a classic CAN object")
    # python-can truncates data to the DLC; zero the bytes beyond it the same way
    buf = np.where(np.arange(8)[None, :] < dl[:, None], rec["data"], 0).astype(np.uint8)
    remote = (rec["mflags"] & _REMOTE) != 0
    return FrameArrays(ts, cid & np.uint32(0x1FFFFFFF), (cid & np.uint32(0x80000000)) != 0, dl, buf, remote)


class BlfLog(PythonCanLog):
    """BLF: whole files through the array reader, python-can for messages and for anything unusual."""

    fast_arrays = True

    def arrays(self, path: Path) -> FrameArrays:
        """The fast reader; on anything it does not handle, python-can's reader decides (and reports damage)."""
        if Path(path).suffix.lower() == ".blf":  # not gzip-compressed
            with contextlib.suppress(Exception):  # the fallback reads (and reports) the same file
                return read_blf_arrays(path)
        return super().arrays(path)


BLF = BlfLog("BLFReader")
