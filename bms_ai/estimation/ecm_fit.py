"""Identify the EKF baselines' ECM on drives with SOC truth, and tune their noise on validation drives.

The comparison with the learned estimator is only fair when the classical filter
is identified on the same training drives and tuned on the same validation drives:

- ``fit_ecm_table``: R0 and R1 as tables over (temperature x SOC), tau per temperature
  knot, and (chemistries with OCV hysteresis) the one-state hysteresis amplitude and
  rate, by linear least squares on the residual V - OCV(true SOC). Linear interpolation
  weights make every table entry a linear coefficient (the filter interpolates the same
  way); the time constants and the hysteresis rate are chosen on grids (coordinate
  descent), a light ridge pulls entries without data to the one-value fit.
- ``tune_noise``: the process / measurement noise by grid search on RMSE, every
  candidate as extra columns of one batched filter (one pass over the drives).
- ``fit_ecm``: the one-value ECM (R0, R1, tau) still stored in SOC model manifests.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.estimation.ekf import EcmEKF, ECMParams, EcmTable, hat_weights
from bms_ai.sim.dataset import RecordedDrive

TEMP_KNOTS = (-10.0, 0.0, 10.0, 25.0, 40.0)
SOC_KNOTS = (0.1, 0.5, 0.9)
TAUS = (10.0, 20.0, 40.0, 80.0, 160.0)
KAPPAS = (10.0, 25.0, 50.0, 100.0)
# noise grid: SOC random walk (1/s) x measurement variance as a multiple of the fit's residual variance
# x initial SOC sigma
Q_SOC_GRID = (1e-10, 1e-9, 1e-8)
R_V_FACTORS = (1.0, 10.0, 100.0, 1000.0)     # the fit's residual is strongly correlated: up to 1000 x
SIGMA0_GRID = (0.05, 0.2)                    # SOC sigma at a stored start
WRONG_START = 0.3
RIDGE = 0.1                 # pull of every table entry towards the one-value fit (relative to the data weight)


def _first_order(y0: float, a: float, b: float, x: np.ndarray) -> np.ndarray:
    """y_k = a y_k-1 + b x_k from y_-1 = y0, in chunks short enough (a^-L <= 1e6) for the closed form."""
    if a < 1e-12:
        return b * x
    out = np.empty(len(x))
    n = int(min(max(13.8 / -np.log(a), 1.0), 4096.0)) if a < 1.0 else 4096
    for s in range(0, len(x), n):
        xs = x[s:s + n]
        ap = a ** np.arange(1, len(xs) + 1)
        out[s:s + len(xs)] = ap * (y0 + b * np.cumsum(xs / ap))
        y0 = out[s + len(xs) - 1]
    return out


def rc_filter(t: np.ndarray, i: np.ndarray, tau: float) -> np.ndarray:
    """f_k = a f_k-1 + (1 - a) i_k, a = exp(-dt/tau): the RC branch current, vectorised per steady-rate run.

    ``i_k`` is the current over (t_k-1, t_k], the convention of the EKF's prediction.
    Runs of (nearly, within 20 %) equal time steps share one coefficient; a gap
    (a park) starts a new run with the branch relaxed by its own exp(-gap/tau).
    """
    t = np.asarray(t, dtype=np.float64)
    i = np.asarray(i, dtype=np.float64)
    out = np.zeros_like(i)
    if i.size < 2:
        return out
    dt = np.diff(t)
    brk = np.flatnonzero(np.abs(dt[1:] - dt[:-1]) > 0.2 * np.maximum(dt[:-1], 1e-9)) + 1
    starts = np.concatenate([[0], brk])
    ends = np.concatenate([brk, [dt.size]])
    for s, e in zip(starts, ends):     # transitions s..e-1 produce out[s+1..e]
        a = float(np.exp(-np.mean(dt[s:e]) / tau))
        out[s + 1:e + 1] = _first_order(out[s], a, 1.0 - a, i[s + 1:e + 1])
    return out


def hysteresis_state(t: np.ndarray, i: np.ndarray, capacity_ah: float, kappa: float) -> np.ndarray:
    """The one-state hysteresis h in [-1, 1] (towards +1 charging) driven by the current, h0 = 0."""
    dt = np.diff(np.asarray(t, dtype=np.float64), prepend=t[0])
    i = np.nan_to_num(np.asarray(i, dtype=np.float64))
    ah = np.exp(-kappa * np.abs(i) * dt / (3600.0 * capacity_ah)).tolist()
    sg = np.sign(i).tolist()
    out = np.empty(len(ah))
    h = 0.0
    for k, (a, s) in enumerate(zip(ah, sg)):
        h = a * h + (1.0 - a) * s
        out[k] = h
    return out


@dataclass
class _Rows:
    """Training rows of all drives (one per cell and strided sample)."""

    y: np.ndarray            # V - OCV(true SOC)
    i: np.ndarray            # current scaled to the reference capacity (A at capacity_ref)
    f: dict[float, np.ndarray]   # RC-filtered scaled current per tau
    h: dict[float, np.ndarray]   # hysteresis state per kappa
    wt: np.ndarray           # (N, nT) temperature weights
    ws: np.ndarray           # (N, nS) SOC weights


def _drive_rows(d, ocv: OCVCurve, cap_ref: float, stride: int, taus, kappas) -> list[tuple]:
    """Per cell of one drive: (y, i, {tau: f}, {kappa: h}, temp, soc) on the strided samples with usable truth."""
    cur = d.current_true if getattr(d, "current_true", None) is not None else d.current
    cur = np.nan_to_num(np.asarray(cur, dtype=np.float64))
    scale = cap_ref / d.capacity_ah
    t = d.t
    m = len(t) // stride * stride
    # the RC filter is fed the mean current over each strided interval (a 10 Hz pulse train is not aliased)
    ts = t[:m:stride]
    i_blk = np.concatenate([cur[:1], cur[1:m - stride + 1].reshape(-1, stride).mean(axis=1)]) * scale
    f = {tau: rc_filter(ts, i_blk, tau) for tau in taus}
    h = {k: hysteresis_state(t, cur, d.capacity_ah, k)[:m:stride] for k in kappas}
    idx = np.arange(0, m, stride)
    n_t = d.cell_t.shape[1]
    out = []
    for c in range(d.n_cells):
        soc = d.soc[idx, c]
        temp = d.cell_t[idx, (c * n_t) // d.n_cells]
        y = d.cell_v[idx, c] - ocv(np.clip(soc, 0.0, 1.0))
        ok = np.isfinite(y) & np.isfinite(temp) & (soc > 0.05) & (soc < 0.95)
        out.append((y[ok], cur[idx][ok] * scale, {k: v[ok] for k, v in f.items()},
                    {k: v[ok] for k, v in h.items()}, temp[ok], soc[ok]))
    return out


def _gather(drives, ocv, cap_ref, stride, taus, kappas, temp_knots, soc_knots) -> _Rows:
    parts = [r for d in drives for r in _drive_rows(d, ocv, cap_ref, stride, taus, kappas)]
    if not parts or sum(p[0].size for p in parts) < 100:
        raise ValueError("ECM identification needs drives with SOC truth (>= 100 usable samples)")
    cat = np.concatenate
    temp, soc = cat([p[4] for p in parts]), cat([p[5] for p in parts])
    return _Rows(y=cat([p[0] for p in parts]), i=cat([p[1] for p in parts]),
                 f={k: cat([p[2][k] for p in parts]) for k in taus},
                 h={k: cat([p[3][k] for p in parts]) for k in kappas},
                 wt=hat_weights(np.asarray(temp_knots), temp), ws=hat_weights(np.asarray(soc_knots), soc))


class _Normal:
    """Normal equations of every candidate design at once.

    All columns any candidate can use (R0 entries x I; R1 entries x f_tau for every tau;
    h for every kappa) are stacked once and their Gram matrix computed once; a candidate
    (one tau per temperature knot, one kappa) is a selection of rows and columns, so the
    grid search costs no further passes over the data.
    """

    def __init__(self, rows: _Rows, taus, kappas) -> None:
        n = rows.y.size
        w = (rows.wt[:, :, None] * rows.ws[:, None, :]).reshape(n, -1)
        self.n_ts, self.n_s = w.shape[1], rows.ws.shape[1]
        self.taus, self.kappas = list(taus), list(kappas)
        z = np.hstack([w * rows.i[:, None]] + [w * rows.f[tau][:, None] for tau in self.taus]
                      + [rows.h[k][:, None] for k in self.kappas])
        self.g = np.einsum("ni,nj->ij", z, z)        # no BLAS threads: the evaluation runs beside other jobs
        self.zy = np.einsum("ni,n->i", z, rows.y)
        self.yy = float(rows.y @ rows.y)
        self.n = n

    def columns(self, taus_per_t: list[float], kappa: float | None) -> np.ndarray:
        """Stacked-column indices of one design: R0 entries, R1 entries (tau of their temperature knot), h."""
        r1 = [self.n_ts * (1 + self.taus.index(taus_per_t[j // self.n_s])) + j for j in range(self.n_ts)]
        h = [self.n_ts * (1 + len(self.taus)) + self.kappas.index(kappa)] if kappa is not None else []
        return np.array(list(range(self.n_ts)) + r1 + h)

    def solve(self, cols: np.ndarray, prior: np.ndarray, ridge: float = RIDGE) -> tuple[np.ndarray, float]:
        """Ridge towards ``prior`` (entries without data take it); coefficients and the plain SSE."""
        g = self.g[np.ix_(cols, cols)]
        zy = self.zy[cols]
        lam = ridge * max(float(np.mean(np.diag(g))), 1e-12)
        coef = np.linalg.solve(g + lam * np.eye(cols.size), zy + lam * prior)
        return coef, self.yy - 2.0 * float(coef @ zy) + float(coef @ g @ coef)


def fit_ecm_table(drives: list, chemistry: str, ocv: OCVCurve | None = None, temp_knots=TEMP_KNOTS,
                  soc_knots=SOC_KNOTS, taus=TAUS, kappas=KAPPAS, stride: int = 10) -> EcmTable:
    """R0/R1 tables, tau per temperature and (hysteresis chemistries) M, kappa from drives with SOC truth."""
    ocv = ocv or load_ocv(chemistry)
    cap_ref = float(np.median([d.capacity_ah for d in drives]))
    kappas = tuple(kappas) if get_chemistry(chemistry).hysteresis_gap_v > 0 else ()
    rows = _gather(drives, ocv, cap_ref, stride, taus, kappas, temp_knots, soc_knots)
    # one-value fit first: the best global tau (and kappa), and the prior every table entry is pulled to
    _, tau0, kappa, c0 = _best_one_value(_Normal(_one_knot(rows), taus, kappas))
    ne = _Normal(rows, taus, kappas)
    prior = np.concatenate([np.full(ne.n_ts, c0[0]), np.full(ne.n_ts, c0[1]), c0[2:]])
    tau_t = [tau0] * len(temp_knots)
    for _ in range(2):            # coordinate descent over the tau of each temperature knot
        for j in range(len(temp_knots)):
            sse = {tau: ne.solve(ne.columns(tau_t[:j] + [tau] + tau_t[j + 1:], kappa), prior)[1] for tau in taus}
            best = min(sse, key=sse.get)
            if sse[best] < sse[tau_t[j]] * (1.0 - 1e-9):    # a knot without data keeps the global tau
                tau_t[j] = best
    coef, sse = ne.solve(ne.columns(tau_t, kappa), prior)
    shape = (len(temp_knots), len(soc_knots))
    n_ts = ne.n_ts
    m_hyst = float(coef[-1]) if kappa is not None else 0.0
    # a resistance far from the one-value fit is the least-squares fit absorbing what a 1-RC model lacks
    r0 = np.clip(coef[:n_ts], 0.25 * max(c0[0], 1e-4), 4.0 * max(c0[0], 1e-4)).reshape(shape)
    r1 = np.clip(coef[n_ts:2 * n_ts], 0.25 * max(c0[1], 1e-4), 4.0 * max(c0[1], 1e-4)).reshape(shape)
    return EcmTable(capacity_ah=cap_ref, temp_knots=temp_knots, soc_knots=soc_knots, r0=r0, r1=r1,
                    tau=tau_t, m_hyst=max(m_hyst, 0.0), kappa_hyst=float(kappa or 25.0),
                    r_v=max(sse / ne.n, 1e-7), source=f"least squares on {len(drives)} drives ({ne.n} samples)")


def _one_knot(rows: _Rows) -> _Rows:
    return replace(rows, wt=np.ones((rows.y.size, 1)), ws=np.ones((rows.y.size, 1)))


def tune_noise(table: EcmTable, drives: list, chemistry: str, ocv: OCVCurve | None = None,
               q_soc_grid=Q_SOC_GRID, r_v_factors=R_V_FACTORS, sigma0_grid=SIGMA0_GRID,
               wrong_start: float = WRONG_START, max_seconds: float | None = None) -> EcmTable:
    """The (q_soc, r_v, sigma_soc0) with the lowest SOC RMSE on ``drives``.

    Each drive is run from its stored SOC and (``wrong_start`` > 0) once more from a stored
    SOC that far off (towards the middle), the two conditions weighted equally: tuned on
    clean starts alone, the filter learns to ignore the voltage (the model error of a
    1-RC ECM is strongly correlated in time) and never recovers a wrong start. Every
    candidate and condition is a column of one filter: one pass per drive.
    """
    ocv = ocv or load_ocv(chemistry)
    grid = [(q, table.r_v * f, s0) for q in q_soc_grid for f in r_v_factors for s0 in sigma0_grid]
    cost = np.zeros(len(grid))
    for d in drives:
        k_end = len(d.t) if max_seconds is None else int(np.searchsorted(d.t, d.t[0] + max_seconds))
        stored = np.asarray(d.meta.get("soc_stored", d.soc[0]), dtype=np.float64)
        starts = [stored] + ([np.where(stored < 0.5, stored + wrong_start, stored - wrong_start)] if wrong_start else [])
        est = run_table_ekf(d, table, ocv, starts, grid, k_end)           # (k_end, starts x grid x cells)
        err = est.reshape(k_end, len(starts), len(grid), d.n_cells) - d.soc[:k_end, None, None, :]
        cost += np.nanmean(err ** 2, axis=(0, 3)).sum(axis=0)
    q, r, s0 = grid[int(np.argmin(cost))]
    return replace(table, q_soc=q, r_v=r, sigma_soc0=s0,
                   source=table.source + f"; noise tuned on {len(drives)} drives"
                   + (f" (stored and {wrong_start:.0%}-off starts)" if wrong_start else ""))


def run_table_ekf(d, table: EcmTable, ocv: OCVCurve, starts: list[np.ndarray], grid: list[tuple[float, float, float]],
                  k_end: int) -> np.ndarray:
    """(k_end, starts x grid x cells) SOC: one filter per start and (q_soc, r_v, sigma_soc0), side by side."""
    copies = len(starts) * len(grid)
    n = d.n_cells * copies
    col = {k: np.tile(np.repeat([c[j] for c in grid], d.n_cells), len(starts))
           for j, k in enumerate(("q_soc", "r_v", "sigma_soc0"))}
    soc0 = np.concatenate([np.tile(s, len(grid)) for s in starts])
    ekf = EcmEKF(n, table, ocv, d.capacity_ah, soc0=soc0, **col)
    n_t = d.cell_t.shape[1]
    tmap = np.tile((np.arange(d.n_cells) * n_t) // d.n_cells, copies)
    out = np.empty((k_end, n))
    sess = d.session_ids()
    t_prev = d.t[0]
    for k in range(k_end):
        dt = float(d.t[k] - t_prev)
        if k and sess[k] != sess[k - 1]:
            ekf.park(dt)
            dt = 0.0
        out[k] = ekf.step(float(d.current[k]), np.tile(d.cell_v[k], copies), d.cell_t[k, tmap], dt)
        t_prev = d.t[k]
    return out


def _best_one_value(ne: _Normal) -> tuple[float, float, float | None, np.ndarray]:
    """(SSE, tau, kappa, [R0, R1, (M)]) of the best one-value ECM over the tau and kappa grids."""
    best = None
    for tau in ne.taus:
        for kappa in ne.kappas or [None]:
            cols = ne.columns([tau], kappa)
            coef, sse = ne.solve(cols, np.zeros(cols.size), 0.0)
            if best is None or sse < best[0]:
                best = (sse, tau, kappa, coef)
    return best


def fit_ecm(drives: list, chemistry: str, taus=TAUS, stride: int = 10) -> ECMParams:
    """One-value R0, R1, tau (grid) and the voltage noise by least squares; capacity = median design."""
    cap = float(np.median([d.capacity_ah for d in drives]))
    ne = _Normal(_one_knot(_gather(drives, load_ocv(chemistry), cap, stride, taus, (), (25.0,), (0.5,))), taus, ())
    sse, tau, _, (r0, r1) = _best_one_value(ne)
    return ECMParams(capacity_ah=cap, r0=max(float(r0), 1e-4), r1=max(float(r1), 1e-4), tau=tau,
                     r_v=max(sse / ne.n, 1e-6))


def simulate_ecm_drive(table: EcmTable, ocv: OCVCurve, t: np.ndarray, current: np.ndarray,
                       soc0: float | np.ndarray, capacity_ah: float | np.ndarray, chemistry: str = "nmc",
                       temp_c: float = 25.0, noise_v: float = 0.001, seed: int = 0, name: str = "ecm") -> RecordedDrive:
    """A drive whose truth is the table ECM itself: identification and filter checks with known answers.

    ``capacity_ah`` per cell (the design capacity in the record is their mean); resistances
    scale with the table's capacity / the cell's, as the filter assumes.
    """
    rng = np.random.default_rng(seed)
    cap = np.atleast_1d(np.asarray(capacity_ah, dtype=np.float64))
    n = cap.size
    soc = np.broadcast_to(np.asarray(soc0, dtype=np.float64), (n,)).copy()
    v1, h = np.zeros(n), np.zeros(n)
    temp = np.full(n, temp_c)
    scale = table.capacity_ah / cap
    socs, volts = np.empty((len(t), n)), np.empty((len(t), n))
    t_prev = t[0]
    for k, i in enumerate(np.asarray(current, dtype=np.float64)):
        dt = t[k] - t_prev
        t_prev = t[k]
        r0, r1, tau = table.lookup(temp, np.clip(soc, 0.0, 1.0))
        a = np.exp(-dt / tau)
        soc = soc + i * dt / (3600.0 * cap)
        v1 = a * v1 + r1 * scale * (1.0 - a) * i
        ah = np.exp(-table.kappa_hyst * abs(i) * dt / (3600.0 * cap))
        h = ah * h + (1.0 - ah) * np.sign(i)
        socs[k] = soc
        volts[k] = ocv(np.clip(soc, 0.0, 1.0)) + v1 + r0 * scale * i + table.m_hyst * h
    volts += noise_v * rng.standard_normal(volts.shape)
    return RecordedDrive(name=name, chemistry=chemistry, capacity_ah=float(cap.mean()), t=np.asarray(t, float),
                         current=np.asarray(current, float), cell_v=volts, cell_t=np.full((len(t), 1), temp_c),
                         soc=socs, meta={"source": "ECM", "ambient_c": temp_c}, cell_capacity_ah=cap.copy())
