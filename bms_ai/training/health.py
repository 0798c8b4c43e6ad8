"""`bms-ai train soh` / `bms-ai train rul`: seeded, with progress; writes reports/estimation/health/.

- soh: simulates aged packs with bms_ai.sim (Scenario(soh=...), rests + a partial charge + a drive),
  decodes their CAN logs (the field view) and runs ``HealthEstimator`` on them; SOH RMSE per cell
  against the simulator's true cell capacity. Classical (no learned model is shipped for SOH).
- rul: samples aging trajectories (``bms_ai.estimation.rul.sample_trajectories``), fits the RUL
  estimator's z prior (train) and conformal factors (calibration), measures error and 90 % interval
  coverage on held-out trajectories, saves models/rul_fadelaw_<chem>_v1.json (parameters + metrics).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from bms_ai.estimation.status import SOH_EOL

SOH_LEVELS = (0.95, 0.9, 0.85, 0.8)


def aged_scenario(chemistry: str, soh: float, seed: int):
    """Rest, partial charge, rest, UDDS, rest at a given SOH: what the rest- and regression-based SOH need."""
    from bms_ai.sim import Phase, Scenario

    rng = np.random.default_rng(seed)
    soc0 = float(rng.uniform(0.2, 0.4))
    target = float(rng.uniform(0.7, 0.9))
    return Scenario(f"aged_{chemistry}_{int(round(soh * 100))}_{seed}", chemistry=chemistry, segments=[
        Phase("rest", duration_s=900), Phase("charge", c_rate=float(rng.uniform(0.3, 0.7)), soc_target=target),
        Phase("rest", duration_s=900), Phase("drive", "udds", repeats=1.0), Phase("rest", duration_s=900)],
        ambient_c=float(rng.uniform(15.0, 35.0)), soc0=soc0, soh=soh)


def make_aged_drives(chemistry: str, out: Path, seed: int, levels=SOH_LEVELS, log=print) -> list[Path]:
    """One aged drive per SOH level (skipped when already there); returns the drive directories."""
    from bms_ai.sim import simulate_drive, write_drive

    dirs = []
    for i, soh in enumerate(levels):
        d = Path(out) / f"aged_{chemistry}_{int(round(soh * 100))}_s{seed + i}"
        if not (d / "meta.json").exists():
            t0 = time.time()
            write_drive(simulate_drive(aged_scenario(chemistry, soh, seed + i), seed=seed + i), d, formats=("blf",))
            log(f"[soh] simulated {d.name} ({time.time() - t0:.0f} s)")
        dirs.append(d)
    return dirs


def soh_on_drive(path: Path) -> dict:
    """HealthEstimator on the decoded CAN view of one drive vs the simulator's true capacity."""
    from bms_ai.estimation.health import HealthEstimator, rest_ocv
    from bms_ai.estimation.soc import SocEstimator
    from bms_ai.sim import truth_arrays
    from bms_ai.sim.dataset import load_drive

    d = load_drive(path)
    ocv = rest_ocv(d.chemistry)
    h = HealthEstimator(d.n_cells, d.capacity_ah, ocv=ocv)
    soc_est = None
    if ocv is None:     # SOC-regression path needs a SOC measurement: the EKF (no model dependency here)
        soc_est = SocEstimator(d.n_cells, d.cell_t.shape[1], d.chemistry, d.capacity_ah, model=None, soc0=None)
    nan = np.full(d.n_cells, np.nan)
    t_h = -np.inf
    for k in range(len(d.t)):
        meas = nan if soc_est is None else soc_est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k],
                                                        d.cell_t[k]).ekf_soc
        h.update(float(d.t[k]), float(d.current[k]), d.cell_v[k], meas)
        if soc_est is not None and d.t[k] - t_h >= 10.0:
            t_h = d.t[k]
            h.estimate_capacity()
    h.flush_rest()
    o = h.output()
    true = truth_arrays(path)["cell_cap_ah"][0] / d.capacity_ah
    err = o.cell_soh - true
    return {"drive": Path(path).name, "chemistry": d.chemistry, "true_soh_mean": float(true.mean()),
            "est_soh_mean": float(o.cell_soh.mean()), "rmse": float(np.sqrt(np.mean(err ** 2))),
            "bias": float(err.mean()), "max_abs": float(np.abs(err).max()), "updates": o.capacity_updates,
            "r0_mean_ohm": o.r0, "cell_soh": o.cell_soh.tolist(), "cell_true": true.tolist()}


def evaluate_soh(chemistries, drives_dir: Path, seed: int, log=print) -> dict:
    """SOH error per drive and per chemistry on simulated aged packs (simulated when missing)."""
    rows = []
    for chem in chemistries:
        for p in make_aged_drives(chem, drives_dir, seed, log=log):
            r = soh_on_drive(p)
            rows.append(r)
            log(f"[soh] {r['drive']}: true {r['true_soh_mean']:.3f} est {r['est_soh_mean']:.3f} "
                f"rmse {r['rmse'] * 100:.2f} % ({r['updates']} updates)")
    summary = {}
    for chem in chemistries:
        e = np.concatenate([np.asarray(r["cell_soh"]) - np.asarray(r["cell_true"]) for r in rows if r["chemistry"] == chem])
        summary[chem] = {"soh_rmse": float(np.sqrt(np.mean(e ** 2))), "bias": float(e.mean()),
                         "drives": sum(r["chemistry"] == chem for r in rows)}
    return {"drives": rows, "summary": summary}


def train_rul_params(chemistry: str, seed: int, n_train: int = 300, n_cal: int = 150, n_test: int = 200,
                     obs_sigma: float = 0.01, log=print) -> tuple:
    """Fit the RUL estimator on sampled trajectories and measure it on held-out ones; (params, test set)."""
    from bms_ai.estimation.rul import RulEstimator, evaluate_rul, fit_rul, sample_trajectories

    t0 = time.time()
    train = sample_trajectories(n_train, seed, chemistry, obs_sigma=obs_sigma)
    cal = sample_trajectories(n_cal, seed + 1, chemistry, obs_sigma=obs_sigma)
    test = sample_trajectories(n_test, seed + 2, chemistry, obs_sigma=obs_sigma)
    log(f"[rul] {chemistry}: {n_train}/{n_cal}/{n_test} trajectories (seeds {seed}/{seed + 1}/{seed + 2})")
    p = fit_rul(train, cal, obs_sigma, progress=log)
    log(f"[rul] conformal lo/hi {p.conformal_lo:.2f}/{p.conformal_hi:.2f} ({time.time() - t0:.0f} s); evaluating")
    est = RulEstimator(p)
    m = evaluate_rul(est, test)
    knee = [t for t in test if t.params["knee_efc"] > 0]
    m["no_knee"] = evaluate_rul(est, [t for t in test if t.params["knee_efc"] == 0])["pooled"]
    m["knee"] = evaluate_rul(est, knee)["pooled"] if knee else {}
    p.metrics = m
    p.provenance = {"trajectories": "bms_ai.estimation.rul.sample_trajectories", "chemistry": chemistry,
                    "seeds": [seed, seed + 1, seed + 2], "n": [n_train, n_cal, n_test], "obs_sigma": obs_sigma}
    log(f"[rul] held-out: median rel err {m['pooled']['rel_err_median'] * 100:.1f} %, mean "
        f"{m['pooled']['rel_err_mean'] * 100:.1f} %, 90 % coverage {m['pooled']['coverage_90'] * 100:.1f} %")
    return p, test


def write_report(report: Path, rul: dict, soh: dict | None, examples: dict) -> None:
    """table.md + results.json + index.html with plots (matplotlib, Agg)."""
    import html

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = Path(report)
    report.mkdir(parents=True, exist_ok=True)
    lines = ["# SOH / RUL — measured", "", f"## RUL (EFC to {SOH_EOL * 100:.0f} % SOH), held-out trajectories", "",
             "| chemistry | slice | n | median rel. error | mean rel. error | 90 % coverage |", "|---|---|---|---|---|---|"]
    for chem, m in rul.items():
        for k in ("life_30", "life_50", "life_70", "pooled", "no_knee", "knee"):
            if m.get(k):
                v = m[k]
                lines.append(f"| {chem} | {k} | {v['n']} | {v['rel_err_median'] * 100:.1f} % | "
                             f"{v['rel_err_mean'] * 100:.1f} % | {v['coverage_90'] * 100:.1f} % |")
    if soh:
        lines += ["", "## SOH on simulated aged drives (decoded CAN, rests + partial charge + UDDS)", "",
                  "| drive | true SOH | est. SOH | RMSE (cells) | bias | max | updates |", "|---|---|---|---|---|---|---|"]
        for r in soh["drives"]:
            lines.append(f"| {r['drive']} | {r['true_soh_mean']:.3f} | {r['est_soh_mean']:.3f} | {r['rmse'] * 100:.2f} % | "
                         f"{r['bias'] * 100:+.2f} % | {r['max_abs'] * 100:.2f} % | {r['updates']} |")
        for chem, v in soh["summary"].items():
            lines.append(f"| **{chem} all** | | | **{v['soh_rmse'] * 100:.2f} %** | {v['bias'] * 100:+.2f} % | | |")
    (report / "table.md").write_text("\n".join(lines) + "\n")
    (report / "results.json").write_text(json.dumps({"rul": rul, "soh": soh}, indent=1) + "\n")
    imgs = []
    for chem, (est, trajs) in examples.items():
        fig, axes = plt.subplots(1, 2, figsize=(11, 4))
        for tr in trajs[:6]:
            axes[0].plot(tr.efc, tr.soh_obs, ".", ms=2, alpha=0.5)
            axes[0].plot(tr.efc, tr.soh, "-", lw=1)
        axes[0].axhline(SOH_EOL, color="k", ls="--", lw=0.8)
        axes[0].set(xlabel="EFC", ylabel="SOH", title=f"{chem}: sampled trajectories (true, observed)")
        from bms_ai.estimation.rul import observe_until
        tr = trajs[0]
        xs, med, lo, hi = [], [], [], []
        for f in np.linspace(0.15, 0.95, 17):
            e, s, _ = observe_until(tr, f)
            m_, l_, h_ = est.predict(e, s)
            xs.append(e[-1])
            med.append(m_)
            lo.append(l_)
            hi.append(h_)
        xs = np.asarray(xs)
        axes[1].plot(xs, tr.eol_efc - xs, "k-", label="true RUL")
        axes[1].plot(xs, med, "b.-", label="predicted")
        axes[1].fill_between(xs, lo, hi, alpha=0.25, label="90 % interval")
        axes[1].set(xlabel="EFC now", ylabel="RUL (EFC)", title=f"{chem}: RUL over life (one held-out trajectory)")
        axes[1].legend()
        fig.tight_layout()
        name = f"rul_{chem}.png"
        fig.savefig(report / name, dpi=90)
        plt.close(fig)
        imgs.append(name)
    if soh:
        fig, ax = plt.subplots(figsize=(5, 4))
        for r in soh["drives"]:
            ax.plot(r["cell_true"], r["cell_soh"], ".", ms=3, label=r["drive"])
        ax.plot([0.75, 1.0], [0.75, 1.0], "k--", lw=0.8)
        ax.set(xlabel="true cell SOH", ylabel="estimated cell SOH", title="SOH per cell")
        ax.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(report / "soh_cells.png", dpi=90)
        plt.close(fig)
        imgs.append("soh_cells.png")
    body = "".join(f'<img src="{i}">' for i in imgs)
    (report / "index.html").write_text(f"<html><head><meta charset='utf-8'><title>SOH/RUL</title></head><body>"
                                       f"<pre>{html.escape(chr(10).join(lines))}</pre>{body}</body></html>\n")


def train_health(task: str, chemistry: str, data, out, seed: int = 0, epochs: int = 30,
                 report: str | Path = "reports/estimation/health", log=print) -> dict:
    """soh: measure the classical SOH estimator; rul: fit + evaluate the RUL estimator (both chemistries)."""
    from bms_ai.estimation.rul import RulEstimator

    report = Path(report)

    def previous() -> dict:    # read late: the other task may have written meanwhile
        return json.loads((report / "results.json").read_text()) if (report / "results.json").exists() else {}

    examples: dict = {}
    if task == "soh":
        drives_dir = Path(data[0]) if data else Path("/tmp/bms_ai_aged")
        new = evaluate_soh([chemistry], drives_dir, seed, log=log)
        prev = previous()
        rul_m, soh_m = prev.get("rul") or {}, prev.get("soh")
        keep = [r for r in (soh_m or {}).get("drives", []) if r["chemistry"] != chemistry]
        soh_m = {"drives": keep + new["drives"],
                 "summary": {**{k: v for k, v in (soh_m or {}).get("summary", {}).items() if k != chemistry},
                             **new["summary"]}}
        entry = {"name": "soh_classical", "version": 1, "file": None, "sha256": None, "params": 0,
                 "metrics": soh_m["summary"][chemistry]}
    else:
        chems = [chemistry]
        saved = {}
        for chem in chems:
            p, test = train_rul_params(chem, seed, log=log)
            prev = previous()
            rul_m, soh_m = prev.get("rul") or {}, prev.get("soh")
            f = Path(out) / f"rul_fadelaw_{chem}_v1.json"
            f.parent.mkdir(parents=True, exist_ok=True)
            p.save(f)
            rul_m[chem] = p.metrics
            examples[chem] = (RulEstimator(p), test)
            saved[chem] = str(f)
        entry = {"name": "rul_fadelaw", "version": 1, "file": saved, "sha256": None, "params": len(p.z_prior) + 2,
                 "metrics": {c: rul_m[c]["pooled"] for c in chems}}
    if not examples:
        from bms_ai.estimation.rul import RulParams, sample_trajectories

        for chem in rul_m:
            f = Path(out) / f"rul_fadelaw_{chem}_v1.json"
            if f.exists():
                examples[chem] = (RulEstimator(RulParams.load(f)), sample_trajectories(6, seed + 2, chem))
    write_report(report, rul_m, soh_m, examples)
    log(f"[health] report: {report / 'index.html'}")
    return entry


def add_arguments(p) -> None:
    """`bms-ai train soh` / `bms-ai train rul`."""
    from bms_ai.core.cliargs import out_dir
    from bms_ai.training.cli import add_common

    add_common(p)
    p.add_argument("--report", type=out_dir, default="reports/estimation/health", help="report directory")


def run(args) -> int:
    """soh: --data is where the simulated aged drives go (reused when present); rul: --out gets the parameters."""
    if args.task == "rul" and args.data:
        raise ValueError("train rul: --data is not used (the fade law is fitted on sampled ageing trajectories)")
    if len(args.data) > 1:
        raise ValueError(f"train soh: --data takes one directory (the simulated aged drives), got {len(args.data)}")
    entry = train_health(args.task, args.chemistry, args.data, Path(args.out), seed=args.seed, report=args.report)
    print(json.dumps(entry, indent=1))
    return 0
