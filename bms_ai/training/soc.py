"""Training of the overpotential model: features -> (eta, sigma), Gaussian NLL, ONNX export, calibration.

The rows (targets eta = v - OCV_true(SOC_true), the estimator's own features)
come from ``training.rows``. The MLP predicts eta and log sigma (Gaussian
NLL); the feature normalisation and output scale are folded into the exported
ONNX graph. The error model the filter needs (``training.calibration``) is
measured on cells the model never saw (one variant left out per fold), with
the validation drives' numbers kept beside it; the classical fallback is
identified and calibrated on the same rows (``training.ecm``). One command per
chemistry; the same seed and data give a byte-identical ONNX file.
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bms_ai.estimation.features import ETA_FEATURES, FEATURE_VERSION, N_FEATURES
from bms_ai.estimation.filter import FilterParams
from bms_ai.estimation.overpotential import ErrorModel
from bms_ai.models.manifest import TensorSpec, read_manifest
from bms_ai.training.calibration import (
    CURRENT_BINS,
    TEMP_BINS,
    ResidualRun,
    calibrate_error_model,
    coverage_table,
    rmse_report,
)
from bms_ai.training.common import data_fingerprint, export_onnx, register, seed_everything
from bms_ai.training.ecm import calibrate_ecm, ecm_pairs, fit_ecm
from bms_ai.training.rows import (
    MAX_ROWS,
    SOC_NOISE,
    SOC_NOISE_CELL_SHARE,
    SOC_NOISE_TAU,
    TRAIN_CELLS,
    TRAIN_ROW_S,
    VAL_CELLS,
    VAL_ROW_S,
    DriveRows,
    add_data_arguments,
    build_rows,
    data_dirs,
    plan_data,
    stack_rows,
    variant_of,
)

HIDDEN = 64
SATURATING = {"log_rest_s"}  # clamped to the training maximum inside the graph: a longer rest is still rest
MODEL_PREFIX = "soc_eta"


# -- the model -------------------------------------------------------------------------------------
def make_module(mean: np.ndarray, std: np.ndarray, y_scale: float, clamp_hi: np.ndarray, hidden: int = HIDDEN):
    """The overpotential MLP (torch): normalisation, input clamps and output scale baked in."""
    import torch
    from torch import nn

    class EtaMLP(nn.Module):
        """Raw features in physical units -> eta [V] and sigma [V]."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("inv_std", torch.tensor(1.0 / std, dtype=torch.float32))
            self.register_buffer("hi", torch.tensor(clamp_hi, dtype=torch.float32))
            self.y_scale = float(y_scale)
            self.log_y_scale = float(math.log(y_scale))
            self.net = nn.Sequential(nn.Linear(len(mean), hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 2))

        def heads(self, x):
            """(eta [V], log sigma [V]) for training."""
            h = self.net((torch.minimum(x, self.hi) - self.mean) * self.inv_std)
            return h[:, 0:1] * self.y_scale, torch.clamp(h[:, 1:2], -8.0, 4.0) + self.log_y_scale

        def forward(self, x):
            eta, log_sigma = self.heads(x)
            return eta, torch.exp(log_sigma)

    return EtaMLP()


def folded(module):
    """The same function as few graph operations as possible (what is exported): cheaper per call.

    The normalisation goes into the first layer's weights, the output scale into
    two separate heads: min -> gemm -> tanh -> gemm -> tanh -> (gemm | gemm -> clip -> exp).
    """
    import torch
    from torch import nn

    lin1, lin2, out = module.net[0], module.net[2], module.net[4]
    log_ys = module.log_y_scale

    class EtaExport(nn.Module):
        """Raw features -> eta [V], sigma [V]."""

        def __init__(self) -> None:
            super().__init__()
            with torch.no_grad():
                self.register_buffer("hi", module.hi.clone())
                self.first = nn.Linear(lin1.in_features, lin1.out_features)
                self.first.weight.copy_(lin1.weight * module.inv_std[None, :])
                self.first.bias.copy_(lin1.bias - self.first.weight @ module.mean)
                self.second = copy.deepcopy(lin2)
                self.eta = nn.Linear(out.in_features, 1)
                self.eta.weight.copy_(out.weight[0:1] * module.y_scale)
                self.eta.bias.copy_(out.bias[0:1] * module.y_scale)
                self.sig = nn.Linear(out.in_features, 1)
                self.sig.weight.copy_(out.weight[1:2])
                self.sig.bias.copy_(out.bias[1:2] + log_ys)

        def forward(self, x):
            h = torch.tanh(self.second(torch.tanh(self.first(torch.minimum(x, self.hi)))))
            return self.eta(h), torch.exp(torch.clamp(self.sig(h), -8.0 + log_ys, 4.0 + log_ys))

    return EtaExport().eval()


def nll(eta, log_sigma, y, beta: float = 0.0):
    """Gaussian NLL per row; beta > 0 weighs rows by sigma^(2 beta) (beta-NLL: high-error rows still fit their mean)."""
    import torch

    loss = 0.5 * ((y - eta) * torch.exp(-log_sigma)) ** 2 + log_sigma
    if beta > 0:
        loss = loss * torch.exp(2.0 * beta * log_sigma).detach()
    return loss.mean()


@dataclass
class FitResult:
    """The trained module and its learning curve."""

    module: object
    best_epoch: int
    curve: list[dict]


def fit(x: np.ndarray, y: np.ndarray, xv: np.ndarray, yv: np.ndarray, seed: int, epochs: int, batch: int = 2048,
        lr: float = 2e-3, beta: float = 0.0, log=print) -> FitResult:
    """Adam + cosine schedule on the NLL; the epoch with the best validation NLL is kept."""
    import torch

    seed_everything(seed)
    hi = np.full(x.shape[1], np.inf, dtype=np.float32)
    for j, (name, _) in enumerate(ETA_FEATURES):
        if name in SATURATING:
            hi[j] = x[:, j].max()
    xc = np.minimum(x, hi)
    module = make_module(xc.mean(0), np.maximum(xc.std(0), 1e-3), float(max(y.std(), 1e-3)), hi)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    steps = epochs * math.ceil(len(x) / batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.05)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)[:, None]
    xvt, yvt = torch.from_numpy(xv), torch.from_numpy(yv)[:, None]
    g = torch.Generator().manual_seed(seed)
    best, curve = (math.inf, -1, None), []
    for ep in range(epochs):
        module.train()
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for b in range(0, len(xt), batch):
            sel = perm[b:b + batch]
            eta, ls = module.heads(xt[sel])
            loss = nll(eta, ls, yt[sel], beta)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item() * len(sel)
        module.eval()
        with torch.no_grad():
            ev, lsv = module.heads(xvt)
            v_nll = float(nll(ev, lsv, yvt))
            v_rmse = float(((ev - yvt) ** 2).mean().sqrt())
            z = float((((ev - yvt) * torch.exp(-lsv)) ** 2).mean().sqrt())
        curve.append({"epoch": ep + 1, "train_loss": tot / len(xt), "val_nll": v_nll, "val_rmse_mv": v_rmse * 1e3,
                      "val_rms_z": z})
        log(f"  epoch {ep + 1}/{epochs} train {tot / len(xt):.3f} val nll {v_nll:.3f} rmse {v_rmse * 1e3:.2f} mV "
            f"rms(z) {z:.2f}", flush=True)
        if v_nll < best[0]:
            best = (v_nll, ep + 1, copy.deepcopy(module.state_dict()))
    module.load_state_dict(best[2])
    module.eval()
    return FitResult(module, best[1], curve)


# -- evaluation of the exported file ----------------------------------------------------------------
def onnx_predict(path: Path, feats: np.ndarray, batch: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """eta, sigma for feature rows (..., F) from the exported ONNX file (what the estimator runs)."""
    from bms_ai.models.runtime import _session

    sess = _session(path)
    flat = feats.reshape(-1, feats.shape[-1]).astype(np.float32)
    eta, sig = np.empty(len(flat), np.float32), np.empty(len(flat), np.float32)
    for b in range(0, len(flat), batch):
        e, s = sess.run(["eta", "sigma"], {"features": np.ascontiguousarray(flat[b:b + batch])})
        eta[b:b + batch], sig[b:b + batch] = e[:, 0], s[:, 0]
    shape = feats.shape[:-1]
    return eta.reshape(shape).astype(np.float64), sig.reshape(shape).astype(np.float64)


def residual_runs(rows: list[DriveRows], eta_hat: list[np.ndarray], sigma: list[np.ndarray]) -> list[ResidualRun]:
    """The validation residuals eta_true - eta_hat per drive, with what the coverage is binned by."""
    out = []
    for r, e, s in zip(rows, eta_hat, sigma):
        res = r.eta - e
        keep = r.keep & np.isfinite(res).all(axis=1)
        out.append(ResidualRun(name=r.name, variant=r.variant, t=r.t, session=r.session, r=np.nan_to_num(res),
                               ref=np.maximum(s, 1e-4), temp=r.feats[:, :, 7].astype(np.float64),
                               i_c=r.feats[:, 0, 0].astype(np.float64), keep=keep,
                               soc=r.feats[:, :, 8].astype(np.float64)))
    return out


def inference_cost_us(path: Path, n_cells: int = 96, repeats: int = 1000) -> dict:
    """Single-thread onnxruntime time of one batch of n_cells [us]: median and 10th percentile.

    A rough figure (the training machine may be busy: the 10th percentile is the closer one to an idle core).
    """
    from bms_ai.models.runtime import _session

    sess = _session(path)
    x = np.zeros((n_cells, N_FEATURES), np.float32)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sess.run(["eta", "sigma"], {"features": x})
        ts.append(time.perf_counter() - t0)
    return {"median": round(float(np.median(ts)) * 1e6, 1), "p10": round(float(np.percentile(ts, 10)) * 1e6, 1)}


# -- the command ------------------------------------------------------------------------------------
def next_slot_version(out: Path, chemistry: str) -> int:
    """One above every SOC model of this chemistry in ``out``: a hot reload always sees the new one as newer."""
    entries, _ = read_manifest(out)
    return 1 + max((e.version for e in entries if e.key == ("soc", chemistry)), default=0)


@dataclass
class TrainConfig:
    """How one chemistry is trained (the seed makes it reproducible)."""

    seed: int = 0
    epochs: int = 40
    beta: float = 0.0
    max_rows: int = MAX_ROWS
    lovo: bool = True        # calibrate on variants left out of training (when there are >= 2)


def fit_rows(trn: list[DriveRows], val: list[DriveRows], cfg: TrainConfig, log) -> tuple[FitResult, np.ndarray]:
    """Stack the rows and fit; (result, training inputs)."""
    rng = np.random.default_rng(cfg.seed)
    x, y = stack_rows(trn, rng, cfg.max_rows)
    xv, yv = stack_rows(val, rng, max(cfg.max_rows // 10, 10000))
    log(f"  {len(x)} train rows, {len(xv)} val rows", flush=True)
    return fit(x, y, xv, yv, cfg.seed, cfg.epochs, beta=cfg.beta, log=log), x


def torch_predict(module, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """eta, sigma for feature rows (..., F) from the torch module (fold models are never exported)."""
    import torch

    with torch.no_grad():
        eta, sig = module(torch.from_numpy(feats.reshape(-1, feats.shape[-1]).astype(np.float32)))
    shape = feats.shape[:-1]
    return eta.numpy().reshape(shape).astype(np.float64), sig.numpy().reshape(shape).astype(np.float64)


def leave_one_variant_out(trn: list[DriveRows], val: list[DriveRows], cfg: TrainConfig,
                          log) -> list[ResidualRun]:
    """Residuals of cells the model never saw: per variant, a model trained without it predicts its drives.

    A vehicle's cells are (almost) never one of the training variants, so these
    residuals, not the validation drives of training variants, are what the
    shipped error model must cover.
    """
    runs = []
    for v in sorted({r.variant for r in trn}):
        log(f"[soc] fold without {v}", flush=True)
        res, _ = fit_rows([r for r in trn if r.variant != v], [r for r in val if r.variant != v] or val, cfg,
                          lambda *a, **k: None)
        held = [r for r in trn + val if r.variant == v]
        preds = [torch_predict(res.module, r.feats) for r in held]
        runs += residual_runs(held, [p[0] for p in preds], [p[1] for p in preds])
    return runs


def total_coverage(em: ErrorModel, runs: list[ResidualRun], noise_var: float) -> dict:
    """Coverage of a cell's whole error by an error model's sigmas (as the filter adds them up)."""
    zs, temp, cur = [], [], []
    for run in runs:
        k = run.keep
        sig_s = (em.slow_scale * run.ref[k] + em.slow_floor) ** 2 * (1.0 + em.k_cell ** 2)
        sig_f = (em.fast_scale * run.ref[k] + em.fast_floor) ** 2 * (1.0 + em.k_cell_fast ** 2)
        zs.append((run.r[k] / np.sqrt(sig_s + sig_f + noise_var)).ravel())
        temp.append(run.temp[k].ravel())
        cur.append(np.repeat(np.abs(run.i_c[k]), run.r.shape[1]))
    z, t, c = np.concatenate(zs), np.concatenate(temp), np.concatenate(cur)
    return {"all": coverage_table(z, np.zeros_like(z), (-np.inf, np.inf), "")["[-inf,inf)"],
            "by_temp": coverage_table(z, t, TEMP_BINS, "C"), "by_current": coverage_table(z, c, CURRENT_BINS, "C-rate")}


def _manifest_parts(res: FitResult, x: np.ndarray) -> tuple[dict, dict]:
    """(normalisation, domain) of the manifest entry."""
    hi = res.module.hi.numpy()
    dom_max = np.where(np.isfinite(hi), np.maximum(x.max(0), 10.0), x.max(0))  # saturating inputs: no upper limit
    norm = {"baked_into_graph": True, "folded_into_first_layer": True, "mean": res.module.mean.tolist(),
            "inv_std": res.module.inv_std.tolist(), "clamp_max": [float(v) if np.isfinite(v) else None for v in hi]}
    return norm, {"min": x.min(0).tolist(), "max": dom_max.tolist()}


def train_soc(chemistry: str, data: list[str], out: Path, cfg: TrainConfig | None = None, val: list[str] | None = None,
              val_fraction: float = 0.2, log=print) -> dict:
    """Train, export, calibrate and register the overpotential model of one chemistry; the manifest entry."""
    import onnx
    import torch

    cfg = cfg or TrainConfig()
    t_start = time.time()
    plan = plan_data(chemistry, data, val or [], cfg.seed, val_fraction)
    log(f"[soc/{chemistry}] {len(plan.train)} train / {len(plan.val)} val drives ({plan.split})", flush=True)
    trn_rows = build_rows(plan.train, cfg.seed, TRAIN_ROW_S, TRAIN_CELLS, log)
    val_rows = build_rows(plan.val, cfg.seed, VAL_ROW_S, VAL_CELLS, log)
    t_fit = time.time()
    res, x = fit_rows(trn_rows, val_rows, cfg, log)
    fit_s = time.time() - t_fit
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{MODEL_PREFIX}_{chemistry}"
    version = next_slot_version(out, chemistry)
    fname = f"{name}_v{version}.onnx"
    export_onnx(folded(res.module), (torch.zeros(4, N_FEATURES),), out / fname, ["features"], ["eta", "sigma"])
    noise_var = FilterParams().r_sensor
    # validation drives (variants seen in training), predicted by the exported file itself
    preds = [onnx_predict(out / fname, r.feats) for r in val_rows]
    seen = residual_runs(val_rows, [p[0] for p in preds], [p[1] for p in preds])
    em_seen, rep_seen = calibrate_error_model(seen, noise_var)
    metrics = {"val_eta_rmse_mv": rmse_report(seen), "val_coverage": rep_seen["coverage"],
               "val_nll": res.curve[res.best_epoch - 1]["val_nll"], "best_epoch": res.best_epoch}
    em, rep, source = em_seen, rep_seen, "validation drives (variants seen in training)"
    if cfg.lovo and len({r.variant for r in trn_rows}) > 1:
        unseen = leave_one_variant_out(trn_rows, val_rows, cfg, log)
        em, rep = calibrate_error_model(unseen, noise_var)
        source = "leave-one-variant-out (cells the model never saw)"
        metrics.update(unseen_eta_rmse_mv=rmse_report(unseen), unseen_coverage=rep["coverage"],
                       val_coverage_shipped=total_coverage(em, seen, noise_var))
    log(f"[soc/{chemistry}] error model ({source}) {json.dumps(em.to_dict())}", flush=True)
    sigma_max = float(max(2.0 * onnx_predict(out / fname, x[:: max(1, len(x) // 200000)])[1].max(), 0.05))
    ecm = fit_ecm(trn_rows, chemistry, log=log)
    ecm_params, ecm_rep = calibrate_ecm(ecm, ecm_pairs(trn_rows, val_rows, chemistry, ecm, cfg.lovo), noise_var)
    log(f"[soc/{chemistry}] ECM fallback {json.dumps(ecm_params)}", flush=True)
    metrics.update(ecm_eta_rmse_mv=ecm_rep["rmse_mv"], ecm_coverage=ecm_rep["coverage"],
                   infer_us_96_cells=inference_cost_us(out / fname), train_seconds=round(time.time() - t_start, 1),
                   fit_seconds=round(fit_s, 1))
    norm, domain = _manifest_parts(res, x)
    n_params = int(sum(p.numel() for p in res.module.parameters()))
    entry = register(
        out, name=name, version=version, file=fname, task="soc", chemistry=chemistry,
        inputs=[TensorSpec("features", ["batch", N_FEATURES], "float32", units=[u for _, u in ETA_FEATURES],
                           names=[n for n, _ in ETA_FEATURES])],
        outputs=[TensorSpec("eta", ["batch", 1], units=["V"]), TensorSpec("sigma", ["batch", 1], units=["V"])],
        feature_version=FEATURE_VERSION, normalisation=norm, domain=domain,
        provenance={"data_dirs": plan.dirs, "split": plan.split, "drives": [d.name for d in plan.train],
                    "val_drives": [d.name for d in plan.val],
                    "variants": sorted({variant_of(d) for d in plan.train}),
                    "val_variants": sorted({variant_of(d) for d in plan.val}),
                    "data_sha256": data_fingerprint(plan.paths), "seed": cfg.seed, "epochs": cfg.epochs,
                    "beta": cfg.beta, "rows": int(len(x)), "target": "v - OCV_true(SOC_true)",
                    "soc_input_noise": {"sigma": SOC_NOISE, "tau_s": SOC_NOISE_TAU, "cell_share": SOC_NOISE_CELL_SHARE},
                    "trainer": "bms_ai.training.soc", "torch": torch.__version__, "onnx": onnx.__version__},
        metrics=metrics, params=n_params,
        extra={"error_model": em.to_dict(), "error_model_source": source, "sigma_max_v": sigma_max,
               "error_model_seen": em_seen.to_dict(), "calibration": rep["correlation"],
               "calibration_bins": rep["binned"], "ecm_fallback": ecm_params,
               "ecm_calibration": ecm_rep["correlation"], "learning_curve": res.curve})
    log(f"[soc/{chemistry}] wrote {out / fname} ({n_params} params, sha256 {entry.sha256[:12]}) in "
        f"{time.time() - t_start:.0f} s", flush=True)
    return entry.to_dict()


def add_arguments(p) -> None:
    """`bms-ai train soc`."""
    add_data_arguments(p)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--max-rows", type=int, default=MAX_ROWS)
    p.add_argument("--beta", type=float, default=0.0, help="beta-NLL weight (0: plain Gaussian NLL)")


def run(args) -> int:
    """Train, export ONNX and update the manifest in --out."""
    data, val = data_dirs(args)
    try:
        cfg = TrainConfig(seed=args.seed, epochs=args.epochs, beta=args.beta, max_rows=args.max_rows,
                          lovo=not args.no_lovo)
        entry = train_soc(args.chemistry, data, Path(args.out), cfg, val=val)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"bms-ai train soc: {exc}") from None
    print(json.dumps({k: entry[k] for k in ("name", "version", "file", "sha256", "params")}, indent=1))
    print(json.dumps({k: entry["metrics"][k] for k in ("val_eta_rmse_mv", "infer_us_96_cells", "train_seconds")}))
    print(json.dumps({"error_model": entry["extra"]["error_model"], "ecm_fallback": entry["extra"]["ecm_fallback"]}))
    return 0
