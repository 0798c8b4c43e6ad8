"""Estimation suites: the train / val / eval drive sets for SOC and SOH estimation, one command each.

    bms-ai simulate --estimation-suite eval --chemistry lfp --out DIR --jobs 2

Every drive is a ``bms_ai.sim.life`` run (RecordedDrive v2 directory: drive.npz + meta.json)
defined completely by its ``LifeConfig``; a drive whose meta.json carries the same config
hash is skipped, so an interrupted suite resumes where it stopped. Seeds are fixed per
split, chemistry and drive: the same command writes the same suite. ``suite.json`` lists
every drive with its classes, variant and held-out flag.

- train: training variants only, 1.5 h drives, randomised cells (spread + SOH U(0.7, 1.0)),
  ambient U(-10, 45) degC, start SOC U(0.1, 0.95), full sensor model;
- val: the same recipe with other seeds;
- eval, tagged by class: a clean 1 h drives (20-30 degC, fresh, current sensor noise only);
  b 3-day lives (full sensor model); d 1 h drives at -10 .. 45 degC, aged, large cell spread;
  e held-out variants (1 h drives at 25 degC and cold / hot, plus one 3-day life).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bms_ai.sim.life import GENERATOR, LifeConfig, SensorSpec, VoltageSensorSpec
from bms_ai.sim.variants import get_variant, variant_names

SUITES = ("train", "val", "eval")
SUITE_SIZES = {"train": 40, "val": 8}          # eval: see eval_specs (19 per chemistry)
_SPLIT_SEED = {"train": 11, "val": 12, "eval": 13}
_CHEM_INDEX = {"nmc": 0, "lfp": 1}
N_CELLS = 3
TRAIN_HOURS, EVAL_HOURS, LIFE_DAYS = 1.5, 1.0, 3
RETRIES, RETRY_SEED_STEP = 3, 7919


@dataclass(frozen=True)
class DriveSpec:
    """One drive of a suite: its name, generator config and eval classes (tags)."""

    name: str
    config: LifeConfig
    classes: tuple[str, ...] = ()

    @property
    def variant(self) -> str:
        """Cell variant of every cell in the drive."""
        return self.config.variant

    @property
    def held_out(self) -> bool:
        """True when the variant is held out of training."""
        return get_variant(self.config.variant).held_out

    def row(self) -> dict:
        """The suite.json entry."""
        c = self.config
        return {"name": self.name, "classes": list(self.classes), "variant": c.variant, "held_out": self.held_out,
                "mode": c.mode, "hours": c.hours if c.mode == "drive" else None,
                "days": c.days if c.mode == "life" else None, "sessions": c.sessions, "n_cells": c.n_cells,
                "ambient_c": c.ambient_c, "soh": c.soh, "soc0": c.soc0, "spread": c.spread,
                "sensors": "clean" if c.current_sensor == SensorSpec.clean() else "full", "seed": c.seed,
                "config_hash": c.config_hash()}


def _seed(split: str, chemistry: str, k: int) -> int:
    return _SPLIT_SEED[split] * 1_000_000 + _CHEM_INDEX[chemistry] * 100_000 + k


def _check(split: str, chemistry: str) -> None:
    if split not in SUITES:
        raise ValueError(f"unknown estimation suite {split!r}; choose from {', '.join(SUITES)}")
    if chemistry not in _CHEM_INDEX:
        raise ValueError(f"unknown chemistry {chemistry!r}; choose from {', '.join(_CHEM_INDEX)}")


def _soh_range(centre: float, half: float, lo: float = 0.65) -> list[float] | None:
    """Per-cell SOH range around a pack's centre (None: fresh)."""
    if centre >= 0.995:
        return None
    return [round(max(lo, centre - half), 3), round(min(1.0, centre + half), 3)]


def training_specs(split: str, chemistry: str, n: int | None = None) -> list[DriveSpec]:
    """train / val: training variants, randomised cells, SOH U(0.7, 1.0), ambient U(-10, 45), SOC0 U(0.1, 0.95)."""
    _check(split, chemistry)
    names = variant_names(chemistry, "train")
    rng = np.random.default_rng([_SPLIT_SEED[split], _CHEM_INDEX[chemistry], 77])
    out = []
    for k in range(SUITE_SIZES[split] if n is None else n):
        v = names[k % len(names)]
        cfg = LifeConfig(variant=v, seed=_seed(split, chemistry, k), mode="drive", hours=TRAIN_HOURS, n_cells=N_CELLS,
                         soh=_soh_range(float(rng.uniform(0.7, 1.0)), 0.02, lo=0.7),
                         ambient_c=round(float(rng.uniform(-10, 45)), 1), soc0=round(float(rng.uniform(0.1, 0.95)), 3))
        out.append(DriveSpec(f"{split}_{chemistry}_{k:03d}_{v}", cfg))
    return out


def _eval_drive(chemistry: str, cls: str, k: int, variant: str, **kw) -> DriveSpec:
    kw.setdefault("mode", "drive")
    kw.setdefault("hours", EVAL_HOURS)
    cfg = LifeConfig(variant=variant, seed=_seed("eval", chemistry, {"a": 0, "b": 100, "d": 200, "e": 300}[cls] + k),
                     n_cells=N_CELLS, **kw)
    tags = ("b", "e") if cls == "e" and cfg.mode == "life" else (cls,)
    suffix = "_life" if cfg.mode == "life" else ""
    return DriveSpec(f"eval_{chemistry}_{cls}{k:02d}_{variant}{suffix}", cfg, tags)


def eval_specs(chemistry: str) -> list[DriveSpec]:
    """The eval suite of one chemistry family, tagged by class (docs/sim.md "Estimation suites")."""
    _check("eval", chemistry)
    train, held = variant_names(chemistry, "train"), variant_names(chemistry, "heldout")
    rng = np.random.default_rng([_SPLIT_SEED["eval"], _CHEM_INDEX[chemistry], 78])
    clean = {"current_sensor": SensorSpec.clean(), "voltage_sensor": VoltageSensorSpec(offset_v=0.0)}
    out = [_eval_drive(chemistry, "a", k, train[k % len(train)], sessions=1, soc0=(0.3, 0.6, 0.9)[k % 3],
                       ambient_c=round(float(rng.uniform(20, 30)), 1), **clean) for k in range(6)]
    lives = ((train[1], 22.0, [0.92, 1.0]), (train[-1], 3.0, [0.8, 0.88]))
    out += [_eval_drive(chemistry, "b", k, v, mode="life", days=LIFE_DAYS, ambient_c=amb, soh=soh)
            for k, (v, amb, soh) in enumerate(lives)]
    hard = ((-10.0, 0.95), (0.0, 0.85), (10.0, 0.75), (45.0, 0.9), (25.0, 0.8), (25.0, 0.7))
    out += [_eval_drive(chemistry, "d", k, train[k % len(train)], ambient_c=amb, soh=_soh_range(c, 0.05), spread=2.5)
            for k, (amb, c) in enumerate(hard)]
    for i, v in enumerate(held):
        out.append(_eval_drive(chemistry, "e", 2 * i, v, ambient_c=25.0))
        out.append(_eval_drive(chemistry, "e", 2 * i + 1, v, ambient_c=-5.0 if i % 2 == 0 else 40.0, soh=[0.85, 0.95]))
    out.append(_eval_drive(chemistry, "e", 2 * len(held), held[0], mode="life", days=LIFE_DAYS, ambient_c=15.0,
                           soh=[0.85, 0.95]))
    return out


def suite_specs(split: str, chemistry: str) -> list[DriveSpec]:
    """Every drive of a suite (same arguments -> same list)."""
    _check(split, chemistry)
    return eval_specs(chemistry) if split == "eval" else training_specs(split, chemistry)


# ---------------------------------------------------------------- generation


def is_cached(path: Path, spec: DriveSpec) -> bool:
    """True if ``path`` holds this drive already (config hash match and drive.npz present); refreshes stale tags."""
    meta_path = path / "meta.json"
    if not (meta_path.exists() and (path / "drive.npz").exists()):
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return False
    if meta.get("config_hash") != spec.config.config_hash():
        return False
    if meta.get("classes") != list(spec.classes) or meta.get("name") != spec.name:
        meta.update(classes=list(spec.classes), name=spec.name)
        meta_path.write_text(json.dumps(meta, indent=1))
    return True


def _work(job: tuple[str, dict, list[str], str]) -> dict:
    """Simulate and write one drive (worker process); errors come back as a row, not an exception."""
    name, cfg_json, classes, out_dir = job
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    from bms_ai.sim.dataset import save_npz

    t0 = time.perf_counter()
    try:
        drive = _simulate_with_retries(LifeConfig.from_json(cfg_json), name, tuple(classes))
        out, tmp = Path(out_dir), Path(out_dir + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_npz(tmp, drive)
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    except Exception as exc:  # noqa: BLE001 - one bad drive must not cost the rest of the suite
        return {"name": name, "wall_s": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"}
    m = drive.meta
    return {"name": name, "wall_s": time.perf_counter() - t0, "cpu_s": m["timing"]["cpu_s"], "awake_h": m["timing"]["awake_h"],
            "days": m["timing"]["simulated_days"], "n_cells": drive.n_cells,
            "truth_pct": max(c["max_abs_soc_vs_cc_pct"] for c in m["checks"].values())}


def _simulate_with_retries(cfg: LifeConfig, name: str, classes: tuple[str, ...]):
    """``simulate``; a solver failure is retried with the next seeds of the drive (same recipe, other draw).

    PyBaMM stops a follower cell that the controller cell's limits do not protect (an
    overcharge event) or fails to bracket a root at extreme draws; a suite keeps its
    composition by drawing again. The drive records the attempts and keeps the spec's hash,
    so the same command still reproduces and resumes the same suite.
    """
    from dataclasses import replace as dc_replace

    from bms_ai.sim.life import simulate

    errors = []
    for attempt in range(RETRIES + 1):
        seed = cfg.seed + RETRY_SEED_STEP * attempt
        try:
            drive = simulate(dc_replace(cfg, seed=seed), name=name, classes=classes)
        except Exception as exc:  # noqa: BLE001 - solver failures have many types
            errors.append(f"seed {seed}: {type(exc).__name__}: {exc}")
            continue
        drive.meta.update(config_hash=cfg.config_hash(), attempts={"seed": seed, "failed": errors})
        return drive
    raise RuntimeError("; ".join(errors))


def _manifest(out: Path, header: dict, specs: list[DriveSpec], summary: dict | None) -> None:
    doc = {**header, "generator": GENERATOR, "composition": _composition(specs),
           "drives": [s.row() for s in specs], "summary": summary}
    out.mkdir(parents=True, exist_ok=True)
    (out / "suite.json").write_text(json.dumps(doc, indent=1) + "\n")


def _composition(specs: list[DriveSpec]) -> dict:
    comp: dict[str, int] = {}
    for s in specs:
        for tag in s.classes or ("-",):
            comp[tag] = comp.get(tag, 0) + 1
    return comp


def _run(todo: list[tuple], jobs: int):
    if jobs <= 1:
        yield from map(_work, todo)
        return
    with mp.get_context("spawn").Pool(jobs) as pool:
        yield from pool.imap_unordered(_work, todo)


def generate(specs: list[DriveSpec], out: Path | str, jobs: int = 1, header: dict | None = None, log=None) -> dict:
    """Simulate every drive not already present in ``out``; writes ``suite.json``; returns the summary."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    header = dict(header or {})
    todo = [(s.name, s.config.to_json(), list(s.classes), str(out / s.name)) for s in specs if not is_cached(out / s.name, s)]
    todo.sort(key=lambda j: j[1]["mode"] != "life")      # the long lives first: better packing on the workers
    say(f"{header.get('suite', 'suite')}: {len(specs)} drives, {len(specs) - len(todo)} present, "
        f"{len(todo)} to simulate on {jobs} job(s)")
    _manifest(out, header, specs, None)
    t0 = time.perf_counter()
    rows = []
    for k, r in enumerate(_run(todo, jobs), 1):
        rows.append(r)
        if "error" in r:
            say(f"[{k}/{len(todo)}] {r['name']}: FAILED after {r['wall_s']:.0f} s: {r['error']}")
        else:
            say(f"[{k}/{len(todo)}] {r['name']}: {r['awake_h']:.2f} awake h over {r['days']:.2f} d, {r['n_cells']} cells "
                f"in {r['wall_s']:.0f} s ({r['cpu_s']:.0f} s CPU; truth vs Coulomb counting {r['truth_pct']:.4f} %)")
    ok = [r for r in rows if "error" not in r]
    summary = {"drives": len(specs), "simulated": len(ok), "present": len(specs) - len(todo),
               "failed": sorted(r["name"] for r in rows if "error" in r),
               "errors": {r["name"]: r["error"] for r in rows if "error" in r},
               "wall_s": round(time.perf_counter() - t0, 1), "jobs": jobs,
               "worker_wall_s": round(sum(r["wall_s"] for r in rows), 1),
               "cpu_s": round(sum(r.get("cpu_s", 0.0) for r in rows), 1),
               "awake_h_simulated": round(sum(r["awake_h"] for r in ok), 2),
               "max_truth_pct": max((r["truth_pct"] for r in ok), default=None)}
    _manifest(out, header, specs, summary)
    return summary


def build_estimation_suite(split: str, chemistry: str, out: Path | str, jobs: int = 1, limit: int | None = None,
                           log=None) -> dict:
    """Generate (or complete) one suite of one chemistry into ``out``; returns the summary."""
    if jobs < 1:
        raise ValueError("--jobs must be >= 1")
    specs = suite_specs(split, chemistry)[: limit if limit else None]
    return generate(specs, out, jobs=jobs, header={"suite": split, "chemistry": chemistry}, log=log)
