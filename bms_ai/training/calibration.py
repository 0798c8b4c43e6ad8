"""Calibration of an overpotential model's error on validation drives: how far the filter may trust it.

The filter (``estimation.filter``) models a cell's overpotential error as
    r_i = sig_slow_i (e + k_cell d_i) + sig_fast_i (f + k_cell_fast g_i) + sensor noise,
with e, d_i unit Gauss-Markov processes of correlation time ``tau_model`` (e
common to the string, d_i per cell) and f, g_i likewise with ``tau_fast``. This
module measures those numbers from residuals r = eta_true - eta_hat:
- the correlation times from the pooled autocorrelation of r / ref (ref: the
  model's own sigma), fitted by a fast plus a slow exponential;
- each process's variance in bins of ref from the lagged covariance of r
  (lags > 0, so white sensor noise stays out) with those two times fixed; a
  white excess beyond the sensor noise counts as fast error; then
  sigma = scale * ref + floor per process;
- k_cell / k_cell_fast from the same decomposition of the string mean and
  the cells' deviations from it.
No low-pass split is needed for the numbers (a split always leaks one process
into the other); the slow/fast parts of a zero-phase split are only used to
report coverage, against the variance each part should hold
(``passed_fraction``). Coverage of the 1- and 2-sigma bands is reported per
temperature and current bin, so a reader sees where the sigmas are honest.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bms_ai.estimation.overpotential import ErrorModel
from bms_ai.training.common import constant_rate_runs, smooth

TEMP_BINS = (-np.inf, 0.0, 10.0, 20.0, 30.0, 40.0, np.inf)      # degC
CURRENT_BINS = (0.0, 0.05, 0.5, 1.0, 2.0, np.inf)               # |I| in C
SOC_BINS = (-np.inf, 0.1, 0.2, 0.8, 0.9, np.inf)
ACF_LAGS_S = np.array([0.5, 1, 2, 3, 5, 7, 10, 15, 20, 30, 45, 60, 90, 120, 180, 300, 450, 600, 900, 1200,
                       1800, 2700, 3600, 5400, 7200])
TAU_FAST_GRID = np.geomspace(1.0, 300.0, 25)
TAU_SLOW_GRID = np.geomspace(60.0, 4 * 3600.0, 25)
SPLIT_CANDIDATES = (10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
K_RANGE = (0.05, 2.0)
MIN_FLOOR_V = 2e-4


def nnls2(design: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float]:
    """Non-negative least squares with two columns: (coefficients, residual norm)."""
    best = None
    cands = [np.linalg.lstsq(design, y, rcond=None)[0]]
    for j in range(2):
        col = design[:, j]
        cj = max(float(col @ y) / max(float(col @ col), 1e-300), 0.0)
        cands.append(np.array([cj, 0.0]) if j == 0 else np.array([0.0, cj]))
    for c in cands:
        if (c < 0).any():
            continue
        res = float(np.linalg.norm(design @ c - y))
        if best is None or res < best[1]:
            best = (c, res)
    return best


def passed_fraction(tau_lp: float, dt: float, tau: float) -> float:
    """Share of a Gauss-Markov process's variance (correlation time tau; 0: white) that ``smooth`` keeps.

    ``smooth`` is a first-order filter run forward and backward at period dt:
    impulse response h(m) = c a^|m|, c = (1 - a)/(1 + a), whose autocorrelation
    is c^2 a^|m| (2/(1 - a^2) + |m| - 1); summed against b^|m| (b = exp(-dt/tau)).
    """
    a = float(np.exp(-dt / tau_lp))
    q = a * (float(np.exp(-dt / tau)) if tau > 0 else 0.0)
    c = (1.0 - a) / (1.0 + a)
    a1 = 2.0 / (1.0 - a * a) - 1.0
    return float(c * c * (a1 + 2.0 * (a1 * q / (1.0 - q) + q / (1.0 - q) ** 2)))


@dataclass
class ResidualRun:
    """One validation drive's residuals on its (uniformly strided) time grid."""

    name: str
    variant: str
    t: np.ndarray            # (T,) s
    session: np.ndarray      # (T,) int
    r: np.ndarray            # (T, n) eta_true - eta_hat [V]
    ref: np.ndarray          # (T, n) reference sigma [V] (the model's own sigma)
    temp: np.ndarray         # (T, n) degC (the feature the model saw)
    i_c: np.ndarray          # (T,) present current [C]
    keep: np.ndarray         # (T,) rows that count (after the warm-up of each session)
    soc: np.ndarray | None = None    # (T, n) the SOC the model saw (for the error tables)
    slow: np.ndarray | None = None
    fast: np.ndarray | None = None


@dataclass
class Correlation:
    """Correlation times, the slow/fast split and the cell shares measured from the residuals."""

    tau_fast: float
    tau_model: float
    amp_fast: float          # share of the normalised variance in each process (the rest is white)
    amp_slow: float
    tau_split: float
    dt: float                # row period the split ran at
    passed: tuple[float, float, float]   # share of the slow / fast / white variance in the slow part
    k_cell: float = 0.5
    k_cell_fast: float = 0.5
    lags_s: list[float] = field(default_factory=list)
    acf: list[float] = field(default_factory=list)

    def report(self) -> dict:
        """Rounded numbers for the manifest."""
        return {k: ([round(float(x), 4) for x in v] if isinstance(v, (list, tuple)) else round(float(v), 4))
                for k, v in self.__dict__.items()}


def uniform_segments(t: np.ndarray, session: np.ndarray) -> tuple[float, list[slice]]:
    """The dominant sample period and the stretches sampled at it (no restarts inside)."""
    runs = [(a, b, dt) for a, b, dt, restart in constant_rate_runs(t, session, max_gap=np.inf) if not restart]
    if not runs:
        return 0.0, []
    dts = np.array([dt for _, _, dt in runs])
    lens = np.array([b - a for a, b, _ in runs])
    vals, inv = np.unique(dts, return_inverse=True)
    dt0 = float(vals[np.argmax(np.bincount(inv, weights=lens))])
    # a run [a, b) continues the sample before it (a - 1): include that one
    return dt0, [slice(a - 1, b) for a, b, dt in runs if dt == dt0]


@dataclass
class Series:
    """Values to correlate over time (T, n), the rows that count, and optionally a key to bin them by."""

    t: np.ndarray
    session: np.ndarray
    values: np.ndarray
    keep: np.ndarray
    key: np.ndarray | None = None       # (T, n): the bin of a product is its first sample's key
    noise: np.ndarray | None = None     # (T, n): sensor noise variance in the units of values


@dataclass
class LagMoments:
    """Mean lagged products per key bin: cov[b, j] = mean v_t v_(t+lag_j) (lag 0 first)."""

    lags_s: np.ndarray
    cov: np.ndarray
    count: np.ndarray        # products at lag 0 per bin
    key_mean: np.ndarray
    noise_mean: np.ndarray
    dt: float


def _bins(key: np.ndarray | None, edges: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    if edges is None or key is None:
        return np.zeros(shape, dtype=np.int64)
    return np.clip(np.searchsorted(edges, key, side="right") - 1, 0, len(edges) - 2)


def lag_moments(items: list[Series], lags_s: np.ndarray = ACF_LAGS_S, edges: np.ndarray | None = None) -> LagMoments:
    """Lagged second moments pooled over series, cells and uniform stretches (no mean removed: a bias counts)."""
    lags = np.r_[0.0, np.asarray(lags_s, dtype=np.float64)]
    nb = 1 if edges is None else len(edges) - 1
    tot, cnt = np.zeros((nb, len(lags))), np.zeros((nb, len(lags)))
    ksum, nsum, dts = np.zeros(nb), np.zeros(nb), []
    for it in items:
        dt, segs = uniform_segments(it.t, it.session)
        if dt <= 0:
            continue
        dts.append(dt)
        v = np.where(it.keep[:, None], it.values, np.nan)
        b = _bins(it.key, edges, v.shape)
        key = it.key if it.key is not None else np.zeros(v.shape)
        noise = it.noise if it.noise is not None else np.zeros(v.shape)
        for sl in segs:
            vs, bs = v[sl], b[sl]
            ok0 = np.isfinite(vs)
            ksum += np.bincount(bs[ok0], key[sl][ok0], nb)
            nsum += np.bincount(bs[ok0], noise[sl][ok0], nb)
            for j, lag in enumerate(lags):
                m = int(round(lag / dt))
                if (m < 1 and lag > 0) or m >= len(vs):
                    continue
                # long lags: every step-th pair (neighbouring pairs carry the same information)
                step = max(1, m // 8)
                prod = vs[:len(vs) - m:step] * vs[m::step]
                ok = np.isfinite(prod)
                bb = bs[:len(vs) - m:step][ok]
                tot[:, j] += np.bincount(bb, prod[ok], nb)
                cnt[:, j] += np.bincount(bb, None, nb)
    if not cnt[:, 0].any():
        raise ValueError("no residual samples to correlate")
    with np.errstate(invalid="ignore", divide="ignore"):
        return LagMoments(lags, tot / cnt, cnt[:, 0], ksum / cnt[:, 0], nsum / cnt[:, 0],
                          float(np.median(dts)) if dts else 0.0)


def fit_two_scales(lags: np.ndarray, rho: np.ndarray, fast_grid: np.ndarray = TAU_FAST_GRID,
                   slow_grid: np.ndarray = TAU_SLOW_GRID) -> tuple[float, float, float, float]:
    """rho(L) ~ a_f exp(-L/tau_f) + a_s exp(-L/tau_s) (lags > 0; a nugget of white noise left out).

    Returns (tau_f, tau_s, a_f, a_s) by non-negative least squares over a grid of time pairs.
    """
    best = None
    for tf in fast_grid:
        for ts in slow_grid:
            if ts <= 2.0 * tf:
                continue
            design = np.column_stack([np.exp(-lags / tf), np.exp(-lags / ts)])
            amps, res = nnls2(design, rho)
            if best is None or res < best[0]:
                best = (res, float(tf), float(ts), float(amps[0]), float(amps[1]))
    if best is None:
        raise ValueError("empty time grids")
    return best[1], best[2], best[3], best[4]


def decompose(mom: LagMoments, tau_f: float, tau_s: float) -> tuple[np.ndarray, np.ndarray]:
    """(slow, fast) process variance per bin: lagged covariance ~ S exp(-L/tau_s) + F exp(-L/tau_f).

    Variance at lag 0 beyond S + F + the sensor noise is error too short to
    resolve at this row period: it counts as fast (the conservative side).
    """
    slow, fast = np.zeros(len(mom.cov)), np.zeros(len(mom.cov))
    for b, row in enumerate(mom.cov):
        ok = np.isfinite(row) & (mom.lags_s > 0)
        if not np.isfinite(row[0]) or ok.sum() < 2:
            continue
        lags = mom.lags_s[ok]
        (fast[b], slow[b]), _ = nnls2(np.column_stack([np.exp(-lags / tau_f), np.exp(-lags / tau_s)]), row[ok])
        fast[b] += max(row[0] - slow[b] - fast[b] - mom.noise_mean[b], 0.0)
    return slow, fast


def quantile_edges(key: np.ndarray, n_bins: int = 12, min_count: int = 200) -> np.ndarray:
    """Bin edges with about equal counts (open at both ends)."""
    key = key[np.isfinite(key)]
    n_bins = max(1, min(n_bins, len(key) // min_count))
    e = np.unique(np.quantile(key, np.linspace(0.0, 1.0, n_bins + 1)))
    return np.r_[-np.inf, e[1:-1], np.inf] if len(e) > 2 else np.array([-np.inf, np.inf])


def cell_shares(runs: list[ResidualRun], tau_f: float, tau_s: float, noise_var: float) -> tuple[float, float]:
    """(k_cell, k_cell_fast): each process = sigma (e + k d_i), e common to the string, d_i per cell.

    With n cells the string mean carries sigma^2 (1 + k^2/n) and the deviations
    sigma^2 k^2 (1 - 1/n); both are decomposed into the two processes.
    """
    sig2, k2s = np.zeros(2), np.zeros(2)
    for n in sorted({run.r.shape[1] for run in runs if run.r.shape[1] > 1}):
        common, dev, rows = [], [], 0
        for run in (r for r in runs if r.r.shape[1] == n):
            z = run.r / run.ref
            m = z.mean(axis=1, keepdims=True)
            nz = noise_var / run.ref ** 2      # sensor noise is independent per cell
            common.append(Series(run.t, run.session, m, run.keep, noise=nz.mean(axis=1, keepdims=True) / n))
            dev.append(Series(run.t, run.session, z - m, run.keep, noise=nz * (1.0 - 1.0 / n)))
            rows += int(run.keep.sum())
        (s_c,), (f_c,) = decompose(lag_moments(common), tau_f, tau_s)
        (s_d,), (f_d,) = decompose(lag_moments(dev), tau_f, tau_s)
        for j, (c, d) in enumerate(((s_c, s_d), (f_c, f_d))):
            kk = d / (1.0 - 1.0 / n)
            sig2[j] += max(c - kk / n, 1e-12) * rows
            k2s[j] += kk * rows
    if not sig2.any():
        return 0.5, 0.5  # no drive with several cells: a neutral share
    k = np.clip(np.sqrt(k2s / np.maximum(sig2, 1e-300)), *K_RANGE)
    return float(k[0]), float(k[1])


def correlation(runs: list[ResidualRun], noise_var: float) -> Correlation:
    """Correlation times, cell shares, and the slow/fast split of every run for the coverage report."""
    mom = lag_moments([Series(run.t, run.session, run.r / run.ref, run.keep) for run in runs])
    rho = mom.cov[0] / mom.cov[0, 0]
    ok = np.isfinite(rho) & (mom.lags_s > 0)
    tf, ts, af, a_s = fit_two_scales(mom.lags_s[ok], rho[ok])
    mid = float(np.sqrt(tf * ts))
    split = min(SPLIT_CANDIDATES, key=lambda c: abs(np.log(c / mid)))
    for run in runs:
        run.slow = smooth(run.t, run.r, split, run.session)
        run.fast = run.r - run.slow
    dt = mom.dt
    passed = (passed_fraction(split, dt, ts), passed_fraction(split, dt, tf), passed_fraction(split, dt, 0.0))
    k, kf = cell_shares(runs, tf, ts, noise_var)
    return Correlation(tau_fast=tf, tau_model=ts, amp_fast=af, amp_slow=a_s, tau_split=split, dt=dt, passed=passed,
                       k_cell=k, k_cell_fast=kf, lags_s=[float(x) for x in mom.lags_s[ok]],
                       acf=[float(x) for x in rho[ok]])


def fit_scale_floor(x: np.ndarray, sd: np.ndarray, cnt: np.ndarray, min_floor: float = MIN_FLOOR_V) -> tuple[float, float]:
    """(scale, floor) >= 0 with sd ~ scale * x + floor (weighted by bin counts)."""
    ok = np.isfinite(x) & np.isfinite(sd) & (cnt > 0)
    if not ok.any():
        raise ValueError("no residual samples to calibrate on")
    w = np.sqrt(cnt[ok])
    (scale, floor), _ = nnls2(np.column_stack([x[ok], np.ones(ok.sum())]) * w[:, None], sd[ok] * w)
    return float(scale), float(max(floor, min_floor))


def fit_processes(items: list[Series], tau_f: float, tau_s: float,
                  n_bins: int = 12) -> tuple[tuple[float, float], tuple[float, float], dict]:
    """(scale, floor) of the slow and of the fast process's sigma against the items' key, and the binned table."""
    keys = np.concatenate([it.key[it.keep].ravel() for it in items])
    mom = lag_moments(items, edges=quantile_edges(keys, n_bins))
    slow, fast = decompose(mom, tau_f, tau_s)
    table = {"key": mom.key_mean.round(5).tolist(), "sigma_slow": np.sqrt(slow).round(5).tolist(),
             "sigma_fast": np.sqrt(fast).round(5).tolist(), "n": mom.count.astype(int).tolist()}
    return (fit_scale_floor(mom.key_mean, np.sqrt(slow), mom.count),
            fit_scale_floor(mom.key_mean, np.sqrt(fast), mom.count), table)


def _bin_labels(edges: tuple[float, ...], unit: str) -> list[str]:
    return [f"[{a:g},{b:g}){unit}" for a, b in zip(edges[:-1], edges[1:])]


def coverage_table(z: np.ndarray, key: np.ndarray, edges: tuple[float, ...], unit: str) -> dict:
    """Per bin of ``key``: samples, share of |z| <= 1 and <= 2 (Gaussian: 0.683 / 0.954) and RMS of z."""
    out = {}
    idx = np.digitize(key, edges[1:-1])
    for j, lab in enumerate(_bin_labels(edges, unit)):
        zz = z[(idx == j) & np.isfinite(z)]
        if len(zz):
            a = np.abs(zz)
            out[lab] = {"n": int(len(zz)), "cover1": round(float(np.mean(a <= 1.0)), 4),
                        "cover2": round(float(np.mean(a <= 2.0)), 4), "rms_z": round(float(np.sqrt(np.mean(zz ** 2))), 3)}
    return out


def coverage_report(runs: list[ResidualRun], var_slow: list[np.ndarray], var_fast: list[np.ndarray],
                    noise_var: float, passed: tuple[float, float, float]) -> dict:
    """1/2-sigma coverage of the slow part, the fast part and the total error per cell, by temperature and current.

    ``var_slow``/``var_fast``: per run, each cell's total variance of that
    process (common and per-cell shares together); a split part is compared
    with the variance it should hold (``passed`` shares of each process).
    """
    p_s, p_f, p_w = passed
    zs, zf, zt, temp, cur = [], [], [], [], []
    for run, vs, vf in zip(runs, var_slow, var_fast):
        k = run.keep
        zs.append((run.slow[k] / np.sqrt(p_s * vs[k] + p_f * vf[k] + p_w * noise_var)).ravel())
        zf.append((run.fast[k] / np.sqrt((1 - p_s) * vs[k] + (1 - p_f) * vf[k] + (1 - p_w) * noise_var)).ravel())
        zt.append((run.r[k] / np.sqrt(vs[k] + vf[k] + noise_var)).ravel())
        temp.append(run.temp[k].ravel())
        cur.append(np.repeat(np.abs(run.i_c[k]), run.r.shape[1]))
    temp_all, cur_all = np.concatenate(temp), np.concatenate(cur)
    rep = {}
    for name, parts in (("total", zt), ("slow", zs), ("fast", zf)):
        zz = np.concatenate(parts)
        rep[name] = {"all": coverage_table(zz, np.zeros_like(zz), (-np.inf, np.inf), "")["[-inf,inf)"],
                     "by_temp": coverage_table(zz, temp_all, TEMP_BINS, "C"),
                     "by_current": coverage_table(zz, cur_all, CURRENT_BINS, "C-rate")}
    return rep


def calibrate_error_model(runs: list[ResidualRun], noise_var: float) -> tuple[ErrorModel, dict]:
    """The ErrorModel of a model whose own sigma is ``run.ref``, with its correlation and coverage report."""
    corr = correlation(runs, noise_var)
    items = [Series(run.t, run.session, run.r, run.keep, run.ref, np.full(run.r.shape, noise_var)) for run in runs]
    (a_s, b_s), (a_f, b_f), table = fit_processes(items, corr.tau_fast, corr.tau_model)
    # the filter's sig_slow is the common process's sigma: a cell's total is sig_slow * sqrt(1 + k^2)
    ks, kf = np.sqrt(1.0 + corr.k_cell ** 2), np.sqrt(1.0 + corr.k_cell_fast ** 2)
    em = ErrorModel(slow_scale=a_s / ks, slow_floor=b_s / ks, fast_scale=a_f / kf, fast_floor=b_f / kf,
                    tau_model=corr.tau_model, tau_fast=corr.tau_fast, k_cell=corr.k_cell, k_cell_fast=corr.k_cell_fast)
    var_slow = [(a_s * run.ref + b_s) ** 2 for run in runs]
    var_fast = [(a_f * run.ref + b_f) ** 2 for run in runs]
    return em, {"correlation": corr.report(), "binned": table,
                "coverage": coverage_report(runs, var_slow, var_fast, noise_var, corr.passed)}


def _rms_mv(x: np.ndarray) -> float:
    return round(float(np.sqrt(np.mean(x ** 2))) * 1e3, 3)


def rmse_report(runs: list[ResidualRun]) -> dict:
    """Residual RMS [mV] overall and per temperature, SOC, current bin and variant (rows after warm-up)."""
    res = np.concatenate([run.r[run.keep].ravel() for run in runs])
    keys = {"by_temp": (np.concatenate([run.temp[run.keep].ravel() for run in runs]), TEMP_BINS, "C"),
            "by_current": (np.concatenate([np.repeat(np.abs(run.i_c[run.keep]), run.r.shape[1]) for run in runs]),
                           CURRENT_BINS, "C-rate")}
    if all(run.soc is not None for run in runs):
        keys["by_soc"] = (np.concatenate([run.soc[run.keep].ravel() for run in runs]), SOC_BINS, "")
    out: dict = {"all": _rms_mv(res)}
    for name, (key, edges, unit) in keys.items():
        idx = np.digitize(key, edges[1:-1])
        out[name] = {lab: _rms_mv(res[idx == j]) for j, lab in enumerate(_bin_labels(edges, unit)) if (idx == j).any()}
    out["by_variant"] = {v: _rms_mv(np.concatenate([run.r[run.keep].ravel() for run in runs if run.variant == v]))
                         for v in sorted({run.variant for run in runs})}
    return out
