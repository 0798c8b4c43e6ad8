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

from bms_ai.core.cliargs import positive_int, unit_float
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
SIGMA_HIDDEN = 16       # the sigma network (out-of-fold errors) is small: it learns a magnitude
SATURATING = {"log_rest_s"}  # clamped to the training maximum inside the graph: a longer rest is still rest
MODEL_PREFIX = "soc_eta"


# -- the model -------------------------------------------------------------------------------------
def make_module(mean: np.ndarray, std: np.ndarray, y_scale: float, clamp_hi: np.ndarray, hidden: int = HIDDEN,
                sigma_only: bool = False):
    """An MLP (torch) with normalisation, input clamps and output scale baked in.

    Two outputs (eta and log sigma), or with ``sigma_only`` one (log sigma of a zero-mean error).
    """
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
            self.sigma_only = sigma_only
            self.net = nn.Sequential(nn.Linear(len(mean), hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                     nn.Linear(hidden, 1 if sigma_only else 2))

        def heads(self, x):
            """(eta [V], log sigma [V]) for training."""
            h = self.net((torch.minimum(x, self.hi) - self.mean) * self.inv_std)
            ls = torch.clamp(h[:, -1:], -8.0, 4.0) + self.log_y_scale
            return (torch.zeros_like(ls) if self.sigma_only else h[:, 0:1] * self.y_scale), ls

        def forward(self, x):
            eta, log_sigma = self.heads(x)
            return eta, torch.exp(log_sigma)

    return EtaMLP()


def _folded_trunk(module):
    """(first, second) Linear layers of a module with its normalisation folded into the first."""
    import torch
    from torch import nn

    lin1 = module.net[0]
    first = nn.Linear(lin1.in_features, lin1.out_features)
    with torch.no_grad():
        first.weight.copy_(lin1.weight * module.inv_std[None, :])
        first.bias.copy_(lin1.bias - first.weight @ module.mean)
    return first, copy.deepcopy(module.net[2])


def folded(module, sigma_module=None):
    """The same function as few graph operations as possible (what is exported): cheaper per call.

    The normalisation goes into the first layer's weights, the output scale into
    the heads: min -> gemm -> tanh -> gemm -> tanh -> (gemm | gemm -> clip -> exp).
    With ``sigma_module`` sigma comes from that network instead of the eta network's own head.
    """
    import torch
    from torch import nn

    sig_src = sigma_module if sigma_module is not None else module
    out, sig_out = module.net[4], sig_src.net[4]

    class EtaExport(nn.Module):
        """Raw features -> eta [V], sigma [V]."""

        def __init__(self) -> None:
            super().__init__()
            with torch.no_grad():
                self.register_buffer("hi", torch.minimum(module.hi, sig_src.hi))
                self.first, self.second = _folded_trunk(module)
                self.eta = nn.Linear(out.in_features, 1)
                self.eta.weight.copy_(out.weight[0:1] * module.y_scale)
                self.eta.bias.copy_(out.bias[0:1] * module.y_scale)
                self.sig = nn.Linear(sig_out.in_features, 1)
                self.sig.weight.copy_(sig_out.weight[-1:])
                self.sig.bias.copy_(sig_out.bias[-1:] + sig_src.log_y_scale)
                self.separate = sigma_module is not None
                if self.separate:
                    self.sig_first, self.sig_second = _folded_trunk(sigma_module)
            self.lo_ls, self.hi_ls = -8.0 + sig_src.log_y_scale, 4.0 + sig_src.log_y_scale

        def forward(self, x):
            xc = torch.minimum(x, self.hi)
            h = torch.tanh(self.second(torch.tanh(self.first(xc))))
            hs = torch.tanh(self.sig_second(torch.tanh(self.sig_first(xc)))) if self.separate else h
            return self.eta(h), torch.exp(torch.clamp(self.sig(hs), self.lo_ls, self.hi_ls))

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
        lr: float = 2e-3, beta: float = 0.0, hidden: int = HIDDEN, sigma_only: bool = False, weight_decay: float = 0.0,
        log=print) -> FitResult:
    """Adam + one-cycle schedule on the NLL; the epoch with the best validation NLL is kept.

    ``sigma_only``: y is a zero-mean error and only its sigma is learned.
    """
    import torch

    seed_everything(seed)
    hi = np.full(x.shape[1], np.inf, dtype=np.float32)
    for j, (name, _) in enumerate(ETA_FEATURES):
        if name in SATURATING:
            hi[j] = x[:, j].max()
    xc = np.minimum(x, hi)
    y_scale = float(max(np.sqrt(np.mean(y ** 2)) if sigma_only else y.std(), 1e-3))
    module = make_module(xc.mean(0), np.maximum(xc.std(0), 1e-3), y_scale, hi, hidden, sigma_only)
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
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


def residual_runs(rows: list[DriveRows], residuals: list[np.ndarray], sigma: list[np.ndarray]) -> list[ResidualRun]:
    """Residuals eta_true - eta_hat per drive with the model's sigma and what the tables are binned by."""
    out = []
    for r, res, s in zip(rows, residuals, sigma):
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
    lovo: bool = True        # sigma and its calibration from variants left out of training (when there are >= 2)
    weight_decay: float = 0.0
    hidden: int = HIDDEN


def fit_rows(trn: list[DriveRows], val: list[DriveRows], cfg: TrainConfig, log, target: str = "eta",
             sigma_only: bool = False, hidden: int | None = None) -> tuple[FitResult, np.ndarray]:
    """Stack the rows (``target``: eta, or the out-of-fold error r_oof) and fit; (result, training inputs)."""
    rng = np.random.default_rng(cfg.seed)
    x, y = stack_rows(trn, rng, cfg.max_rows, target)
    xv, yv = stack_rows(val, rng, max(cfg.max_rows // 10, 10000), target)
    log(f"  {len(x)} train rows, {len(xv)} val rows", flush=True)
    return fit(x, y, xv, yv, cfg.seed, cfg.epochs, beta=cfg.beta, hidden=hidden or cfg.hidden, sigma_only=sigma_only,
               weight_decay=cfg.weight_decay, log=log), x


def torch_predict(module, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """eta, sigma for feature rows (..., F) from the torch module (fold models are never exported)."""
    import torch

    with torch.no_grad():
        eta, sig = module(torch.from_numpy(feats.reshape(-1, feats.shape[-1]).astype(np.float32)))
    shape = feats.shape[:-1]
    return eta.numpy().reshape(shape).astype(np.float64), sig.numpy().reshape(shape).astype(np.float64)


def out_of_fold(trn: list[DriveRows], val: list[DriveRows], cfg: TrainConfig, log) -> dict[str, int]:
    """Set ``r_oof`` on every drive: its eta error under a model trained without its cell variant.

    A vehicle's cells are (almost) never one of the training variants, so these
    errors, not those on validation drives of training variants, are what the
    shipped sigma must cover. Returns each fold's best epoch.
    """
    best = {}
    for v in sorted({r.variant for r in trn}):
        log(f"[soc] fold without {v}", flush=True)
        res, _ = fit_rows([r for r in trn if r.variant != v], [r for r in val if r.variant != v] or val, cfg,
                          lambda *a, **k: None)
        for r in (r for r in trn + val if r.variant == v):
            r.r_oof = r.eta - torch_predict(res.module, r.feats)[0]
        best[v] = res.best_epoch
    return best


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


def _calibrate(path: Path, trn: list[DriveRows], val: list[DriveRows], lovo: bool, noise_var: float) -> dict:
    """Error models of the exported file: on unseen-variant errors (shipped) and on the validation drives.

    The shipped one is calibrated on the validation drives' out-of-fold errors,
    which the sigma network was not fitted to (it only stopped early on them).
    """
    preds = [onnx_predict(path, r.feats) for r in val]
    seen = residual_runs(val, [r.eta - p[0] for r, p in zip(val, preds)], [p[1] for p in preds])
    em_seen, rep_seen = calibrate_error_model(seen, noise_var)
    out = {"em": em_seen, "rep": rep_seen, "em_seen": em_seen,
           "source": "validation drives (variants seen in training)",
           "metrics": {"val_eta_rmse_mv": rmse_report(seen), "val_coverage": rep_seen["coverage"]}}
    if not lovo:
        return out
    unseen = residual_runs(val, [r.r_oof for r in val], [p[1] for p in preds])
    em, rep = calibrate_error_model(unseen, noise_var)
    trn_sig = [onnx_predict(path, r.feats)[1] for r in trn]
    unseen_trn = residual_runs(trn, [r.r_oof for r in trn], trn_sig)
    out.update(em=em, rep=rep, source="validation drives, out-of-fold (a model that never saw their cell variant)")
    out["metrics"].update(unseen_eta_rmse_mv=rmse_report(unseen), unseen_coverage=rep["coverage"],
                          unseen_train_eta_rmse_mv=rmse_report(unseen_trn),
                          unseen_train_coverage=total_coverage(em, unseen_trn, noise_var),
                          val_coverage_shipped=total_coverage(em, seen, noise_var))
    return out


def train_soc(chemistry: str, data: list[str], out: Path, cfg: TrainConfig | None = None, val: list[str] | None = None,
              val_fraction: float = 0.2, log=print) -> dict:
    """Train, export, calibrate and register the overpotential model of one chemistry; the manifest entry."""
    import torch

    cfg = cfg or TrainConfig()
    t_start = time.time()
    plan = plan_data(chemistry, data, val or [], cfg.seed, val_fraction)
    log(f"[soc/{chemistry}] {len(plan.train)} train / {len(plan.val)} val drives ({plan.split})", flush=True)
    trn_rows = build_rows(plan.train, cfg.seed, TRAIN_ROW_S, TRAIN_CELLS, log)
    val_rows = build_rows(plan.val, cfg.seed, VAL_ROW_S, VAL_CELLS, log)
    t_fit = time.time()
    res, x = fit_rows(trn_rows, val_rows, cfg, log)
    lovo = cfg.lovo and len({r.variant for r in trn_rows}) > 1
    sig_res, folds = None, {}
    if lovo:
        folds = out_of_fold(trn_rows, val_rows, cfg, log)
        log(f"[soc/{chemistry}] sigma network on the out-of-fold errors", flush=True)
        sig_res, _ = fit_rows(trn_rows, val_rows, cfg, log, "r_oof", sigma_only=True, hidden=SIGMA_HIDDEN)
    fit_s = time.time() - t_fit
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"{MODEL_PREFIX}_{chemistry}"
    version = next_slot_version(out, chemistry)
    fname = f"{name}_v{version}.onnx"
    model = folded(res.module, sig_res.module if sig_res else None)
    export_onnx(model, (torch.zeros(4, N_FEATURES),), out / fname, ["features"], ["eta", "sigma"])
    noise_var = FilterParams().r_sensor
    cal = _calibrate(out / fname, trn_rows, val_rows, lovo, noise_var)
    log(f"[soc/{chemistry}] error model ({cal['source']}) {json.dumps(cal['em'].to_dict())}", flush=True)
    sigma_max = float(max(2.0 * onnx_predict(out / fname, x[:: max(1, len(x) // 200000)])[1].max(), 0.05))
    ecm = fit_ecm(trn_rows, chemistry, log=log)
    ecm_params, ecm_rep = calibrate_ecm(ecm, ecm_pairs(trn_rows, val_rows, chemistry, ecm, cfg.lovo), noise_var)
    log(f"[soc/{chemistry}] ECM fallback {json.dumps(ecm_params)}", flush=True)
    metrics = dict(cal["metrics"], val_nll=res.curve[res.best_epoch - 1]["val_nll"], best_epoch=res.best_epoch,
                   fold_best_epochs=folds, ecm_eta_rmse_mv=ecm_rep["rmse_mv"], ecm_coverage=ecm_rep["coverage"],
                   infer_us_96_cells=inference_cost_us(out / fname), train_seconds=round(time.time() - t_start, 1),
                   fit_seconds=round(fit_s, 1))
    extra = {"error_model": cal["em"].to_dict(), "error_model_source": cal["source"], "sigma_max_v": sigma_max,
             "error_model_seen": cal["em_seen"].to_dict(), "calibration": cal["rep"]["correlation"],
             "calibration_bins": cal["rep"]["binned"], "ecm_fallback": ecm_params,
             "ecm_calibration": ecm_rep["correlation"], "learning_curve": res.curve,
             "sigma_network": ({"hidden": SIGMA_HIDDEN, "target": "out-of-fold eta error", "best_epoch": sig_res.best_epoch}
                               if sig_res else None)}
    entry = _register(out, fname, name, version, chemistry, model, res, x, plan, cfg, metrics, extra)
    log(f"[soc/{chemistry}] wrote {out / fname} ({entry.params} params, sha256 {entry.sha256[:12]}) in "
        f"{time.time() - t_start:.0f} s", flush=True)
    return entry.to_dict()


def _register(out: Path, fname: str, name: str, version: int, chemistry: str, model, res: FitResult, x: np.ndarray,
              plan, cfg: TrainConfig, metrics: dict, extra: dict):
    """The manifest entry of an exported model."""
    import onnx
    import torch

    norm, domain = _manifest_parts(res, x)
    return register(
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
        metrics=metrics, params=int(sum(p.numel() for p in model.parameters())), extra=extra)


def add_arguments(p) -> None:
    """`bms-ai train soc`."""
    add_data_arguments(p)
    p.add_argument("--epochs", type=positive_int, default=40)
    p.add_argument("--max-rows", type=positive_int, default=MAX_ROWS)
    p.add_argument("--beta", type=unit_float, default=0.0, help="beta-NLL weight (0: plain Gaussian NLL)")


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
