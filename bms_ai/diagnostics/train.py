"""Train / calibrate the incipient-fault detectors on data-factory drives -> models/faults/.

``python -m bms_ai.diagnostics.train DRIVES... [--out models/faults]``

- thresholds of the residual detectors: the largest statistic seen on the
  fault-free calibration drives times a margin (so fault-free driving stays
  silent by construction on the calibration set; the evaluation measures it
  on held-out drives);
- lithium-plating model: logistic regression on [min temperature, C-rate,
  max cell voltage] over charging ticks, labels from the simulator's anode
  potential, exported to ONNX (opset 17, dynamic batch) with its own
  manifest entry (sha256, inputs, provenance, metrics).
Deterministic: same drives -> same files.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np

from bms_ai.core.paths import share_path
from bms_ai.diagnostics.detectors import DetectorParams, PlatingModel
from bms_ai.diagnostics.replay import Measured, load_measured, replay

FEATURE_VERSION = "faults-1"
MARGIN = 1.5


def is_fault_free(m: Measured) -> bool:
    """A drive without injected faults (the calibration set)."""
    return not m.faults


def calibrate(drives: list[Measured], chemistry: str = "nmc") -> tuple[dict, dict]:
    """Thresholds from fault-free drives: max statistic x MARGIN (with physical floors)."""
    base = DetectorParams.defaults(chemistry)
    # permissive: never alarm, just measure
    probe = DetectorParams(**{**base.to_dict(), "leak_alarm_a": 1e9, "imbalance_alarm_v": 1e9, "thermal_h": 1e12})
    stats = {"leak_a": 0.0, "drift_v": 0.0, "thermal_cusum": 0.0, "hours": 0.0, "drives": []}
    for m in drives:
        if m.chemistry != chemistry or not is_fault_free(m):
            continue
        r = replay(m, params=DetectorParams(**probe.to_dict()), rules=False, trace_every=10)
        leak = r.trace["leak_lcb"]
        stats["leak_a"] = max(stats["leak_a"], float(leak.max()))
        drift = r.trace["drift"]
        stats["drift_v"] = max(stats["drift_v"], float(np.abs(drift - np.median(drift, axis=1, keepdims=True)).max()))
        stats["thermal_cusum"] = max(stats["thermal_cusum"], float(r.trace["th_cusum"].max()))
        stats["hours"] += m.hours
        stats["drives"].append(m.name)
    if not stats["drives"]:
        return base.to_dict(), stats
    params = base.to_dict()
    params["leak_alarm_a"] = round(max(stats["leak_a"] * MARGIN, 0.05), 4)
    params["imbalance_alarm_v"] = round(max(stats["drift_v"] * MARGIN, 0.002), 5)
    params["thermal_h"] = round(max(stats["thermal_cusum"] * MARGIN, 60.0), 1)
    return params, stats


def _plating_labels(drive_dir: Path, t: np.ndarray) -> np.ndarray:
    import pyarrow.parquet as pq

    tab = pq.read_table(drive_dir / "truth.parquet", columns=["t", "fault_plating"])
    tt = tab.column("t").to_numpy()
    lab = tab.column("fault_plating").to_numpy().astype(float)
    return np.interp(t, tt, lab) > 0.5


def plating_dataset(dirs: list[Path], drives: list[Measured]) -> tuple[np.ndarray, np.ndarray]:
    """Plating features and labels over the charging ticks of the drives (every 5th: ticks are correlated)."""
    xs, ys = [], []
    for d, m in zip(dirs, drives):
        c = m.current / m.capacity_ah
        charging = c > 0.05
        if not charging.any():
            continue
        lab = _plating_labels(d, m.t) if (d / "truth.parquet").is_file() else np.zeros(len(m.t), bool)
        x = np.c_[np.nanmin(m.cell_t, axis=1), c, np.nanmax(m.cell_v, axis=1)][charging]
        ok = np.isfinite(x).all(axis=1)
        xs.append(x[ok][::5])
        ys.append(lab[charging][ok][::5])
    if not xs:
        return np.empty((0, 3)), np.empty(0)
    return np.concatenate(xs), np.concatenate(ys).astype(float)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, iters: int = 50) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Newton's method (IRLS) on standardised features, balanced class weights."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    z = (x - mean) / std
    a = np.c_[z, np.ones(len(z))]
    w = np.zeros(a.shape[1])
    pos = max(y.mean(), 1e-6)
    cw = np.where(y > 0.5, 0.5 / pos, 0.5 / max(1 - pos, 1e-6))
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-a @ w))
        g = a.T @ (cw * (p - y)) + l2 * w
        h = (a * (cw * p * (1 - p))[:, None]).T @ a + l2 * np.eye(len(w))
        step = np.linalg.solve(h, g)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1]), mean, std


def export_plating_onnx(path: Path, w: np.ndarray, b: float, mean: np.ndarray, std: np.ndarray) -> None:
    """The logistic model as ONNX (normalisation in the graph), so the runtime needs no separate scaler."""
    import onnx
    from onnx import TensorProto, helper

    f = np.float32
    inits = [helper.make_tensor("mean", TensorProto.FLOAT, [3], mean.astype(f).tolist()),
             helper.make_tensor("std", TensorProto.FLOAT, [3], std.astype(f).tolist()),
             helper.make_tensor("w", TensorProto.FLOAT, [3, 1], w.astype(f).tolist()),
             helper.make_tensor("b", TensorProto.FLOAT, [1], [float(b)])]
    nodes = [helper.make_node("Sub", ["features", "mean"], ["c"]),
             helper.make_node("Div", ["c", "std"], ["z"]),
             helper.make_node("MatMul", ["z", "w"], ["l0"]),
             helper.make_node("Add", ["l0", "b"], ["logit"]),
             helper.make_node("Sigmoid", ["logit"], ["p_plating"])]
    g = helper.make_graph(nodes, "plating_logistic",
                          [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", 3])],
                          [helper.make_tensor_value_info("p_plating", TensorProto.FLOAT, ["batch", 1])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="bms_ai.diagnostics.train")
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def train(drive_dirs: list[Path], out: Path, cache: Path | None = None, log=print) -> dict:
    """Calibrate thresholds per chemistry, train the plating model, write files and manifest to ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    drives = [load_measured(d, cache) for d in drive_dirs]
    log(f"loaded {len(drives)} drives in {time.perf_counter() - t0:.1f} s")
    params: dict = {}
    calib: dict = {}
    for chem in sorted({m.chemistry for m in drives}):
        params[chem], calib[chem] = calibrate(drives, chem)
        log(f"{chem}: calibrated on {calib[chem].get('drives')}: {calib[chem]}")
    (out / "detectors.json").write_text(json.dumps({
        "feature_version": FEATURE_VERSION, "margin": MARGIN, "params": params, "calibration": calib}, indent=1) + "\n")

    x, y = plating_dataset(drive_dirs, drives)
    metrics: dict = {"samples": int(len(y)), "positives": int(y.sum())}
    if len(y) and 0 < y.sum() < len(y):
        w, b, mean, std = fit_logistic(x, y)
        p = 1.0 / (1.0 + np.exp(-(((x - mean) / std) @ w + b)))
        pred = p > 0.5
        metrics.update(recall=float((pred & (y > 0.5)).sum() / max(y.sum(), 1)),
                       false_positive_rate=float((pred & (y < 0.5)).sum() / max((y < 0.5).sum(), 1)))
        export_plating_onnx(out / "plating.onnx", w, b, mean, std)
        (out / "plating.json").write_text(json.dumps({
            "weights": w.tolist(), "bias": b, "mean": mean.tolist(), "std": std.tolist(),
            "features": list(PlatingModel.FEATURES), "metrics": metrics}, indent=1) + "\n")
        log(f"plating model: {metrics}")
    else:
        log(f"plating model: not trained (labels {metrics})")
    manifest = {"models": []}
    prov = {"drives": [m.name for m in drives], "source": "bms_ai.sim data factory (bms_ai.diagnostics.suite)",
            "trainer": "bms_ai.diagnostics.train", "seeded": True}
    if (out / "plating.onnx").is_file():
        manifest["models"].append({
            "name": "fault_plating", "version": "1.0.0", "file": "plating.onnx", "sha256": _sha(out / "plating.onnx"),
            "task": "lithium plating risk during charge (probability)", "chemistry": sorted({m.chemistry for m in drives}),
            "inputs": [{"name": "features", "shape": ["batch", 3], "dtype": "float32",
                        "fields": [["t_min_c", "degC"], ["c_rate", "1/h"], ["v_max", "V"]]}],
            "outputs": [{"name": "p_plating", "shape": ["batch", 1]}],
            "feature_version": FEATURE_VERSION, "normalisation": "in-graph (Sub mean, Div std)",
            "provenance": {**prov, "drives": [m.name for m in drives if m.current.max() / m.capacity_ah > 0.05]},
            "metrics": metrics})
    manifest["models"].append({
        "name": "fault_detector_thresholds", "version": "1.0.0", "file": "detectors.json",
        "sha256": _sha(out / "detectors.json"), "task": "calibrated thresholds of the residual/CUSUM detectors",
        "inputs": [{"name": "PackSample", "fields": ["cell_voltages", "cell_temperatures", "pack_current"]}],
        "feature_version": FEATURE_VERSION,
        "provenance": {**prov, "drives": sorted(d for c in calib.values() for d in c.get("drives", []))},
        "metrics": {chem: {k: v for k, v in c.items() if k != "drives"} for chem, c in calib.items()}})
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return {"params": params, "calibration": calib, "plating": metrics}


def add_arguments(ap: argparse.ArgumentParser) -> None:
    """`bms-ai train faults DRIVES...`."""
    ap.add_argument("drives", nargs="+", type=Path, help="drive directories (or folders of them)")
    ap.add_argument("--out", type=Path, default=share_path("models", "faults"))
    ap.add_argument("--cache", type=Path, default=None, help="decoded-log cache directory")


def run(a: argparse.Namespace) -> int:
    """Calibrate and train into --out."""
    dirs: list[Path] = []
    for p in a.drives:
        dirs.extend([p] if (p / "meta.json").is_file() else sorted(q.parent for q in p.glob("*/meta.json")))
    if not dirs:
        raise FileNotFoundError(f"no drives (folders with meta.json) under {', '.join(map(str, a.drives))}")
    train(dirs, a.out, a.cache)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bms_ai.diagnostics.train`` (same as `bms-ai train faults`)."""
    ap = argparse.ArgumentParser(description=__doc__)
    add_arguments(ap)
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
