"""Training of the overpotential model: features -> (eta, sigma), Gaussian NLL, ONNX export, calibration.

Target: eta = v_cell - OCV_true(SOC_true), everything the current history,
temperature, SOC and hysteresis add to the equilibrium voltage of the drive's
own cell (its true OCV curve; drives without one use the chemistry table).
Inputs: ``eta_features_table`` (the estimator's own streaming code) fed with
truth + a slowly varying SOC error of about 1 %, like the filter's. The MLP
predicts eta and log sigma (Gaussian NLL), with the feature normalisation and
output scale baked into the ONNX graph. The validation drives (a val suite, or
a seeded split by drive) then measure the error model the filter needs
(``training.calibration``) and the classical fallback is identified and
calibrated on the same rows (``training.ecm``). One command per chemistry;
the same seed and data give a byte-identical ONNX file.
"""

from __future__ import annotations

import copy
import json
import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.estimation.features import (
    DEFAULT_HYSTERESIS_RATE,
    ETA_FEATURES,
    FEATURE_VERSION,
    N_FEATURES,
    cell_sensor_map,
    eta_features_table,
)
from bms_ai.estimation.filter import FilterParams
from bms_ai.estimation.overpotential import ErrorModel
from bms_ai.estimation.soc import WARMUP_S
from bms_ai.models.manifest import TensorSpec, read_manifest
from bms_ai.sim.dataset import RecordedDrive
from bms_ai.training.calibration import (
    CURRENT_BINS,
    TEMP_BINS,
    ResidualRun,
    calibrate_error_model,
    coverage_table,
    rmse_report,
)
from bms_ai.training.common import (
    data_fingerprint,
    export_onnx,
    gauss_markov,
    load_training_drives,
    register,
    seed_everything,
    session_of,
)

HIDDEN = 64
TRAIN_ROW_S = 1.0          # one training row per cell every this many seconds
VAL_ROW_S = 1.0            # validation rows are denser: the fast error's correlation is measured on them
TRAIN_CELLS = 8            # cells per drive used (cells of one string share most inputs)
VAL_CELLS = 16
MAX_ROWS = 3_000_000
SOC_NOISE = 0.01           # the filter's SOC error the model must tolerate
SOC_NOISE_TAU = 1800.0     # ... slowly varying
SOC_NOISE_CELL_SHARE = 0.5
SATURATING = {"log_rest_s"}  # clamped to the training maximum inside the graph: a longer rest is still rest
MODEL_PREFIX = "soc_eta"


# -- targets and inputs ---------------------------------------------------------------------------
def true_ocv(d: RecordedDrive) -> OCVCurve:
    """The equilibrium OCV of the drive's own cell: its v2 curve, else the chemistry's table."""
    s, v = getattr(d, "ocv_soc", None), getattr(d, "ocv_v", None)
    if s is not None and v is not None and len(s) >= 3:
        return OCVCurve(np.asarray(s, float), np.asarray(v, float), d.chemistry)
    return load_ocv(d.chemistry)


def eta_target(d: RecordedDrive, cells: np.ndarray | None = None) -> np.ndarray:
    """eta = v - OCV_true(SOC_true) per sample and cell [V] (NaN where the voltage is missing)."""
    sl = slice(None) if cells is None else cells
    return d.cell_v[:, sl] - true_ocv(d)(np.clip(d.soc[:, sl], 0.0, 1.0))


def soc_input(t: np.ndarray, soc: np.ndarray, rng: np.random.Generator, sigma: float = SOC_NOISE,
              tau: float = SOC_NOISE_TAU, cell_share: float = SOC_NOISE_CELL_SHARE) -> np.ndarray:
    """What the filter would feed the model: truth + a slow error common to the string + a per-cell part."""
    n = soc.shape[1]
    s_common = sigma / math.sqrt(1.0 + cell_share ** 2)
    err = gauss_markov(t, (), rng, s_common, tau)[:, None] + gauss_markov(t, (n,), rng, s_common * cell_share, tau)
    return np.clip(soc + err, 0.0, 1.0)


def hysteresis_rate(chemistry: str) -> float:
    """The feature pipeline's hysteresis rate for a chemistry (as the estimator sets it up)."""
    return get_chemistry(chemistry).hysteresis_rate or DEFAULT_HYSTERESIS_RATE


def variant_of(d: RecordedDrive) -> str:
    """The cell variant a drive was recorded with (cell set, else the simulator's parameter set)."""
    m = d.meta or {}
    for k in ("cell_set", "variant"):
        if m.get(k):
            return str(m[k])
    src = str(m.get("source", "")).split()
    return src[-1] if src else "default"


def after_warmup(t: np.ndarray, session: np.ndarray, warmup_s: float = WARMUP_S) -> np.ndarray:
    """Rows at least ``warmup_s`` after their session's first sample (before, the history is assumed)."""
    start = np.r_[True, np.diff(session) != 0]
    t_start = np.maximum.accumulate(np.where(start, np.arange(len(t)), 0))
    return (t - t[t_start]) >= warmup_s


def split_drives(names: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split by drive (by sorted name: independent of the order found): (train, val) indices."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    perm = np.random.default_rng(seed).permutation(len(order))
    n_val = max(1, int(round(val_fraction * len(order)))) if len(order) > 1 else 0
    val = sorted(order[j] for j in perm[:n_val])
    return [i for i in order if i not in set(val)], val


def drive_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, drive): a drive's noise does not depend on which other drives are used."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


@dataclass
class DriveRows:
    """One drive's rows for training or validation (a strided subset of its samples and cells)."""

    name: str
    variant: str
    idx: np.ndarray          # (R,) sample indices into the drive
    cells: np.ndarray        # (n,) cell indices
    t: np.ndarray            # (R,) s
    session: np.ndarray      # (R,)
    feats: np.ndarray        # (R, n, F) float32
    eta: np.ndarray          # (R, n) target [V]
    keep: np.ndarray         # (R,) after warm-up
    full_t: np.ndarray       # (T,) the drive's own time, current [C] and sessions (the ECM runs at full rate)
    full_i_c: np.ndarray
    full_session: np.ndarray

    def valid(self) -> np.ndarray:
        """(R, n) rows usable as targets: after warm-up, finite features and target."""
        return self.keep[:, None] & np.isfinite(self.eta) & np.isfinite(self.feats).all(axis=2)


def drive_rows(d: RecordedDrive, rng: np.random.Generator, row_s: float, max_cells: int) -> DriveRows:
    """Features via the estimator's own streaming code, targets, warm-up mask; ``max_cells`` random cells."""
    n = d.n_cells
    cells = np.sort(rng.choice(n, size=min(n, max_cells), replace=False)) if n > max_cells else np.arange(n)
    session = session_of(d)
    dt = float(np.median(np.diff(d.t))) if len(d.t) > 1 else 1.0
    stride = max(1, int(round(row_s / max(dt, 1e-6))))
    # each chosen cell reads the sensor it has in the whole string
    sens = cell_sensor_map(n, d.cell_t.shape[1])[cells] if d.cell_t.shape[1] else None
    cell_t = d.cell_t[:, sens] if sens is not None else d.cell_t
    soc_in = soc_input(d.t, d.soc[:, cells], rng)
    feats = eta_features_table(d.t, d.current, cell_t, soc_in, d.capacity_ah, hysteresis_rate(d.chemistry),
                               session, stride)
    idx = np.arange(0, len(d.t), stride)
    return DriveRows(name=d.name, variant=variant_of(d), idx=idx, cells=cells, t=d.t[idx], session=session[idx],
                     feats=feats, eta=eta_target(d, cells)[idx], keep=after_warmup(d.t, session)[idx],
                     full_t=d.t, full_i_c=d.current / d.capacity_ah, full_session=session)


def stack_rows(rows: list[DriveRows], rng: np.random.Generator, max_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(X, y) over all valid rows and cells, uniformly subsampled to at most ``max_rows``."""
    xs, ys = [], []
    for r in rows:
        ok = r.valid()
        xs.append(r.feats[ok])
        ys.append(r.eta[ok].astype(np.float32))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) > max_rows:
        pick = np.sort(rng.choice(len(x), size=max_rows, replace=False))
        x, y = x[pick], y[pick]
    return x, y


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
@dataclass
class DataPlan:
    """Which drives train and which validate (never the eval suite)."""

    train: list[RecordedDrive]
    val: list[RecordedDrive]
    dirs: list[str]
    paths: list[Path]
    split: str


def plan_data(chemistry: str, data: list[str], val: list[str], seed: int, val_fraction: float) -> DataPlan:
    """Drives of one chemistry from --data (and --val, else a seeded split by drive)."""
    trn, trn_paths = load_training_drives(data, chemistry)
    if val:
        vd, v_paths = load_training_drives(val, chemistry)
        names = {d.name for d in trn}
        if any(d.name in names for d in vd):
            raise ValueError("a drive is both in --data and --val")
        plan = DataPlan(trn, vd, list(data) + list(val), trn_paths + v_paths, "val suite")
    else:
        tr, va = split_drives([d.name for d in trn], val_fraction, seed)
        plan = DataPlan([trn[i] for i in tr], [trn[i] for i in va], list(data), trn_paths,
                        f"seeded split by drive (fraction {val_fraction}, seed {seed})")
    if not plan.train or not plan.val:
        raise ValueError(f"need {chemistry} drives for training and validation under {data} {val}: found "
                         f"{len(plan.train)} / {len(plan.val)}")
    return plan


def next_slot_version(out: Path, chemistry: str) -> int:
    """One above every SOC model of this chemistry in ``out``: a hot reload always sees the new one as newer."""
    entries, _ = read_manifest(out)
    return 1 + max((e.version for e in entries if e.key == ("soc", chemistry)), default=0)


def _build(drives: list[RecordedDrive], seed: int, row_s: float, cells: int, log) -> list[DriveRows]:
    rows = []
    for d in drives:
        t0 = time.time()
        rows.append(drive_rows(d, drive_rng(seed, d.name), row_s, cells))
        log(f"  {d.name}: {len(d.t)} samples x {d.n_cells} cells -> {rows[-1].feats.shape[0]} rows x "
            f"{len(rows[-1].cells)} cells ({time.time() - t0:.1f} s)", flush=True)
    return rows


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


def _ecm_pairs(trn: list[DriveRows], val: list[DriveRows], chemistry: str, final, lovo: bool) -> list:
    """(ECM parameters, rows) to calibrate the fallback's sigmas on: fits without each variant, else val."""
    from bms_ai.training.ecm import fit_ecm

    variants = sorted({r.variant for r in trn})
    if not (lovo and len(variants) > 1):
        return [(final, r) for r in val]
    pairs = []
    for v in variants:
        p = fit_ecm([r for r in trn if r.variant != v], chemistry, log=lambda *a, **k: None)
        pairs += [(p, r) for r in trn + val if r.variant == v]
    return pairs


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

    from bms_ai.training.ecm import calibrate_ecm, fit_ecm

    cfg = cfg or TrainConfig()
    t_start = time.time()
    plan = plan_data(chemistry, data, val or [], cfg.seed, val_fraction)
    log(f"[soc/{chemistry}] {len(plan.train)} train / {len(plan.val)} val drives ({plan.split})", flush=True)
    trn_rows = _build(plan.train, cfg.seed, TRAIN_ROW_S, TRAIN_CELLS, log)
    val_rows = _build(plan.val, cfg.seed, VAL_ROW_S, VAL_CELLS, log)
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
    ecm_params, ecm_rep = calibrate_ecm(ecm, _ecm_pairs(trn_rows, val_rows, chemistry, ecm, cfg.lovo), noise_var)
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
    from bms_ai.training.cli import add_common

    add_common(p)
    p.add_argument("--val", nargs="*", default=[], help="validation drives (default: a seeded split of --data)")
    p.add_argument("--suite-root", default=None,
                   help="root of the estimation suites: --data ROOT/train/CHEM and --val ROOT/val/CHEM")
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--max-rows", type=int, default=MAX_ROWS)
    p.add_argument("--beta", type=float, default=0.0, help="beta-NLL weight (0: plain Gaussian NLL)")
    p.add_argument("--no-lovo", action="store_true",
                   help="calibrate on the validation drives only (no leave-one-variant-out folds)")


def data_dirs(args) -> tuple[list[str], list[str]]:
    """(--data, --val) with --suite-root filled in; a one-line error when neither names any drives."""
    data, val = list(args.data), list(args.val)
    if args.suite_root and not data:
        data = [str(Path(args.suite_root) / "train" / args.chemistry)]
        val = val or [str(Path(args.suite_root) / "val" / args.chemistry)]
    if not data:
        raise SystemExit("bms-ai train: give --data DIR... (and optionally --val DIR...) or --suite-root ROOT")
    return data, val


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
