"""Cloud ingest: uploaded MCAP segments -> per-vehicle timelines, Parquet partitioned by vehicle and day.

One segment at a time (the unit of parallel work in ``bms_ai.fleet.pipeline``):
its ``/bms/pack/measurements`` and ``/bms/battery_state`` messages are decoded in
bulk (``bms_ai.core.cdr``, no rclpy), joined by stamp, the SOC sigma taken from
the estimator's ``soc`` diagnostic, and written as
``timelines/vehicle=<pseudonym>/day=<YYYY-MM-DD>/part-<segment hash>.parquet``
(idempotent: the part is named by the segment's content hash). Columns: t (unix
s), current, cell_v and cell_t (lists), soc_est, capacity_est, sigma (NaN between
soc statuses). A damaged segment (bad CRC, truncated, undecodable message) is a
counted rejection with its reason, never a crash.

``read_timeline`` assembles one vehicle's parts (only that vehicle in memory):
sorted by time, duplicate stamps dropped, sigma carried forward, sessions
derived from gaps in the samples (a park between them).
"""

from __future__ import annotations

import datetime
import io
import posixpath
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bms_ai.core.cdr import CdrError, decode_battery_states, decode_diagnostic_array
from bms_ai.fleet.edge import BATTERY, DIAGNOSTICS, MEASUREMENTS
from bms_ai.fleet.store import ObjectStore

TIMELINES = "timelines"
SEGMENTS = "segments"
SESSION_GAP_S = 10.0      # samples further apart than this belong to different sessions (the vehicle slept)


class SegmentError(ValueError):
    """A segment that cannot be ingested (damaged file, missing metadata, undecodable message)."""


@dataclass
class SegmentData:
    """One segment's decoded contents."""

    meta: dict[str, str]
    meas: dict[str, np.ndarray]
    state: dict[str, np.ndarray]
    sigma_t: np.ndarray
    sigma: np.ndarray


OP_CHUNK, OP_MESSAGE = 0x06, 0x05


def _chunk_records(data: bytes, offset: int, length: int) -> bytes:
    """The decompressed, CRC-checked records of the Chunk record at ``offset``."""
    if data[offset] != OP_CHUNK or offset + length > len(data):
        raise SegmentError(f"no chunk record at offset {offset}")
    p = offset + 9
    _t0, _t1, usize, crc, n = struct.unpack_from("<QQQII", data, p)
    p += 32
    compression = data[p:p + n].decode()
    p += n
    (size,) = struct.unpack_from("<Q", data, p)
    body = data[p + 8:p + 8 + size]
    if compression == "zstd":
        import zstandard
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=usize)
    elif compression == "lz4":
        import lz4.frame
        raw = lz4.frame.decompress(body)
    elif compression == "":
        raw = bytes(body)
    else:
        raise SegmentError(f"unknown chunk compression {compression!r}")
    if len(raw) != usize or (crc and zlib.crc32(raw) != crc):
        raise SegmentError(f"chunk at offset {offset}: CRC or size mismatch")
    return raw


def _split_messages(raw: bytes, wanted: dict[int, list[bytes]]) -> None:
    """Message records of a decompressed chunk, appended by channel id (others skipped)."""
    p, end = 0, len(raw)
    unpack = struct.unpack_from
    while p < end:
        op, length = unpack("<BQ", raw, p)
        p += 9
        if p + length > end:
            raise SegmentError("truncated record inside a chunk")
        if op == OP_MESSAGE:
            out = wanted.get(unpack("<H", raw, p)[0])
            if out is not None:
                out.append(raw[p + 22:p + length])
        p += length


def _read_records(data: bytes, topics: list[str]) -> tuple[dict[str, str], dict[str, list[bytes]]]:
    """Metadata and message payloads per topic, in file order.

    The mcap library reads the footer, summary and metadata (so a file without them, e.g. cut
    short, is refused as it would be by any MCAP reader); the chunks are then split here in one
    tight loop, as the library's per-record objects cost more than the whole decode.
    """
    from mcap.reader import make_reader

    reader = make_reader(io.BytesIO(data), validate_crcs=True)
    summary = reader.get_summary()
    if summary is None:
        raise SegmentError("no summary section (segment not finished)")
    meta: dict[str, str] = {}
    for m in reader.iter_metadata():
        if m.name == "bms_ai":
            meta.update(m.metadata)
    payloads: dict[str, list[bytes]] = {t: [] for t in topics}
    wanted = {cid: payloads[ch.topic] for cid, ch in summary.channels.items() if ch.topic in payloads}
    for ci in sorted(summary.chunk_indexes, key=lambda c: c.chunk_start_offset):
        _split_messages(_chunk_records(data, ci.chunk_start_offset, ci.chunk_length), wanted)
    return meta, payloads


def read_segment(data: bytes) -> SegmentData:
    """Decode a segment; SegmentError with the reason when it is damaged or not a fleet segment."""
    try:
        meta, payloads = _read_records(data, [MEASUREMENTS, BATTERY, DIAGNOSTICS])
    except SegmentError:
        raise
    except Exception as exc:  # noqa: BLE001 - any damage in a file from outside is a rejection, not a crash
        raise SegmentError(f"unreadable MCAP: {type(exc).__name__}: {exc}") from None
    if not meta.get("vehicle"):
        raise SegmentError("no vehicle in the segment metadata")
    if not payloads[MEASUREMENTS]:
        raise SegmentError(f"no {MEASUREMENTS} messages")
    try:
        meas = decode_battery_states(payloads[MEASUREMENTS])
        state = decode_battery_states(payloads[BATTERY]) if payloads[BATTERY] else {}
        sig_t, sig = [], []
        for p in payloads[DIAGNOSTICS]:
            t, statuses = decode_diagnostic_array(p)
            for st in statuses:
                if st.name.endswith(": soc"):
                    v = dict(st.values).get("soc_sigma")
                    if v is not None:
                        sig_t.append(t)
                        sig.append(float(v))
    except (CdrError, ValueError) as exc:
        raise SegmentError(f"undecodable message: {exc}") from None
    return SegmentData(meta, meas, state, np.array(sig_t), np.array(sig))


def _fixed_list(a: np.ndarray) -> pa.Array:
    a = np.ascontiguousarray(a, np.float32)
    return pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), a.shape[1])


def segment_table(seg: SegmentData) -> pa.Table:
    """The timeline rows of one segment (sorted by t; estimator columns NaN where it gave none)."""
    m = seg.meas
    t = m["t"]
    order = np.argsort(t, kind="stable")
    t = t[order]
    soc = np.full(len(t), np.nan)
    cap = np.full(len(t), np.nan)
    if seg.state:
        k = np.searchsorted(t, seg.state["t"])
        hit = (k < len(t)) & (t[np.minimum(k, len(t) - 1)] == seg.state["t"])
        soc[k[hit]] = seg.state["percentage"][hit]
        cap[k[hit]] = seg.state["capacity"][hit]
    sigma = np.full(len(t), np.nan)
    if len(seg.sigma_t):
        k = np.minimum(np.searchsorted(t, seg.sigma_t), len(t) - 1)
        sigma[k] = seg.sigma
    return pa.table({
        "t": t, "current": m["current"][order].astype(np.float32),
        "cell_v": _fixed_list(m["cell_voltage"][order]), "cell_t": _fixed_list(m["cell_temperature"][order]),
        "soc_est": soc.astype(np.float32), "capacity_est": cap.astype(np.float32), "sigma": sigma.astype(np.float32),
    })


def day_of(t_unix: float) -> str:
    """UTC day of a wall time (the partition)."""
    return datetime.datetime.fromtimestamp(float(t_unix), datetime.timezone.utc).strftime("%Y-%m-%d")


def part_key(vehicle: str, day: str, name: str) -> str:
    """Where one segment's rows of one day go."""
    return f"{TIMELINES}/vehicle={vehicle}/day={day}/part-{name}.parquet"


def table_bytes(table: pa.Table) -> bytes:
    """Parquet (zstd) in memory, for an atomic put; no dictionaries (float samples: 3x slower, larger)."""
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf, compression="zstd", use_dictionary=False, write_statistics=False)
    return buf.getvalue().to_pybytes()


def ingest_segment(store: ObjectStore, key: str) -> list[dict]:
    """One segment into its timeline part(s); manifest rows (one per day, or one with ``error`` when rejected)."""
    name = posixpath.basename(key).split(".")[0][:32]
    try:
        seg = read_segment(store.get(key))
        table = segment_table(seg)
    except (SegmentError, KeyError) as exc:
        return [{"key": key, "error": str(exc)}]
    vehicle = seg.meta["vehicle"]
    t = table.column("t").to_numpy()
    days = np.floor(t / 86400.0)
    out = []
    for d in np.unique(days):
        sel = np.flatnonzero(days == d)
        part = table.slice(int(sel[0]), len(sel))     # sorted by t: one day is one contiguous slice
        day = day_of(d * 86400.0)
        pk = part_key(vehicle, day, name)
        store.put(pk, table_bytes(part))
        out.append({"key": key, "error": "", "vehicle": vehicle, "day": day, "part": pk, "rows": len(sel),
                    "t0": float(t[sel[0]]), "t1": float(t[sel[-1]]), "chemistry": seg.meta.get("chemistry", ""),
                    "design_capacity_ah": float(seg.meta.get("design_capacity_ah", "nan")),
                    "n_cells": int(table.column("cell_v").type.list_size)})
    return out


@dataclass
class Timeline:
    """One vehicle's samples over a period, in time order (what the labeller and SOH trend read)."""

    vehicle: str
    t: np.ndarray
    current: np.ndarray
    cell_v: np.ndarray
    cell_t: np.ndarray
    soc_est: np.ndarray
    capacity_est: np.ndarray
    sigma: np.ndarray
    session: np.ndarray
    days: list[str] = field(default_factory=list)

    @property
    def hours(self) -> float:
        """Vehicle-hours of samples (awake time)."""
        return float(np.sum(np.where(np.diff(self.session) == 0, np.diff(self.t), 0.0))) / 3600.0


def sessions_from_gaps(t: np.ndarray, gap_s: float = SESSION_GAP_S) -> np.ndarray:
    """Session index per sample: a new session after each gap longer than ``gap_s`` (the vehicle slept)."""
    return np.concatenate([[0], np.cumsum(np.diff(t) > gap_s)]).astype(np.int32)


def _ffill(x: np.ndarray) -> np.ndarray:
    ok = np.isfinite(x)
    if not ok.any():
        return x
    idx = np.where(ok, np.arange(len(x)), 0)
    np.maximum.accumulate(idx, out=idx)
    out = x[idx]
    out[: int(np.argmax(ok))] = np.nan
    return out


def read_timeline(store: ObjectStore, vehicle: str, parts: Iterable[str] | None = None,
                  gap_s: float = SESSION_GAP_S) -> Timeline:
    """One vehicle's timeline from its Parquet parts (all of them, or the given keys)."""
    keys = sorted(parts) if parts is not None else list(store.list(f"{TIMELINES}/vehicle={vehicle}/"))
    if not keys:
        raise KeyError(f"no timeline parts for vehicle {vehicle}")
    table = pa.concat_tables([pq.read_table(io.BytesIO(store.get(k))) for k in keys])
    t = table.column("t").to_numpy()
    order = np.argsort(t, kind="stable")
    t = t[order]
    keep = np.concatenate([[True], np.diff(t) > 0])      # a segment uploaded twice: one copy of each stamp
    idx = order[keep]

    def col(name: str) -> np.ndarray:
        return table.column(name).to_numpy()[idx]

    def cells(name: str) -> np.ndarray:
        c = table.column(name).combine_chunks()
        return c.flatten().to_numpy().reshape(len(c), c.type.list_size)[idx]

    t = t[keep]
    days = sorted({k.split("/day=")[1].split("/")[0] for k in keys if "/day=" in k})
    return Timeline(vehicle, t, col("current").astype(np.float64), cells("cell_v").astype(np.float64),
                    cells("cell_t").astype(np.float64), col("soc_est"), col("capacity_est"),
                    _ffill(col("sigma").astype(np.float64)), sessions_from_gaps(t, gap_s), days)


def list_segments(store: ObjectStore, prefix: str = SEGMENTS + "/") -> list[str]:
    """Every uploaded segment key (``.mcap``) under the prefix."""
    return [k for k in store.list(prefix) if k.endswith(".mcap")]
