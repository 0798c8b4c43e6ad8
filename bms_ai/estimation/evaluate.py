"""`bms-ai evaluate DRIVES... --report DIR`: SOC evaluation protocol v2, the shipped estimator against strong baselines.

One run evaluates every method (``bms_ai.estimation.baselines.METHODS``: the shipped
estimator, Coulomb counting from the true / stored start, Coulomb counting with OCV
resets, an identified ECM EKF, the EKF with a current-offset state) on the same drives
and the same inputs:

- session by session: at every session boundary (the vehicle slept; no samples) each
  method is re-created and restarts from the blob it stored at the end of the last
  session, so nothing but what a BMS keeps crosses a park;
- under declared conditions (``VARIANTS``: condition name -> perturbation of the
  measured inputs where that is exact): current offsets of +-0.006 C and +-0.03 C
  (0.3 A and 1.5 A on a 50 Ah pack), and wrong stored starts in the style of the
  McMaster blind benchmark (true 90/60/30 % with the stored value 30 points off);
- metrics per drive and pooled per class (a..e, the named variants, held-out cell
  sets), per chemistry: RMSE, p95 and max absolute error over all cells and samples,
  error after 5 min and after the first rest, time to stay within 2 points, a
  McMaster-style weighted score (``SCORE_CASES``: one table of test cases and fixed
  weights), win/loss counts of the shipped estimator against each baseline, and the
  per-cell capacity (SOH) against the truth where a method reports one.

Writes results.json, table.md and index.html (plots). ``--faults`` runs the
fault-detector evaluation (``bms_ai.diagnostics.evaluate``) as before.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import html
import importlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.core.cliargs import nonneg_float, out_dir, positive_int
from bms_ai.core.files import load_json
from bms_ai.estimation.baselines import METHODS, EvalSetup, Method, PackInfo
from bms_ai.estimation.ekf import EcmTable
from bms_ai.estimation.pack import PackEstimator, open_models
from bms_ai.models.runtime import ModelRegistry, default_model_dir
from bms_ai.sim.dataset import RecordedDrive, find_drives, load_drive, read_meta, resample_drive

PROTOCOL_VERSION = 2
LEARNED = ("shipped", "shipped_fallback")     # the shipped estimator's names (with / without its model)

# -- conditions ---------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One evaluation condition: a named perturbation applied by the harness to chosen drives.

    ``kind`` names the perturbation (``PERTURBATIONS``); ``value`` is its size (current
    offset in C of the drive's cell capacity; for a wrong start the true start SOC the
    drive must have, within ``start_tol``); ``stored_delta`` is the stored-SOC error of a
    wrong start. ``drives`` selects drives by class tag ("*": every drive), at most
    ``max_per_chemistry`` of them per chemistry (0: all), first by name (wrong starts:
    nearest true start first).
    """

    name: str
    kind: str
    value: float = 0.0
    stored_delta: float = 0.0
    drives: str = "a"
    max_per_chemistry: int = 0
    start_tol: float = 0.075


@dataclass
class Inputs:
    """What every method sees in one run (measured values, perturbed) and where it starts."""

    t: np.ndarray
    current: np.ndarray
    cell_v: np.ndarray
    cell_t: np.ndarray
    session: np.ndarray
    soc_stored: np.ndarray


def soc_stored(d: RecordedDrive) -> np.ndarray:
    """The SOC a BMS had stored before the drive's first sample (meta ``soc_stored``; default the true start)."""
    s = d.meta.get("soc_stored")
    return np.broadcast_to(np.asarray(d.soc[0] if s is None else s, dtype=np.float64), (d.n_cells,)).copy()


def _as_measured(d: RecordedDrive, v: Variant) -> Inputs:
    return Inputs(d.t, d.current, d.cell_v, d.cell_t, d.session_ids(), soc_stored(d))


def _current_offset(d: RecordedDrive, v: Variant) -> Inputs:
    x = _as_measured(d, v)
    x.current = d.current + v.value * d.capacity_ah
    return x


def _wrong_start(d: RecordedDrive, v: Variant) -> Inputs:
    x = _as_measured(d, v)
    x.soc_stored = np.clip(d.soc[0] + v.stored_delta, 0.0, 1.0)
    return x


PERTURBATIONS: dict[str, Callable[[RecordedDrive, Variant], Inputs]] = {
    "none": _as_measured, "current_offset": _current_offset, "wrong_start": _wrong_start}

VARIANTS: list[Variant] = [
    Variant("base", "none", drives="*"),
    # 0.3 A and 1.5 A on the 50 Ah reference pack, scaled to each drive's cell capacity
    Variant("offset+0.006C", "current_offset", +0.006, max_per_chemistry=2),
    Variant("offset-0.006C", "current_offset", -0.006, max_per_chemistry=2),
    Variant("offset+0.03C", "current_offset", +0.03, max_per_chemistry=2),
    Variant("offset-0.03C", "current_offset", -0.03, max_per_chemistry=2),
    # McMaster-style wrong starts: true start 90/60/30 %, stored value 30 points off
    Variant("start90-stored60", "wrong_start", 0.90, -0.30, max_per_chemistry=2),
    Variant("start60-stored30", "wrong_start", 0.60, -0.30, max_per_chemistry=2),
    Variant("start30-stored60", "wrong_start", 0.30, +0.30, max_per_chemistry=2),
]

# -- the weighted score ---------------------------------------------------------------


@dataclass(frozen=True)
class ScoreCase:
    """One test case of the weighted score: which runs (and samples) it averages, and its weight.

    Modelled on the McMaster University SOC estimation benchmark, which scores an
    algorithm by a weighted sum of per-test-case mean RMSE with fixed weights.
    """

    name: str
    weight: float
    mcmaster: str                            # the benchmark's test case this one stands for
    description: str
    select: Callable[[RunResult], bool]
    samples: str = "all"                     # key of SAMPLE_SETS


def _base(r: RunResult) -> bool:
    return r.kind == "none"


SCORE_CASES: list[ScoreCase] = [
    ScoreCase("held_out_cell", 0.1, "held-out cell", "unperturbed runs on held-out cell sets",
              lambda r: _base(r) and r.held_out),
    ScoreCase("open_cells", 0.1, "open cells", "unperturbed runs on the training cell sets",
              lambda r: _base(r) and not r.held_out),
    ScoreCase("charging", 0.1, "charging", "samples charging at >= C/20, unperturbed runs", _base, "charging"),
    ScoreCase("standard_cycles", 0.1, "standard cycles", "class a: clean 1 h drives", lambda r: _base(r) and "a" in r.classes),
    ScoreCase("non_standard_cycles", 0.1, "non-standard cycles", "class b: multi-day lives (drives, parks, charges)",
              lambda r: _base(r) and "b" in r.classes),
    ScoreCase("initial_soc", 0.1, "initial-SOC perturbation", "wrong stored start (variants and drives recorded so)",
              lambda r: r.kind == "wrong_start" or (_base(r) and r.wrong_start)),
    ScoreCase("current_offset", 0.1, "current-offset perturbation", "current offset (variants and drives recorded so)",
              lambda r: r.kind == "current_offset" or (_base(r) and r.offset_c != 0.0)),
    ScoreCase("high_load", 0.2, "payload conditions", "samples at |I| >= 1 C (heavy load), unperturbed runs",
              _base, "high_load"),
    ScoreCase("temperatures", 0.1, "temperatures", "unperturbed runs at an ambient outside 15..35 degC",
              lambda r: _base(r) and r.ambient_c is not None and not 15.0 <= r.ambient_c <= 35.0),
]

# sample subsets some cases score on: name -> mask from the current in C (true current where recorded)
SAMPLE_SETS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "charging": lambda i_c: i_c >= 0.05,
    "high_load": lambda i_c: np.abs(i_c) >= 1.0,
}

# -- drives ---------------------------------------------------------------------------


def drive_classes(meta: dict) -> tuple[str, ...]:
    """The drive's class tags (meta ``classes``); a drive recorded before tags gets them from its conditions."""
    if meta.get("classes"):
        return tuple(str(c) for c in meta["classes"])
    tags = []
    if float(meta.get("current_offset_a") or 0.0) != 0.0:
        tags.append("c")
    amb = meta.get("ambient_c")
    soh = float(np.mean(meta["soh"])) if meta.get("soh") else 1.0      # one value, or one per cell
    if (amb is not None and abs(float(amb) - 25.0) > 5.0) or soh < 0.9:
        tags.append("d")
    if meta.get("held_out"):
        tags.append("e")
    return tuple(tags) or ("a",)


@dataclass
class DriveHead:
    """What planning needs of a drive without loading its arrays (the true start only when asked)."""

    path: Path
    name: str
    chemistry: str
    classes: tuple[str, ...]
    size: int

    @functools.cached_property
    def soc0(self) -> float:
        """Mean true SOC at the first sample (selects the drives for wrong-start conditions)."""
        if (self.path / "drive.npz").exists():
            with np.load(self.path / "drive.npz") as z:
                return float(np.mean(z["soc"][0]))
        return float(np.mean(load_drive(self.path).soc[0]))


def drive_head(path: Path) -> DriveHead:
    """Name, chemistry and classes from meta.json; size from the file (longest drives are started first)."""
    meta = read_meta(path)
    data = path / "drive.npz" if (path / "drive.npz").exists() else path / "truth.parquet"
    return DriveHead(path, str(meta.get("name", path.name)), str(meta.get("chemistry", "nmc")), drive_classes(meta),
                     data.stat().st_size)


def plan(heads: list[DriveHead], variants: list[Variant]) -> list[tuple[DriveHead, Variant]]:
    """The (drive, condition) runs of an evaluation, in report order (conditions first, then drives)."""
    out = []
    for v in variants:
        if v.kind not in PERTURBATIONS:
            raise ValueError(f"condition {v.name}: unknown perturbation '{v.kind}'; known: {', '.join(PERTURBATIONS)}")
        cand = [h for h in heads if v.drives == "*" or v.drives in h.classes]
        if v.kind == "wrong_start":
            cand = sorted((h for h in cand if abs(h.soc0 - v.value) <= v.start_tol), key=lambda h: (abs(h.soc0 - v.value), h.name))
        chosen: dict[str, int] = {}
        for h in cand:
            if v.max_per_chemistry and chosen.get(h.chemistry, 0) >= v.max_per_chemistry:
                continue
            chosen[h.chemistry] = chosen.get(h.chemistry, 0) + 1
            out.append((h, v))
    return out


# -- metrics ----------------------------------------------------------------------------

HIST_BINS = 10000          # |error| histogram: 0.01-point bins up to 100 points (pooled p95)
WITHIN = 0.02              # "within 2 points"


@dataclass
class Marks:
    """Sample indices and masks every method's errors are read at (from the truth, never the inputs)."""

    k_5min: int
    k_rest: int                          # last sample of the first rest >= 10 min (-1: none)
    sets: dict[str, np.ndarray]


def marks(d: RecordedDrive) -> Marks:
    """5 min after the first sample, the end of the first rest, the charging / heavy-load samples."""
    cur = d.current_true if d.current_true is not None else d.current
    i_c = np.nan_to_num(np.asarray(cur, dtype=np.float64)) / d.capacity_ah
    k5 = int(np.searchsorted(d.t, d.t[0] + 300.0))
    rest = np.abs(i_c) <= 0.02
    k_rest = -1
    edges = np.flatnonzero(np.diff(np.concatenate([[0], rest.astype(np.int8), [0]])))
    for s, e in zip(edges[::2], edges[1::2]):
        if d.t[e - 1] - d.t[s] >= 600.0:
            k_rest = int(e - 1)
            break
    return Marks(k5 if k5 < len(d.t) else -1, k_rest, {k: f(i_c) for k, f in SAMPLE_SETS.items()})


class ErrorStats:
    """Streaming error statistics of one method over one run, fed session by session."""

    def __init__(self, m: Marks) -> None:
        self.m = m
        self.sse, self.count, self.max = 0.0, 0, 0.0
        self.hist = np.zeros(HIST_BINS + 1, dtype=np.int64)
        self.at = {"err_5min": math.nan, "err_after_rest": math.nan}
        self.last_bad = -1
        self.sets = {k: [0.0, 0] for k in m.sets}

    def add(self, k0: int, err: np.ndarray) -> None:
        """Errors (est - truth) of rows k0.. of the run."""
        a = np.abs(err)
        ok = np.isfinite(a)
        self.sse += float(np.sum(np.where(ok, err, 0.0) ** 2))
        self.count += int(ok.sum())
        if ok.any():
            self.max = max(self.max, float(a[ok].max()))
        self.hist += np.bincount(np.minimum((a[ok] * 1e4).astype(np.int64), HIST_BINS), minlength=HIST_BINS + 1)
        row = np.where(ok, a, np.inf).max(axis=1) if a.size else np.empty(0)
        for key, k in (("err_5min", self.m.k_5min), ("err_after_rest", self.m.k_rest)):
            if k0 <= k < k0 + len(row):
                self.at[key] = float(row[k - k0])
        bad = np.flatnonzero(row > WITHIN)
        if bad.size:
            self.last_bad = k0 + int(bad[-1])
        for key, mask in self.m.sets.items():
            sel = mask[k0:k0 + len(row)][:, None] & ok
            self.sets[key][0] += float(np.sum(np.where(sel, err, 0.0) ** 2))
            self.sets[key][1] += int(sel.sum())

    def p95(self) -> float:
        """95th percentile of |error| (upper edge of its 0.01-point bin)."""
        if not self.count:
            return math.nan
        return float(np.searchsorted(np.cumsum(self.hist), 0.95 * self.count) + 1) / 1e4

    def result(self, t: np.ndarray) -> dict:
        """The per-run metrics (fractions of 1; times in s from the first sample)."""
        n = len(t)
        if self.last_bad < 0:
            within = 0.0
        else:
            within = math.inf if self.last_bad >= n - 1 else float(t[self.last_bad + 1] - t[0])
        return {"rmse": math.sqrt(self.sse / self.count) if self.count else math.nan, "p95": self.p95(),
                "max": self.max, **self.at, "t_within_2pts_s": within, "samples": self.count}


# -- one run ------------------------------------------------------------------------------


@dataclass
class MethodRun:
    """One method over one run: metrics, what is pooled, what the method said about itself, SOH."""

    name: str
    metrics: dict
    sse: float
    count: int
    hist: np.ndarray
    sets: dict[str, list]
    info: dict
    soh: dict | None = None


@dataclass
class RunResult:
    """One drive under one condition, every method."""

    drive: str
    chemistry: str
    variant: str
    kind: str
    classes: tuple[str, ...]
    held_out: bool
    cell_set: str
    ambient_c: float | None
    wrong_start: bool
    offset_c: float
    duration_s: float
    samples: int
    sessions: int
    n_cells: int
    methods: dict[str, MethodRun] = field(default_factory=dict)
    trace: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def groups(self) -> list[str]:
        """Every class this run is pooled into: all, its tags, c for any perturbation, the variant, held_out."""
        g = ["all", *self.classes]
        if self.kind != "none":
            g += ["c", self.variant]
        if self.held_out:
            g.append("held_out")
        return list(dict.fromkeys(g))


def session_bounds(session: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of equal session index."""
    cut = np.flatnonzero(np.diff(session)) + 1
    starts = np.concatenate([[0], cut])
    ends = np.concatenate([cut, [len(session)]])
    return list(zip(starts.tolist(), ends.tolist()))


MethodSpec = str | type    # a registered name (METHODS) or a Method subclass


def run_methods(pack: PackInfo, setup: EvalSetup, names: list[MethodSpec], x: Inputs, truth: np.ndarray,
                m: Marks, plot_points: int = 1500) -> tuple[dict[str, ErrorStats], dict, dict[str, Method], dict]:
    """The harness: every method, session by session, a fresh object restarting from its own stored blob.

    Returns per method its error statistics, its info (merged over sessions) and its last
    session object (for the capacity estimate), plus decimated traces for the plots.
    """
    bounds = session_bounds(x.session)
    stride = max(1, len(x.t) // plot_points)
    keep = np.arange(0, len(x.t), stride)
    trace = {"t": x.t[keep], "session": x.session[keep], "truth": truth[keep].astype(np.float32), "est": {}}
    stats, infos, last = {}, {}, {}
    for spec in names:
        factory = METHODS.get(spec) if isinstance(spec, str) else spec
        blob, est_keep, key, cpu = None, np.empty((len(keep), pack.n_cells), np.float32), "", 0.0
        for s0, s1 in bounds:
            c0 = time.process_time()
            meth = factory(pack, setup)
            key = meth.name
            start = truth[0] if meth.oracle_start else x.soc_stored
            meth.start(float(x.t[s0]), blob, np.array(start, dtype=np.float64))
            est = meth.run(x.t[s0:s1], x.current[s0:s1], x.cell_v[s0:s1], x.cell_t[s0:s1])
            blob = meth.stop()
            cpu += time.process_time() - c0
            stats.setdefault(key, ErrorStats(m)).add(s0, est - truth[s0:s1])
            sel = (keep >= s0) & (keep < s1)
            est_keep[sel] = est[keep[sel] - s0]
            infos[key] = _merge_info(infos.get(key, {}), meth.info())
            last[key] = meth
        infos[key]["cpu_us_per_sample"] = cpu / max(len(x.t), 1) * 1e6
        trace["est"][key] = est_keep
    return stats, infos, last, trace


def _merge_info(a: dict, b: dict) -> dict:
    """Counts add up over sessions (samples per SOC method, rejections); everything else: the latest."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            out[k] = {kk: a[k].get(kk, 0) + vv for kk, vv in v.items()} | {kk: vv for kk, vv in a[k].items() if kk not in v}
        elif k == "rejected" and isinstance(a.get(k), int):
            out[k] = a[k] + v
        else:
            out[k] = v
    return out


def soh_truth(d: RecordedDrive) -> tuple[np.ndarray, str]:
    """True per-cell capacity (Ah): the drive's ``cell_capacity_ah``, else from the truth by regression (older drives)."""
    if d.cell_capacity_ah is not None:
        return np.asarray(d.cell_capacity_ah, dtype=np.float64), "cell_capacity_ah"
    return true_cell_soh(d) * d.capacity_ah, "regression of true SOC on Ah (drive without cell_capacity_ah)"


def _soh(meth: Method, truth: np.ndarray, source: str, design: float) -> dict | None:
    est = meth.capacity_ah()
    if est is None:
        return None
    ok = np.isfinite(truth) & np.isfinite(est) & (truth > 0.5 * design) & (truth < 1.5 * design)
    err = (est - truth)[ok] / design
    return {"est_ah": est.tolist(), "true_ah": truth.tolist(), "truth": source, "cells": int(ok.sum()),
            "sse": float(np.sum(err ** 2)), "rmse": float(np.sqrt(np.mean(err ** 2))) if ok.any() else None}


def pack_info(d: RecordedDrive, ocv_source: str) -> PackInfo:
    """The pack as every method sees it; ``ocv_source`` "datasheet" gives the drive's own OCV where it has one."""
    ocv = load_ocv(d.chemistry)
    used = "chemistry"
    if ocv_source == "datasheet" and d.ocv_soc is not None and d.ocv_v is not None:
        ocv, used = OCVCurve(d.ocv_soc, d.ocv_v, d.chemistry), "datasheet"
    return PackInfo(d.chemistry, d.capacity_ah, d.n_cells, d.cell_t.shape[1], ocv, used)


def evaluate_drive(path: str | Path, variants: list[Variant], setup: EvalSetup, names: list[MethodSpec],
                   ocv_source: str = "chemistry") -> list[RunResult]:
    """Every condition of one drive (loaded once), every method; the unit of parallel work."""
    d = resample_drive(load_drive(path), setup.rate_hz)
    pack = pack_info(d, ocv_source)
    m = marks(d)
    truth_cap, cap_source = soh_truth(d)
    stored = soc_stored(d)
    out = []
    for v in variants:
        t0 = time.perf_counter()
        x = PERTURBATIONS[v.kind](d, v)
        stats, infos, last, trace = run_methods(pack, setup, names, x, d.soc, m)
        r = RunResult(d.name, d.chemistry, v.name, v.kind, drive_classes(d.meta), bool(d.meta.get("held_out", False)),
                      str(d.meta.get("cell_set", "")), _float_or_none(d.meta.get("ambient_c")),
                      bool(np.max(np.abs(stored - d.soc[0])) >= 0.05),
                      float(d.meta.get("current_offset_a") or 0.0) / d.capacity_ah,
                      float(d.t[-1] - d.t[0]), len(d.t), len(session_bounds(x.session)), d.n_cells, trace=trace)
        for key, st in stats.items():
            r.methods[key] = MethodRun(key, st.result(d.t), st.sse, st.count, st.hist, st.sets, infos[key],
                                       _soh(last[key], truth_cap, cap_source, d.capacity_ah) if v.kind == "none" else None)
        r.seconds = time.perf_counter() - t0
        out.append(r)
    return out


def _float_or_none(v) -> float | None:
    return None if v is None else float(v)


# -- an evaluation ---------------------------------------------------------------------------


@contextlib.contextmanager
def _single_threaded_workers() -> Iterator[None]:
    """Worker processes start with one BLAS / OpenMP thread each (2 shared cores; same numbers every run)."""
    keys = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
    old = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ[k] = "1"
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def evaluate(paths: list[Path], setup: EvalSetup, names: list[MethodSpec] | None = None,
             variants: list[Variant] | None = None, jobs: int = 2, ocv_source: str = "chemistry",
             log: Callable[[str], None] = print) -> list[RunResult]:
    """Every planned (drive, condition) run; drives in parallel (``jobs``), results in plan order (deterministic)."""
    names = list(names or METHODS.names())
    for n in names:
        if isinstance(n, str):
            METHODS.check(n)
    heads = [drive_head(Path(p)) for p in paths]
    runs = plan(heads, list(VARIANTS if variants is None else variants))
    per_drive: dict[Path, list[Variant]] = {}
    for h, v in runs:
        per_drive.setdefault(h.path, []).append(v)
    size = {h.path: h.size for h in heads}
    order = sorted(per_drive, key=lambda p: -size[p] * len(per_drive[p]))    # most work first: the pool ends together
    done: dict[tuple[Path, str], RunResult] = {}
    t0 = time.perf_counter()

    def report(k: int, p: Path, res: list[RunResult]) -> None:
        done.update({(p, v.name): r for v, r in zip(per_drive[p], res)})
        log(f"[{k}/{len(order)}] {_progress(res)} ({time.perf_counter() - t0:.0f} s)")

    if jobs <= 1 or len(order) <= 1:
        for k, p in enumerate(order, 1):
            report(k, p, evaluate_drive(p, per_drive[p], setup, names, ocv_source))
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with _single_threaded_workers(), ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futs = {pool.submit(evaluate_drive, p, per_drive[p], setup, names, ocv_source): p for p in order}
            for k, f in enumerate(as_completed(futs), 1):
                report(k, futs[f], f.result())
    return [done[(h.path, v.name)] for h, v in runs]


def _progress(res: list[RunResult]) -> str:
    r0 = res[0]
    parts = []
    for r in res:
        errs = " ".join(f"{k} {m.metrics['rmse'] * 100:.2f}" for k, m in r.methods.items())
        parts.append(f"{r.variant}: {errs}")
    return f"{r0.drive} ({r0.chemistry}, {r0.duration_s / 3600:.1f} h, {r0.sessions} sessions) RMSE % " + "; ".join(parts)


# -- pooling ------------------------------------------------------------------------------------


def learned_key(r: RunResult) -> str | None:
    """The shipped estimator's name in this run (with or without its model), None if it did not run."""
    return next((k for k in LEARNED if k in r.methods), None)


def method_order(runs: list[RunResult]) -> list[str]:
    """Methods in registry order (the shipped estimator first), as they appear in the runs."""
    seen = {k for r in runs for k in r.methods}
    return [k for k in dict.fromkeys((*LEARNED, *METHODS.names())) if k in seen]


def case_values(runs: list[RunResult], method: str) -> dict[str, float | None]:
    """Per score case: the mean RMSE of ``method`` over the case's runs (sample subset where it has one)."""
    out: dict[str, float | None] = {}
    for c in SCORE_CASES:
        vals = []
        for r in runs:
            mr = r.methods.get(method)
            if mr is None or not c.select(r):
                continue
            if c.samples == "all":
                vals.append(mr.metrics["rmse"])
            elif mr.sets[c.samples][1]:
                vals.append(math.sqrt(mr.sets[c.samples][0] / mr.sets[c.samples][1]))
        out[c.name] = float(np.mean(vals)) if vals else None
    return out


def weighted_score(values: dict[str, float | None]) -> float | None:
    """Weighted sum of the case values; cases without runs drop out and the weights are renormalised."""
    w = {c.name: c.weight for c in SCORE_CASES if values.get(c.name) is not None}
    if not w:
        return None
    return sum(w[k] * values[k] for k in w) / sum(w.values())


def pooled(runs: list[RunResult], method: str) -> dict | None:
    """RMSE / p95 / max over every cell and sample of the runs, mean per-run RMSE, score."""
    ms = [r.methods[method] for r in runs if method in r.methods]
    if not ms:
        return None
    count = sum(m.count for m in ms)
    hist = np.sum([m.hist for m in ms], axis=0)
    p95 = float(np.searchsorted(np.cumsum(hist), 0.95 * count) + 1) / 1e4 if count else math.nan
    vals = case_values(runs, method)
    return {"rmse": math.sqrt(sum(m.sse for m in ms) / count) if count else math.nan, "p95": p95,
            "max": max(m.metrics["max"] for m in ms), "mean_run_rmse": float(np.mean([m.metrics["rmse"] for m in ms])),
            "runs": len(ms), "cases": vals, "score": weighted_score(vals)}


TIE = 1e-5      # RMSE difference (0.001 points) below which a run is a tie


def win_loss(runs: list[RunResult], baseline: str) -> dict[str, int]:
    """Runs where the shipped estimator's RMSE is lower (win), higher (loss) or within ``TIE`` of ``baseline``'s."""
    out = {"win": 0, "loss": 0, "tie": 0}
    for r in runs:
        k = learned_key(r)
        if k is None or baseline not in r.methods or k == baseline:
            continue
        a, b = r.methods[k].metrics["rmse"], r.methods[baseline].metrics["rmse"]
        out["tie" if abs(a - b) <= TIE else "win" if a < b else "loss"] += 1
    return out


def group_names(runs: list[RunResult]) -> list[str]:
    """Pooling groups in report order: all, the classes a..e, c's named conditions, held_out, other tags."""
    seen = list(dict.fromkeys(g for r in runs for g in r.groups))
    fixed = ["all", "a", "b", "c", "d", "e"]
    named = [v.name for v in VARIANTS if v.name in seen]
    return [g for g in fixed if g in seen] + named + [g for g in seen if g not in fixed and g not in named]


def summary(runs: list[RunResult]) -> dict:
    """Per group and chemistry ("all" pools both): every method pooled, the win/loss table; SOH per chemistry."""
    methods = method_order(runs)
    chems = ["all", *sorted({r.chemistry for r in runs})]
    groups: dict = {}
    for g in group_names(runs):
        in_g = [r for r in runs if g in r.groups]
        groups[g] = {}
        for c in chems:
            sel = [r for r in in_g if c in ("all", r.chemistry)]
            if not sel:
                continue
            groups[g][c] = {"runs": len(sel), "methods": {m: p for m in methods if (p := pooled(sel, m)) is not None},
                            "win_loss": {b: win_loss(sel, b) for b in methods if b not in LEARNED}}
    return {"groups": groups, "soh": soh_summary(runs, chems), "cpu_us_per_sample": cpu_summary(runs)}


def cpu_summary(runs: list[RunResult]) -> dict[str, float]:
    """Process time per sample of each method over all runs (this machine, this load: a rough guide)."""
    out = {}
    for k in method_order(runs):
        n = sum(r.samples for r in runs if k in r.methods)
        cpu = sum(r.methods[k].info.get("cpu_us_per_sample", 0.0) * r.samples for r in runs if k in r.methods)
        out[k] = cpu / max(n, 1)
    return out


def soh_summary(runs: list[RunResult], chems: list[str]) -> dict:
    """Capacity RMSE (fraction of design) per chemistry and method, over cells of unperturbed runs."""
    out: dict = {}
    for c in chems:
        agg: dict[str, list] = {}
        for r in runs:
            if r.kind != "none" or c not in ("all", r.chemistry):
                continue
            for k, mr in r.methods.items():
                if mr.soh is not None and mr.soh["cells"]:
                    a = agg.setdefault(k, [0.0, 0, 0])
                    a[0] += mr.soh["sse"]
                    a[1] += mr.soh["cells"]
                    a[2] += 1
        out[c] = {k: {"rmse": math.sqrt(s / n), "cells": n, "runs": nr} for k, (s, n, nr) in agg.items()}
    return out


# -- the EKF's ECM -------------------------------------------------------------------------------------


def resolve_ecm(chemistries: list[str], ecm_file: Path | None, fit_drives: list[str] | None,
                tune_drives: list[str] | None, models: ModelRegistry | None, log=print) -> dict[str, EcmTable]:
    """The EKF's ECM per chemistry, from (first that applies) a file, identification on the given training
    drives (the model's own train/validation split where its manifest names it), the model manifest, or the
    chemistry default (labelled as not identified)."""
    from bms_ai.estimation.ecm_fit import fit_ecm_table, tune_noise

    out: dict[str, EcmTable] = {}
    given = load_json(ecm_file, "ECM table") if ecm_file else {}
    if not isinstance(given, dict):
        raise ValueError(f"{ecm_file}: an ECM table must be a JSON object (chemistry -> table)")
    for chem in chemistries:
        entry = models.slot("soc", chem).model.entry if models is not None and models.slot("soc", chem).model else None
        if chem in given:
            out[chem] = EcmTable.from_dict(given[chem])
            out[chem].source = f"{ecm_file}: {out[chem].source}"
        elif fit_drives:
            trn, val = _fit_split(chem, fit_drives, tune_drives, entry)
            if not trn:
                continue
            log(f"[ecm/{chem}] identifying on {len(trn)} drives, tuning the noise on {len(val)}")
            tab = fit_ecm_table(trn, chem)
            out[chem] = tune_noise(tab, val, chem, max_seconds=3600.0) if val else tab
        elif entry is not None and entry.extra.get("ecm"):
            out[chem] = with_chemistry_hysteresis(EcmTable.from_dict(entry.extra["ecm"]), chem)
            out[chem].source = f"model manifest {entry.name}@{entry.version} ({out[chem].source})"
    return out


def with_chemistry_hysteresis(tab: EcmTable, chemistry: str) -> EcmTable:
    """A table identified without hysteresis gets the chemistry's published one (LFP), as a production EKF has."""
    chem = get_chemistry(chemistry)
    if tab.m_hyst <= 0 and chem.hysteresis_gap_v > 0:
        tab.m_hyst, tab.kappa_hyst = chem.hysteresis_gap_v / 2.0, chem.hysteresis_rate or tab.kappa_hyst
        tab.source += "; hysteresis from the chemistry record"
    return tab


def _fit_split(chem: str, fit: list[str], tune: list[str] | None, entry) -> tuple[list, list]:
    """Training and validation drives of ``chem``: the model's split by name if its manifest has one."""
    drives = [d for d in (load_drive(p) for p in find_drives(fit)) if d.chemistry == chem]
    prov = entry.provenance if entry is not None else {}
    names = {d.name for d in drives}
    if tune is None and set(prov.get("drives", [])) & names:
        return ([d for d in drives if d.name in set(prov["drives"])],
                [d for d in drives if d.name in set(prov.get("val_drives", []))])
    if tune is not None:
        val = [d for d in (load_drive(p) for p in find_drives(tune)) if d.chemistry == chem]
        return drives, val
    drives.sort(key=lambda d: d.name)
    return [d for k, d in enumerate(drives) if k % 5 != 4], [d for k, d in enumerate(drives) if k % 5 == 4]


# -- report --------------------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x * 100:.{digits}f}"


def protocol(setup: EvalSetup, names: list[str], variants: list[Variant], ocv_source: str, model_dir) -> dict:
    """Everything needed to reproduce the numbers: methods, conditions, score cases, model and ECM sources."""
    return {"version": PROTOCOL_VERSION, "methods": [n if isinstance(n, str) else n.__name__ for n in names],
            "ocv": ocv_source, "rate_hz": setup.rate_hz or "as recorded",
            "models": str(model_dir) if model_dir is not None else None,
            "variants": [asdict(v) for v in variants],
            "score_cases": [{"name": c.name, "weight": c.weight, "mcmaster": c.mcmaster, "runs": c.description,
                             "samples": c.samples} for c in SCORE_CASES],
            "ecm": {c: t.to_dict() for c, t in setup.ecm.items()}}


def run_rows(runs: list[RunResult]) -> list[dict]:
    """One JSON row per run: identity, classes, per-method metrics, info and SOH."""
    return [{"drive": r.drive, "chemistry": r.chemistry, "variant": r.variant, "kind": r.kind, "classes": list(r.classes),
             "held_out": r.held_out, "cell_set": r.cell_set, "ambient_c": r.ambient_c, "duration_s": r.duration_s,
             "samples": r.samples, "sessions": r.sessions, "cells": r.n_cells, "seconds": r.seconds,
             "methods": {k: {"metrics": m.metrics, "info": m.info, "soh": m.soh} for k, m in r.methods.items()}}
            for r in runs]


def markdown(summ: dict, runs: list[RunResult], proto: dict) -> list[str]:
    """table.md: protocol, score weights, one table per class and chemistry with its win/loss, SOH, runs."""
    md = ["# SOC evaluation (protocol v2)", "",
          f"Methods: {', '.join(method_order(runs))}. OCV given to every method: {proto['ocv']}. "
          f"Models: {proto['models'] or 'none (the shipped estimator runs its fallback)'}.", ""]
    md += [f"- EKF ECM ({c}): {t['source']}" for c, t in proto["ecm"].items()] or ["- EKF ECM: chemistry defaults (not identified)"]
    md += ["- CPU per sample (us, process time): " + ", ".join(f"{k} {v:.0f}" for k, v in summ["cpu_us_per_sample"].items())]
    md += ["", "## Conditions", "", "| condition | perturbation | value | stored delta | drives | max per chemistry |",
           "|---|---|---|---|---|---|"]
    md += [f"| {v['name']} | {v['kind']} | {v['value']} | {v['stored_delta']} | {v['drives']} | {v['max_per_chemistry'] or 'all'} |"
           for v in proto["variants"]]
    md += ["", "## Weighted score: test cases and weights (McMaster-style)", "",
           "| case | weight | McMaster case | runs / samples |", "|---|---|---|---|"]
    md += [f"| {c['name']} | {c['weight']} | {c['mcmaster']} | {c['runs']} |" for c in proto["score_cases"]]
    md += ["", "Score = sum of weight x mean per-run RMSE over the case's runs, divided by the weights of the cases "
           "that have runs (% points, lower is better).", ""]
    for g, by_chem in summ["groups"].items():
        for chem, s in by_chem.items():
            md += _group_table(g, chem, s)
    md += ["## SOH (capacity per cell vs truth, RMSE in % of design)", "", "| chemistry | method | RMSE | cells | runs |",
           "|---|---|---|---|---|"]
    md += [f"| {c} | {k} | {_pct(v['rmse'])} | {v['cells']} | {v['runs']} |" for c, by in summ["soh"].items() for k, v in by.items()]
    md += ["", "## Runs (RMSE %)", "", "| drive | condition | chem | classes | h | " + " | ".join(method_order(runs)) + " |",
           "|---|---|---|---|---|" + "---|" * len(method_order(runs))]
    for r in runs:
        md.append(f"| {r.drive} | {r.variant} | {r.chemistry} | {','.join(r.classes)} | {r.duration_s / 3600:.1f} | "
                  + " | ".join(_pct(r.methods[k].metrics["rmse"]) if k in r.methods else "-" for k in method_order(runs)) + " |")
    return md


def _group_table(g: str, chem: str, s: dict) -> list[str]:
    md = [f"## Class {g} - {chem} ({s['runs']} runs)", "", "| method | RMSE % | p95 % | max % | mean run RMSE % | score % |",
          "|---|---|---|---|---|---|"]
    md += [f"| {k} | {_pct(p['rmse'])} | {_pct(p['p95'])} | {_pct(p['max'])} | {_pct(p['mean_run_rmse'])} | {_pct(p['score'])} |"
           for k, p in s["methods"].items()]
    learned = [k for k in LEARNED if k in s["methods"]]
    if learned and s["win_loss"]:
        md += ["", f"{'/'.join(learned)} vs baseline (runs with lower / higher / equal RMSE):", "",
               "| baseline | win | loss | tie |", "|---|---|---|---|"]
        md += [f"| {b} | {w['win']} | {w['loss']} | {w['tie']} |" for b, w in s["win_loss"].items()]
    return md + [""]


def _md_html(md: list[str]) -> str:
    """The markdown of ``markdown`` as HTML (headings, tables, paragraphs; nothing else is used)."""
    out, table = [], []

    def flush() -> None:
        if table:
            rows = [[html.escape(c.strip()) for c in ln.strip().strip("|").split("|")] for ln in table if not ln.startswith("|---")]
            head = "".join(f"<th>{c}</th>" for c in rows[0])
            body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows[1:])
            out.append(f"<table><tr>{head}</tr>{body}</table>")
            table.clear()

    for ln in md:
        if ln.startswith("|"):
            table.append(ln)
            continue
        flush()
        if ln.startswith("#"):
            level = len(ln) - len(ln.lstrip("#"))
            out.append(f"<h{level}>{html.escape(ln.lstrip('#').strip())}</h{level}>")
        elif ln.strip():
            out.append(f"<p>{html.escape(ln.lstrip('- '))}</p>")
    flush()
    return "\n".join(out)


def plots(runs: list[RunResult], summ: dict, out: Path) -> list[tuple[str, str]]:
    """PNG files: RMSE by method per class (bar chart), SOC truth vs methods and error per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    methods = method_order(runs)
    for g, by_chem in summ["groups"].items():
        chems = list(by_chem)
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(chems) * len(methods) / 3), 3))
        w = 0.8 / max(len(methods), 1)
        for j, m in enumerate(methods):
            ax.bar(np.arange(len(chems)) + (j - len(methods) / 2 + 0.5) * w,
                   [by_chem[c]["methods"].get(m, {}).get("rmse", np.nan) * 100 for c in chems], w, label=m)
        ax.set_xticks(np.arange(len(chems)), chems)
        ax.set_ylabel("RMSE %-pts")
        ax.set_title(f"class {g}")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fn = f"class_{_safe(g)}.png"
        fig.savefig(out / fn, dpi=70)
        plt.close(fig)
        files.append((f"class {g}", fn))
    for r in runs:
        files.append((f"{r.drive} / {r.variant}", _run_plot(plt, r, out)))
    return files


def _run_plot(plt, r: RunResult, out: Path) -> str:
    tr = r.trace
    th = (tr["t"] - tr["t"][0]) / 3600.0
    th[np.flatnonzero(np.diff(tr["session"])) + 1] = np.nan      # no line across a park
    c = 0
    fig, ax = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    ax[0].plot(th, tr["truth"][:, c] * 100, "k", lw=1.5, label="truth (cell 0)")
    for k, est in tr["est"].items():
        ax[0].plot(th, est[:, c] * 100, lw=0.8, label=k)
        ax[1].plot(th, (est[:, c] - tr["truth"][:, c]) * 100, lw=0.8, label=k)
    ax[0].set_ylabel("SOC %")
    ax[0].legend(fontsize=7, ncol=3)
    ax[1].set_ylabel("error %-pts")
    ax[1].set_xlabel("h")
    ax[1].set_ylim(-15, 15)
    ax[0].set_title(f"{r.drive} ({r.variant}, {r.chemistry})")
    fig.tight_layout()
    fn = f"run_{_safe(r.drive)}_{_safe(r.variant)}.png"
    fig.savefig(out / fn, dpi=70)
    plt.close(fig)
    return fn


def _safe(s: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in s)


def write_report(runs: list[RunResult], out: Path, proto: dict, with_plots: bool = True) -> Path:
    """results.json, table.md and index.html (with plots) into ``out``; returns the HTML page."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summ = summary(runs)
    (out / "results.json").write_text(json.dumps({"protocol": proto, "summary": summ, "runs": run_rows(runs)},
                                                 indent=1, default=_json_default))
    md = markdown(summ, runs, proto)
    (out / "table.md").write_text("\n".join(md) + "\n")
    figs = plots(runs, summ, out) if with_plots else []
    body = [_md_html(md)] + [f"<h3>{html.escape(t)}</h3><img src=\"{html.escape(f)}\">" for t, f in figs]
    page = out / "index.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'><title>bms_ai SOC evaluation</title>"
                    "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}"
                    "table{border-collapse:collapse;margin:6px 0}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")
    return page


def _json_default(o):
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, np.generic):
        return o.item()
    return str(o)


# -- CLI -----------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bms-ai evaluate` arguments."""
    p.add_argument("drives", nargs="+", help="drives or directories of drives (held-out evaluation sets)")
    p.add_argument("--report", type=out_dir, required=True, help="output directory: results.json, table.md, index.html")
    p.add_argument("--models", default=str(default_model_dir()),
                   help="model directory (default: the installed models, from any directory; 'none' = no models)")
    p.add_argument("--jobs", type=positive_int, default=2, help="drives evaluated in parallel (results do not depend on it)")
    p.add_argument("--methods", default="", help=f"comma list (default all: {', '.join(METHODS.names())})")
    p.add_argument("--variants", default="all", help="comma list of conditions, 'all' or 'base' "
                   f"(known: {', '.join(v.name for v in VARIANTS)})")
    p.add_argument("--rate-hz", type=nonneg_float, default=0.0,
                   help="resample every drive to this rate before any method sees it (0: as recorded; the "
                        "current is window-averaged, so Coulomb counting keeps the charge)")
    p.add_argument("--ocv", choices=("chemistry", "datasheet"), default="chemistry",
                   help="OCV table given to every method: the chemistry default or the drive's datasheet curve")
    p.add_argument("--ecm", default="", help="EKF ECM tables (JSON: chemistry -> table, as written into the report)")
    p.add_argument("--fit-drives", nargs="*", default=None,
                   help="identify the EKF's ECM on these training drives (the model's own split where its manifest names it)")
    p.add_argument("--tune-drives", nargs="*", default=None, help="validation drives for the EKF noise grid search")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--faults", action="store_true",
                   help="fault-detector evaluation (rules + learned vs thresholds only) into REPORT/faults")
    p.add_argument("--no-soc", action="store_true", help="skip the SOC evaluation (with --faults: faults only)")


def _choose_variants(spec: str) -> list[Variant]:
    if spec in ("", "all"):
        return list(VARIANTS)
    by_name = {v.name: v for v in VARIANTS}
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in by_name]
    if bad:
        raise ValueError(f"unknown condition(s) {', '.join(bad)}; known: {', '.join(by_name)}")
    return [by_name[n] for n in names]


def run(args: argparse.Namespace) -> int:
    """Run the SOC evaluation (and optionally the fault-detector one); 0 on success."""
    paths = find_drives(args.drives)
    if not paths:
        raise FileNotFoundError("no drives found")
    if not args.no_soc:
        model_dir = None if args.models.lower() == "none" else Path(args.models) if args.models else default_model_dir()
        models = open_models(model_dir) if model_dir is not None else None
        if models is not None:
            models.poll()
        chems = sorted({drive_head(p).chemistry for p in paths})
        setup = EvalSetup(model_dir=model_dir, rate_hz=args.rate_hz)
        setup.ecm = resolve_ecm(chems, Path(args.ecm) if args.ecm else None, args.fit_drives, args.tune_drives, models)
        names = [s.strip() for s in args.methods.split(",") if s.strip()] or None
        variants = _choose_variants(args.variants)
        runs = evaluate(paths, setup, names, variants, jobs=args.jobs, ocv_source=args.ocv)
        out = Path(args.report)
        out.mkdir(parents=True, exist_ok=True)
        for chem, tab in setup.ecm.items():
            (out / f"ecm_{chem}.json").write_text(json.dumps({chem: tab.to_dict()}, indent=1))
        page = write_report(runs, out, protocol(setup, names or METHODS.names(), variants, args.ocv, model_dir),
                            with_plots=not args.no_plots)
        print("\n".join(_headline(summary(runs))))
        print(f"report: {page}")
    if args.faults:
        try:
            mod = importlib.import_module("bms_ai.diagnostics.evaluate")
        except ImportError as exc:
            print(f"fault evaluation not available: {exc}")
            return 2
        out = Path(args.report) / "faults"
        fault_summary = mod.run_fault_evaluation([str(p) for p in paths], out)
        print(json.dumps(fault_summary, indent=1, default=str))
        print(f"fault report: {out}")
    return 0


def _headline(summ: dict) -> list[str]:
    lines = []
    for chem, s in summ["groups"].get("all", {}).items():
        lines.append(f"{chem}: " + ", ".join(f"{k} RMSE {_pct(p['rmse'])} % score {_pct(p['score'])}"
                                            for k, p in s["methods"].items()))
    return lines


# -- single-estimator traces (the estimator's own NN / EKF / CC outputs) --------------------------------

TRACE_METHODS = ("nn", "ekf", "cc")


@dataclass
class TraceResult:
    """One drive through PackEstimator alone: its fused, internal EKF and internal CC traces, with metrics."""

    drive: str
    chemistry: str
    condition: str
    t: np.ndarray
    truth: np.ndarray                      # (T, n)
    est: dict[str, np.ndarray]             # method -> (T, n)
    sigma: np.ndarray
    metrics: dict[str, dict] = field(default_factory=dict)
    cycle_s: np.ndarray = field(default_factory=lambda: np.empty(0))
    method_used: str = ""


RunTrace = TraceResult


def run_drive(d: RecordedDrive, registry: ModelRegistry | None, soc0: np.ndarray | None = None,
              condition: str | None = None) -> TraceResult:
    """PackEstimator over one drive (one session, as the node runs it) with the traces of its internal filters.

    For checks of the estimator itself; comparisons with baselines go through ``evaluate``.
    Samples the node would reject are left out (NaN). The capacity estimate uses the
    SOC-regression method only (``rest_capacity=False``).
    """
    est = PackEstimator(d.chemistry, d.capacity_ah, registry, initial_soc=d.soc[0] if soc0 is None else soc0,
                        rest_capacity=False)
    n_steps = len(d.t)
    out = {m: np.full((n_steps, d.n_cells), np.nan) for m in TRACE_METHODS}
    sig = np.full(n_steps, np.nan)
    cyc = np.full(n_steps, np.nan)
    used = set()
    for k in range(n_steps):
        step = est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k])
        if step is None:
            continue
        o = step.soc
        cyc[k] = est.cycle_last_s
        out["nn"][k], out["ekf"][k], out["cc"][k], sig[k] = o.cell_soc, o.ekf_soc, o.cc_soc, o.sigma
        used.add(o.method)
    r = TraceResult(d.name, d.chemistry, condition or str(d.meta.get("condition", "drive")), d.t, d.soc, out, sig,
                    cycle_s=cyc, method_used="/".join(sorted(used)))
    for m in TRACE_METHODS:
        r.metrics[m] = metrics(d.t, out[m], d.soc)
    return r


def true_cell_soh(d: RecordedDrive) -> np.ndarray:
    """Capacity / design from the truth itself: regression of true SOC on true Ah throughput."""
    cur = d.current_true if d.current_true is not None else d.current - float(d.meta.get("current_offset_a") or 0.0)
    ah = np.concatenate([[0.0], np.cumsum(0.5 * (cur[1:] + cur[:-1]) * np.diff(d.t)) / 3600.0])
    ah_c = ah - ah.mean()
    slope = (ah_c[:, None] * (d.soc - d.soc.mean(axis=0))).sum(axis=0) / max(float((ah_c ** 2).sum()), 1e-12)
    return 1.0 / np.where(slope > 0, slope, np.nan) / d.capacity_ah


def metrics(t: np.ndarray, est: np.ndarray, truth: np.ndarray) -> dict:
    """RMSE, max error, error at and after 5 min, and the time after which the error stays within 2 points."""
    e = est - truth
    ok = np.isfinite(e).all(axis=1)
    e, tt = e[ok], t[ok]
    ae = np.abs(e).max(axis=1)
    after = tt >= tt[0] + 300.0
    bad = np.nonzero(ae > WITHIN)[0]
    conv = 0.0 if bad.size == 0 else (float(tt[bad[-1]] - tt[0]) if bad[-1] + 1 < len(tt) else float("inf"))
    at5 = (tt >= tt[0] + 300.0) & (tt <= tt[0] + 360.0)
    return {"rmse": float(np.sqrt(np.mean(e ** 2))), "max": float(ae.max()),
            "err_at_5min": float(ae[at5].max()) if at5.any() else float("nan"),
            "max_after_5min": float(ae[after].max()) if after.any() else float("nan"),
            "rmse_after_5min": float(np.sqrt(np.mean(e[after] ** 2))) if after.any() else float("nan"),
            "converge_2pct_s": conv}
