"""A realistic fault-monitor workload: a bundled 96-cell drive at 10 Hz, clean or with injected faults.

The monitor's per-sample cost and its exact outputs are judged on the same
input: the samples fault_monitor would receive (float32 cell values from
pack/measurements, every value stamped with the header time), the
estimator's SOC beside them, and in the faulted variant every kind of bad
input the rules exist for (over/undervoltage, overtemperature, open wires,
sensor dropouts, stale stamps, a communication loss, a frozen cell, a cold
charge, out-of-order stamps, bus silence for the watchdog, a reset).

:func:`record` reduces a run to a canonical, comparable form (a digest per
call, the level changes per check, the event log), so an optimisation of the
rules can be checked for bit-identical behaviour against a stored record.

``python -m bms_ai.diagnostics.workload record OUT.json`` writes that record;
``python -m bms_ai.diagnostics.workload time [--baseline TREE]`` measures us
per sample, next to the same workload run on another checkout (subprocesses,
interleaved rounds, so both see the same machine load).
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bms_ai.can.assembler import PACK_LEVEL_KEY
from bms_ai.core.paths import share_path
from bms_ai.pack import PackSample

DRIVE = "nmc_udds"
#: health values that measure the machine, not the monitor's decisions: left out of a record
TIMING_KEYS = frozenset({"step_mean_us", "step_max_us"})
#: values naming a file of the checkout: recorded by file name, so a record holds in any checkout
PATH_KEYS = frozenset({"limits"})


@dataclass
class Call:
    """One monitor input: a sample, a watchdog tick, a reset, an estimate or a peer status."""

    kind: str                      # "sample" | "watchdog" | "reset"
    now: float
    sample: PackSample | None = None
    soc: float = math.nan          # the estimator's SOC delivered just before (NaN: none)
    fallback: bool | None = None   # the estimator's model_fallback flag delivered just before (None: none)


@functools.lru_cache(maxsize=2)
def _drive(name: str = DRIVE) -> Any:
    """A bundled drive, loaded once per process (reading its parquet costs more than the rules)."""
    from bms_ai.sim.dataset import load_drive

    return load_drive(share_path("data", "drives", name))


def _sample(t: float, pv: float, i: float, cv: np.ndarray, ct: np.ndarray) -> PackSample:
    """As battery_state_to_sample makes it: float32 cells on the wire, every value stamped with the header."""
    cv = cv.astype(np.float32).astype(np.float64)
    ct = ct.astype(np.float32).astype(np.float64)
    return PackSample(stamp=t, pack_voltage=pv, pack_current=i, cell_voltages=cv, cell_temperatures=ct,
                      pack_voltage_stamp=t, pack_current_stamp=t, cell_voltage_stamps=np.full(cv.shape, t),
                      cell_temperature_stamps=np.full(ct.shape, t))


def calls(faults: bool = False, drive: str = DRIVE, limit: int | None = None) -> Iterator[Call]:
    """The monitor's inputs over a whole bundled drive (``limit``: only the first samples)."""
    d = _drive(drive)
    n = len(d.t) if limit is None else min(limit, len(d.t))
    soc = d.soc.mean(axis=1)
    for k in range(n):
        t, i = float(d.t[k]), float(d.current[k])
        cv, ct = d.cell_v[k].copy(), d.cell_t[k].copy()
        s_soc = float(soc[k])
        if not faults:
            yield Call("sample", t + 0.01, _sample(t, float(cv.sum()), i, cv, ct), soc=s_soc)
            continue
        yield from _faulted(k, t, i, cv, ct, s_soc)


def _cell_faults(k: int, cv: np.ndarray) -> None:
    """Cell-voltage faults of sample ``k``, in place."""
    if 20 <= k < 60:
        cv[5] += 0.12 + 0.002 * (k - 20)        # overvoltage through MOL, RSL, MSL (latched)
    if 70 <= k < 110:
        cv[40] = 2.6                            # undervoltage (MSL) and a spread
    if 120 <= k < 140:
        cv[60] = math.nan                       # open wire: NaN with a fresh stamp
    if 140 <= k < 150:
        cv[30], cv[31] = cv[30] - 0.3, cv[31] + 0.3  # open sense wire: low/high pair
    if 650 <= k < 1000:
        cv[10] = 3.95                           # frozen cell while the pack moves
    if 1000 <= k < 1050:
        cv[48:] = math.nan                      # half the cells ageing out


def _sensor_current_soc_faults(k: int, ct: np.ndarray, i: float, soc: float) -> tuple[float, float]:
    """Temperature faults of sample ``k`` (in place); its current and the estimator's SOC."""
    if 150 <= k < 170:
        ct[7] = math.nan                        # sensor dropout
    if 300 <= k < 360:
        ct[3] = 70.0                            # overtemperature (MSL) and a spread
    if k >= 1080:
        i = 45.0 if not 1300 <= k < 1330 else 160.0   # a long charge, with an overcurrent burst
        ct -= 27.0                              # ... at ~0 degC: charge undertemperature, plating risk
    if 700 <= k < 705:
        soc += 0.1                              # SOC jumps
    if 900 <= k < 950:
        soc = 1.2                               # SOC outside 0..1
    return i, soc


def _faulted(k: int, t: float, i: float, cv: np.ndarray, ct: np.ndarray, soc: float) -> Iterator[Call]:
    """Sample ``k`` of the drive with the fault scenario of its time slot applied."""
    now = t + 0.01
    fallback = True if 1400 <= k < 1450 else (False if k == 1450 else None)
    _cell_faults(k, cv)
    i, soc = _sensor_current_soc_faults(k, ct, i, soc)
    pv = float(np.nansum(cv)) + (5.0 if 600 <= k < 650 else 0.0)  # pack voltage off the sum of cells
    s = _sample(t, pv, i, cv, ct)
    if 180 <= k < 200:
        s.cell_voltage_stamps[:10] = t - 5.0    # stale cell stamps
    if 400 <= k < 430:                          # communication lost: every value aged out to NaN
        s = PackSample.empty(cv.size, ct.size)
        s.stamp = t
    if k == 450:
        s.stamp = t - 1.0                       # out of order: rejected
    if 500 <= k < 520:                          # bus silent: the watchdog steps instead
        yield Call("watchdog", now + 1.2)
        return
    if k == 1060:
        yield Call("reset", now)
    yield Call("sample", now, s, soc=soc, fallback=fallback)


def make_monitor() -> Any:
    """The monitor fault_monitor builds for the reference pack (NMC, 50 Ah, detectors on)."""
    from bms_ai.diagnostics.monitor import FaultMonitor

    return FaultMonitor.load("", "nmc", "pack0", capacity_ah=50.0)


def feed(mon: Any, c: Call) -> list[Any]:
    """One input to the monitor, as the node delivers it; the statuses it returns."""
    if c.fallback is not None:
        mon.on_peer_status("pack0", "estimator: soc", [("model_fallback", str(c.fallback))])
    if math.isfinite(c.soc):
        mon.on_estimate(c.soc, c.now - 0.005, 50.0)
    if c.kind == "watchdog":
        return mon.watchdog(c.now)
    if c.kind == "reset":
        mon.reset(c.now)
        return []
    return mon.on_sample(c.sample, c.now)


def _plain(x: Any) -> Any:
    """A status value as JSON keeps it exactly (bool, int, float incl. NaN, str)."""
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return float(x)
    if isinstance(x, str):
        return x
    raise TypeError(f"status value of type {type(x).__name__}: {x!r}")


def canonical(results: list[Any]) -> list[list[Any]]:
    """One call's statuses as plain lists (check, level, message, values in published order), timing left out."""
    return [[r.check, int(r.level), r.message,
             [[k, Path(v).name if k in PATH_KEYS else _plain(v)] for k, v in r.values.items() if k not in TIMING_KEYS]]
            for r in results]


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, allow_nan=True).encode()).hexdigest()[:16]


def _event(e: Any) -> list[Any]:
    return [e.check, e.tier, e.index, e.onset, e.set_time, e.value, e.cleared, e.level]


def record(faults: bool = False, limit: int | None = None) -> dict[str, Any]:
    """A whole run, comparable bit for bit: a digest per call, level changes per check, every event."""
    mon = make_monitor()
    digests: list[str] = []
    levels: dict[str, list[list[int]]] = {}
    last: dict[str, int] = {}
    for n, c in enumerate(calls(faults, limit=limit)):
        res = canonical(feed(mon, c))
        digests.append(_digest(res))
        for check, level, _msg, _kv in res:
            if last.get(check) != level:
                last[check] = level
                levels.setdefault(check, []).append([n, level])
    events = [_event(e) for e in mon.engine.events] + [_event(e) for e in mon.detectors.events]
    return {"calls": len(digests), "digests": digests, "levels": levels, "events": events,
            "steps": mon.steps, "rejected": mon.rejected}


def _edge_sample(rng: np.random.Generator, k: int, n: int, n_temps: int, pack_level: bool) -> PackSample:
    """Tick ``k`` of a small synthetic pack: limits crossed, NaN, signed zeros, stale stamps, pack V off."""
    t = 1000.0 + 0.1 * k
    v = 3.7 + 0.01 * rng.standard_normal(n) + (0.6 if 100 <= k < 140 else 0.0)
    temps = 25 + rng.standard_normal(n_temps) + (40 if 200 <= k < 240 else 0)
    if 250 <= k < 260:
        v[:] = math.nan
    if 300 <= k < 310 and n_temps:
        temps[0] = math.nan
    if k % 97 == 0:
        v[0] = 0.0
    if k % 89 == 0 and n_temps:
        temps[-1] = -0.0
    cur = float(rng.uniform(-50, 50)) if k < 350 else 0.0
    return PackSample(t, float(np.nansum(v)) if k % 50 else 1.0, cur, v, temps, t, t, np.full(n, t),
                      np.full(n_temps, t if k % 70 else t - 3), status={PACK_LEVEL_KEY: 1.0} if pack_level else {})


def record_edges() -> dict[str, Any]:
    """Small packs the drives do not cover (0, 1, 2, 5 sensors; pack-level), with NaN and signed zeros."""
    digests, events = [], []
    for n_temps in (0, 1, 2, 5):
        for pack_level in (False, True):
            mon = make_monitor()
            rng = np.random.default_rng(n_temps * 2 + pack_level)
            for k in range(400):
                s = _edge_sample(rng, k, 1 if pack_level else 12, n_temps, pack_level)
                mon.on_estimate(0.5 + 0.001 * k + (0.2 if k == 150 else 0.0), s.stamp, 50.0)
                digests.append(_digest(canonical(mon.on_sample(s, s.stamp + 0.01))))
                if k == 330:
                    mon.reset(s.stamp)
            events += [_event(e) for e in mon.engine.events]
    return {"calls": len(digests), "digests": digests, "levels": {}, "events": events, "steps": 0, "rejected": 0}


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Where two records part (empty when identical): the first call, check or event that differs."""
    for key in ("calls", "steps", "rejected"):
        if a[key] != b[key]:
            return f"{key}: {a[key]} != {b[key]}"
    for n, (x, y) in enumerate(zip(a["digests"], b["digests"])):
        if x != y:
            return f"call {n}: statuses differ"
    if a["levels"] != b["levels"]:
        return "level changes differ"
    if json.dumps(a["events"]) != json.dumps(b["events"]):
        return "events differ"
    return ""


def time_per_sample(rounds: int = 3, limit: int | None = None) -> dict[str, float]:
    """Best-of-``rounds`` mean us per monitor call (CPU time of this thread), clean and faulted drive.

    The inputs are built beforehand; a round is a fresh monitor over the whole drive.
    """
    import gc

    out = {}
    for variant in ("clean", "faulted"):
        work = list(calls(variant == "faulted", limit=limit))
        best = math.inf
        for _ in range(rounds):
            mon = make_monitor()
            gc.collect()
            t0 = time.thread_time()
            for c in work:
                feed(mon, c)
            best = min(best, (time.thread_time() - t0) / len(work))
        out[variant] = best * 1e6
    return out


def _time_tree(tree: str, rounds: int, limit: int | None) -> dict[str, float]:
    """us per call of this workload on the checkout at ``tree`` (a subprocess on that tree's bms_ai)."""
    code = ("import json, runpy, sys; sys.path.insert(0, sys.argv[1]); "
            "m = runpy.run_path(sys.argv[2]); print(json.dumps(m['time_per_sample'](int(sys.argv[3]), "
            "None if sys.argv[4] == 'all' else int(sys.argv[4]))))")
    env = {**os.environ, "PYTHONPATH": tree}
    out = subprocess.run([sys.executable, "-c", code, tree, __file__, str(rounds), str(limit or "all")],
                         env=env, capture_output=True, text=True, check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """Record a run, or time this checkout next to a baseline checkout."""
    ap = argparse.ArgumentParser(prog="python -m bms_ai.diagnostics.workload", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="write the clean and faulted records as JSON")
    rec.add_argument("out")
    rec.add_argument("--limit", type=int, help="only the first N samples of each drive")
    tm = sub.add_parser("time", help="us per monitor call, this checkout and (optionally) a baseline")
    tm.add_argument("--baseline", help="another checkout (e.g. `git worktree add /tmp/base main`)")
    tm.add_argument("--rounds", type=int, default=3)
    tm.add_argument("--repeats", type=int, default=2, help="interleaved subprocess runs per tree")
    tm.add_argument("--limit", type=int)
    args = ap.parse_args(argv)
    if args.cmd == "record":
        doc = {"drive": DRIVE, "clean": record(False, args.limit), "faulted": record(True, args.limit),
               "edges": record_edges()}
        Path(args.out).write_text(json.dumps(doc, separators=(",", ":")) + "\n")
        return 0
    here = str(Path(__file__).resolve().parents[2])
    trees = {"this": here, **({"baseline": str(Path(args.baseline).resolve())} if args.baseline else {})}
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in trees}
    for _ in range(args.repeats):  # interleaved, so both trees see the same machine load
        for name, tree in trees.items():
            runs[name].append(_time_tree(tree, args.rounds, args.limit))
    res: dict[str, Any] = {"unit": "us per monitor call (thread CPU time, best of rounds and repeats)",
                           "cells": 96, "drive": DRIVE}
    for name, rs in runs.items():
        res[name] = {v: min(r[v] for r in rs) for v in ("clean", "faulted")}
    if "baseline" in res:
        res["speedup"] = {v: res["baseline"][v] / res["this"][v] for v in ("clean", "faulted")}
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
