"""The classical overpotential fallback (``EcmEta``): identified on training drives, calibrated on validation.

eta = r0 a(T) I + RC(r1 a(T) I; tau) + hysteresis_v h, with a(T) the Arrhenius
factor exp(k (1/T - 1/T_ref)) and h the feature pipeline's one-state
hysteresis. For each (tau, k) on a grid the resistances and the hysteresis
gap are linear: least squares over the training rows (SOC 0.1-0.95, where the
OCV curve is not a knee), the pair with the smallest error wins. Resistances
are reported for the 50 Ah reference series group (``EcmParams.scaled``).
Its error model comes from the validation residuals like the learned model's
(``training.calibration``), with the ECM's own shape: slow sigma = (rest +
per_c |I|_600s) sqrt(a), fast sigma = (rest + per_c |I|) sqrt(a).
"""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.estimation.overpotential import T_REF_K, EcmEta, EcmParams, ErrorModel, make_features
from bms_ai.sim.dataset import RecordedDrive
from bms_ai.training.calibration import ResidualRun, Series, correlation, coverage_report, fit_processes, rmse_report
from bms_ai.training.common import lowpass
from bms_ai.training.rows import (
    TRAIN_CELLS,
    TRAIN_ROW_S,
    VAL_CELLS,
    VAL_ROW_S,
    DriveRows,
    add_data_arguments,
    build_rows,
    data_dirs,
    plan_data,
)
from bms_ai.training.synth import current_profile

TAU_GRID = (10.0, 20.0, 40.0, 80.0, 160.0, 320.0)
ACTIVATION_GRID = (0.0, 1000.0, 2000.0, 3000.0, 4000.0, 5000.0, 6000.0, 8000.0)
REFERENCE_AH = 50.0
SOC_FIT_RANGE = (0.1, 0.95)
I_COL, IEMA600_COL, TEMP_COL, SOC_COL, HYST_COL = 0, 6, 7, 8, 9


def arrhenius(temp_c: np.ndarray, k: float) -> np.ndarray:
    """Resistance factor relative to 25 degC (the same clipping as ``EcmEta``)."""
    temp_k = np.clip(np.asarray(temp_c, dtype=np.float64) + 273.15, 233.0, 343.0)
    return np.exp(k * (1.0 / temp_k - 1.0 / T_REF_K))


def rc_current(rows, tau: float) -> np.ndarray:
    """The RC branch's low-passed current [C] at the rows (full-rate filtering; relaxed at each restart).

    ``EcmEta`` filters a(T) I; temperature moves far slower than tau, so a(T) RC(I) is used here.
    """
    return lowpass(rows.full_t, rows.full_i_c, tau, rows.full_session, init="zero", max_gap=np.inf)[rows.idx]


def columns(rows, tau: float, k: float, lp: np.ndarray | None = None) -> np.ndarray:
    """(R, n, 3) regressors of [r0, r1, hysteresis_v] per C: a I, a RC(I), h."""
    f = rows.feats
    arr = arrhenius(f[:, :, TEMP_COL], k)
    lp = rc_current(rows, tau) if lp is None else lp
    i_c = f[:, :, I_COL].astype(np.float64)
    return np.stack([arr * i_c, arr * lp[:, None], f[:, :, HYST_COL].astype(np.float64)], axis=2)


def fit_ecm(rows: list, chemistry: str, taus=TAU_GRID, ks=ACTIVATION_GRID, log=print) -> EcmParams:
    """(tau, k) by grid, resistances (and the hysteresis gap, if the chemistry has one) by least squares.

    Resistances are for the 50 Ah reference group.
    """
    best = None
    # a chemistry without hysteresis gets none: the term would only stand in for slow diffusion
    hysteresis = get_chemistry(chemistry).hysteresis_gap_v > 0
    lps = {tau: [rc_current(r, tau) for r in rows] for tau in taus}
    for tau in taus:
        for k in ks:
            gram, rhs, sse0, n = np.zeros((3, 3)), np.zeros(3), 0.0, 0
            for r, lp in zip(rows, lps[tau]):
                soc = r.feats[:, :, SOC_COL]
                ok = r.valid() & (soc > SOC_FIT_RANGE[0]) & (soc < SOC_FIT_RANGE[1])
                a = columns(r, tau, k, lp)[ok]
                y = r.eta[ok]
                gram += a.T @ a
                rhs += a.T @ y
                sse0 += float(y @ y)
                n += len(y)
            if n == 0:
                raise ValueError("no rows to identify the ECM on")
            use = [0, 1, 2] if hysteresis else [0, 1]
            coef = np.zeros(3)
            coef[use] = np.linalg.lstsq(gram[np.ix_(use, use)], rhs[use], rcond=None)[0]
            coef = np.maximum(coef, [1e-5, 1e-5, 0.0])
            sse = sse0 - 2.0 * coef @ rhs + coef @ gram @ coef
            if best is None or sse < best[0]:
                best = (sse, tau, k, coef, n)
    sse, tau, k, (r0c, r1c, hyst), n = best
    log(f"  ECM: tau {tau:g} s, activation {k:g} K, rms {np.sqrt(max(sse, 0) / n) * 1e3:.2f} mV over {n} rows",
        flush=True)
    return EcmParams(r0=float(r0c / REFERENCE_AH), r1=float(r1c / REFERENCE_AH), tau=float(tau),
                     activation_k=float(k), hysteresis_v=float(hyst))


def ecm_eta(p: EcmParams, rows) -> np.ndarray:
    """What ``EcmEta`` predicts at the rows [V] (per C: the 50 Ah resistances times 50)."""
    cols = columns(rows, p.tau, p.activation_k)
    return cols @ np.array([p.r0 * REFERENCE_AH, p.r1 * REFERENCE_AH, p.hysteresis_v])


def calibrate_ecm(p: EcmParams, pairs: list, noise_var: float) -> tuple[dict, dict]:
    """The fallback's sigma parameters and error model; (EcmParams fields of ``p``, report).

    ``pairs``: (ECM parameters, rows) whose residuals are measured: the
    validation drives under ``p``, or each variant's drives under an ECM
    identified without that variant (the fallback meets cells it was not fitted to).
    """
    runs, arrs, emas = [], [], []
    for q, r in pairs:
        res = r.eta - ecm_eta(q, r)
        arr = arrhenius(r.feats[:, :, TEMP_COL], q.activation_k)
        ema = np.broadcast_to(r.feats[:, :, IEMA600_COL].astype(np.float64), res.shape)
        keep = r.keep & np.isfinite(res).all(axis=1)
        # reference shape for the correlation analysis: the present defaults' sigma
        ref = (0.004 + 0.03 * ema) * np.sqrt(arr)
        runs.append(ResidualRun(name=r.name, variant=r.variant, t=r.t, session=r.session, r=np.nan_to_num(res),
                                ref=ref, temp=r.feats[:, :, TEMP_COL].astype(np.float64),
                                i_c=r.feats[:, 0, I_COL].astype(np.float64), keep=keep,
                                soc=r.feats[:, :, SOC_COL].astype(np.float64)))
        arrs.append(arr)
        emas.append(ema)
    corr = correlation(runs, noise_var)
    ks, kf = np.sqrt(1.0 + corr.k_cell ** 2), np.sqrt(1.0 + corr.k_cell_fast ** 2)
    # normalised by the cold factor, the ECM's sigmas are linear in |I|_600s (slow) and |I| (fast)
    slow_items, fast_items = [], []
    for run, a, e in zip(runs, arrs, emas):
        v = run.r / np.sqrt(a)
        noise = noise_var / a
        cur = np.broadcast_to(np.abs(run.i_c)[:, None], v.shape)
        slow_items.append(Series(run.t, run.session, v, run.keep, e, noise))
        fast_items.append(Series(run.t, run.session, v, run.keep, cur, noise))
    (per_c, rest), _, _ = fit_processes(slow_items, corr.tau_fast, corr.tau_model)
    _, (per_c_f, rest_f), _ = fit_processes(fast_items, corr.tau_fast, corr.tau_model)
    out = dict(asdict(p), sigma_rest=rest / ks, sigma_per_c=per_c / ks, sigma_fast_rest=rest_f / kf,
               sigma_fast_per_c=per_c_f / kf,
               error=ErrorModel(tau_model=corr.tau_model, tau_fast=corr.tau_fast, k_cell=corr.k_cell,
                                k_cell_fast=corr.k_cell_fast).to_dict())
    var_slow = [((rest + per_c * e) ** 2) * a for e, a in zip(emas, arrs)]
    var_fast = [((rest_f + per_c_f * np.abs(run.i_c)[:, None]) ** 2) * a for run, a in zip(runs, arrs)]
    report = {"correlation": corr.report(), "coverage": coverage_report(runs, var_slow, var_fast, noise_var, corr.passed),
              "rmse_mv": rmse_report(runs)}
    return out, report


def ecm_pairs(trn: list[DriveRows], val: list[DriveRows], chemistry: str, final, lovo: bool) -> list:
    """(ECM parameters, rows) to calibrate the fallback's sigmas on: fits without each variant, else val."""
    variants = sorted({r.variant for r in trn})
    if not (lovo and len(variants) > 1):
        return [(final, r) for r in val]
    pairs = []
    for v in variants:
        p = fit_ecm([r for r in trn if r.variant != v], chemistry, log=lambda *a, **k: None)
        pairs += [(p, r) for r in trn + val if r.variant == v]
    return pairs


def ecm_literal(d: dict) -> str:
    """The fitted numbers as an ``EcmParams(...)`` line for ECM_DEFAULTS."""
    e = d["error"]
    return (f"EcmParams(r0={d['r0']:.5f}, r1={d['r1']:.5f}, tau={d['tau']:g}, activation_k={d['activation_k']:g}, "
            f"hysteresis_v={d['hysteresis_v']:.4f}, sigma_rest={d['sigma_rest']:.4f}, "
            f"sigma_per_c={d['sigma_per_c']:.4f}, sigma_fast_rest={d['sigma_fast_rest']:.4f}, "
            f"sigma_fast_per_c={d['sigma_fast_per_c']:.4f}, error=ErrorModel(tau_model={e['tau_model']:.0f}, "
            f"tau_fast={e['tau_fast']:.1f}, k_cell={e['k_cell']:.2f}, k_cell_fast={e['k_cell_fast']:.2f}))")


def add_arguments(p) -> None:
    """`bms-ai train ecm`: the same data options as `train soc`."""
    add_data_arguments(p)


def run(args) -> int:
    """Identify and calibrate the classical fallback; print the numbers (nothing is written)."""

    data, val = data_dirs(args)
    try:
        plan = plan_data(args.chemistry, data, val, args.seed, 0.2)
    except (ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"bms-ai train ecm: {exc}") from None
    trn = build_rows(plan.train, args.seed, TRAIN_ROW_S, TRAIN_CELLS, print)
    vrows = build_rows(plan.val, args.seed, VAL_ROW_S, VAL_CELLS, print)
    from bms_ai.estimation.filter import FilterParams
    final = fit_ecm(trn, args.chemistry)
    params, report = calibrate_ecm(final, ecm_pairs(trn, vrows, args.chemistry, final, not args.no_lovo),
                                   FilterParams().r_sensor)
    print(json.dumps({"ecm": params, "rmse_mv": report["rmse_mv"], "correlation": report["correlation"],
                      "coverage_total": report["coverage"]["total"]["all"]}, indent=1, default=float))
    print(f'"{args.chemistry}": {ecm_literal(params)},')
    return 0


def ecm_cell_drive(p: EcmParams, chemistry: str, seed: int, ambient_c: float, duration: float = 3600.0,
                   dt: float = 1.0, n_cells: int = 4, capacity_ah: float = 50.0, v_noise: float = 0.001,
                   ocv_shift_v: float = 0.0) -> RecordedDrive:
    """A drive of ideal ECM cells with known parameters (its identification must give them back).

    Voltage = the drive's own OCV (the chemistry table + ``ocv_shift_v``, stored
    as the v2 true curve) + exactly what ``EcmEta`` computes; cells differ by
    +-1 degC; 1 mV voltage noise.
    """
    rng = np.random.default_rng(seed)
    soc0 = float(rng.uniform(0.4, 0.9))
    t, i = current_profile(rng, duration, capacity_ah, soc0, dt)
    temps = ambient_c + np.linspace(-1.0, 1.0, n_cells)
    soc = np.clip(soc0 + np.cumsum(np.r_[0.0, i[1:] * np.diff(t)]) / (3600.0 * capacity_ah), 0.0, 1.0)
    soc = np.repeat(soc[:, None], n_cells, axis=1)
    cell_t = np.repeat(temps[None], len(t), axis=0)
    feats = make_features(n_cells, n_cells, capacity_ah, get_chemistry(chemistry).hysteresis_rate or 25.0)
    ecm = EcmEta(n_cells, p.scaled(capacity_ah))
    eta = np.empty((len(t), n_cells))
    for k in range(len(t)):
        f = feats.update(float(t[k]), float(i[k]), cell_t[k], soc[k])
        eta[k] = ecm.step(float(t[k] - t[k - 1]) if k else 0.0, float(i[k]), f).eta
    curve = load_ocv(chemistry)
    ocv_v = curve.ocv + ocv_shift_v
    v = np.interp(soc, curve.soc, ocv_v) + eta + v_noise * rng.standard_normal(eta.shape)
    d = RecordedDrive(name=f"ecm_{chemistry}_{seed}", chemistry=chemistry, capacity_ah=capacity_ah, t=t, current=i,
                      cell_v=v, cell_t=cell_t, soc=soc, meta={"source": "ideal ECM cells", "ambient_c": ambient_c,
                                                               "cell_set": "ecm"})
    d.ocv_soc, d.ocv_v = curve.soc.copy(), ocv_v
    return d
