"""Pack values -> CAN frames through the same DBC and pack config (simulation, tests).

The inverse of :class:`~bms_ai.can.decoder.PackDecoder`: it walks the same
routes, so whatever the decoder reads back is what was meant. Alive counters
and checksums are filled in per the pack config's checks.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np

from bms_ai.can.decoder import CELL_T, CELL_V, PACK_I, PACK_V, PackDecoder, Route
from bms_ai.pack import PackSample


class PackEncoder:
    def __init__(self, decoder: PackDecoder) -> None:
        self.decoder = decoder
        self.db = decoder.db
        self._counters: dict[str, int] = {}
        self._msgs = {r.name: self.db.get_message_by_name(r.name) for r in decoder.routes.values()}
        self._by_name: dict[str, Route] = {r.name: r for r in decoder.routes.values()}

    def schedule(self, t0: float, t1: float) -> Iterator[tuple[float, str, int]]:
        """(time, message, mux) per the DBC cycle times; mux values spread over each cycle."""
        events: list[tuple[float, str, int]] = []
        for name, m in self._msgs.items():
            cyc = (m.cycle_time or 100) / 1000.0
            r = self._by_name[name]
            muxes = sorted(k for k in r.by_mux if k >= 0) or [-1]
            n = int(math.floor((t1 - t0) / cyc)) + 1
            base = t0 + np.arange(n) * cyc
            for j, mux in enumerate(muxes):
                for t in base + j * cyc / len(muxes):
                    if t < t1:
                        events.append((float(t), name, mux))
        events.sort(key=lambda e: (e[0], e[1], e[2]))
        return iter(events)

    def encode(self, name: str, mux: int, sample: PackSample) -> bytes:
        r = self._by_name[name]
        m = self._msgs[name]
        values: dict[str, float] = {s.name: 0 for s in m.signals}
        if r.mux is not None and mux >= 0:
            values[r.mux.name] = mux
        slots = list(r.by_mux.get(-1, [])) + (list(r.by_mux.get(mux, [])) if mux >= 0 else [])
        for s in slots:
            if s.kind == CELL_V:
                v = sample.cell_voltages[s.index]
            elif s.kind == CELL_T:
                v = sample.cell_temperatures[s.index]
            elif s.kind == PACK_V:
                v = sample.pack_voltage
            elif s.kind == PACK_I:
                v = sample.pack_current
            else:
                v = sample.status.get(self.decoder.status_names[s.index], 0.0)
            ok = math.isfinite(v)
            raw = (v - s.offset) / s.scale if ok else 0.0
            sig = m.get_signal_by_name(s.plan.name)
            lo, hi = sig.minimum, sig.maximum
            if lo is not None and hi is not None:
                raw = min(max(raw, lo), hi)
            values[s.plan.name] = raw
            if s.invalid is not None:
                values[s.invalid.name] = 0 if ok else 1
            if s.valid is not None:
                values[s.valid.name] = 1 if ok else 0
        if r.counter is not None:
            c = self._counters.get(name, -1) + 1 & r.counter.mask
            self._counters[name] = c
            values[r.counter.name] = c
        data = bytearray(m.encode(values, scaling=True, strict=False))
        if r.crc_byte >= 0:
            data[r.crc_byte] = r.crc_fn(bytes(data[:r.crc_byte] + data[r.crc_byte + 1:]))
        return bytes(data)

    def frame_id(self, name: str) -> tuple[int, bool]:
        r = self._by_name[name]
        return r.frame_id, r.extended
