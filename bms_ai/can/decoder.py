"""Frame routing compiled from a pack config and its DBC.

Each CAN id maps to a route: which bits hold which pack element, and which
protection checks apply. Both the per-frame assembler and the vectorised
offline decoder run from these routes, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cantools.database import Database

from bms_ai.can.checks import CRC_ALGORITHMS
from bms_ai.can.codec import SignalPlan, compile_signal
from bms_ai.can.dbc import load_dbc
from bms_ai.can.packconfig import PackConfig, validate_against_dbc

# element kinds
CELL_V, CELL_T, PACK_V, PACK_I, STATUS = range(5)


@dataclass(slots=True)
class SignalSlot:
    """One value a frame carries: target kind/index, plan, config scaling, invalid flag."""

    kind: int
    index: int  # element index; for STATUS an index into Route.status_names
    plan: SignalPlan
    scale: float = 1.0
    offset: float = 0.0
    invalid: SignalPlan | None = None  # raw 1 -> value invalid
    valid: SignalPlan | None = None  # raw 0 -> value invalid


@dataclass(slots=True)
class Route:
    """Everything about one CAN id: its slots per multiplexer value and the checks that guard it."""

    name: str
    frame_id: int
    extended: bool
    length: int
    mux: SignalPlan | None
    by_mux: dict[int, list[SignalSlot]] = field(default_factory=dict)  # key -1 = not multiplexed
    counter: SignalPlan | None = None
    crc_byte: int = -1
    crc_fn: object = None
    crc_rows_fn: object = None
    timeout: float | None = None
    needs_be: bool = False


class PackDecoder:
    """Routes for every configured message, keyed by (frame id, extended)."""

    def __init__(self, cfg: PackConfig, db: Database | None = None) -> None:
        db = db if db is not None else load_dbc(cfg.dbc_path, strict=cfg.dbc_strict)
        validate_against_dbc(cfg, db)
        self.cfg = cfg
        self.db = db
        self.status_names: list[str] = list(cfg.status)
        self.routes: dict[tuple[int, bool], Route] = {}
        self._build()

    def _route(self, name: str) -> Route:
        m = self.db.get_message_by_name(name)
        key = (m.frame_id, bool(m.is_extended_frame))
        r = self.routes.get(key)
        if r is None:
            mux = None
            for s in m.signals:
                if s.is_multiplexer:
                    mux = compile_signal(s, m.length)
            timeout = 3.0 * m.cycle_time / 1000.0 if m.cycle_time else None
            r = Route(name=m.name, frame_id=m.frame_id, extended=key[1], length=m.length, mux=mux, timeout=timeout)
            self.routes[key] = r
        return r

    def _plan(self, message: str, signal: str | None) -> SignalPlan | None:
        if signal is None:
            return None
        m = self.db.get_message_by_name(message)
        return compile_signal(m.get_signal_by_name(signal), m.length)

    def _add(self, route: Route, muxes: list[int], slot: SignalSlot) -> None:
        for mux in muxes:
            route.by_mux.setdefault(mux, []).append(slot)

    def _muxes(self, route: Route, message: str, signal: str) -> list[int]:
        s = self.db.get_message_by_name(message).get_signal_by_name(signal)
        if route.mux is None or not s.multiplexer_ids:
            return [-1]
        return list(s.multiplexer_ids)

    def _build(self) -> None:
        cfg = self.cfg
        for kind, sm in ((PACK_V, cfg.pack_voltage), (PACK_I, cfg.pack_current)):
            r = self._route(sm.message)
            slot = SignalSlot(kind, 0, self._plan(sm.message, sm.signal), sm.scale, sm.offset,
                        valid=self._plan(sm.message, sm.valid))
            self._add(r, self._muxes(r, sm.message, sm.signal), slot)
        for i, (_name, sm) in enumerate(cfg.status.items()):
            r = self._route(sm.message)
            slot = SignalSlot(STATUS, i, self._plan(sm.message, sm.signal), sm.scale, sm.offset,
                        valid=self._plan(sm.message, sm.valid))
            self._add(r, self._muxes(r, sm.message, sm.signal), slot)
        for kind, groups in ((CELL_V, cfg.cell_voltages), (CELL_T, cfg.cell_temperatures)):
            for g in groups:
                r = self._route(g.message)
                for k, sname in enumerate(g.slots):
                    inv = g.invalid[k] if g.invalid else None
                    plan, iplan = self._plan(g.message, sname), self._plan(g.message, inv)
                    for mux in self._muxes(r, g.message, sname):
                        idx = max(mux, 0) * g.per_mux + k + g.offset
                        r.by_mux.setdefault(mux, []).append(SignalSlot(kind, idx, plan, g.scale, g.value_offset, invalid=iplan))
                for sname, idx in g.signals.items():
                    slot = SignalSlot(kind, idx, self._plan(g.message, sname), g.scale, g.value_offset)
                    self._add(r, self._muxes(r, g.message, sname), slot)
        for c in cfg.checks:
            r = self._route(c.message)
            if c.timeout is not None:
                r.timeout = c.timeout
            r.counter = self._plan(c.message, c.counter)
            if c.crc_signal:
                s = self.db.get_message_by_name(c.message).get_signal_by_name(c.crc_signal)
                r.crc_byte = s.start // 8
                r.crc_fn, r.crc_rows_fn = CRC_ALGORITHMS.get(c.crc_algorithm)
        for r in self.routes.values():
            plans = [r.mux, r.counter] + [p for slots in r.by_mux.values() for s in slots
                                          for p in (s.plan, s.invalid, s.valid)]
            r.needs_be = any(p is not None and p.big_endian for p in plans)
