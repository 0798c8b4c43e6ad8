"""Fleet simulator throughput: vehicle-hours simulated per core-minute (calendar and awake hours).

Process CPU time of one process (one core), so the figure does not depend on what else the
machine runs; the output writing (``save_npz``) is not part of it.
"""

from __future__ import annotations

import time
from typing import Any

TARGET_VEHICLE_H_PER_CORE_MIN = 1000.0


def bench(quick: bool = False, vehicles: int | None = None, days: float | None = None, n_cells: int = 96,
          seed: int = 0) -> dict[str, Any]:
    """Simulate a small fleet of 96-cell vehicles; vehicle-hours per core-minute, calendar and awake."""
    from bms_ai.fleet.simulator import FleetConfig, simulate_fleet

    cfg = FleetConfig(vehicles=vehicles or (2 if quick else 8), days=days or (1.0 if quick else 7.0), seed=seed,
                      n_cells=n_cells)
    t0 = time.process_time()
    cal = awake = 0.0
    per = []
    for d in simulate_fleet(cfg):
        cal += d.meta["timing"]["calendar_h"]
        awake += d.meta["timing"]["awake_h"]
        per.append({"variant": d.meta["variant"], "cpu_s": d.meta["timing"]["cpu_s"], "awake_h": d.meta["timing"]["awake_h"]})
    cpu_min = max(time.process_time() - t0, 1e-9) / 60.0
    res = {"vehicles": cfg.vehicles, "days": cfg.days, "cells": n_cells, "cpu_s": round(cpu_min * 60.0, 2),
           "calendar_h": round(cal, 1), "awake_h": round(awake, 1),
           "calendar_vehicle_h_per_core_min": round(cal / cpu_min, 1),
           "awake_vehicle_h_per_core_min": round(awake / cpu_min, 1),
           "target_vehicle_h_per_core_min": TARGET_VEHICLE_H_PER_CORE_MIN, "per_vehicle": per}
    res["meets_target_calendar"] = res["calendar_vehicle_h_per_core_min"] >= TARGET_VEHICLE_H_PER_CORE_MIN
    res["meets_target_awake"] = res["awake_vehicle_h_per_core_min"] >= TARGET_VEHICLE_H_PER_CORE_MIN
    return res


if __name__ == "__main__":
    import json

    print(json.dumps(bench(quick=True), indent=1))
