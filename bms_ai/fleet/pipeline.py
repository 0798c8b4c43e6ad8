"""The fleet data pipeline on Ray Data: segments -> timelines -> pseudo-labels -> SOH trends -> anomaly ranking.

Stages (each a Ray Data map over small work items, so memory is bounded by one
segment or one vehicle per worker, never the fleet):

1. ingest (``bms_ai.fleet.ingest``): one task per batch of segment keys writes
   timeline parts and returns manifest rows (rejections counted with reasons);
2. label: one task per vehicle reads its timeline, runs
   ``bms_ai.fleet.labels.label_timeline`` over the whole period, writes
   ``labels/vehicle=<p>/day=<d>/labels.parquet`` (the timeline columns plus
   ``label_soc`` / ``label_sigma`` per cell: training-ready) and returns per-cell
   capacity, current offset and a per-day capacity trend;
3. fleet (driver, small rows only): ``soh/soh.parquet`` (vehicle, cell, capacity,
   SOH, trend per day), ``anomalies/ranking.json`` (cells drifting against their
   pack and fleet peers, by robust z-score), ``pipeline/summary.json``.

Ray: ``ray.init`` on 127.0.0.1 with ``num_cpus`` by default, or joins a cluster
(``address="127.0.0.1:6379"`` after ``ray start --head --node-ip-address 127.0.0.1``).
``bms-ai fleet ingest --store URL`` runs stage 1, ``bms-ai fleet label --store URL``
stages 2-3 on what is ingested.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import pickle
import resource
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bms_ai.core.cliargs import positive_int
from bms_ai.fleet.ingest import (
    SESSION_GAP_S,
    TIMELINES,
    _fixed_list,
    ingest_segment,
    list_segments,
    read_timeline,
    table_bytes,
)
from bms_ai.fleet.labels import LabelConfig, _counting, estimate_capacity, label_timeline
from bms_ai.fleet.store import ObjectStore, open_store

MANIFEST = "pipeline/manifest.parquet"
SUMMARY = "pipeline/summary.json"
SOH = "soh/soh.parquet"
RANKING = "anomalies/ranking.json"
MANIFEST_FIELDS = {"key": "", "error": "", "vehicle": "", "day": "", "part": "", "rows": 0, "t0": math.nan,
                   "t1": math.nan, "chemistry": "", "design_capacity_ah": math.nan, "n_cells": 0}


# -- Ray ------------------------------------------------------------------------------------------


def start_ray(address: str | None = None, num_cpus: int | None = None, quiet: bool = True) -> bool:
    """Connect to ``address`` or start a local Ray on 127.0.0.1; False when one was already running here."""
    _quiet_logs(quiet)
    import ray

    if ray.is_initialized():
        _configure_data(quiet)
        return False
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    kw: dict[str, Any] = {"include_dashboard": False, "log_to_driver": not quiet, "logging_level": "ERROR"}
    if address:
        ray.init(address=address, **kw)
    else:
        ray.init(num_cpus=num_cpus, _node_ip_address="127.0.0.1", **kw)
    _configure_data(quiet)
    return True


def _configure_data(quiet: bool) -> None:
    """This driver's Ray Data settings (logs, progress bars, scheduling)."""
    import ray

    _quiet_logs(quiet)
    ctx = ray.data.DataContext.get_current()
    # Our stages are one map each: the reservation (half the CPUs held back per operator) only delays the second
    # worker's first task (~1 s) and leaves gaps between tasks. 4 tasks of 1 s on 2 workers: 3.2 s with it, 2.1 s
    # without (docs/fleet_pipeline.md, "Scale").
    ctx.op_resource_reservation_enabled = False
    ctx.enable_progress_bars = not quiet
    ctx.verbose_stats_logs = False
    with contextlib.suppress(AttributeError):
        ctx.print_on_execution_start = not quiet


#: Ray tasks per worker in a stage. Each task boundary costs 0.15-0.4 s of a worker's time on the 2-core
#: development machine (the executor's turn-around), so a stage runs as a few tasks per worker (labels: blocks
#: of equal work, :func:`balanced_order`; ingest: equal segment counts). 64 vehicle-weeks, 3 rounds of 1 then 2 workers in one
#: session, median wall: 4 per worker 29.6 / 18.8 s, 2 per worker 29.5 / 15.0 s, 1 per worker 27.6 / 13.7 s
#: (docs/fleet_pipeline.md, "Scale"). Two keep some room for a slower worker.
TASKS_PER_WORKER = 2


def n_tasks(items: int, workers: int | None) -> int:
    """How many tasks a stage of ``items`` runs in: TASKS_PER_WORKER per worker (all of the cluster's CPUs if None)."""
    import ray

    if not workers:   # Ray Data starts a local Ray on first use when none is running: it gets this machine's CPUs
        workers = int(ray.cluster_resources().get("CPU", 1)) if ray.is_initialized() else os.cpu_count() or 1
    w = max(1, workers)
    return max(1, min(items, TASKS_PER_WORKER * w))


def _tasks(workers: int | None) -> Any:
    """Ray Data's task pool, at most ``workers`` tasks at once (None: as many as the cluster has CPUs)."""
    import ray

    return ray.data.TaskPoolStrategy(size=workers) if workers else None


def _quiet_logs(quiet: bool) -> None:
    """Ray Data logs every dataset's start and end at INFO; a pipeline stage in a test or CLI says enough itself."""
    import logging
    import warnings

    if quiet:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")    # read when ray.data configures its logging
    for name in ("ray.data", "ray"):    # logger levels only: Ray may share handlers with the root logger
        logging.getLogger(name).setLevel(logging.ERROR if quiet else logging.INFO)
    if quiet:
        warnings.filterwarnings("ignore", module=r"ray\.data\..*")


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _columns(rows: list[dict], fields: dict[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for k, default in fields.items():
        vals = [r.get(k, default) for r in rows]
        out[k] = np.array(vals, dtype=object if isinstance(default, str) else None)
    return out


def _ingest_batch(batch: dict[str, np.ndarray], store: ObjectStore) -> dict[str, np.ndarray]:
    """Ray task body: ingest each segment key of the batch; manifest columns out (plus CPU and memory used)."""
    c0 = time.process_time()
    rows = [r for k in batch["key"] for r in ingest_segment(store, str(k))]
    cols = _columns(rows, MANIFEST_FIELDS)
    cols["cpu_s"] = np.full(len(rows), (time.process_time() - c0) / max(len(rows), 1))
    cols["worker_rss_mb"] = np.full(len(rows), _rss_mb())
    cols["pid"] = np.full(len(rows), os.getpid())
    return cols


# -- per vehicle ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class VehicleJob:
    """One vehicle's parts and pack, from the manifest."""

    vehicle: str
    chemistry: str
    design_capacity_ah: float
    parts: tuple[str, ...]


def day_capacity(t: np.ndarray, current: np.ndarray, session: np.ndarray, lab, design_ah: float,
                 days: np.ndarray, cfg: LabelConfig) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Per day: each cell's capacity from that day's anchor pairs (the whole period's offset), with sigma."""
    ah, hours, _ = _counting(t, current, session)
    n = lab.capacity_ah.shape[0]
    names, caps, sigs = [], [], []
    for d in np.unique(days):
        lo, hi = np.searchsorted(days, [d, d + 1])
        anchors = [a for a in lab.anchors if lo <= a.index < hi]
        c, s = estimate_capacity(anchors, ah, hours, lab.offset_a, design_ah, n, cfg)
        names.append(time.strftime("%Y-%m-%d", time.gmtime(float(d) * 86400.0)))
        caps.append(c)
        sigs.append(s)
    return names, np.array(caps), np.array(sigs)


def trend_per_day(caps: np.ndarray, sigs: np.ndarray, prior_sigma: float) -> np.ndarray:
    """Weighted slope of capacity over days per cell (Ah/day); NaN with fewer than two informative days."""
    n_days, n = caps.shape
    out = np.full(n, np.nan)
    x = np.arange(n_days, dtype=float)
    for c in range(n):
        ok = sigs[:, c] < 0.5 * prior_sigma
        if ok.sum() < 2:
            continue
        w = 1.0 / sigs[ok, c] ** 2
        xm = np.sum(w * x[ok]) / w.sum()
        ym = np.sum(w * caps[ok, c]) / w.sum()
        den = np.sum(w * (x[ok] - xm) ** 2)
        if den > 0:
            out[c] = float(np.sum(w * (x[ok] - xm) * (caps[ok, c] - ym)) / den)
    return out


def pack_relative(t: np.ndarray, anchors, n: int, min_dsoc: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Each cell against its own pack, from the anchors: relative capacity and self-discharge rate.

    Between two anchor times where every cell has an anchor, a cell's SOC change minus the pack
    median's is ``k dSOC_med - leak dT`` (k = Q_med / Q_cell - 1; leak in SOC per hour, parks
    included). The OCV inversion's error from a generic curve is common to the pack's cells and
    cancels in the difference, so this is sharper than each cell's absolute capacity. Least squares
    over the pairs; NaN where fewer than one pair moves the pack by ``min_dsoc`` (two for the leak).
    Returns capacity_rel (Q_cell / Q_med - 1) and leak (SOC/h lost beyond the pack's).
    """
    by_idx: dict[int, dict[int, float]] = defaultdict(dict)
    for a in anchors:
        by_idx[a.index][a.cell] = a.soc
    nodes = [i for i in sorted(by_idx) if len(by_idx[i]) == n]
    rel, leak = np.full(n, np.nan), np.full(n, np.nan)
    if len(nodes) < 2:
        return rel, leak
    z = np.array([[by_idx[i][c] for c in range(n)] for i in nodes])
    dz = np.diff(z, axis=0)
    dmed = np.median(dz, axis=1)
    dh = np.diff(t[nodes]) / 3600.0
    moving = np.abs(dmed) >= min_dsoc
    if not moving.any():
        return rel, leak
    y = dz - dmed[:, None]
    if moving.sum() >= 2 and np.ptp(dh[moving] / dmed[moving]) > 1e-9:
        x = np.column_stack([dmed, -dh])
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        k, leak = coef[0], coef[1]
    else:
        k = (y[moving] * dmed[moving, None]).sum(0) / (dmed[moving] ** 2).sum()
    rel = 1.0 / (1.0 + k) - 1.0
    return rel, leak


def pack_resistance(t: np.ndarray, current: np.ndarray, cell_v: np.ndarray, session: np.ndarray,
                    capacity_ah: float, min_step_c: float = 0.1, min_steps: int = 20) -> np.ndarray:
    """Each cell's resistance against its own pack: (R_cell - R_median) / R_median, from current steps.

    Between consecutive samples of one session, a current step dI moves every cell's voltage by
    R dI (the ohmic part, before any slow relaxation), and its OCV barely moves in one sample; the
    cell's residual against the pack median then moves by (R_cell - R_med) dI. Least squares over
    the steps of at least ``min_step_c`` (C) gives that difference; dividing by the median cell's
    own step response makes it a ratio, comparable across packs of any size, age or temperature.
    A loose or corroded cell connector adds series resistance the cell's peers do not have (the
    pack's own cells spread by ~5 %). NaN with fewer than ``min_steps`` steps.
    """
    n = cell_v.shape[1]
    v = cell_v.astype(np.float64)
    med = np.median(v, axis=1)
    dt = np.diff(t)
    ok = (np.diff(session) == 0) & (dt <= 2.0 * float(np.median(dt))) if len(t) > 1 else np.zeros(0, bool)
    di = np.diff(current.astype(np.float64))
    ok &= np.abs(di) >= min_step_c * capacity_ah
    if int(ok.sum()) < min_steps:
        return np.full(n, np.nan)
    di = di[ok]
    den = float(di @ di)
    r_med = float(di @ np.diff(med)[ok]) / den
    if not r_med > 0:
        return np.full(n, np.nan)
    dr = np.diff(v - med[:, None], axis=0)[ok]
    return (di @ dr) / den / r_med


def label_vehicle(job: VehicleJob, store: ObjectStore, gap_s: float = SESSION_GAP_S,
                  cfg: LabelConfig | None = None) -> dict[str, Any]:
    """Labels of one vehicle's whole timeline, written per day; the per-cell figures the fleet stage ranks."""
    c0 = time.process_time()
    cfg = cfg or LabelConfig()
    tl = read_timeline(store, job.vehicle, job.parts, gap_s)
    lab = label_timeline(tl.t, tl.current, tl.cell_v, job.chemistry, job.design_capacity_ah, tl.session, cfg=cfg)
    days = np.floor(tl.t / 86400.0)
    for d in np.unique(days):
        lo, hi = np.searchsorted(days, [d, d + 1])
        sl = slice(int(lo), int(hi))
        table = pa.table({
            "t": tl.t[sl], "session": tl.session[sl], "current": tl.current[sl].astype(np.float32),
            "cell_v": _fixed_list(tl.cell_v[sl]), "cell_t": _fixed_list(tl.cell_t[sl]),
            "soc_est": tl.soc_est[sl], "sigma_est": tl.sigma[sl].astype(np.float32),
            "label_soc": _fixed_list(lab.soc[sl]), "label_sigma": _fixed_list(lab.sigma[sl])})
        day = time.strftime("%Y-%m-%d", time.gmtime(float(d) * 86400.0))
        store.put(f"labels/vehicle={job.vehicle}/day={day}/labels.parquet", table_bytes(table))
    names, caps, sigs = day_capacity(tl.t, tl.current, tl.session, lab, job.design_capacity_ah, days, cfg)
    rel, leak = pack_relative(tl.t, lab.anchors, lab.capacity_ah.shape[0])
    res = pack_resistance(tl.t, tl.current, tl.cell_v, tl.session, job.design_capacity_ah)
    return {"vehicle": job.vehicle, "chemistry": job.chemistry, "design_capacity_ah": job.design_capacity_ah,
            "samples": len(tl.t), "hours": tl.hours, "sessions": int(tl.session[-1]) + 1,
            "anchors": len(lab.anchors), "capacity_ah": lab.capacity_ah.tolist(),
            "capacity_sigma_ah": lab.capacity_sigma_ah.tolist(), "offset_a": lab.offset_a.tolist(),
            "capacity_rel": rel.tolist(), "leak_per_h": leak.tolist(), "resistance_rel": res.tolist(),
            "days": names, "day_capacity_ah": caps.tolist(), "day_capacity_sigma_ah": sigs.tolist(),
            "trend_ah_per_day": trend_per_day(caps, sigs, cfg.capacity_prior_sigma * job.design_capacity_ah).tolist(),
            "cpu_s": time.process_time() - c0, "worker_rss_mb": _rss_mb(), "pid": os.getpid()}


def _label_row(row: dict[str, Any], store: ObjectStore) -> dict[str, Any]:
    job = VehicleJob(str(row["vehicle"]), str(row["chemistry"]), float(row["design_capacity_ah"]),
                     tuple(json.loads(row["parts"])))
    try:
        return {"result": json.dumps(label_vehicle(job, store)), "error": ""}
    except (ValueError, KeyError) as exc:   # a timeline the labeller refuses (too short): counted, not fatal
        return {"result": json.dumps({"vehicle": job.vehicle}), "error": f"{job.vehicle}: {exc}"}


# -- fleet ---------------------------------------------------------------------------------------


def robust_z(x: np.ndarray, floor: float) -> np.ndarray:
    """(x - median) / (1.4826 MAD), the scale at least ``floor`` (a fleet of identical cells has MAD 0)."""
    ok = np.isfinite(x)
    if not ok.any():
        return np.full_like(x, np.nan)
    med = np.median(x[ok])
    mad = 1.4826 * np.median(np.abs(x[ok] - med))
    return (x - med) / max(mad, floor)


ANOMALY_REASONS = ("capacity below its peers", "self-discharge (leak)", "resistance above its peers")


def rank_anomalies(vehicles: list[dict[str, Any]], cap_floor: float = 0.01,
                   leak_floor: float = 2e-4, res_floor: float = 0.02) -> list[dict[str, Any]]:
    """Cells drifting against their peers: per chemistry, robust z of capacity, leak and resistance relative to the pack.

    ``capacity_rel`` and ``leak_per_h`` come from ``pack_relative`` (each cell against its own pack's
    median, from the label anchors), ``resistance_rel`` from ``pack_resistance``. Each is z-scored
    over every cell of the fleet with that chemistry, so one cell that differs from its pack more
    than cells across the fleet do stands out, while a whole pack of one batch does not.
    Score = max(-z_capacity, z_leak, z_resistance); highest first.
    """
    by_chem: dict[str, list[tuple[str, int, float, float, float]]] = defaultdict(list)
    for v in vehicles:
        rel = np.asarray(v["capacity_rel"], float)
        leak = np.asarray(v["leak_per_h"], float)
        res = np.asarray(v["resistance_rel"] if v.get("resistance_rel") is not None else np.full(len(rel), np.nan), float)
        for c in range(len(rel)):
            by_chem[v["chemistry"]].append((v["vehicle"], c, float(rel[c]), float(leak[c]), float(res[c])))
    out = []
    for chem, cells in by_chem.items():
        cols = np.array([c[2:] for c in cells]).reshape(-1, 3)
        z = np.column_stack([-robust_z(cols[:, 0], cap_floor), robust_z(cols[:, 1], leak_floor),
                             robust_z(cols[:, 2], res_floor)])
        for (veh, cell, r, lk, rs), zs in zip(cells, z):
            k = int(np.argmax(np.nan_to_num(zs, nan=-np.inf))) if np.isfinite(zs).any() else 0
            out.append({"vehicle": veh, "cell": cell, "chemistry": chem, "score": float(np.nanmax([*zs, 0.0])),
                        "capacity_rel": r, "z_capacity": float(-zs[0]), "leak_per_h": lk, "z_leak": float(zs[1]),
                        "resistance_rel": rs, "z_resistance": float(zs[2]), "reason": ANOMALY_REASONS[k]})
    out.sort(key=lambda r: -r["score"])
    return out


def soh_table(vehicles: list[dict[str, Any]]) -> pa.Table:
    """One row per vehicle and cell: capacity, sigma, SOH against the design, trend."""
    rows: dict[str, list] = defaultdict(list)
    for v in vehicles:
        for c, (cap, sig, tr) in enumerate(zip(v["capacity_ah"], v["capacity_sigma_ah"], v["trend_ah_per_day"])):
            rows["vehicle"].append(v["vehicle"])
            rows["cell"].append(c)
            rows["capacity_ah"].append(cap)
            rows["capacity_sigma_ah"].append(sig)
            rows["soh"].append(cap / v["design_capacity_ah"])
            rows["trend_soh_per_day"].append(tr / v["design_capacity_ah"])
            rows["days"].append(len(v["days"]))
            rows["capacity_rel"].append(v["capacity_rel"][c])
            rows["leak_per_h"].append(v["leak_per_h"][c])
            res = v.get("resistance_rel")
            rows["resistance_rel"].append(float(res[c]) if res is not None else math.nan)
    return pa.table(rows)


# -- stages --------------------------------------------------------------------------------------


def run_ingest(store: ObjectStore, workers: int | None = None, batch_size: int | None = None,
               keys: list[str] | None = None) -> dict[str, Any]:
    """Stage 1 on Ray Data: every segment (or ``keys``) into timeline parts; the manifest saved to the store.

    ``batch_size``: segments per task (None: the segments spread over :func:`n_tasks` tasks).
    """
    import ray

    t0 = time.perf_counter()
    keys = list_segments(store) if keys is None else keys
    if not keys:
        return {"segments": 0, "rejected": 0, "errors": [], "rows": 0, "wall_s": 0.0, "cpu_s": 0.0}
    batch_size = batch_size or -(-len(keys) // n_tasks(len(keys), workers))   # segments per task
    ds = ray.data.from_items([{"key": k} for k in keys], override_num_blocks=-(-len(keys) // batch_size))
    out = ds.map_batches(_ingest_batch, fn_kwargs={"store": store}, batch_size=batch_size, batch_format="numpy",
                         compute=_tasks(workers), num_cpus=1).to_pandas()
    bad = out[out["error"] != ""]
    good = out[out["error"] == ""]
    table = pa.Table.from_pandas(out.drop(columns=["worker_rss_mb", "pid"]), preserve_index=False)
    store.put(MANIFEST, table_bytes(table))
    return {"segments": len(keys), "rejected": len(bad),
            "errors": [f"{k}: {e}" for k, e in zip(bad["key"], bad["error"])][:50],
            "rows": int(good["rows"].sum()), "parts": len(good), "wall_s": time.perf_counter() - t0,
            "cpu_s": float(out["cpu_s"].sum()), "worker_rss_mb_max": float(out["worker_rss_mb"].max()),
            "workers_seen": int(out["pid"].nunique())}


def vehicle_jobs(manifest: pa.Table) -> list[dict[str, Any]]:
    """One job row per vehicle from the ingest manifest (its parts, chemistry and design capacity)."""
    df = manifest.to_pandas()
    df = df[df["error"] == ""]
    jobs = []
    for veh, g in df.groupby("vehicle", sort=True):
        jobs.append({"vehicle": veh, "chemistry": str(g["chemistry"].iloc[0]),
                     "design_capacity_ah": float(g["design_capacity_ah"].iloc[0]),
                     "parts": json.dumps(sorted(set(g["part"]))), "rows": int(g["rows"].sum())})
    return jobs


def balanced_order(sizes: list[int], n_blocks: int) -> list[int]:
    """An order of the items whose contiguous blocks (as Ray Data splits ``from_items``: counts differ by at most
    one) carry about equal work: the largest item first into the lightest block with room (LPT).

    Why: a stage ends with its slowest task; vehicles differ several-fold in samples, so blocks cut in name
    order left one worker idle for a whole task at the end.
    """
    n = len(sizes)
    n_blocks = max(1, min(n_blocks, n))
    room = [len(c) for c in np.array_split(np.arange(n), n_blocks)]
    bins: list[list[int]] = [[] for _ in range(n_blocks)]
    load = [0] * n_blocks
    for i in sorted(range(n), key=lambda k: -sizes[k]):
        j = min((b for b in range(n_blocks) if len(bins[b]) < room[b]), key=lambda b: load[b])
        bins[j].append(i)
        load[j] += sizes[i]
    return [i for b in bins for i in b]


def run_label(store: ObjectStore, workers: int | None = None) -> dict[str, Any]:
    """Stages 2-3 on Ray Data: labels per vehicle, then the fleet's SOH table and anomaly ranking."""
    import ray

    t0 = time.perf_counter()
    try:
        manifest = pq.read_table(io.BytesIO(store.get(MANIFEST)))
    except KeyError:
        raise ValueError(f"{store.url}: nothing ingested yet (no {MANIFEST}); run `bms-ai fleet ingest` first") \
            from None
    jobs = vehicle_jobs(manifest)
    blocks = n_tasks(len(jobs), workers) if jobs else 1
    jobs = [jobs[i] for i in balanced_order([j["rows"] for j in jobs], blocks)]
    rows = ray.data.from_items(jobs, override_num_blocks=blocks).map(
        _label_row, fn_kwargs={"store": store}, compute=_tasks(workers), num_cpus=1).take_all() if jobs else []
    errors = [r["error"] for r in rows if r["error"]]
    vehicles = [json.loads(r["result"]) for r in rows if not r["error"]]
    ranking = rank_anomalies(vehicles)
    if vehicles:
        store.put(SOH, table_bytes(soh_table(vehicles)))
    store.put(RANKING, json.dumps({"cells": ranking[:1000], "cells_ranked": len(ranking),
                                   "method": rank_anomalies.__doc__.split("\n")[0]}, indent=1).encode())
    return {"vehicles": len(vehicles), "label_errors": errors, "samples": sum(v["samples"] for v in vehicles),
            "vehicle_hours": sum(v["hours"] for v in vehicles), "anchors": sum(v["anchors"] for v in vehicles),
            "cpu_s": sum(v["cpu_s"] for v in vehicles), "wall_s": time.perf_counter() - t0,
            "worker_rss_mb_max": max((v["worker_rss_mb"] for v in vehicles), default=0.0),
            "workers_seen": len({v["pid"] for v in vehicles}), "top": ranking[:5]}


def _edge_row(row: dict[str, Any], store: ObjectStore, cfg: Any) -> dict[str, Any]:
    from bms_ai.fleet.edge import run_vehicle
    from bms_ai.sim.dataset import load_drive

    d = load_drive(row["path"]) if row["path"] else pickle.loads(row["drive"])
    r = run_vehicle(d, store, cfg)
    return {"pseudonym": r.pseudonym, "segments": len(r.segments), "samples": r.samples, "bytes": r.bytes,
            "diagnostics": r.diagnostics, "events": json.dumps(r.events), "seconds": r.seconds}


def run_vehicles(drives: list[Any], store: ObjectStore, cfg: Any = None, workers: int | None = None) -> list[dict]:
    """The vehicle edge for a whole fleet on Ray Data, one task per vehicle (``RecordedDrive`` or a drive path).

    Each vehicle runs ``bms_ai.fleet.edge.run_vehicle`` unchanged; Ray only spreads them over
    the workers (the estimator and fault monitor cost milliseconds per sample, the cloud side
    microseconds). Returns one summary row per vehicle, in the given order.
    """
    import ray

    from bms_ai.fleet.edge import EdgeConfig

    cfg = cfg or EdgeConfig()
    items = [{"i": i, "path": str(d) if isinstance(d, (str, os.PathLike)) else "",
              "drive": b"" if isinstance(d, (str, os.PathLike)) else pickle.dumps(d)} for i, d in enumerate(drives)]
    if not items:
        return []
    rows = ray.data.from_items(items, override_num_blocks=len(items)).map(
        lambda r: {"i": r["i"], **_edge_row(r, store, cfg)}, compute=_tasks(workers), num_cpus=1).take_all()
    return [dict(r, events=json.loads(r["events"])) for r in sorted(rows, key=lambda r: r["i"])]


def run_pipeline(store: ObjectStore | str, address: str | None = None, workers: int | None = None,
                 num_cpus: int | None = None, quiet: bool = True, endpoint_url: str | None = None) -> dict[str, Any]:
    """Ingest then label, on a local Ray (127.0.0.1) or the cluster at ``address``; the summary (also stored)."""
    st = open_store(store, endpoint_url) if isinstance(store, str) else store
    start_ray(address, num_cpus, quiet)
    summary = {"store": st.url, "ingest": run_ingest(st, workers), "label": run_label(st, workers)}
    st.put(SUMMARY, json.dumps(summary, indent=1, default=str).encode())
    return summary


# -- CLI (`bms-ai fleet ingest` / `bms-ai fleet label`) -------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Flags shared by the ingest and label commands."""
    p.add_argument("--store", required=True, help="object store: a folder, file://..., or s3://bucket/prefix")
    p.add_argument("--endpoint-url", default=None, help="S3-compatible endpoint (with s3://)")
    p.add_argument("--address", default=None, help="join this Ray cluster (e.g. 127.0.0.1:6379); default: local")
    p.add_argument("--workers", type=positive_int, default=None, help="parallel tasks per stage (default: all CPUs)")
    p.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of the local Ray (default: all)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _cli(args: argparse.Namespace, stage: str) -> int:
    try:
        st = open_store(args.store, args.endpoint_url)
        root = getattr(st, "root", None)
        if root is not None and not root.is_dir():  # reading a folder store that is not there: a typo, not 0 segments
            raise ValueError(f"store folder {root} not found")
        start_ray(args.address, args.num_cpus, args.quiet)
        res = run_ingest(st, args.workers) if stage == "ingest" else run_label(st, args.workers)
    except (ValueError, KeyError, OSError) as exc:
        print(f"bms-ai fleet {stage}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(res, indent=1, default=str))
    return 0


class IngestCommand:
    """`bms-ai fleet ingest --store URL`: uploaded segments -> Parquet timelines per vehicle and day."""

    add_arguments = staticmethod(add_arguments)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Run stage 1 and print its figures."""
        return _cli(args, "ingest")


class LabelCommand:
    """`bms-ai fleet label --store URL`: timelines -> labels, SOH table, anomaly ranking."""

    add_arguments = staticmethod(add_arguments)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        """Run stages 2-3 and print their figures."""
        return _cli(args, "label")


__all__ = ["TIMELINES", "IngestCommand", "LabelCommand", "VehicleJob", "label_vehicle", "rank_anomalies",
           "run_ingest", "run_label", "run_pipeline", "run_vehicles", "start_ray"]
