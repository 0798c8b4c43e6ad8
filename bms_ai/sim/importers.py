"""Real-data importer: McMaster (Kollmeyer) LG 18650HG2 / Panasonic 18650PF
drive-cycle CSV exports (Digatron tester) -> the simulator's truth schema.

File layout (as published, e.g. ``25degC/551_LA92.csv``): free-text header
lines, then a column row starting ``Time Stamp,Step,Status,Prog Time,Step Time,
Cycle,Cycle Level,Procedure,Voltage,Current,Temperature,Capacity,WhAccu,Cnt``,
optionally a units row, then data. ``Prog Time`` is ``H:MM:SS.fff`` (hours may
exceed 24); current is + for charge; capacity in Ah accumulates with sign.

The data is one cell, so the truth table has cell 00 filled and cells 01..95
NaN (meta ``cells_present`` = 1); pack columns describe that one cell. SOC is
Coulomb counted from the measured current, starting at ``soc0`` (the tests
start fully charged: 1C CC-CV to 4.2 V).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from bms_ai.sim.canlog import CAN_T0, N_CELLS
from bms_ai.sim.io import FORMAT_VERSION, _versions
from bms_ai.sim.simulator import N_TEMP

REQUIRED = ("Prog Time", "Voltage", "Current", "Temperature")
LABELS = ("fault_any", "fault_can", "fault_isc", "fault_plating", "fault_self_discharge", "fault_sensor", "fault_thermal")


def _seconds(s: str) -> float:
    parts = s.strip().split(":")
    if len(parts) == 1:
        return float(parts[0])
    if len(parts) != 3:
        raise ValueError(f"bad time {s!r}")
    return int(parts[0]) * 3600.0 + int(parts[1]) * 60.0 + float(parts[2])


def read_kollmeyer_csv(path: Path | str) -> dict[str, np.ndarray]:
    """Columns t [s], voltage [V], current [A, + charge], temperature [degC], capacity [Ah]."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig", errors="replace") as fh:
        rows = list(csv.reader(fh))
    head = next((k for k, r in enumerate(rows) if r and r[0].strip() == "Time Stamp"), None)
    if head is None:
        raise ValueError(f"{path}: no 'Time Stamp,...' column row; not a McMaster/Digatron drive-cycle CSV")
    names = [c.strip() for c in rows[head]]
    missing = [c for c in REQUIRED if c not in names]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    col = {n: names.index(n) for n in names}
    t, v, i, temp, cap = [], [], [], [], []
    bad = 0
    for r in rows[head + 1:]:
        if len(r) < len(REQUIRED):
            continue
        try:
            tt = _seconds(r[col["Prog Time"]])
            vv, ii, te = float(r[col["Voltage"]]), float(r[col["Current"]]), float(r[col["Temperature"]])
            ca = float(r[col["Capacity"]]) if "Capacity" in col and r[col["Capacity"]].strip() else np.nan
        except (ValueError, IndexError):
            bad += 1  # units row or a damaged line
            continue
        t.append(tt)
        v.append(vv)
        i.append(ii)
        temp.append(te)
        cap.append(ca)
    if len(t) < 2:
        raise ValueError(f"{path}: fewer than 2 data rows")
    ta = np.asarray(t)
    if np.any(np.diff(ta) < 0):
        raise ValueError(f"{path}: time goes backwards")
    return {"t": ta - ta[0], "voltage": np.asarray(v), "current": np.asarray(i), "temperature": np.asarray(temp),
            "capacity": np.asarray(cap), "skipped_rows": np.asarray(bad)}


def kollmeyer_truth(data: dict[str, np.ndarray], capacity_ah: float = 3.0, soc0: float = 1.0,
                    rated_ah: float = 3.0, ambient_c: float | None = None, rate_hz: float = 10.0) -> dict[str, np.ndarray]:
    """Resample to ``rate_hz`` and fill the truth schema (cell 00 only)."""
    t_raw = data["t"]
    t = np.arange(0.0, t_raw[-1] + 1e-9, 1.0 / rate_hz)
    i = np.interp(t, t_raw, data["current"])
    v = np.interp(t, t_raw, data["voltage"])
    temp = np.interp(t, t_raw, data["temperature"])
    # Coulomb counting on the raw samples (trapezoid), then resampled
    ah_raw = np.concatenate([[0.0], np.cumsum(0.5 * (data["current"][1:] + data["current"][:-1]) * np.diff(t_raw))]) / 3600.0
    soc = soc0 + np.interp(t, t_raw, ah_raw) / capacity_ah
    n = len(t)
    nan = np.full(n, np.nan, dtype=np.float32)
    cols: dict[str, np.ndarray] = {
        "t": t, "t_can": CAN_T0 + t, "current_a": i, "pack_voltage_v": v, "soc": soc, "soc_min": soc, "soc_max": soc,
        "soh": np.full(n, capacity_ah / rated_ah), "soh_min": np.full(n, capacity_ah / rated_ah),
        "ambient_c": np.full(n, np.nan if ambient_c is None else ambient_c),
        "mode": np.where(np.abs(i) > 0.01, np.where(i > 0, 4, 3), 1).astype(np.int8),
        "speed_mps": nan, "charger_state": np.zeros(n, dtype=np.int8),
    }
    per = {"soc": soc.astype(np.float32), "cap_ah": np.full(n, capacity_ah, np.float32), "r0_ohm": nan,
           "temp_c": temp.astype(np.float32), "v": v.astype(np.float32)}
    for name, first in per.items():
        for c in range(N_CELLS):
            cols[f"{name}_c{c:02d}"] = first if c == 0 else nan
    for s in range(N_TEMP):
        cols[f"tsens_c_s{s:02d}"] = temp.astype(np.float32) if s == 0 else nan
    for k in LABELS:
        cols[k] = np.zeros(n, dtype=np.uint8)
    cols["fault_cell"] = np.full(n, -1, dtype=np.int16)
    return cols


def import_kollmeyer_csv(path: Path | str, out_dir: Path | str, chemistry: str = "nmc", capacity_ah: float = 3.0,
                         soc0: float = 1.0, rated_ah: float = 3.0, ambient_c: float | None = None) -> Path:
    """Write ``truth.parquet`` + ``meta.json`` (no CAN log) for one test file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = read_kollmeyer_csv(path)
    cols = kollmeyer_truth(data, capacity_ah, soc0, rated_ah, ambient_c)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), out / "truth.parquet", compression="zstd")
    meta = {"format_version": FORMAT_VERSION, "source": {"format": "mcmaster_kollmeyer_csv", "file": Path(path).name,
                                                        "skipped_rows": int(data["skipped_rows"])},
            "chemistry": chemistry, "cells": N_CELLS, "cells_present": 1, "n_parallel": 1,
            "design_capacity_ah": rated_ah, "duration_s": float(cols["t"][-1]), "truth_rate_hz": 10,
            "can_time_origin": CAN_T0, "faults": [], "seed": None, "scenario": None, "versions": _versions(),
            "files": ["truth.parquet"]}
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out
