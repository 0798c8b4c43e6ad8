"""Vectorised decode of recorded CAN logs (decode CLI, training-data prep, fleet logs).

Frames are grouped per message id and decoded with numpy from the same routes
as the live assembler; rejection rules and sampling are the same, so values
are identical to feeding the frames one by one (tested).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.can.assembler import REJECT_REASONS
from bms_ai.can.codec import frames_to_words
from bms_ai.can.decoder import CELL_T, CELL_V, PACK_I, PACK_V, PackDecoder, Route, SignalSlot
from bms_ai.can.frames import MAX_ID, FrameArrays, stamps_ok
from bms_ai.can.logs import read_log
from bms_ai.pack import PackSample


@dataclass
class Events:
    """Per-element time series of accepted values (value NaN where flagged invalid)."""

    ts: list[np.ndarray] = field(default_factory=list)
    vals: list[np.ndarray] = field(default_factory=list)

    def add(self, ts: np.ndarray, vals: np.ndarray) -> None:
        """Append one message's values (merged in time order later)."""
        self.ts.append(ts)
        self.vals.append(vals)

    def merged(self) -> tuple[np.ndarray, np.ndarray]:
        """(times, values) of every part, in time order (stable for equal times)."""
        if not self.ts:
            return np.empty(0), np.empty(0)
        if len(self.ts) == 1:
            return self.ts[0], self.vals[0]
        t = np.concatenate(self.ts)
        v = np.concatenate(self.vals)
        o = np.argsort(t, kind="stable")
        return t[o], v[o]


@dataclass
class DecodedLog:
    """A whole log decoded: accepted values per pack element, and what the live path would have counted."""

    pack_voltage: Events
    pack_current: Events
    cells: list[Events]
    temps: list[Events]
    status: dict[str, Events]
    rejected: dict[str, int]
    accepted: int
    counter_errors: dict[str, int]
    t_first: float
    t_last: float
    frame_ts: np.ndarray  # timestamps of every frame that passed the time check


def decode_frames(frames: FrameArrays, decoder: PackDecoder) -> DecodedLog:
    """Every accepted value of a whole log, per pack element, with the per-frame path's rejection counts."""
    cfg = decoder.cfg
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    out = DecodedLog(Events(), Events(), [Events() for _ in range(cfg.n_cells)],
                     [Events() for _ in range(cfg.n_temps)],
                     {n: Events() for n in decoder.status_names}, rejected, 0, {}, math.nan, math.nan, np.empty(0))
    bad = frames.bad
    rejected["error_frame"] = int(bad.sum())  # error, remote and oversize frames
    ts = frames.ts
    time_valid = stamps_ok(ts)
    rejected["bad_time"] = int((~bad & ~time_valid).sum())
    keep = ~bad & time_valid
    # accepted in time iff ts >= every earlier (non-bad) timestamp; NaN never accepted
    masked = np.where(keep, ts, -np.inf)
    prev_max = np.concatenate(([-np.inf], np.fmax.accumulate(masked)[:-1]))
    time_ok = keep & (ts >= prev_max)
    rejected["time_backwards"] = int((keep & ~time_ok).sum())
    routed = np.zeros(len(frames), dtype=bool)
    for (fid, ext), r in decoder.routes.items():
        rows = np.flatnonzero(time_ok & (frames.ids == fid) & (frames.ext == ext))
        routed[rows] = True
        _decode_route(frames, rows, r, decoder, out)
    bad_id = frames.ids > MAX_ID
    rejected["bad_id"] = int((time_ok & ~routed & bad_id).sum())
    rejected["unknown_id"] = int((time_ok & ~routed & ~bad_id).sum())
    # the live path's stamp follows every time-accepted frame, known or not
    good_t = ts[time_ok]
    out.frame_ts = good_t
    if good_t.size:
        out.t_first, out.t_last = float(good_t[0]), float(good_t[-1])
    return out


def _checked_rows(frames: FrameArrays, rows: np.ndarray, r: Route, rejected: dict[str, int]):
    """Rows of one message that pass the length and checksum checks, and their payloads."""
    ok_len = frames.dlc[rows] == r.length
    rejected["dlc_error"] += int((~ok_len).sum())
    rows = rows[ok_len]
    data = frames.data[rows]
    if r.crc_byte >= 0 and rows.size:
        body = np.delete(data[:, :r.length], r.crc_byte, axis=1)
        ok_crc = r.crc_rows_fn(body) == data[:, r.crc_byte]
        rejected["crc_error"] += int((~ok_crc).sum())
        rows, data = rows[ok_crc], data[ok_crc]
    return rows, data


def _mux_groups(r: Route, le: np.ndarray, be: np.ndarray, rejected: dict[str, int]):
    """(row selection, slots) per multiplexer value, and the rows that carry a known layout."""
    n = le.shape[0]
    plain = r.by_mux.get(-1, [])
    if r.mux is None:
        return [(np.arange(n), plain)], np.arange(n)
    mux = r.mux.values(le, be).astype(np.int64)
    known = np.isin(mux, [m for m in r.by_mux if m >= 0]) if not plain else np.ones(n, bool)
    rejected["unknown_mux"] += int((~known).sum())
    groups = [(np.flatnonzero(known & (mux == m)), slots) for m, slots in r.by_mux.items() if m >= 0]
    if plain:
        groups.append((np.flatnonzero(known), plain))
    return groups, np.flatnonzero(known)


def _decode_route(frames: FrameArrays, rows: np.ndarray, r: Route, decoder: PackDecoder, out: DecodedLog) -> None:
    """Decode the frames of one message id into ``out`` (values, counts, alive-counter errors)."""
    if rows.size == 0:
        return
    rows, data = _checked_rows(frames, rows, r, out.rejected)
    if rows.size == 0:
        return
    le, be = frames_to_words(data, r.length)
    t = frames.ts[rows]
    groups, sel_all = _mux_groups(r, le, be, out.rejected)
    # frames with a non-finite decoded value are rejected whole
    finite = np.ones(rows.size, dtype=bool)
    decoded = []
    for sel, slots in groups:
        for s in slots:
            v = s.plan.values(le[sel], be[sel]) * s.scale + s.offset
            finite[sel[~np.isfinite(v)]] = False
            decoded.append((sel, s, v))
    out.rejected["non_finite"] += int((~finite[sel_all]).sum())
    for sel, s, v in decoded:
        ok = finite[sel]
        sel, v = sel[ok], v[ok]
        if s.invalid is not None:
            v = np.where(s.invalid.values(le[sel], be[sel]) != 0, np.nan, v)
        if s.valid is not None:
            v = np.where(s.valid.values(le[sel], be[sel]) == 0, np.nan, v)
        _events(out, decoder, s).add(t[sel], v)
    acc = sel_all[finite[sel_all]]
    out.accepted += int(acc.size)
    if r.counter is not None and acc.size > 1:
        c = r.counter.values(le[acc], be[acc]).astype(np.int64)
        out.counter_errors[r.name] = int(((c[1:] - c[:-1]) % (r.counter.mask + 1) != 1).sum())


def _events(out: DecodedLog, decoder: PackDecoder, s: SignalSlot) -> Events:
    """The time series a slot's values belong to."""
    if s.kind == CELL_V:
        return out.cells[s.index]
    if s.kind == CELL_T:
        return out.temps[s.index]
    if s.kind == PACK_V:
        return out.pack_voltage
    if s.kind == PACK_I:
        return out.pack_current
    return out.status[decoder.status_names[s.index]]


def first_k_at_or_after(t: np.ndarray, period: float) -> np.ndarray:
    """Smallest k with k * period >= t per element, exact in floating point (int64).

    One correction step each way suffices: stamps are bounded (frames.STAMP_MAX),
    so t / period is far inside float precision and off by at most one.
    """
    k = np.ceil(t / period)
    k = np.where((k - 1) * period >= t, k - 1, k)
    k = np.where(k * period < t, k + 1, k)
    return k.astype(np.int64)


def sample_instants(frame_ts: np.ndarray, period: float, max_catchup: int = 600) -> tuple[np.ndarray, int]:
    """The instants the live sampler emits for these accepted frame times, and how many it skips.

    The live path (:class:`~bms_ai.can.sampler.FixedRateSampler`) emits the
    sample for instant T when the first frame later than T arrives, and at
    most ``max_catchup`` instants per gap between two frames (the rest of a
    long gap is skipped and counted). Work and memory are bounded by
    ``len(frame_ts) * max_catchup``, never by the span of time the log covers.
    """
    ts = np.asarray(frame_ts, dtype=np.float64)
    if ts.size < 2 or not np.isfinite(ts[[0, -1]]).all():
        return np.empty(0), 0
    p = first_k_at_or_after(ts, period)
    p[0] = math.floor(ts[0] / period) + 1  # the first instant strictly after the first frame
    p = np.maximum.accumulate(p)  # the next instant due, after each frame
    gap = np.diff(p)
    n = np.minimum(gap, max_catchup)
    total = int(n.sum())
    starts = p[:-1] - (np.cumsum(n) - n)
    k = np.repeat(starts, n) + np.arange(total, dtype=np.int64)
    return k * period, int((gap - n).sum())


def sample_times(t_first: float, t_last: float, period: float, frame_ts: np.ndarray | None = None,
                 max_catchup: int = 600) -> np.ndarray:
    """Fixed-rate sample instants k*period strictly between the first and last frame.

    Exactly the instants the live sampler emits for these frame times (see
    :func:`sample_instants`); without ``frame_ts`` the log is taken as one gap.
    """
    if not (math.isfinite(t_first) and math.isfinite(t_last)):
        return np.empty(0)
    if frame_ts is None:
        frame_ts = np.array([t_first, t_last])
    return sample_instants(frame_ts, period, max_catchup)[0]


def _at(ev: Events, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t, v = ev.merged()
    idx = np.searchsorted(t, times, side="right") - 1
    has = idx >= 0
    vals = np.full(times.shape, np.nan)
    stamps = np.full(times.shape, np.nan)
    vals[has] = v[idx[has]]
    stamps[has] = t[idx[has]]
    return vals, stamps


@dataclass
class SampleTable:
    """Pack samples at fixed instants; values NaN where unknown or older than max_age."""

    t: np.ndarray
    pack_voltage: np.ndarray
    pack_current: np.ndarray
    cell_voltages: np.ndarray  # (T, n_cells)
    cell_temperatures: np.ndarray  # (T, n_temps)
    status: dict[str, np.ndarray]
    rejected: dict[str, int]
    accepted: int
    counter_errors: dict[str, int]
    skipped: int = 0  # instants of long gaps not sampled (beyond max_catchup per gap)

    def __len__(self) -> int:
        return int(self.t.shape[0])

    def samples(self) -> Iterator[PackSample]:
        """Row by row as PackSamples, the records a live replay publishes (per-value stamps stay NaN)."""
        base = PackSample.empty(self.cell_voltages.shape[1], self.cell_temperatures.shape[1])
        for i in range(len(self)):
            s = base.copy()
            s.stamp = float(self.t[i])
            s.pack_voltage, s.pack_current = float(self.pack_voltage[i]), float(self.pack_current[i])
            s.cell_voltages[:] = self.cell_voltages[i]
            s.cell_temperatures[:] = self.cell_temperatures[i]
            s.status = {k: float(v[i]) for k, v in self.status.items()}
            yield s


def sample(decoded: DecodedLog, times: np.ndarray, max_age: float | None = None) -> SampleTable:
    """Values at ``times`` (the latest accepted before each); older than ``max_age`` -> NaN (status never ages)."""
    def col(ev: Events) -> np.ndarray:
        v, s = _at(ev, times)
        if max_age is not None:
            v[~(s >= times - max_age)] = np.nan
        return v

    cells = np.stack([col(e) for e in decoded.cells], axis=1) if decoded.cells else np.empty((len(times), 0))
    temps = np.stack([col(e) for e in decoded.temps], axis=1) if decoded.temps else np.empty((len(times), 0))
    status = {k: _at(e, times)[0] for k, e in decoded.status.items()}
    return SampleTable(times, col(decoded.pack_voltage), col(decoded.pack_current), cells, temps, status,
                       decoded.rejected, decoded.accepted, decoded.counter_errors)


def sample_frames(frames: FrameArrays, decoder: PackDecoder, period: float, max_age: float | None = 1.0,
                  max_catchup: int = 600) -> tuple[SampleTable, DecodedLog]:
    """Samples every ``period`` s of CAN time, exactly those the live sampler would emit for these frames."""
    decoded = decode_frames(frames, decoder)
    times, skipped = sample_instants(decoded.frame_ts, period, max_catchup)
    table = sample(decoded, times, max_age)
    table.skipped = skipped
    return table, decoded


def decode_log(path: str | Path, cfg, rate: float = 10.0, max_age: float | None = 1.0,
               decoder: PackDecoder | None = None) -> SampleTable:
    """Read a CAN log and return pack samples at ``rate`` Hz (the can_bridge's view)."""
    return sample_frames(read_log(path), decoder or PackDecoder(cfg), 1.0 / rate, max_age)[0]
