"""Recorded-drive directory: can.blf (+ can.asc), truth.parquet, meta.json.

Truth-table columns (10 Hz, one row per step; see docs/sim.md):
  t [s since drive start], t_can [CAN timestamp = CAN_T0 + t], current_a [+ = charging],
  pack_voltage_v, soc, soc_min, soc_max, soh, soh_min, ambient_c, mode, speed_mps,
  charger_state, soc_cNN, cap_ah_cNN, r0_ohm_cNN, temp_c_cNN, v_cNN (NN = 00..95),
  tsens_c_sNN (NN = 00..31, true temperature at sensor location),
  fault_isc, fault_self_discharge, fault_thermal, fault_plating, fault_sensor,
  fault_can, fault_any (uint8 0/1), fault_cell (int16, -1 = none)
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from bms_ai.sim.canlog import CAN_T0, N_CELLS, build_frames, write_asc, write_blf
from bms_ai.sim.simulator import N_TEMP, SimulatedDrive

FORMAT_VERSION = 1
SIM_VERSION = "1.0"


def truth_columns(drive: SimulatedDrive) -> dict[str, np.ndarray]:
    """The truth table's columns (schema in the module docstring)."""
    cols: dict[str, np.ndarray] = {
        "t": drive.t.astype(np.float64),
        "t_can": (CAN_T0 + drive.t).astype(np.float64),
        "current_a": drive.current.astype(np.float64),
        "pack_voltage_v": drive.pack_voltage.astype(np.float64),
        "soc": drive.soc.mean(axis=1),
        "soc_min": drive.soc.min(axis=1),
        "soc_max": drive.soc.max(axis=1),
        "soh": drive.capacity.mean(axis=1) / drive.design_capacity_ah,
        "soh_min": drive.capacity.min(axis=1) / drive.design_capacity_ah,
        "ambient_c": np.full(len(drive.t), drive.scenario.ambient_c),
        "mode": drive.mode.astype(np.int8),
        "speed_mps": drive.speed.astype(np.float32),
        "charger_state": drive.charger_state.astype(np.int8),
    }
    for name, arr, dtype in (("soc", drive.soc, np.float32), ("cap_ah", drive.capacity, np.float32),
                             ("r0_ohm", drive.r0, np.float32), ("temp_c", drive.temp, np.float32),
                             ("v", drive.v, np.float32)):
        for i in range(N_CELLS):
            cols[f"{name}_c{i:02d}"] = arr[:, i].astype(dtype)
    for s in range(N_TEMP):
        cols[f"tsens_c_s{s:02d}"] = drive.sensor_temp[:, s].astype(np.float32)
    for k in sorted(drive.labels):
        cols[k] = drive.labels[k].astype(np.uint8)
    cols["fault_cell"] = drive.fault_cell.astype(np.int16)
    return cols


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"bms_ai_sim": SIM_VERSION, "format": str(FORMAT_VERSION)}
    for pkg in ("pybamm", "python-can", "cantools", "pyarrow", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "missing"
    return out


def meta_for(drive: SimulatedDrive) -> dict:
    """meta.json content: scenario, seed, chemistry, pack config, versions and fault events."""
    sc = drive.scenario
    return {
        "format_version": FORMAT_VERSION,
        "scenario": sc.to_dict(),
        "scenario_hash": scenario_hash(sc.to_dict(), drive.seed),
        "seed": drive.seed,
        "chemistry": drive.chemistry.name,
        "parameter_set": drive.chemistry.parameter_set,
        "pack_config": drive.chemistry.pack_config,
        "dbc": "bms_ai_pack96.dbc",
        "cells": N_CELLS,
        "temperature_sensors": N_TEMP,
        "n_parallel": drive.chemistry.n_parallel,
        "design_capacity_ah": drive.design_capacity_ah,
        "duration_s": round(drive.duration_s, 3),
        "truth_rate_hz": 10,
        "can_time_origin": CAN_T0,
        "truncated_at_s": drive.truncated_at_s,
        "faults": drive.events,
        "versions": _versions(),
    }


def scenario_hash(scenario_dict: dict, seed: int) -> str:
    """Short hash of scenario + seed + simulator version: a cached drive is reused only if it matches."""
    blob = json.dumps({"scenario": scenario_dict, "seed": seed, "sim": SIM_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_drive(drive: SimulatedDrive, out_dir: Path | str, formats: tuple[str, ...] = ("blf",)) -> Path:
    """Write the drive directory; returns it. ``formats``: any of blf, asc."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in formats:
        if f not in ("blf", "asc"):
            raise ValueError(f"unknown CAN log format {f!r} (blf, asc)")
    frames = build_frames(drive)
    if "blf" in formats:
        write_blf(frames, out / "can.blf")
    if "asc" in formats:
        write_asc(frames, out / "can.asc")
    cols = truth_columns(drive)
    table = pa.table(cols)
    floats = [n for n, c in cols.items() if c.dtype.kind == "f"]
    pq.write_table(table, out / "truth.parquet", compression="zstd", compression_level=9,
                   use_dictionary=[n for n in cols if n not in floats], use_byte_stream_split=floats,
                   write_statistics=False)
    meta = meta_for(drive)
    meta["frames"] = len(frames)
    meta["files"] = sorted(p.name for p in out.iterdir() if p.name != "meta.json")
    (out / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return out


def read_truth(drive_dir: Path | str):
    """The truth table as a pyarrow Table."""
    import pyarrow.parquet as pq

    return pq.read_table(Path(drive_dir) / "truth.parquet")


def truth_arrays(drive_dir: Path | str) -> dict[str, np.ndarray]:
    """The truth table as numpy: 1-D pack columns plus stacked per-cell (N, 96)
    ``soc``/``cap_ah``/``r0_ohm``/``temp_c``/``v`` (keys ``cell_<name>``) and
    ``tsens_c`` (N, 32)."""
    tbl = read_truth(drive_dir)
    names = tbl.column_names
    out: dict[str, np.ndarray] = {}
    for prefix in ("soc", "cap_ah", "r0_ohm", "temp_c", "v"):
        cols = [f"{prefix}_c{i:02d}" for i in range(N_CELLS)]
        out[f"cell_{prefix}"] = np.column_stack([tbl[c].to_numpy() for c in cols])
    out["tsens_c"] = np.column_stack([tbl[f"tsens_c_s{s:02d}"].to_numpy() for s in range(N_TEMP)])
    per_cell = {n for n in names if n.rsplit("_", 1)[-1][:1] in ("c", "s") and n.rsplit("_", 1)[-1][1:].isdigit()}
    for n in names:
        if n not in per_cell:
            out[n] = tbl[n].to_numpy()
    return out


