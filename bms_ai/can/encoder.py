"""Pack values -> CAN frames through the same DBC and pack config (simulation, tests, benchmarks).

The inverse of :class:`~bms_ai.can.decoder.PackDecoder`: it walks the same
routes, so whatever the decoder reads back is what was meant. Alive counters
and checksums are filled in per the pack config's checks.

One layout, two executions: :meth:`PackEncoder.encode_rows` packs any
number of frames of one message with numpy (a simulated drive is ~10^6
frames), :meth:`PackEncoder.encode` packs one frame in plain integers (tests,
benchmarks); they share slots, conversions and alive counters and are tested
equal. Values are converted like cantools' ``encode_message`` (clamped to the
DBC range, ``raw = round((value - offset) / scale)`` half to even); a value
that is not finite is sent as raw 0 with its invalid flag set.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from bms_ai.can.codec import SignalPlan, compile_signal
from bms_ai.can.decoder import CELL_T, CELL_V, PACK_I, PACK_V, PackDecoder, Route, SignalSlot
from bms_ai.pack import PackSample

ARRAYS = {CELL_V: "cell_voltages", CELL_T: "cell_temperatures"}
SCALARS = {PACK_V: "pack_voltage", PACK_I: "pack_current"}


class PackEncoder:
    """Frames of the pack config's messages from pack quantities (the names of :class:`PackSample`).

    Quantity names: ``pack_voltage``, ``pack_current``, the pack config's
    status names, and ``cell_voltages`` / ``cell_temperatures`` given per
    frame and slot (see :meth:`element_index`). Signals the pack config does
    not map (a power or a voltage limit) are passed by DBC signal name.
    """

    def __init__(self, decoder: PackDecoder) -> None:
        self.decoder = decoder
        self.db = decoder.db
        self._counters: dict[str, int] = {}
        self._by_name: dict[str, Route] = {r.name: r for r in decoder.routes.values()}
        self._msgs = {name: self.db.get_message_by_name(name) for name in self._by_name}
        self._fields: dict[tuple[str, str], _Field] = {}
        self._layouts: dict[tuple[str, int], list[_SlotWriter]] = {}
        self._muxes: dict[str, list[int]] = {}
        self._tables: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
        self._quantities = {"pack_voltage", "pack_current", *ARRAYS.values(), *decoder.status_names}

    # what is sent, and when -------------------------------------------------
    def messages(self) -> list[str]:
        """The messages the pack config maps, in the decoder's route order."""
        return list(self._by_name)

    def frame_id(self, name: str) -> tuple[int, bool]:
        """(arbitration id, extended) of message ``name``."""
        r = self._by_name[name]
        return r.frame_id, r.extended

    def cycle(self, name: str) -> float:
        """Send period (s) from the DBC cycle time; 100 ms where the DBC gives none."""
        return (self._msgs[name].cycle_time or 100) / 1000.0

    def muxes(self, name: str) -> list[int]:
        """Multiplexer values sent each cycle, ``[-1]`` for a message without a multiplexer."""
        m = self._muxes.get(name)
        if m is None:
            m = self._muxes[name] = sorted(k for k in self._by_name[name].by_mux if k >= 0) or [-1]
        return list(m)

    def schedule(self, t0: float, t1: float) -> Iterator[tuple[float, str, int]]:
        """(time, message, mux) per the DBC cycle times; mux values spread over each cycle."""
        events: list[tuple[float, str, int]] = []
        for name in self._by_name:
            cyc = self.cycle(name)
            muxes = self.muxes(name)
            n = int(math.floor((t1 - t0) / cyc)) + 1
            base = t0 + np.arange(n) * cyc
            for j, mux in enumerate(muxes):
                for t in base + j * cyc / len(muxes):
                    if t < t1:
                        events.append((float(t), name, mux))
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        return iter(events)

    def cycle_times(self, name: str, t_end: float, phase: float = 0.0,
                    spread: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Send times of a whole drive and each frame's mux value, vectorised (the simulator's schedule).

        Cycles start at ``phase`` and run until the first past ``t_end``; the
        mux values of one cycle are spread evenly over ``spread`` of it.
        """
        period = self.cycle(name)
        muxes = self.muxes(name)
        per = len(muxes)
        n_cyc = int(np.floor((t_end - phase) / period)) + 1
        cyc = np.repeat(np.arange(n_cyc, dtype=np.int32), per)
        pos = np.tile(np.arange(per, dtype=np.int32), n_cyc)
        t = cyc * period + phase + pos * (period / max(per, 1)) * spread
        return t, np.asarray(muxes, dtype=np.int64)[pos]

    # layout -------------------------------------------------------------------
    def _slots(self, route: Route, mux: int) -> list[SignalSlot]:
        plain = route.by_mux.get(-1, [])
        if route.mux is None or mux < 0:
            return list(plain)
        return list(plain) + list(route.by_mux.get(mux, []))

    def element_index(self, name: str, quantity: str, mux: np.ndarray) -> np.ndarray:
        """(frames, slots) element indices of ``quantity`` (cell_voltages/cell_temperatures) each frame carries.

        The columns are the order :meth:`encode_rows` expects array values in.
        """
        keys, rows = self._element_table(name, quantity)
        mux = np.asarray(mux, dtype=np.int64).reshape(-1)
        if self._by_name[name].mux is None:
            return rows[np.zeros(mux.shape, np.int64)]
        pos = np.minimum(np.searchsorted(keys, mux), len(keys) - 1)
        if not np.array_equal(keys[pos], mux):
            raise ValueError(f"{name}: multiplexer values outside {keys.tolist()}")
        return rows[pos]

    def _element_table(self, name: str, quantity: str) -> tuple[np.ndarray, np.ndarray]:
        """Multiplexer values and, per value, the element index of each slot of ``quantity``."""
        t = self._tables.get((name, quantity))
        if t is None:
            table = {m: [w.index for w in self._layout(name, m) if w.key == quantity] for m in self.muxes(name)}
            widths = {len(v) for v in table.values()}
            if len(widths) != 1:
                raise ValueError(f"{name}: {quantity} slots differ in number between multiplexer values")
            keys = np.asarray(list(table), dtype=np.int64)
            t = self._tables[(name, quantity)] = (keys, np.asarray(list(table.values()), np.int64).reshape(len(keys), -1))
        return t

    # encoding -----------------------------------------------------------------
    def encode(self, name: str, mux: int, sample: PackSample) -> bytes:
        """One frame of ``name`` (multiplexer value ``mux``) from a sample; status missing from it -> 0.

        Per-frame twin of :meth:`encode_rows` in plain integers (~10x faster
        for one frame than numpy); both use the same layout and conversions.
        """
        r = self._by_name[name]
        words = [0, 0]  # little-, big-endian
        for w in self._layout(name, mux):
            w.put1(words, w.value(sample))
        if r.mux is not None:
            self._field(name, r.mux.name).put1(words, mux)
        if r.counter is not None:
            self._field(name, r.counter.name).put1(words, int(self._next_counters(name, r, 1)[0]))
        length = self._msgs[name].length
        if length > 8:
            raise ValueError("encoding handles classic CAN frames (<= 8 bytes)")
        data = bytearray((words[0] | int.from_bytes(words[1].to_bytes(length, "big"), "little")).to_bytes(length, "little"))
        if r.crc_byte >= 0:
            data[r.crc_byte] = r.crc_fn(bytes(data[:r.crc_byte] + data[r.crc_byte + 1:]))
        return bytes(data)

    def encode_rows(self, name: str, mux: np.ndarray, values: Mapping[str, Any] | None = None,
                    signals: Mapping[str, Any] | None = None,
                    invalid: Mapping[str, Any] | None = None) -> np.ndarray:
        """(frames, length) uint8 payloads of message ``name``, one row per entry of ``mux``.

        ``values``: pack quantities, each a scalar or one value per frame;
        arrays as (frames, slots) in :meth:`element_index` order. A quantity
        the message carries but ``values`` lacks is sent invalid.
        ``invalid``: explicit invalid flags per quantity (default: value not
        finite). ``signals``: DBC values of signals the pack config does not
        map. Multiplexer, alive counter and checksum are filled in.
        """
        values, signals, invalid = values or {}, signals or {}, invalid or {}
        unknown = sorted(set(values) - self._quantities)
        if unknown:
            raise ValueError(f"{name}: not pack quantities: {unknown}; known: {sorted(self._quantities)}")
        r = self._by_name[name]
        mux = np.asarray(mux, dtype=np.int64).reshape(-1)
        words = _Words(mux.shape[0], self._msgs[name].length)
        for m, sel in self._groups(r, mux):
            for slot in self._layout(name, m):
                slot.put(words, values, invalid, sel)
        if r.mux is not None:
            words.put(self._field(name, r.mux.name), mux)
        for sname, v in signals.items():
            words.put(self._field(name, sname), v)
        if r.counter is not None and r.counter.name not in signals:
            words.put(self._field(name, r.counter.name), self._next_counters(name, r, mux.shape[0]))
        data = words.payloads()
        if r.crc_byte >= 0:
            data[:, r.crc_byte] = r.crc_rows_fn(np.delete(data, r.crc_byte, axis=1))
        return data

    def _groups(self, r: Route, mux: np.ndarray) -> Iterator[tuple[int, np.ndarray | slice]]:
        """Rows per multiplexer value (all rows at once when they share one)."""
        if r.mux is None:
            yield -1, slice(None)
            return
        muxes = self.muxes(r.name)
        if mux.size and (mux == mux[0]).all() and int(mux[0]) in muxes:
            yield int(mux[0]), slice(None)
            return
        covered = 0
        for m in muxes:
            sel = np.flatnonzero(mux == m)
            covered += sel.size
            if sel.size:
                yield m, sel
        if covered != mux.shape[0]:
            raise ValueError(f"{r.name}: multiplexer values outside {muxes}")

    def _layout(self, name: str, mux: int) -> list[_SlotWriter]:
        """The writers of the slots a frame with this multiplexer value carries (cached)."""
        key = (name, mux)
        out = self._layouts.get(key)
        if out is None:
            out, col = [], dict.fromkeys(ARRAYS, 0)
            for s in self._slots(self._by_name[name], mux):
                j = None
                if s.kind in ARRAYS:
                    j, col[s.kind] = col[s.kind], col[s.kind] + 1
                qty = ARRAYS.get(s.kind) or SCALARS.get(s.kind) or self.decoder.status_names[s.index]
                out.append(_SlotWriter(qty, j, s.index, s.scale, s.offset, self._field(name, s.plan.name),
                                       s.invalid and self._field(name, s.invalid.name),
                                       s.valid and self._field(name, s.valid.name)))
            self._layouts[key] = out
        return out

    def _next_counters(self, name: str, r: Route, n: int) -> np.ndarray:
        start = self._counters.get(name, -1) + 1
        c = (start + np.arange(n)) & r.counter.mask
        if n:
            self._counters[name] = int(c[-1])
        return c

    def _field(self, name: str, signal: str) -> _Field:
        key = (name, signal)
        f = self._fields.get(key)
        if f is None:
            msg = self._msgs[name]
            sig = msg.get_signal_by_name(signal)
            f = self._fields[key] = _Field(compile_signal(sig, msg.length), sig.minimum, sig.maximum)
        return f


def _column(v: Any, sel, j: int | None, n: int) -> np.ndarray:
    """Values of the selected rows (and slot ``j`` of an array quantity) as float64."""
    a = np.asarray(v, dtype=np.float64)
    if j is not None and a.ndim == 2:
        return a[sel, j]
    return np.broadcast_to(a, (n,))[sel]


class _Field:
    """One DBC signal compiled for writing: where its bits go and the values it may carry."""

    __slots__ = ("plan", "lo", "hi", "raw_lo", "raw_hi", "mask", "shift")

    def __init__(self, plan: SignalPlan, lo: float | None, hi: float | None) -> None:
        self.plan = plan
        # the DBC range clamps (cantools' minimum/maximum; None where the DBC gives [0|0])
        self.lo, self.hi = (lo, hi) if lo is not None and hi is not None else (-np.inf, np.inf)
        if plan.signed:
            self.raw_lo, self.raw_hi = -(1 << (plan.length - 1)), (1 << (plan.length - 1)) - 1
        else:
            self.raw_lo, self.raw_hi = 0, (1 << plan.length) - 1
        self.mask = np.uint64(plan.mask)
        self.shift = np.uint64(plan.shift)

    def bits(self, x: np.ndarray) -> np.ndarray:
        """uint64 words holding DBC values ``x``: clamped, rounded half to even, NaN -> 0, clipped to the bits."""
        x = np.minimum(np.maximum(x, self.lo), self.hi)
        p = self.plan
        if p.is_float:
            raw = (x.astype(np.float32).view(np.uint32) if p.length == 32 else x.view(np.uint64)).astype(np.uint64)
        else:
            r = np.rint((x - p.offset) / p.scale)
            r = np.minimum(np.maximum(np.where(np.isnan(r), 0.0, r), self.raw_lo), self.raw_hi)
            raw = r.astype(np.int64).astype(np.uint64)
        return (raw & self.mask) << self.shift

    def put1(self, words: list[int], x: float) -> None:
        """:meth:`bits` for one value in plain integers, OR-ed into ``words`` [little, big]."""
        p = self.plan
        x = min(max(float(x), self.lo), self.hi)  # NaN stays NaN
        if p.is_float:
            raw = int(np.asarray(x, np.float32 if p.length == 32 else np.float64).view(
                np.uint32 if p.length == 32 else np.uint64))
        else:
            r = (x - p.offset) / p.scale
            if r != r:
                raw = 0
            elif math.isinf(r):
                raw = self.raw_hi if r > 0 else self.raw_lo
            else:
                raw = min(max(round(r), self.raw_lo), self.raw_hi)
        words[p.big_endian] |= (raw & p.mask) << p.shift


class _SlotWriter:
    """Writes one pack quantity (and its invalid/valid flag) into frames, with the pack config's scaling."""

    __slots__ = ("key", "column", "index", "scale", "offset", "field", "invalid", "valid")

    def __init__(self, key: str, column: int | None, index: int, scale: float, offset: float, field: _Field,
                 invalid: _Field | None, valid: _Field | None) -> None:
        self.key, self.column, self.index, self.scale, self.offset = key, column, index, scale, offset
        self.field, self.invalid, self.valid = field, invalid, valid

    def value(self, sample: PackSample) -> float:
        """This quantity's value in ``sample`` (a status it lacks counts as 0)."""
        if self.column is not None:
            return float(getattr(sample, self.key)[self.index])
        if self.key in SCALARS.values():
            return float(getattr(sample, self.key))
        return float(sample.status.get(self.key, 0.0))

    def put1(self, words: list[int], v: float) -> None:
        """:meth:`put` for one frame in plain integers."""
        ok = math.isfinite(v)
        self.field.put1(words, (v - self.offset) / self.scale)
        if self.invalid is not None:
            self.invalid.put1(words, 0.0 if ok else 1.0)
        if self.valid is not None:
            self.valid.put1(words, 1.0 if ok else 0.0)

    def put(self, words: _Words, values: Mapping[str, Any], invalid: Mapping[str, Any], sel) -> None:
        """Write the selected frames' values; a missing or non-finite value is raw 0, flagged invalid."""
        v = _column(values.get(self.key, math.nan), sel, self.column, words.n)
        ok = np.isfinite(v)
        words.put(self.field, (v - self.offset) / self.scale, sel)
        if self.invalid is not None:
            flag = _column(invalid[self.key], sel, self.column, words.n) != 0 if self.key in invalid else ~ok
            words.put(self.invalid, flag.astype(np.float64), sel)
        if self.valid is not None:
            words.put(self.valid, ok.astype(np.float64), sel)


class _Words:
    """Frame payloads under construction: little- and big-endian words of ``n`` frames."""

    def __init__(self, n: int, length: int) -> None:
        if length > 8:
            raise ValueError("vectorised encoding handles classic CAN frames (<= 8 bytes)")
        self.n, self.length = n, length
        self.le = np.zeros(n, dtype=np.uint64)
        self.be = np.zeros(n, dtype=np.uint64)

    def put(self, field: _Field, phys: Any, sel=slice(None)) -> None:
        """Write DBC values ``phys`` of one signal into the selected frames (all frames: one value each)."""
        x = np.asarray(phys, dtype=np.float64)
        if x.ndim == 0 or isinstance(sel, slice):
            x = np.broadcast_to(x, (self.n,))[sel]
        words = self.be if field.plan.big_endian else self.le
        words[sel] |= field.bits(x)

    def payloads(self) -> np.ndarray:
        """(n, length) uint8: little-endian bytes, big-endian signals aligned like the decoder's words."""
        n, length = self.n, self.length
        out = self.le.astype("<u8").view(np.uint8).reshape(n, 8)[:, :length]
        if self.be.any():
            out = out | self.be.astype(">u8").view(np.uint8).reshape(n, 8)[:, 8 - length:]
        return np.ascontiguousarray(out)
