"""Test helpers: a synthetic pack drive encoded into frames of the reference DBC, and log files of it."""

from __future__ import annotations

from pathlib import Path

import can
import numpy as np

from bms_ai.can.decoder import PackDecoder
from bms_ai.can.encoder import PackEncoder
from bms_ai.pack import PackSample


def synthetic_sample(t: float, n_cells: int = 96, n_temps: int = 32) -> PackSample:
    """Smoothly varying pack values (distinct per cell) at time t."""
    cells = 3.6 + 0.002 * np.arange(n_cells) / n_cells + 0.05 * np.sin(0.3 * t + np.arange(n_cells) * 0.01)
    temps = 25.0 + 0.1 * np.arange(n_temps) + 2.0 * np.sin(0.05 * t)
    s = PackSample.empty(n_cells, n_temps)
    s.cell_voltages[:] = cells
    s.cell_temperatures[:] = temps
    s.pack_voltage = float(cells.sum())
    s.pack_current = float(-50.0 * np.sin(0.2 * t))
    s.status = {"bms_state": 3.0, "contactor_plus": 1.0, "contactor_minus": 1.0}
    return s


_ENCODED: dict[tuple, list[tuple[float, int, bool, bytes]]] = {}


def synthetic_messages(decoder: PackDecoder, t0: float, t1: float) -> list[can.Message]:
    """Every frame the reference pack sends in [t0, t1), per the DBC cycle times (fresh objects each call)."""
    key = (decoder.cfg.source, decoder.cfg.dbc_path, t0, t1)
    if key not in _ENCODED:  # encoding is the slow part; tests may modify the messages they get
        enc = PackEncoder(decoder)
        _ENCODED[key] = [(t, *enc.frame_id(name), enc.encode(name, mux, synthetic_sample(t)))
                         for t, name, mux in enc.schedule(t0, t1)]
    return [can.Message(timestamp=t, arbitration_id=fid, is_extended_id=ext, data=data, channel=0)
            for t, fid, ext, data in _ENCODED[key]]


def write_log(path: str | Path, msgs) -> Path:
    """A log file of ``msgs`` in the format its suffix names (python-can's writers)."""
    with can.Logger(str(path)) as log:
        for m in msgs:
            log.on_message_received(m)
    return Path(path)
