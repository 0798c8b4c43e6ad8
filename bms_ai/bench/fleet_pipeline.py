"""`bms-ai bench --only fleet_pipeline`: cloud pipeline throughput (ingest + labels) with 1 and 2 Ray workers in one run.

Vehicles are the fleet simulator's weeks (96 cells, what a vehicle uploads in a week at
the fleet demo's 0.1 Hz; 8 simulated, each uploaded under several ids for larger fleets),
or with ``source="lives"`` recorded drives (the multi-day lives of
``$BMS_AI_ESTIMATION_DATA`` or ``data/estimation`` beside the checkout when present, else
the bundled drives). Each is uploaded as segments once under its own vehicle id and start
day; the estimator trace is replayed (its cost belongs to the vehicle, not to the cloud).
The same fleet is then ingested and labelled on one local Ray with 1 worker and with 2.
Figures: vehicle-hours per core-minute from wall time x workers (what a cluster pays) and
from the workers' own CPU time (what the code costs, less sensitive to other load), the
2-worker speed-up over 2x the 1-worker throughput (1.0 = linear), peak RSS of a worker.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]


def _fleet_drives(quick: bool) -> list[Path]:
    est = Path(os.environ.get("BMS_AI_ESTIMATION_DATA") or ROOT.parent / "data" / "estimation")
    lives = sorted(est.glob("eval_*/*_life"))
    if lives and not quick:
        return lives
    return [ROOT / "data" / "drives" / "nmc_udds", ROOT / "data" / "drives" / "lfp_udds"]


#: rounds of (1 worker, 2 workers) runs; the median round's speed-up is the reported one
ROUNDS = 3


def _simulated_weeks(vehicles: int, quick: bool) -> list:
    from bms_ai.fleet.demo import default_mix
    from bms_ai.fleet.simulator import FleetConfig, simulate_fleet
    from bms_ai.sim.dataset import resample_drive

    fc = FleetConfig(vehicles=vehicles, days=2.0 if quick else 7.0, n_cells=96, mix=default_mix())
    return [resample_drive(d, 0.1) for d in simulate_fleet(fc)]


def make_fleet(store: Any, vehicles: int, quick: bool, source: str = "fleet") -> dict[str, Any]:
    """Upload ``vehicles`` vehicles (drives round-robin, each its own id and start day) with replayed estimates."""
    from bms_ai.fleet.edge import EdgeConfig, EdgeResult, pseudonymizer, replayed_trace, upload
    from bms_ai.sim.dataset import load_drive, resample_drive

    cfg = EdgeConfig(key="bench-key")
    if source == "fleet":   # up to 8 simulated weeks, each uploaded under several ids when more vehicles are asked
        drives = _simulated_weeks(min(vehicles, 4 if quick else 8), quick)
    else:
        drives = [resample_drive(load_drive(p), 1.0) for p in _fleet_drives(quick)]
    samples, cells = 0, set()
    for k in range(vehicles):
        d = drives[k % len(drives)]
        d.t = d.t - d.t[0]
        d.meta["t0_unix"] = 1767225600.0 + 86400.0 * (k // len(drives))
        res = EdgeResult(pseudonymizer(cfg)(f"BENCH{k:012d}"))
        upload(d, replayed_trace(d, d.soc.mean(axis=1)), store, res, cfg)
        samples += res.samples
        cells.add(d.n_cells)
    return {"vehicles": vehicles, "samples": samples, "cells": sorted(cells), "source": source}


def _run(store: Any, workers: int) -> dict[str, Any]:
    from bms_ai.fleet.pipeline import run_ingest, run_label

    t0 = time.perf_counter()
    ing = run_ingest(store, workers)
    lab = run_label(store, workers)
    wall = time.perf_counter() - t0
    vh = lab["vehicle_hours"]
    cpu = ing["cpu_s"] + lab["cpu_s"]
    return {"workers": workers, "wall_s": round(wall, 2), "cpu_s": round(cpu, 2), "vehicle_hours": round(vh, 1),
            "vh_per_core_min_wall": round(vh / (wall * workers / 60.0), 1),
            "vh_per_core_min_cpu": round(vh / (cpu / 60.0), 1),
            "ingest_us_per_sample": round(ing["cpu_s"] / max(lab["samples"], 1) * 1e6, 1),
            "label_us_per_sample": round(lab["cpu_s"] / max(lab["samples"], 1) * 1e6, 1),
            "worker_rss_mb_max": round(max(ing.get("worker_rss_mb_max", 0.0), lab["worker_rss_mb_max"]), 1),
            "rejected": ing["rejected"], "worker_pids": [ing["workers_seen"], lab["workers_seen"]]}


def bench(quick: bool = False, vehicles: int | None = None, source: str = "fleet") -> dict[str, Any]:
    """Throughput of ingest + labels with 1 and 2 workers on one local Ray (127.0.0.1, 2 CPUs)."""
    import ray

    from bms_ai.fleet.pipeline import start_ray
    from bms_ai.fleet.store import open_store

    tmp = Path(tempfile.mkdtemp(prefix="bms_fleet_bench_"))
    try:
        store = open_store(str(tmp / "store"))
        fleet = make_fleet(store, vehicles or (4 if quick else 64), quick, source)
        own = start_ray(num_cpus=2, quiet=True)
        try:
            _run(store, 2)                      # warm-up: both workers have imported everything
            # ROUNDS rounds of 1 then 2 workers: this VM's speed drifts by 10-20 % between runs of the same work
            # (the workers' own CPU seconds too), so each round's ratio pairs runs seconds apart, and the median
            # round is the figure; the faster run of each worker count is kept for the throughput columns
            runs = [_run(store, w) for _ in range(ROUNDS) for w in (1, 2)]
            one, two = (min(runs[k::2], key=lambda r: r["wall_s"]) for k in (0, 1))
        finally:
            if own:
                ray.shutdown()
        rounds = [a["wall_s"] / b["wall_s"] for a, b in zip(runs[0::2], runs[1::2])]
        speedup = float(np.median(rounds))
        return {"fleet": fleet, "runs": [one, two], "speedup_2_workers": round(speedup, 2),
                "linearity": round(speedup / 2.0, 2), "linearity_rounds": [round(r / 2.0, 2) for r in rounds],
                "target": {"vh_per_core_min": 300, "linearity": 0.8},
                "cpu_count": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()],
                "note": "wall figures share the machine with other work; cpu figures are the workers' own time"}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    """Print the bench as JSON (``python -m bms_ai.bench.fleet_pipeline``)."""
    import json

    print(json.dumps(bench(), indent=1))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
