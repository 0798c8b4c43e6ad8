"""`bms-ai evaluate DRIVES... --report DIR`: NN+CC filter vs EKF vs Coulomb counting on held-out drives.

Every method gets the same information: the same measured inputs and the
same initial SOC (the stored value a BMS would have; the true one unless the
condition is "wrong initial SOC"). Writes results.json, a markdown table and
an HTML report with plots.
"""

from __future__ import annotations

import argparse
import html
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.estimation.pack import PackEstimator, open_models
from bms_ai.models.runtime import ModelRegistry, default_model_dir
from bms_ai.sim.dataset import RecordedDrive, find_drives, load_drive

METHODS = ("nn", "ekf", "cc")
TARGETS = {"nmc": {"rmse": 0.010, "max": 0.03}, "lfp": {"rmse": 0.015, "max": 0.04}}


@dataclass
class RunResult:
    """One drive through the estimator: SOC traces per method, truth and metrics."""

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


def run_drive(d: RecordedDrive, registry: ModelRegistry | None, soc0: np.ndarray | None = None,
              condition: str | None = None) -> RunResult:
    """The pack estimator over one drive (as the node runs it), with NN/EKF/CC traces and metrics.

    Samples the node would reject are left out (NaN). The capacity estimate uses the
    SOC-regression method only (``rest_capacity=False``), as this evaluation always has;
    the node also uses rests where the chemistry allows. ``cycle_s`` is the whole step (SOC + health).
    """
    est = PackEstimator(d.chemistry, d.capacity_ah, registry, initial_soc=d.soc[0] if soc0 is None else soc0,
                        rest_capacity=False)
    n_steps = len(d.t)
    out = {m: np.full((n_steps, d.n_cells), np.nan) for m in METHODS}
    sig = np.full(n_steps, np.nan)
    cyc = np.full(n_steps, np.nan)
    methods = set()
    for k in range(n_steps):
        step = est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k])
        if step is None:
            continue
        o = step.soc
        cyc[k] = est.cycle_last_s
        out["nn"][k], out["ekf"][k], out["cc"][k], sig[k] = o.cell_soc, o.ekf_soc, o.cc_soc, o.sigma
        methods.add(o.method)
    r = RunResult(d.name, d.chemistry, condition or str(d.meta.get("condition", "drive")), d.t, d.soc, out, sig,
                  cycle_s=cyc, method_used="/".join(sorted(methods)))
    for m in METHODS:
        r.metrics[m] = metrics(d.t, out[m], d.soc)
    h = est.health_output()
    true_soh = true_cell_soh(d)
    # truth from a regression can break where a cell's SOC saturates: such cells are left out (reported)
    ok = np.isfinite(true_soh) & (true_soh > 0.5) & (true_soh < 1.5)
    r.metrics["soh"] = {"est": h.cell_soh.tolist(), "true": true_soh.tolist(), "updates": h.capacity_updates,
                        "cells_with_truth": int(ok.sum()),
                        "rmse": float(np.sqrt(np.mean((h.cell_soh[ok] - true_soh[ok]) ** 2)))
                        if h.capacity_updates and ok.any() else None,
                        "r0_ohm": h.cell_r0.tolist()}
    return r


def true_cell_soh(d: RecordedDrive) -> np.ndarray:
    """Capacity / design from the truth itself: regression of true SOC on true Ah throughput."""
    i = d.current - float(d.meta.get("current_offset_a", 0.0))
    ah = np.concatenate([[0.0], np.cumsum(0.5 * (i[1:] + i[:-1]) * np.diff(d.t)) / 3600.0])
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
    # time after which the error stays within 2 points
    bad = np.nonzero(ae > 0.02)[0]
    conv = 0.0 if bad.size == 0 else (float(tt[bad[-1]] - tt[0]) if bad[-1] + 1 < len(tt) else float("inf"))
    at5 = (tt >= tt[0] + 300.0) & (tt <= tt[0] + 360.0)
    return {"rmse": float(np.sqrt(np.mean(e ** 2))), "max": float(ae.max()),
            "err_at_5min": float(ae[at5].max()) if at5.any() else float("nan"),
            "max_after_5min": float(ae[after].max()) if after.any() else float("nan"),
            "rmse_after_5min": float(np.sqrt(np.mean(e[after] ** 2))) if after.any() else float("nan"),
            "converge_2pct_s": conv}


def evaluate(paths: list[Path], model_dir: Path | None, wrong_init: float = 0.3, log=print) -> list[RunResult]:
    """Every drive once with its stored initial SOC, plus a wrong-initial-SOC run on the 25 C drives."""
    reg = None
    if model_dir is not None:
        reg = open_models(model_dir)
        reg.poll()
    results = []
    for p in paths:
        d = load_drive(p)
        r = run_drive(d, reg)
        results.append(r)
        log(_line(r))
        if str(d.meta.get("condition", "")).startswith("25C") and wrong_init:
            delta = wrong_init if d.soc[0].mean() < 0.6 else -wrong_init
            r2 = run_drive(d, reg, soc0=np.clip(d.soc[0] + delta, 0, 1), condition=f"init{delta * 100:+.0f}pts")
            r2.drive = d.name + "+wronginit"
            results.append(r2)
            log(_line(r2))
    return results


def _line(r: RunResult) -> str:
    m = r.metrics
    return (f"{r.drive:28s} {r.condition:12s} " + "  ".join(
        f"{k}: rmse {m[k]['rmse'] * 100:5.2f}% max {m[k]['max'] * 100:5.2f}%" for k in METHODS))


def summary(results: list[RunResult]) -> dict:
    """Per chemistry: pooled RMSE / max per method, SOH error, the targets and whether they pass."""
    out: dict = {}
    for chem in sorted({r.chemistry for r in results}):
        rs = [r for r in results if r.chemistry == chem and "init" not in r.condition]
        agg = {}
        for m in METHODS:
            se = np.concatenate([((r.est[m] - r.truth) ** 2).ravel() for r in rs])
            agg[m] = {"rmse": float(np.sqrt(np.nanmean(se))), "max": float(max(r.metrics[m]["max"] for r in rs))}
        wi = [r for r in results if r.chemistry == chem and "init" in r.condition]
        off = [r for r in rs if r.condition == "offset0.3A"]
        cyc = np.concatenate([r.cycle_s for r in rs])
        tgt = TARGETS.get(chem, TARGETS["lfp"])
        soh_err = []
        for r in rs:
            if r.metrics.get("soh", {}).get("updates"):
                tr = np.asarray(r.metrics["soh"]["true"])
                ok = np.isfinite(tr) & (tr > 0.5) & (tr < 1.5)
                soh_err.append((np.asarray(r.metrics["soh"]["est"]) - tr)[ok])
        out[chem] = {
            "methods": agg,
            "soh_rmse": float(np.sqrt(np.nanmean(np.concatenate(soh_err) ** 2))) if soh_err else None,
            "soh_drives_with_estimate": f"{len(soh_err)}/{len(rs)}",
            "nn_vs_ekf_rmse_ratio": agg["ekf"]["rmse"] / max(agg["nn"]["rmse"], 1e-12),
            "offset0.3A_nn_rmse": off[0].metrics["nn"]["rmse"] if off else None,
            "wrong_init_converge_2pct_s": [r.metrics["nn"]["converge_2pct_s"] for r in wi],
            "wrong_init_err_at_5min": [r.metrics["nn"]["err_at_5min"] for r in wi],
            "cycle_p99_ms_2cells": float(np.nanpercentile(cyc, 99) * 1e3),
            "targets": {"rmse": tgt["rmse"], "max": tgt["max"], "nn_vs_ekf_ratio": 2.0, "offset_rmse": 0.015,
                        "wrong_init_s": 300},
            "pass": {"rmse": agg["nn"]["rmse"] <= tgt["rmse"], "max": agg["nn"]["max"] <= tgt["max"],
                     "ratio": agg["ekf"]["rmse"] / max(agg["nn"]["rmse"], 1e-12) >= 2.0,
                     "offset": bool(off) and off[0].metrics["nn"]["rmse"] <= 0.015,
                     "wrong_init": bool(wi) and all(r.metrics["nn"]["err_at_5min"] <= 0.02 for r in wi)},
        }
    return out


def write_report(results: list[RunResult], out: Path, model_dir: Path | None) -> Path:
    """results.json, table.md and index.html with plots into ``out``; returns the HTML page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    summ = summary(results)
    rows = []
    for r in results:
        rows.append({"drive": r.drive, "chemistry": r.chemistry, "condition": r.condition, "method_used": r.method_used,
                     **{f"{m}_{k}": r.metrics[m][k] for m in METHODS
                        for k in ("rmse", "max", "converge_2pct_s", "err_at_5min", "max_after_5min")},
                     "soh": r.metrics.get("soh")})
    (out / "results.json").write_text(json.dumps({"summary": summ, "runs": rows,
                                                  "models": str(model_dir) if model_dir else None}, indent=1))
    md = ["| drive | chem | condition | NN+CC RMSE | NN max | EKF RMSE | EKF max | CC RMSE | CC max | NN conv. 2% (s) |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for x in rows:
        md.append(f"| {x['drive']} | {x['chemistry']} | {x['condition']} | {x['nn_rmse'] * 100:.2f}% | "
                  f"{x['nn_max'] * 100:.2f}% | {x['ekf_rmse'] * 100:.2f}% | {x['ekf_max'] * 100:.2f}% | "
                  f"{x['cc_rmse'] * 100:.2f}% | {x['cc_max'] * 100:.2f}% | {x['nn_converge_2pct_s']:.0f} |")
    md.append("")
    for chem, s in summ.items():
        md.append(f"**{chem}** overall: " + ", ".join(
            f"{m.upper()} RMSE {s['methods'][m]['rmse'] * 100:.2f}% max {s['methods'][m]['max'] * 100:.2f}%"
            for m in METHODS) + f"; EKF/NN RMSE ratio {s['nn_vs_ekf_rmse_ratio']:.2f}; pass {s['pass']}")
    (out / "table.md").write_text("\n".join(md) + "\n")
    imgs = []
    for r in results:
        fig, ax = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
        th = (r.t - r.t[0]) / 60
        ax[0].plot(th, r.truth[:, 0] * 100, "k", lw=1.5, label="truth (cell 0)")
        for m, c in zip(METHODS, ("C0", "C1", "C2")):
            ax[0].plot(th, r.est[m][:, 0] * 100, c, lw=0.8, label=m)
            ax[1].plot(th, (r.est[m][:, 0] - r.truth[:, 0]) * 100, c, lw=0.8, label=m)
        ax[0].set_ylabel("SOC %")
        ax[0].legend(fontsize=7)
        ax[1].set_ylabel("error %-pts")
        ax[1].set_xlabel("min")
        ax[1].set_ylim(-10, 10)
        ax[0].set_title(f"{r.drive} ({r.condition})")
        fig.tight_layout()
        fn = f"{r.drive}.png"
        fig.savefig(out / fn, dpi=70)
        plt.close(fig)
        imgs.append(fn)
    # error by condition
    fig, ax = plt.subplots(figsize=(9, 3.5))
    labels = [f"{r.chemistry}:{r.condition}" for r in results]
    x = np.arange(len(results))
    for j, m in enumerate(METHODS):
        ax.bar(x + (j - 1) * 0.27, [r.metrics[m]["rmse"] * 100 for r in results], 0.27, label=m)
    ax.set_xticks(x, labels, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("RMSE %-pts")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "by_condition.png", dpi=70)
    plt.close(fig)
    body = [f"<h1>bms_ai SOC evaluation</h1><p>models: {html.escape(str(model_dir))}</p>",
            "<h2>Summary</h2><pre>" + html.escape(json.dumps(summ, indent=1)) + "</pre>",
            "<h2>Per drive</h2>" + _md_table_html(md), '<h2>Error by condition</h2><img src="by_condition.png">']
    body += [f'<h3>{html.escape(f)}</h3><img src="{html.escape(f)}">' for f in imgs]
    page = out / "index.html"
    page.write_text("<!doctype html><html><head><meta charset='utf-8'><title>bms_ai evaluation</title>"
                    "<style>body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:2px 6px}</style>"
                    "</head><body>" + "\n".join(body) + "</body></html>\n")
    return page


def _md_table_html(md: list[str]) -> str:
    rows = [ln for ln in md if ln.startswith("|") and not ln.startswith("|---")]
    cells = [[html.escape(c.strip()) for c in ln.strip("|").split("|")] for ln in rows]
    head = "".join(f"<th>{c}</th>" for c in cells[0])
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in cells[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bms-ai evaluate` arguments."""
    p.add_argument("drives", nargs="+", help="held-out drives (directories)")
    p.add_argument("--report", required=True, help="output directory for table + HTML report")
    p.add_argument("--models", default=str(default_model_dir()), help="model directory with manifest.json (default: the shipped models; '' = none)")
    p.add_argument("--wrong-init", type=float, default=0.3, help="initial-SOC error for the wrong-init run")
    p.add_argument("--faults", action="store_true",
                   help="fault-detector evaluation (rules + learned vs thresholds only) into REPORT/faults")
    p.add_argument("--no-soc", action="store_true", help="skip the SOC evaluation (with --faults: faults only)")


def run(args: argparse.Namespace) -> int:
    """Run the SOC evaluation (and optionally the fault-detector one); 0 on success."""
    paths = find_drives(args.drives)
    if not paths:
        raise FileNotFoundError("no drives found")
    if not args.no_soc:
        model_dir = Path(args.models) if args.models else None
        results = evaluate(paths, model_dir, wrong_init=args.wrong_init)
        page = write_report(results, Path(args.report), model_dir)
        print(json.dumps(summary(results), indent=1))
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
