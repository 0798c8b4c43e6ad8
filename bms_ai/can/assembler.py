"""Per-frame decode and PackSample assembly for live buses.

Bad input never raises: every rejected frame is counted under a named reason
so the node can report it on /diagnostics.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bms_ai.can.codec import frame_words
from bms_ai.can.decoder import CELL_T, CELL_V, PACK_I, PACK_V, PackDecoder, Route
from bms_ai.can.frames import STAMP_MAX, STAMP_MIN, id_ok
from bms_ai.pack import PackSample

REJECT_REASONS = (
    "unknown_id", "dlc_error", "crc_error", "time_backwards", "non_finite",
    "unknown_mux", "error_frame", "remote_frame", "bad_type", "bad_time", "bad_id",
)


@dataclass(slots=True)
class MessageStats:
    """Receive statistics of one message: counts, times, protection errors, timeouts."""

    count: int = 0
    first_rx: float = math.nan
    last_rx: float = math.nan
    counter_errors: int = 0
    crc_errors: int = 0
    last_counter: int = -1
    timeouts: int = 0  # transitions into timeout
    timed_out: bool = False


@dataclass(slots=True)
class Counters:
    """Frames accepted, and rejected per reason (the bus-health counters)."""

    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REJECT_REASONS, 0))

    @property
    def total_rejected(self) -> int:
        """All rejected frames, whatever the reason."""
        return sum(self.rejected.values())


class PackAssembler:
    """Feeds decoded frames into the latest-value PackSample."""

    def __init__(self, decoder: PackDecoder) -> None:
        self.decoder = decoder
        cfg = decoder.cfg
        self.sample = PackSample.empty(cfg.n_cells, cfg.n_temps)
        self.status_stamps = {name: math.nan for name in decoder.status_names}
        self.counters = Counters()
        self.stats: dict[str, MessageStats] = {r.name: MessageStats() for r in decoder.routes.values()}
        self.unknown_ids: dict[int, int] = {}
        self.last_ts = -math.inf
        self._routes = decoder.routes
        self._status_names = decoder.status_names
        self._compiled: dict[tuple[str, int], tuple[list, list[tuple]]] = {}  # (route, mux) -> slots, plans

    def _reject(self, reason: str) -> bool:
        self.counters.rejected[reason] += 1
        return False

    def feed_message(self, msg) -> bool:
        """Feed a ``can.Message``; returns True when the frame was accepted."""
        if getattr(msg, "is_error_frame", False):
            return self._reject("error_frame")
        if getattr(msg, "is_remote_frame", False):
            return self._reject("remote_frame")
        return self.feed(msg.arbitration_id, msg.data, msg.timestamp, bool(msg.is_extended_id))

    def feed(self, arb_id: int, data: bytes, ts: float, extended: bool = False) -> bool:
        """Decode one frame into the sample; count and drop anything invalid."""
        try:
            ts = float(ts)
            n = len(data)
        except (TypeError, ValueError):
            return self._reject("bad_type")
        if not STAMP_MIN <= ts < STAMP_MAX:  # NaN, inf, negative, 1e300: no instant counts from it
            return self._reject("bad_time")
        if not ts >= self.last_ts:
            return self._reject("time_backwards")
        self.last_ts = ts
        route: Route | None = self._routes.get((arb_id, extended))
        if route is None:
            if not id_ok(arb_id):
                return self._reject("bad_id")
            self.unknown_ids[arb_id] = self.unknown_ids.get(arb_id, 0) + 1
            return self._reject("unknown_id")
        if n != route.length:
            return self._reject("dlc_error")
        data = bytes(data)
        if route.crc_byte >= 0 and not self._crc_ok(route, data):
            return self._reject("crc_error")
        le, be = frame_words(data, route.length) if route.needs_be else (int.from_bytes(data, "little"), 0)
        key = -1 if route.mux is None else route.mux.raw(le, be)
        compiled = self._compiled.get((route.name, key))
        if compiled is None:
            slots = self._slots(route, le, be)
            if slots is None:
                return self._reject("unknown_mux")
            compiled = self._compiled[(route.name, key)] = (slots, [_compile(s) for s in slots])
        slots = compiled[0]
        values = _values(compiled[1], le, be)
        if values is None:
            return self._reject("non_finite")
        self._store(slots, values, ts)
        self._received(route, le, be, ts)
        return True

    def _crc_ok(self, route: Route, data: bytes) -> bool:
        body = data[:route.crc_byte] + data[route.crc_byte + 1:]
        if route.crc_fn(body) == data[route.crc_byte]:
            return True
        self.stats[route.name].crc_errors += 1
        return False

    @staticmethod
    def _slots(route: Route, le: int, be: int):
        """The slots this frame carries (plain + its multiplexer value's); None for an unknown mux value."""
        slots = route.by_mux.get(-1, ())
        if route.mux is None:
            return slots
        mslots = route.by_mux.get(route.mux.raw(le, be))
        if mslots is None and not slots:
            return None
        return (list(slots) + mslots) if slots and mslots else (mslots or slots)

    def _store(self, slots, values: list[float], ts: float) -> None:
        smp = self.sample
        for s, v in zip(slots, values):
            k = s.kind
            if k == CELL_V:
                smp.cell_voltages[s.index] = v
                smp.cell_voltage_stamps[s.index] = ts
            elif k == CELL_T:
                smp.cell_temperatures[s.index] = v
                smp.cell_temperature_stamps[s.index] = ts
            elif k == PACK_V:
                smp.pack_voltage = v
                smp.pack_voltage_stamp = ts
            elif k == PACK_I:
                smp.pack_current = v
                smp.pack_current_stamp = ts
            else:
                name = self._status_names[s.index]
                smp.status[name] = v
                self.status_stamps[name] = ts
        smp.stamp = ts

    def _received(self, route: Route, le: int, be: int, ts: float) -> None:
        """Per-message statistics of an accepted frame (alive counter, receive times)."""
        st = self.stats[route.name]
        if route.counter is not None:
            c = route.counter.raw(le, be)
            if st.last_counter >= 0 and c != (st.last_counter + 1) & route.counter.mask:
                st.counter_errors += 1
            st.last_counter = c
        st.count += 1
        if st.count == 1:
            st.first_rx = ts
        st.last_rx = ts
        self.counters.accepted += 1

    def snapshot(self, now: float | None = None, max_age: float | None = None) -> PackSample:
        """Copy of the current sample; values older than ``max_age`` become NaN."""
        out = self.sample.copy()
        if now is not None and max_age is not None:
            apply_max_age(out, now, max_age)
        return out

    def check_timeouts(self, now: float) -> list[str]:
        """Names of messages silent for longer than their timeout at time ``now``."""
        out = []
        for r in self._routes.values():
            if r.timeout is None:
                continue
            st = self.stats[r.name]
            late = not (now - st.last_rx <= r.timeout)  # never received counts as late
            if late and not st.timed_out:
                st.timeouts += 1
            st.timed_out = late
            if late:
                out.append(r.name)
        return out

    def rates(self) -> dict[str, float]:
        """Mean receive rate per message over its receive span (Hz)."""
        out = {}
        for name, st in self.stats.items():
            span = st.last_rx - st.first_rx
            out[name] = (st.count - 1) / span if st.count > 1 and span > 0 else 0.0
        return out


def _compile(s) -> tuple:
    """A slot as a flat tuple for :func:`_values` (attribute look-ups cost more than the arithmetic)."""
    p = s.plan
    signed_len = p.length if p.signed else 0

    def bits(flag):  # a flag's zero-ness does not depend on its sign extension
        return None if flag is None else (flag.big_endian, flag.shift, flag.mask)

    return (p.big_endian, p.shift, p.mask, signed_len, p if p.is_float else None, p.scale, p.offset,
            s.scale, s.offset, bits(s.invalid), bits(s.valid))


def _values(plans: list[tuple], le: int, be: int) -> list[float] | None:
    """Scaled values of a frame's compiled slots (NaN where flagged invalid); None if any is not finite.

    The same arithmetic, in the same order, as ``SignalPlan.value`` then the
    slot's scaling, so values are identical to the vectorised decoder's.
    """
    values = []
    for big, shift, mask, signed_len, float_plan, pscale, poffset, sscale, soffset, invalid, valid in plans:
        if float_plan is not None:
            v = float_plan.value(le, be) * sscale + soffset
        else:
            raw = ((be if big else le) >> shift) & mask
            if signed_len and raw >> (signed_len - 1):
                raw -= 1 << signed_len
            v = (raw * pscale + poffset) * sscale + soffset
        if not math.isfinite(v):
            return None
        if ((invalid is not None and ((be if invalid[0] else le) >> invalid[1]) & invalid[2])
                or (valid is not None and not ((be if valid[0] else le) >> valid[1]) & valid[2])):
            v = math.nan
        values.append(v)
    return values


def apply_max_age(sample: PackSample, now: float, max_age: float) -> None:
    """Blank values whose CAN time is older than ``now - max_age``."""
    limit = now - max_age
    if not sample.pack_voltage_stamp >= limit:
        sample.pack_voltage = math.nan
    if not sample.pack_current_stamp >= limit:
        sample.pack_current = math.nan
    sample.cell_voltages[~(sample.cell_voltage_stamps >= limit)] = np.nan
    sample.cell_temperatures[~(sample.cell_temperature_stamps >= limit)] = np.nan
