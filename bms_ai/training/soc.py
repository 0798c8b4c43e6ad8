"""Per-cell SOC model: MLP over the shared features -> (SOC, sigma), Gaussian NLL, ONNX export."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from bms_ai.estimation.features import FEATURE_VERSION, N_SOC_FEATURES, SOC_FEATURES, soc_features_table
from bms_ai.models.manifest import TensorSpec
from bms_ai.sim.dataset import RecordedDrive, find_drives, load_drive
from bms_ai.training.common import data_fingerprint, export_onnx, next_version, register, seed_everything

HIDDEN = 64


def build_dataset(drives: list[RecordedDrive], stride: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """(features, true SOC) rows over all cells of the drives, after the 60 s EMA warm-up."""
    feats, socs = [], []
    for d in drives:
        f = soc_features_table(d.t, d.current, d.cell_v, d.cell_t, d.capacity_ah)
        # skip the first 60 s: EMAs start from an assumed steady state
        k0 = int(np.searchsorted(d.t, d.t[0] + 60.0))
        f, y = f[k0::stride], d.soc[k0::stride]
        feats.append(f.reshape(-1, N_SOC_FEATURES))
        socs.append(y.reshape(-1))
    x, y = np.concatenate(feats), np.concatenate(socs)
    ok = np.isfinite(x).all(axis=1) & np.isfinite(y)
    return x[ok].astype(np.float32), y[ok].astype(np.float32)


def make_module(mean: np.ndarray, std: np.ndarray, hidden: int = HIDDEN):
    """The SOC MLP (torch) with the feature normalisation baked in."""
    import torch
    from torch import nn

    class SocMLP(nn.Module):
        """Normalisation is baked in, so the ONNX input is the raw feature vector in physical units."""

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.tensor(std, dtype=torch.float32))
            self.net = nn.Sequential(nn.Linear(N_SOC_FEATURES, hidden), nn.Tanh(), nn.Linear(hidden, hidden),
                                     nn.Tanh(), nn.Linear(hidden, 2))

        def forward(self, x):
            h = self.net((x - self.mean) / self.std)
            soc = torch.sigmoid(h[:, 0:1])
            sigma = nn.functional.softplus(h[:, 1:2]) + 1e-3
            return soc, sigma

    return SocMLP()


def train_soc(chemistry: str, data: list[str | Path], out: Path, seed: int = 0, epochs: int = 30,
              val_fraction: float = 0.2, max_drives: int | None = None, log=print) -> dict:
    """Train, calibrate sigma, export ONNX and register it in ``out``; returns the manifest entry."""
    import torch

    seed_everything(seed)
    paths = [p for p in find_drives(data)]
    drives = [d for d in (load_drive(p) for p in paths) if d.chemistry == chemistry]
    if max_drives:
        drives = drives[:max_drives]
    if len(drives) < 2:
        raise ValueError(f"need >= 2 {chemistry} drives under {data}, found {len(drives)}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(drives))
    n_val = max(1, int(round(val_fraction * len(drives))))
    val = [drives[i] for i in order[:n_val]]
    trn = [drives[i] for i in order[n_val:]]
    t0 = time.time()
    feats_trn, soc_trn = build_dataset(trn)
    feats_val, soc_val = build_dataset(val, stride=10)
    from bms_ai.estimation.ecm_fit import fit_ecm

    ecm = fit_ecm(trn, chemistry)
    log(f"[soc/{chemistry}] EKF baseline ECM identified on the same drives: {ecm}")
    log(f"[soc/{chemistry}] {len(trn)} train drives ({len(feats_trn)} samples), {len(val)} val drives "
        f"({len(feats_val)} samples); features {time.time() - t0:.1f}s")
    mean, std = feats_trn.mean(0), feats_trn.std(0) + 1e-6
    model = make_module(mean, std)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    xt, yt = torch.from_numpy(feats_trn), torch.from_numpy(soc_trn)[:, None]
    xv, yv = torch.from_numpy(feats_val), torch.from_numpy(soc_val)[:, None]
    g = torch.Generator().manual_seed(seed)
    bs = 1024
    for ep in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=g)
        tot = 0.0
        for b in range(0, len(xt), bs):
            idx = perm[b:b + bs]
            soc, sig = model(xt[idx])
            err = soc - yt[idx]
            mse = (err ** 2).mean()
            nll = (0.5 * (err / sig) ** 2 + torch.log(sig)).mean()
            loss = mse * 100 + (nll if ep >= 2 else 0.0)   # mean first, then calibrate sigma
            opt.zero_grad()
            loss.backward()
            opt.step()
            tot += float(mse) * len(idx)
        sched.step()
        model.eval()
        with torch.no_grad():
            sv, sgv = model(xv)
            rmse_v = float(((sv - yv) ** 2).mean().sqrt())
            cover = float(((sv - yv).abs() <= 1.645 * sgv).float().mean())
        log(f"[soc/{chemistry}] epoch {ep + 1}/{epochs} train rmse {np.sqrt(tot / len(xt)) * 100:.2f}% "
            f"val rmse {rmse_v * 100:.2f}% sigma-90%-cover {cover:.2f}")
    with torch.no_grad():
        sv, sgv = model(xv)
        ratio = ((sv - yv).abs() / sgv).numpy().ravel()
    sigma_scale = float(max(np.quantile(ratio, 0.9) / 1.645, 1.0))
    log(f"[soc/{chemistry}] sigma calibration factor (90 % coverage on validation): {sigma_scale:.2f}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = f"soc_cell_{chemistry}"
    version = next_version(out, name)
    fname = f"{name}_v{version}.onnx"
    export_onnx(model, (torch.zeros(4, N_SOC_FEATURES),), out / fname, ["features"], ["soc", "sigma"])
    entry = register(
        out, name=name, version=version, file=fname, task="soc", chemistry=chemistry,
        inputs=[TensorSpec("features", ["batch", N_SOC_FEATURES], "float32",
                           units=[u for _, u in SOC_FEATURES], names=[n for n, _ in SOC_FEATURES])],
        outputs=[TensorSpec("soc", ["batch", 1], units=["1"]), TensorSpec("sigma", ["batch", 1], units=["1"])],
        feature_version=FEATURE_VERSION,
        normalisation={"baked_into_graph": True, "mean": mean.tolist(), "std": std.tolist()},
        domain={"min": feats_trn.min(0).tolist(), "max": feats_trn.max(0).tolist()},
        provenance={"drives": [d.name for d in trn], "val_drives": [d.name for d in val],
                    "data_sha256": data_fingerprint([Path(p) for p in paths]),
                    "source": sorted({str(d.meta.get("source", "")) for d in drives}), "seed": seed,
                    "epochs": epochs, "trainer": "bms_ai.training.soc", "torch": torch.__version__},
        metrics={"val_rmse_nn_only": rmse_v, "val_sigma_cover_90": cover},
        params=int(n_params), extra={"sigma_scale": sigma_scale, "ecm": {k: getattr(ecm, k) for k in ("capacity_ah", "r0", "r1", "tau", "r_v")}})
    log(f"[soc/{chemistry}] wrote {out / fname} ({n_params} params, sha256 {entry.sha256[:12]})")
    return entry.to_dict()


def add_arguments(p) -> None:
    """`bms-ai train soc`."""
    from bms_ai.training.cli import add_common

    add_common(p, data_required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--max-drives", type=int, default=None)


def run(args) -> int:
    """Train, export ONNX and update the manifest in --out."""
    import json

    entry = train_soc(args.chemistry, args.data, Path(args.out), seed=args.seed, epochs=args.epochs,
                      max_drives=args.max_drives)
    print(json.dumps({k: entry[k] for k in ("name", "version", "file", "sha256", "params", "metrics")}, indent=1))
    return 0
