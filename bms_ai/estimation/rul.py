"""RUL (equivalent full cycles to the 80 % SOH end of life) from field SOH history, with a 90 % interval.

Aging trajectories (``sample_trajectories``) follow documented empirical laws, sampled with cell-to-cell
and usage variation from a fixed seed (docs/estimation.md, "SOH / RUL" section, has the citations):

- cycle fade  ``a_cyc * EFC**z``  (z ~ 0.5: SEI-limited, Schmalstieg 2014 NMC; 0.55: Wang 2011 LFP)
  with an Arrhenius temperature factor (Ea 31.5 kJ/mol, Wang 2011) and a C-rate factor;
- calendar fade ``b_cal * days**0.75`` (Schmalstieg 2014), days = EFC / (EFC per day of that user);
- a knee in a fraction of cells (lithium plating / LAM onset, Attia 2022): extra ``c * (EFC - EFC_knee)**2``;
- resistance growth linear in throughput plus calendar ``days**0.75`` (Schmalstieg 2014).

Observed SOH = true SOH + estimator noise (sigma ``obs_sigma``) every ``obs_every`` EFC, i.e. what the
field SOH estimator (partial charges) delivers.

Estimator (``RulEstimator``): Bayesian fit of ``SOH = 1 - A * EFC**z`` on a z grid (A profiled in closed
form, Gaussian noise, prior over z learned from training trajectories), posterior predictive of the EOL
crossing -> median RUL and 5/95 % quantiles, widened by a split-conformal factor fitted on calibration
trajectories (so the 90 % interval is calibrated on trajectories the fit never saw).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.estimation.status import SOH_EOL

Z_GRID = np.round(np.arange(0.35, 1.21, 0.05), 3)
KNEE_FRACS = (0.5, 0.7, 0.85)
R_GAS = 8.314
N_SAMPLES = 48


@dataclass
class Trajectory:
    """One sampled aging history: true and observed SOH, resistance growth, true end of life."""

    efc: np.ndarray          # observation points (EFC)
    soh: np.ndarray          # true capacity SOH at efc
    soh_obs: np.ndarray      # field estimate (noisy)
    r_rel: np.ndarray        # R0 / R0(new)
    eol_efc: float           # true EFC where SOH crosses EOL
    params: dict = field(default_factory=dict)


def _soh_law(efc: np.ndarray, p: dict) -> np.ndarray:
    days = efc / p["efc_per_day"]
    loss = p["a_cyc"] * efc ** p["z"] + p["b_cal"] * days ** 0.75
    if p["knee_efc"] > 0:
        loss = loss + p["c_knee"] * np.clip(efc - p["knee_efc"], 0, None) ** 2
    return 1.0 - loss


def sample_trajectories(n: int, seed: int, chemistry: str = "nmc", obs_sigma: float = 0.01,
                        obs_every: float = 10.0, max_efc: float = 6000.0) -> list[Trajectory]:
    """n aged cells/packs with cell-to-cell and usage variation; same seed -> same trajectories."""
    rng = np.random.default_rng(seed)
    out: list[Trajectory] = []
    base = {"nmc": (1.8e-3, 0.5), "lfp": (1.2e-3, 0.55)}[chemistry]
    while len(out) < n:
        temp_c = rng.uniform(10.0, 40.0)
        c_rate = rng.uniform(0.3, 2.0)
        arr = math.exp(-31500.0 / R_GAS * (1.0 / (273.15 + temp_c) - 1.0 / 298.15))
        p = {"temp_c": temp_c, "c_rate": c_rate, "efc_per_day": rng.uniform(0.3, 2.0),
             "z": float(np.clip(rng.normal(base[1], 0.05), 0.4, 0.7)),
             "a_cyc": base[0] * arr * (1.0 + 0.3 * (c_rate - 1.0)) * rng.lognormal(0.0, 0.15),
             "b_cal": 4.0e-4 * arr * rng.lognormal(0.0, 0.2),
             "knee_efc": 0.0, "c_knee": 0.0, "r_cyc": 1.0e-4 * arr * rng.lognormal(0.0, 0.2)}
        if rng.random() < 0.3:
            p["knee_efc"] = rng.uniform(400.0, 2000.0)
            p["c_knee"] = 10 ** rng.uniform(-7.3, -6.3)
        grid = np.arange(0.0, max_efc + 1e-9, 1.0)
        s = _soh_law(grid, p)
        below = np.nonzero(s <= SOH_EOL)[0]
        if below.size == 0 or below[0] < 5 * obs_every:
            continue
        i = below[0]
        eol = float(grid[i - 1] + (s[i - 1] - SOH_EOL) / (s[i - 1] - s[i]))
        efc = np.arange(obs_every, eol * 1.02, obs_every)
        soh = _soh_law(efc, p)
        days = efc / p["efc_per_day"]
        r_rel = 1.0 + p["r_cyc"] * efc + 2.0e-3 * arr * days ** 0.75
        out.append(Trajectory(efc, soh, soh + rng.normal(0.0, obs_sigma, efc.size), r_rel, eol, p))
    return out


@dataclass
class RulParams:
    """Fitted RUL estimator parameters (z prior, conformal factors), saved as JSON next to the models."""

    obs_sigma: float = 0.01
    z_prior: list[float] = field(default_factory=lambda: [1.0 / len(Z_GRID)] * len(Z_GRID))
    conformal_lo: float = 1.0        # split-conformal widening of the lower / upper half of the interval
    conformal_hi: float = 1.0
    min_points: int = 5
    knee_penalty: float = 10.0       # Occam factor against the knee term (prior odds no-knee : knee)
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """Write as sorted JSON (diff-friendly)."""
        Path(path).write_text(json.dumps(asdict(self), indent=1, sort_keys=True) + "\n")

    @classmethod
    def load(cls, path: Path) -> RulParams:
        """Read a saved parameter file; unknown keys are ignored."""
        d = json.loads(Path(path).read_text())
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class RulEstimator:
    """Posterior over the fade-law exponent; RUL quantiles from the posterior mixture."""

    def __init__(self, params: RulParams | None = None) -> None:
        self.p = params or RulParams()
        self.log_prior = np.log(np.maximum(np.asarray(self.p.z_prior, dtype=np.float64), 1e-12))

    def _posterior(self, efc: np.ndarray, soh: np.ndarray):
        """Per (z, knee onset): least squares of loss = A*EFC**z + C*(EFC - knee)_+**2, C >= 0.

        Knee onsets are tried at fixed fractions of the history (none = pure power law); each model's
        evidence (Laplace, flat prior on A, C) weights its predictive samples.
        """
        y = 1.0 - soh
        s2 = self.p.obs_sigma ** 2
        x = efc / 1000.0
        now = float(x.max())
        models, mean, cov, logw = [], [], [], []
        for k, z in enumerate(Z_GRID):
            for kf in (None,) + KNEE_FRACS:
                xk = None if kf is None else kf * now
                basis = np.column_stack([x ** z, np.zeros_like(x) if xk is None else np.clip(x - xk, 0, None) ** 2])
                a = float(basis[:, 0] @ y / (basis[:, 0] @ basis[:, 0]))
                b = np.array([a, 0.0])
                post_cov = np.array([[s2 / (basis[:, 0] @ basis[:, 0]), 0.0], [0.0, 0.0]])
                logdet = float(np.log(post_cov[0, 0]))
                if xk is not None:
                    gram = basis.T @ basis
                    if np.linalg.det(gram) <= 1e-18 * gram[0, 0] * max(gram[1, 1], 1e-30):
                        continue
                    bb = np.linalg.solve(gram, basis.T @ y)
                    if bb[1] <= 0 or bb[0] <= 0:
                        continue
                    b, post_cov = bb, s2 * np.linalg.inv(gram)
                    logdet = float(np.linalg.slogdet(post_cov)[1]) - 2.0 * np.log(self.p.knee_penalty * len(KNEE_FRACS))
                sse = float(np.sum((y - basis @ b) ** 2))
                models.append((float(z), xk))
                mean.append(b)
                cov.append(post_cov)
                logw.append(self.log_prior[k] - 0.5 * sse / s2 + 0.5 * logdet)
        lw = np.asarray(logw)
        w = np.exp(lw - lw.max())
        return models, w / w.sum(), np.asarray(mean), np.asarray(cov)

    def predict(self, efc_hist, soh_hist) -> tuple[float, float, float]:
        """(rul, lo_90, hi_90) in EFC from the current (last) EFC; NaN if too little history."""
        efc = np.asarray(efc_hist, dtype=np.float64)
        soh = np.asarray(soh_hist, dtype=np.float64)
        ok = np.isfinite(efc) & np.isfinite(soh) & (efc > 0)
        efc, soh = efc[ok], soh[ok]
        if efc.size < self.p.min_points or np.ptp(efc) <= 0:
            return float("nan"), float("nan"), float("nan")
        now = float(efc.max())
        models, w, mean, cov = self._posterior(efc, soh)
        rng = np.random.default_rng(0)                               # deterministic predictive samples
        eps = rng.standard_normal((N_SAMPLES, 2))
        xg = (now + np.geomspace(1.0, 5.0e4, 300)) / 1000.0         # future EFC grid
        ruls, wts = [], []
        for k in np.nonzero(w > 1e-4 * w.max())[0]:
            z, xk = models[k]
            chol = np.linalg.cholesky(cov[k] + np.eye(2) * 1e-18)
            ab = mean[k] + eps @ chol.T
            ab[:, 0] = np.maximum(ab[:, 0], 1e-9)
            ab[:, 1] = np.maximum(ab[:, 1], 0.0)
            knee = np.zeros_like(xg) if xk is None else np.clip(xg - xk, 0, None) ** 2
            loss = ab[:, :1] * xg[None, :] ** z + ab[:, 1:] * knee[None, :]
            hit = loss >= 1.0 - SOH_EOL
            first = np.where(hit.any(axis=1), hit.argmax(axis=1), len(xg) - 1)
            ruls.append(xg[first] * 1000.0 - now)
            wts.append(np.full(N_SAMPLES, w[k] / N_SAMPLES))
        rul = np.maximum(np.concatenate(ruls), 1.0)
        ww = np.concatenate(wts)
        order = np.argsort(rul)
        cdf = np.cumsum(ww[order])
        cdf /= cdf[-1]
        lr = np.log(rul[order])

        def q(p: float) -> float:
            return float(np.interp(p, cdf, lr))

        med, lo, hi = q(0.5), q(0.05), q(0.95)
        return (float(np.exp(med)), float(np.exp(med - self.p.conformal_lo * (med - lo))),
                float(np.exp(med + self.p.conformal_hi * (hi - med))))


def observe_until(tr: Trajectory, frac: float) -> tuple[np.ndarray, np.ndarray, float]:
    """History seen when a fraction ``frac`` of the life has passed, and the true RUL then."""
    n = int(np.searchsorted(tr.efc, frac * tr.eol_efc, side="right"))
    now = tr.efc[max(n - 1, 0)]
    return tr.efc[:n], tr.soh_obs[:n], float(tr.eol_efc - now)


def fit_rul(train: list[Trajectory], calib: list[Trajectory], obs_sigma: float,
            fracs=(0.3, 0.5, 0.7), progress=None) -> RulParams:
    """z prior from full training trajectories (smoothed histogram of best z); conformal scale from calib."""
    counts = np.full(len(Z_GRID), 0.5)
    flat = RulEstimator(RulParams(obs_sigma=obs_sigma))
    for i, tr in enumerate(train):
        models, w, _, _ = flat._posterior(tr.efc, tr.soh_obs)
        for (z, _), wi in zip(models, w):
            counts[int(np.argmin(np.abs(Z_GRID - z)))] += wi
        if progress and (i + 1) % max(len(train) // 5, 1) == 0:
            progress(f"rul prior {i + 1}/{len(train)}")
    prior = counts / counts.sum()
    p = RulParams(obs_sigma=obs_sigma, z_prior=prior.tolist())
    est = RulEstimator(p)
    s_lo, s_hi = [], []
    for tr in calib:
        for f in fracs:
            e, s, true = observe_until(tr, f)
            med, lo, hi = est.predict(e, s)
            if not math.isfinite(med):
                continue
            lt, lm = math.log(max(true, 1.0)), math.log(med)
            s_lo.append(max(lm - lt, 0.0) / max(lm - math.log(lo), 1e-6))
            s_hi.append(max(lt - lm, 0.0) / max(math.log(hi) - lm, 1e-6))
    # each tail gets 5 %: one-sided conformal quantiles (knees make the lower tail much heavier)
    p.conformal_lo, p.conformal_hi = _conformal_q(s_lo, 0.95), _conformal_q(s_hi, 0.95)
    return p


def _conformal_q(scores: list[float], level: float) -> float:
    if not scores:
        return 1.0
    v = sorted(scores)
    k = min(int(math.ceil((len(v) + 1) * level)) - 1, len(v) - 1)
    return float(v[k])


def evaluate_rul(est: RulEstimator, test: list[Trajectory], fracs=(0.3, 0.5, 0.7)) -> dict:
    """Relative RUL error and 90 % interval coverage per life fraction (and pooled)."""
    res: dict = {}
    pooled_err, pooled_cov = [], []
    for f in fracs:
        err, cov, width = [], [], []
        for tr in test:
            e, s, true = observe_until(tr, f)
            med, lo, hi = est.predict(e, s)
            if not math.isfinite(med):
                continue
            err.append(abs(med - true) / true)
            cov.append(lo <= true <= hi)
            width.append((hi - lo) / true)
        res[f"life_{int(f * 100)}"] = {"n": len(err), "rel_err_mean": float(np.mean(err)),
                                       "rel_err_median": float(np.median(err)),
                                       "coverage_90": float(np.mean(cov)), "rel_width_median": float(np.median(width))}
        pooled_err += err
        pooled_cov += cov
    res["pooled"] = {"n": len(pooled_err), "rel_err_mean": float(np.mean(pooled_err)),
                     "rel_err_median": float(np.median(pooled_err)), "coverage_90": float(np.mean(pooled_cov))}
    return res


def load_rul_estimator(model_dir: str | Path, chemistry: str) -> tuple[RulEstimator, str]:
    """RUL estimator from ``<model_dir>/rul_fadelaw_<chem>_v1.json``; defaults (flat prior) when missing/bad.

    Never raises (runs inside the node); the second value says what was loaded.
    """
    f = Path(model_dir) / f"rul_fadelaw_{chemistry}_v1.json"
    try:
        p = RulParams.load(f)
        if len(p.z_prior) != len(Z_GRID):
            raise ValueError(f"z prior has {len(p.z_prior)} entries, expected {len(Z_GRID)}")
        return RulEstimator(p), f.name
    except (OSError, ValueError, TypeError, KeyError) as exc:
        return RulEstimator(), f"defaults ({type(exc).__name__}: {exc})"
