"""Scenario grids (train / val / test) built in parallel with caching.

A suite is a deterministic list of (name, Scenario, seed) drawn from a seeded
generator over chemistry x schedule x ambient x SOH x fault. The splits use
disjoint seeds, so no drive (cell spread, noise, fault cell) repeats across
splits. A drive whose meta.json carries the same scenario hash is skipped.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import numpy as np

from bms_ai.sim.scenario import Fault, Phase, Scenario

SUITE_SIZES = {"train": 64, "val": 16, "test": 16, "smoke": 2}
_SPLIT_SEED = {"train": 1, "val": 2, "test": 3, "smoke": 4}
CYCLE_CHOICES = ("udds", "hwfet", "us06", "wltc_3b")
AMBIENTS = (-20.0, -10.0, 0.0, 10.0, 25.0, 35.0, 45.0)
SOHS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
FAULT_CHOICES = ("none", "none", "isc", "self_discharge", "thermal", "sensor", "plating", "can")


def _one(rng: np.random.Generator, split: str, k: int) -> tuple[str, Scenario, int]:
    chem = str(rng.choice(["nmc", "lfp"]))
    cycle = str(rng.choice(CYCLE_CHOICES))
    amb = float(rng.choice(AMBIENTS))
    soh = float(rng.choice(SOHS))
    fault = str(rng.choice(FAULT_CHOICES))
    soc0 = float(np.round(rng.uniform(0.55, 0.95), 3))
    segs = [Phase("drive", cycle, repeats=float(rng.choice([1.0, 1.5, 2.0])))]
    if rng.random() < 0.4:  # partial charge then more driving
        segs += [Phase("rest", duration_s=float(rng.integers(60, 600))),
                 Phase("charge", c_rate=float(rng.choice([0.3, 0.5, 1.0])), soc_target=float(rng.uniform(0.7, 0.95)),
                         duration_s=1800.0),
                 Phase("rest", duration_s=float(rng.integers(60, 600)))]
    if rng.random() < 0.3:
        segs.append(Phase("park", duration_s=float(rng.integers(300, 1200))))
    faults: list[Fault] = []
    cell = int(rng.integers(0, 96))
    onset = float(np.round(rng.uniform(60.0, 600.0), 1))
    if fault == "isc":
        faults = [Fault("isc", onset_s=onset, cell=cell, magnitude=float(np.round(np.exp(rng.uniform(np.log(2), np.log(200))), 2)))]
    elif fault == "self_discharge":
        faults = [Fault("self_discharge", onset_s=onset, cell=cell, magnitude=float(np.round(rng.uniform(0.2, 3.0), 2)))]
    elif fault == "thermal":
        faults = [Fault("thermal", onset_s=onset, cell=cell, magnitude=float(np.round(rng.uniform(2.0, 15.0), 1)))]
    elif fault == "sensor":
        kind = str(rng.choice(["sensor_stuck", "sensor_drift", "open_wire"]))
        target = str(rng.choice(["cell_v", "cell_t"])) if kind != "sensor_drift" else str(rng.choice(["current", "cell_v"]))
        ch = cell if target == "cell_v" else cell % 32
        mag = {"current": 30.0, "cell_v": 0.05}.get(target, 0.0) if kind == "sensor_drift" else 0.0
        faults = [Fault(kind, onset_s=onset, cell=-1 if target == "current" else ch, target=target, magnitude=mag)]
    elif fault == "can":
        faults = [Fault("can_timeout", onset_s=onset, target=str(rng.choice(["BMS_PackMeas", "BMS_CellVoltages", "BMS_CellTemps"])),
                        duration_s=float(np.round(rng.uniform(0.5, 10.0), 1)))]
    elif fault == "plating":  # low-temperature fast charge
        amb = float(rng.choice([-20.0, -10.0, 0.0]))
        soc0 = float(np.round(rng.uniform(0.15, 0.4), 3))
        segs = [Phase("rest", duration_s=60.0), Phase("charge", c_rate=float(rng.choice([1.0, 1.5, 2.0])),
                                                          soc_target=0.8, duration_s=2400.0),
                Phase("rest", duration_s=600.0), Phase("drive", cycle, repeats=0.5)]
    name = f"{split}_{k:03d}_{chem}_{cycle}_{'m' if amb < 0 else ''}{abs(int(amb))}c_soh{int(round(soh * 100))}_{fault}"
    sc = Scenario(name, chem, segs, ambient_c=amb, soc0=soc0, soh=soh, faults=faults).validate()
    return name, sc, _SPLIT_SEED[split] * 100000 + k


def suite(split: str) -> list[tuple[str, Scenario, int]]:
    """The (name, scenario, seed) list of a split; same split -> same list."""
    if split not in SUITE_SIZES:
        raise ValueError(f"unknown suite {split!r}; choose from {sorted(SUITE_SIZES)}")
    if split == "smoke":
        return [("smoke_000_nmc", Scenario("smoke_000_nmc", "nmc", [Phase("drive", "udds", repeats=0.03)]), 1),
                ("smoke_001_lfp", Scenario("smoke_001_lfp", "lfp", [Phase("drive", "us06", repeats=0.05)], soc0=0.7,
                                           faults=[Fault("thermal", onset_s=5.0, cell=3, magnitude=5.0)]), 2)]
    rng = np.random.default_rng([_SPLIT_SEED[split], 2026])
    return [_one(rng, split, k) for k in range(SUITE_SIZES[split])]


def is_cached(out: Path, sc: Scenario, seed: int, formats: tuple[str, ...]) -> bool:
    """True if ``out`` holds this scenario + seed already (hash match and all files present)."""
    from bms_ai.sim.io import scenario_hash

    meta = out / "meta.json"
    if not meta.exists():
        return False
    try:
        m = json.loads(meta.read_text())
    except (OSError, ValueError):
        return False
    need = ["truth.parquet"] + [f"can.{f}" for f in formats]
    return m.get("scenario_hash") == scenario_hash(sc.to_dict(), seed) and all((out / f).exists() for f in need)


def _work(job: tuple[str, dict, int, str, tuple[str, ...]]) -> dict:
    name, scd, seed, out_dir, formats = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from bms_ai.sim.io import write_drive
    from bms_ai.sim.simulator import simulate_drive

    t0 = time.perf_counter()
    try:
        sc = Scenario.from_dict(scd)
        d = simulate_drive(sc, seed)
        write_drive(d, out_dir, formats)
    except Exception as exc:  # one bad drive must not cost the rest of the suite
        return {"name": name, "duration_s": 0.0, "compute_s": time.perf_counter() - t0, "cached": False,
                "error": f"{type(exc).__name__}: {exc}"}
    return {"name": name, "duration_s": d.duration_s, "compute_s": time.perf_counter() - t0, "cached": False}


def build_suite(split: str, out: Path | str, jobs: int = 1, formats: tuple[str, ...] = ("blf",),
                limit: int | None = None, log=None) -> dict:
    """Simulate every drive of the split not already cached; returns a summary."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    items = suite(split)[: limit if limit else None]
    todo, results = [], []
    for name, sc, seed in items:
        d = out / name
        if is_cached(d, sc, seed, formats):
            meta = json.loads((d / "meta.json").read_text())
            results.append({"name": name, "duration_s": meta["duration_s"], "compute_s": 0.0, "cached": True})
        else:
            todo.append((name, sc.to_dict(), seed, str(d), tuple(formats)))
    say(f"suite {split}: {len(items)} drives, {len(items) - len(todo)} cached, {len(todo)} to simulate on {jobs} job(s)")
    t0 = time.perf_counter()
    if todo:
        if jobs <= 1:
            it = map(_work, todo)
            pool = None
        else:
            pool = mp.get_context("spawn").Pool(jobs)
            it = pool.imap_unordered(_work, todo)
        try:
            for k, r in enumerate(it, 1):
                results.append(r)
                if "error" in r:
                    say(f"[{k}/{len(todo)}] {r['name']}: FAILED {r['error']}")
                else:
                    say(f"[{k}/{len(todo)}] {r['name']}: {r['duration_s'] / 60:.1f} min driving in {r['compute_s']:.1f} s")
        finally:
            if pool is not None:
                pool.close()
                pool.join()
    wall = time.perf_counter() - t0
    failed = sorted(r["name"] for r in results if "error" in r)
    new = [r for r in results if not r["cached"] and "error" not in r]
    hours = sum(r["duration_s"] for r in new) / 3600.0
    summary = {
        "suite": split, "drives": len(items), "simulated": len(new), "failed": failed,
        "cached": sum(1 for r in results if r["cached"]),
        "hours_total": round(sum(r["duration_s"] for r in results) / 3600.0, 3),
        "hours_simulated": round(hours, 3), "wall_s": round(wall, 1), "jobs": jobs,
        "hours_per_minute_wall": round(hours / (wall / 60.0), 3) if new and wall > 0 else None,
        "hours_per_cpu_minute": round(hours / (sum(r["compute_s"] for r in new) / 60.0), 3) if new else None,
    }
    index = {"summary": summary, "drives": sorted(r["name"] for r in results if "error" not in r),
             "errors": {r["name"]: r["error"] for r in results if "error" in r}}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"suite_{split}.json").write_text(json.dumps(index, indent=2) + "\n")
    return summary
