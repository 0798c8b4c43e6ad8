"""Vectorised decode of recorded CAN logs (decode CLI, training-data prep, fleet logs).

Frames are grouped per message id and decoded with numpy from the same routes
as the live assembler; rejection rules and sampling are the same, so values
are identical to feeding the frames one by one (tested). A log is decoded in
chunks of frames with a :class:`Carry` of the live path's state between them,
so memory stays flat in the length of a drive.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.can.assembler import REJECT_REASONS
from bms_ai.can.codec import frames_to_words
from bms_ai.can.decoder import CELL_T, CELL_V, PACK_I, PACK_V, PackDecoder, Route, SignalSlot
from bms_ai.can.frames import MAX_ID, FrameArrays, stamps_ok
from bms_ai.can.logs import CHUNK_ROWS, read_log_chunks
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
        """(times, values) of every part, in time order (stable for equal times); merged once."""
        if not self.ts:
            return np.empty(0), np.empty(0)
        if len(self.ts) > 1:
            t = np.concatenate(self.ts)
            o = np.argsort(t, kind="stable")
            self.ts, self.vals = [t[o]], [np.concatenate(self.vals)[o]]
        return self.ts[0], self.vals[0]

    def last(self, t0: float, v0: float) -> tuple[float, float]:
        """The latest (time, value), or (t0, v0) when there is none."""
        t, v = self.merged()
        return (float(t[-1]), float(v[-1])) if t.size else (t0, v0)


@dataclass
class Carry:
    """The live path's state between two chunks of a log: what one chunk hands to the next."""

    sample: PackSample  # latest accepted value and its CAN time per element (the assembler's sample)
    status_stamps: dict[str, float]
    last_ts: float = -math.inf  # the time check: latest stamp that passed it
    k_next: int | None = None  # next sample instant k (None: before the first frame)
    counters: dict[str, int] = field(default_factory=dict)  # last alive-counter value per message

    @classmethod
    def start(cls, decoder: PackDecoder) -> Carry:
        """Nothing received yet."""
        cfg = decoder.cfg
        return cls(PackSample.empty(cfg.n_cells, cfg.n_temps), dict.fromkeys(decoder.status_names, math.nan))

    def into(self, out: DecodedLog) -> None:
        """Start each element's events with its carried value (if any), so samples see it."""
        s = self.sample
        _prepend(out.pack_voltage, s.pack_voltage_stamp, s.pack_voltage)
        _prepend(out.pack_current, s.pack_current_stamp, s.pack_current)
        for i, ev in enumerate(out.cells):
            _prepend(ev, s.cell_voltage_stamps[i], s.cell_voltages[i])
        for i, ev in enumerate(out.temps):
            _prepend(ev, s.cell_temperature_stamps[i], s.cell_temperatures[i])
        for name, ev in out.status.items():
            _prepend(ev, self.status_stamps.get(name, math.nan), s.status.get(name, math.nan))

    def advance(self, out: DecodedLog, k_next: int | None) -> None:
        """Take over a decoded chunk's latest values, time check, instant and counters."""
        s = self.sample
        s.pack_voltage_stamp, s.pack_voltage = out.pack_voltage.last(s.pack_voltage_stamp, s.pack_voltage)
        s.pack_current_stamp, s.pack_current = out.pack_current.last(s.pack_current_stamp, s.pack_current)
        for i, ev in enumerate(out.cells):
            s.cell_voltage_stamps[i], s.cell_voltages[i] = ev.last(s.cell_voltage_stamps[i], s.cell_voltages[i])
        for i, ev in enumerate(out.temps):
            s.cell_temperature_stamps[i], s.cell_temperatures[i] = ev.last(
                s.cell_temperature_stamps[i], s.cell_temperatures[i])
        for name, ev in out.status.items():
            t, v = ev.last(math.nan, math.nan)
            if not math.isnan(t):
                self.status_stamps[name], s.status[name] = t, v
        if math.isfinite(out.t_last):
            self.last_ts = s.stamp = out.t_last
        self.k_next = k_next
        self.counters.update(out.counter_last)


def _prepend(ev: Events, t: float, v: float) -> None:
    if not math.isnan(t):
        ev.ts.insert(0, np.array([t]))
        ev.vals.insert(0, np.array([v]))


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
    counter_last: dict[str, int] = field(default_factory=dict)  # last alive-counter value per message
    received: dict[str, tuple[int, float, float]] = field(default_factory=dict)  # accepted, first and last stamp


def decode_frames(frames: FrameArrays, decoder: PackDecoder, carry: Carry | None = None) -> DecodedLog:
    """Every accepted value of a log (or of one chunk after ``carry``), per pack element, with rejection counts."""
    cfg = decoder.cfg
    rejected = dict.fromkeys(REJECT_REASONS, 0)
    out = DecodedLog(Events(), Events(), [Events() for _ in range(cfg.n_cells)],
                     [Events() for _ in range(cfg.n_temps)],
                     {n: Events() for n in decoder.status_names}, rejected, 0, {}, math.nan, math.nan, np.empty(0))
    last_ts = -math.inf
    if carry is not None:
        carry.into(out)
        out.counter_last = dict(carry.counters)
        last_ts = carry.last_ts
    bad = frames.bad
    rejected["error_frame"] = int(bad.sum())  # error, remote and oversize frames
    ts = frames.ts
    time_valid = stamps_ok(ts)
    rejected["bad_time"] = int((~bad & ~time_valid).sum())
    keep = ~bad & time_valid
    # accepted in time iff ts >= every earlier (non-bad) timestamp; NaN never accepted
    masked = np.where(keep, ts, -np.inf)
    prev_max = np.fmax.accumulate(np.concatenate(([last_ts], masked)))[:-1]
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
    if acc.size:
        out.received[r.name] = (int(acc.size), float(t[acc[0]]), float(t[acc[-1]]))
    if r.counter is not None and acc.size:
        c = r.counter.values(le[acc], be[acc]).astype(np.int64)
        prev = out.counter_last.get(r.name)
        if prev is not None:  # continue from the previous chunk
            c = np.concatenate(([prev], c))
        out.counter_errors[r.name] = int(((c[1:] - c[:-1]) % (r.counter.mask + 1) != 1).sum())
        out.counter_last[r.name] = int(c[-1])


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


def sample_instants(frame_ts: np.ndarray, period: float, max_catchup: int = 600,
                    k_next: int | None = None) -> tuple[np.ndarray, int, int | None]:
    """The instants the live sampler emits for these accepted frame times, how many it skips, the next k.

    ``k_next`` continues a sampler that has seen earlier frames (None: these
    are the first, and the first frame only sets the first instant).

    The live path (:class:`~bms_ai.can.sampler.FixedRateSampler`) emits the
    sample for instant T when the first frame later than T arrives, and at
    most ``max_catchup`` instants per gap between two frames (the rest of a
    long gap is skipped and counted). Work and memory are bounded by
    ``len(frame_ts) * max_catchup``, never by the span of time the log covers.
    """
    ts = np.asarray(frame_ts, dtype=np.float64)
    if ts.size == 0:
        return np.empty(0), 0, k_next
    p = first_k_at_or_after(ts, period)
    if k_next is None:
        p[0] = math.floor(ts[0] / period) + 1  # the first instant strictly after the first frame
    else:
        p = np.concatenate(([k_next], p))
    p = np.maximum.accumulate(p)  # the next instant due, after each frame
    gap = np.diff(p)
    n = np.minimum(gap, max_catchup)
    total = int(n.sum())
    starts = p[:-1] - (np.cumsum(n) - n)
    k = np.repeat(starts, n) + np.arange(total, dtype=np.int64)
    return k * period, int((gap - n).sum()), int(p[-1])


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
    frame_ts = np.asarray(frame_ts, dtype=np.float64)
    if not np.isfinite(frame_ts).all():
        return np.empty(0)
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


def concat_tables(tables: list[SampleTable]) -> SampleTable:
    """Consecutive chunks' tables as one (counts summed)."""
    first = tables[0]
    rejected = {k: sum(t.rejected[k] for t in tables) for k in first.rejected}
    counters: dict[str, int] = {}
    for t in tables:
        for k, v in t.counter_errors.items():
            counters[k] = counters.get(k, 0) + v
    return SampleTable(np.concatenate([t.t for t in tables]),
                       np.concatenate([t.pack_voltage for t in tables]),
                       np.concatenate([t.pack_current for t in tables]),
                       np.concatenate([t.cell_voltages for t in tables]),
                       np.concatenate([t.cell_temperatures for t in tables]),
                       {k: np.concatenate([t.status[k] for t in tables]) for k in first.status},
                       rejected, sum(t.accepted for t in tables), counters, sum(t.skipped for t in tables))


def sample_chunk(frames: FrameArrays, decoder: PackDecoder, period: float, max_age: float | None,
                 max_catchup: int, carry: Carry) -> tuple[SampleTable, DecodedLog]:
    """The samples the live sampler emits for one chunk of frames after ``carry`` (which advances)."""
    decoded = decode_frames(frames, decoder, carry)
    times, skipped, k_next = sample_instants(decoded.frame_ts, period, max_catchup, carry.k_next)
    table = sample(decoded, times, max_age)
    table.skipped = skipped
    carry.advance(decoded, k_next)
    return table, decoded


def sample_frames(frames: FrameArrays, decoder: PackDecoder, period: float, max_age: float | None = 1.0,
                  max_catchup: int = 600) -> tuple[SampleTable, DecodedLog]:
    """Samples every ``period`` s of CAN time, exactly those the live sampler would emit for these frames."""
    return sample_chunk(frames, decoder, period, max_age, max_catchup, Carry.start(decoder))


def decode_chunks(chunks: Iterable[FrameArrays], decoder: PackDecoder, period: float,
                  max_age: float | None = 1.0, max_catchup: int = 600) -> Iterator[SampleTable]:
    """Samples chunk by chunk (counts per chunk): a whole drive in memory bounded by one chunk."""
    carry = Carry.start(decoder)
    for frames in chunks:
        yield sample_chunk(frames, decoder, period, max_age, max_catchup, carry)[0]


def decode_log_chunks(path: str | Path, cfg, rate: float = 10.0, max_age: float | None = 1.0,
                      decoder: PackDecoder | None = None, rows: int = CHUNK_ROWS,
                      errors: list[str] | None = None) -> Iterator[SampleTable]:
    """A CAN log's pack samples at ``rate`` Hz, streamed in chunks of ``rows`` frames.

    Damage ends the stream with its reason in ``errors`` (LogError without a list).
    """
    decoder = decoder or PackDecoder(cfg)
    return decode_chunks(read_log_chunks(path, rows, errors), decoder, 1.0 / rate, max_age)


def decode_log(path: str | Path, cfg, rate: float = 10.0, max_age: float | None = 1.0,
               decoder: PackDecoder | None = None) -> SampleTable:
    """Read a CAN log and return pack samples at ``rate`` Hz (the can_bridge's view); damage ends it quietly."""
    errors: list[str] = []
    tables = list(decode_log_chunks(path, cfg, rate, max_age, decoder, errors=errors))
    if not tables:
        return next(decode_chunks([FrameArrays.empty()], decoder or PackDecoder(cfg), 1.0 / rate, max_age))
    return concat_tables(tables)

