"""Tune the NN+CC fusion filter (R inflation, process noise) on validation drives only.

The NN's errors are correlated over minutes, so at 10 Hz its sigma must be
inflated (roughly sqrt(correlation time / sample period)); we pick the factor
that minimises RMSE plus a wrong-initial-SOC penalty on the validation drives
recorded in the model's manifest entry (never on the held-out suite).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np

from bms_ai.estimation.ekf import ecm_for
from bms_ai.estimation.soc import FusionParams, SocEstimator
from bms_ai.models.runtime import ModelRegistry
from bms_ai.sim.dataset import find_drives, load_drive


def _run(d, model, ecm, fp: FusionParams, soc0) -> np.ndarray:
    est = SocEstimator(d.n_cells, d.cell_t.shape[1], d.chemistry, d.capacity_ah, model=model, ecm=ecm, fusion=fp,
                       soc0=soc0)
    out = np.empty_like(d.soc)
    for k in range(len(d.t)):
        out[k] = est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k]).cell_soc
    return out


def tune(chemistry: str, model_dir: Path, data: list[str | Path], r_scales=(10.0, 30.0, 100.0),
         q_socs=(2e-9,), max_drives: int = 2, log=print) -> dict:
    """The fusion parameters with the best validation score (RMSE + wrong-init penalty)."""
    reg = ModelRegistry(model_dir)
    reg.poll()
    model = reg.get("soc", chemistry)
    if model is None:
        raise ValueError(f"no {chemistry} SOC model in {model_dir}")
    val = set(model.entry.provenance.get("val_drives", []))
    drives = [load_drive(p) for p in find_drives(data) if p.name in val][:max_drives]
    if not drives:
        raise ValueError("validation drives of the model not found under --data")
    best = None
    for r, q in itertools.product(r_scales, q_socs):
        fp = FusionParams(r_scale=r, q_soc=q)
        se, conv = [], []
        for d in drives:
            ecm = ecm_for(model, d.capacity_ah)
            e = _run(d, model, ecm, fp, d.soc[0]) - d.soc
            se.append(np.mean(e ** 2))
            s0 = np.clip(d.soc[0] + (0.3 if d.soc[0].mean() < 0.6 else -0.3), 0, 1)
            e2 = np.abs(_run(d, model, ecm, fp, s0) - d.soc).max(axis=1)
            at5 = (d.t >= d.t[0] + 300.0) & (d.t <= d.t[0] + 360.0)
            conv.append(float(e2[at5].max()))     # error 5 min after a 30-point wrong start
        rmse = float(np.sqrt(np.mean(se)))
        score = rmse + max(0.0, max(conv) - 0.02)
        log(f"[tune/{chemistry}] r_scale {r:5.1f} q_soc {q:.0e}: val rmse {rmse * 100:.2f}% "
            f"wrong-init error at 5 min {max(conv) * 100:.2f}% score {score:.4f}", flush=True)
        if best is None or score < best[0]:
            best = (score, r, q, rmse, max(conv))
    _, r, q, rmse, conv = best
    return {"r_scale": r, "q_soc": q, "val_rmse": rmse, "val_wrong_init_err_5min": conv}


def add_arguments(p) -> None:
    """`bms-ai train tune`."""
    from bms_ai.training.cli import add_common

    add_common(p, data_required=True)


def run(args) -> int:
    """Tune the filter of the newest model in --out and store the result in its manifest entry."""
    import json

    from bms_ai.models.manifest import read_manifest, upsert_entry

    res = tune(args.chemistry, Path(args.out), args.data)
    entries, _ = read_manifest(Path(args.out))
    entry = max((e for e in entries if e.key == ("soc", args.chemistry)), key=lambda e: e.version)
    entry.extra["fusion"] = {"r_scale": res["r_scale"], "q_soc": res["q_soc"]}
    entry.metrics.update({f"tuned_{k}": v for k, v in res.items()})
    upsert_entry(Path(args.out), entry)
    print(json.dumps({"name": entry.name, "version": entry.version, "metrics": entry.metrics}, indent=1))
    return 0
