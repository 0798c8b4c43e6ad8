"""Evaluation baselines: the method contract, vectorised Coulomb counting, OCV resets, the identified ECM EKF."""

from __future__ import annotations

import numpy as np
import pytest

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation.baselines import (
    METHODS,
    CoulombCounting,
    CoulombOcvReset,
    CoulombOracle,
    EkfBaseline,
    EkfBiasBaseline,
    EvalSetup,
    PackInfo,
    ShippedEstimator,
    default_ecm,
    pack_state,
    unpack_state,
)
from bms_ai.estimation.coulomb import CoulombCounter, clamped_path, soc_increments
from bms_ai.estimation.ecm_fit import Q_SOC_GRID, fit_ecm, fit_ecm_table, rc_filter, simulate_ecm_drive, tune_noise
from bms_ai.estimation.ekf import ECMParams, EcmTable


def pack(chem: str = "nmc", n: int = 2, cap: float = 5.0, n_temps: int = 1) -> PackInfo:
    return PackInfo(chem, cap, n, n_temps, load_ocv(chem))


def stepped(m, t, i, v, temp) -> np.ndarray:
    return np.array([m.step(float(t[k]), float(i[k]), v[k], temp[k]).copy() for k in range(len(t))])


def profile(seed: int, seconds: float = 3600.0, dt: float = 5.0, cap: float = 5.0) -> tuple[np.ndarray, np.ndarray]:
    """Minute-long constant-current segments (-2 C .. +1 C) with a 10-min rest every 40 min."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, seconds, dt)
    i = np.repeat(rng.uniform(-2.0, 1.0, int(seconds / 60) + 1) * cap, int(60 / dt))[:len(t)]
    i[(np.arange(len(t)) * dt // 600) % 4 == 3] = 0.0
    return t, i


TABLE = EcmTable(capacity_ah=5.0, temp_knots=[0.0, 25.0], soc_knots=[0.5], r0=[[0.03], [0.02]], r1=[[0.02], [0.01]],
                 tau=[40.0, 20.0], r_v=2e-6, q_soc=1e-10)


# -- Coulomb counting -------------------------------------------------------------------


def test_clamped_path_equals_sequential_clipping() -> None:
    rng = np.random.default_rng(1)
    inc = np.concatenate([rng.normal(0.002, 0.01, 3000), rng.normal(-0.003, 0.01, 3000), rng.normal(0.0, 0.05, 500)])
    ref, s = np.empty_like(inc), 0.5
    for k, d in enumerate(inc):
        s = min(max(s + d, 0.0), 1.0)
        ref[k] = s
    out = clamped_path(0.5, inc)
    assert out.min() == 0.0 and out.max() == 1.0          # both bounds are hit
    assert np.allclose(out, ref, atol=1e-12)


def test_soc_increments_match_the_stepping_counter() -> None:
    t = np.array([0.0, 0.1, 0.2, 0.4, 0.3, 0.5])          # one step backwards in time: held
    i = np.array([1.0, -5.0, np.nan, 2.0, 3.0, 4.0])
    cc = CoulombCounter(5.0, 0.5, 1)
    ref = [0.5]
    for k in range(1, len(t)):
        ref.append(cc.step(i[k], t[k] - t[k - 1])[0])
    assert np.allclose(0.5 + np.cumsum(soc_increments(t, i, 5.0)[:, 0]), ref, atol=1e-15)


@pytest.mark.parametrize("cls", [CoulombCounting, CoulombOcvReset])
def test_vectorised_run_equals_stepping(cls) -> None:
    """Rest, a wake-up after a long park, a full charge and clipping, through run() and step() alike."""
    p = pack("nmc")
    ocv = p.ocv
    t = np.arange(0.0, 4000.0, 5.0)
    i = np.where(t < 300, -10.0, 0.0)
    i[(t >= 2500) & (t < 3500)] = 20.0              # charge past full (clipped) ...
    i[t >= 3500] = 0.2                               # ... then the CV taper below C/20
    v = np.column_stack([ocv(0.7) + 0.001 * np.sin(t), np.where(t >= 3500, 4.2, ocv(0.65))])
    temp = np.full((len(t), 1), 25.0)
    blob = pack_state(soc=np.array([0.5, 0.6]), t=-7200.0)
    a, b = cls(p, EvalSetup()), cls(p, EvalSetup())
    a.start(0.0, blob, np.zeros(2))
    b.start(0.0, blob, np.zeros(2))
    out_run = a.run(t, i, v, temp)
    out_step = stepped(b, t, i, v, temp)
    assert np.allclose(out_run, out_step, atol=1e-12)
    assert np.allclose(unpack_state(a.stop())["soc"], unpack_state(b.stop())["soc"], atol=1e-12)
    assert out_run.max() == 1.0


def test_coulomb_oracle_and_stored_differ_only_in_where_they_start() -> None:
    assert CoulombOracle.oracle_start and not CoulombCounting.oracle_start
    assert METHODS.get("cc_oracle") is CoulombOracle and METHODS.get("cc_stored") is CoulombCounting


def test_session_restart_carries_the_soc_through_the_blob() -> None:
    p = pack("nmc", n=1)
    t, i = np.arange(0.0, 100.0), np.full(100, -18.0)
    m = CoulombCounting(p, EvalSetup())
    m.start(0.0, None, np.array([0.8]))
    first = m.run(t, i, np.full((100, 1), 3.7), np.full((100, 1), 25.0))
    blob = m.stop()
    m2 = CoulombCounting(p, EvalSetup())
    m2.start(5000.0, blob, np.array([0.1]))           # the stored value is only for the first session
    second = m2.run(t + 5000.0, i, np.full((100, 1), 3.7), np.full((100, 1), 25.0))
    assert second[0, 0] == first[-1, 0]                # nothing is counted over the park
    assert second[-1, 0] == pytest.approx(0.8 - 18.0 * 198 / 3600 / 5.0)


# -- OCV resets ----------------------------------------------------------------------------


def _ocv_reset_run(chem: str, soc_rest: float, rest_s: float, stored: float = 0.5, blob: bytes | None = None,
                   first_t: float = 0.0, load_s: float = 60.0) -> np.ndarray:
    """load_s of a 1 C discharge, then rest_s at rest at the OCV of soc_rest (1 Hz)."""
    p = pack(chem, n=1, cap=5.0)
    t = first_t + np.arange(0.0, load_s + rest_s, 1.0)
    i = np.where(t - first_t < load_s, -5.0, 0.0)
    v = np.full((len(t), 1), float(p.ocv(soc_rest)))
    m = CoulombOcvReset(p, EvalSetup())
    m.start(first_t, blob, np.array([stored]))
    return m.run(t, i, v, np.full((len(t), 1), 25.0))[:, 0]


def test_ocv_reset_after_30_min_rest_only() -> None:
    out = _ocv_reset_run("nmc", 0.7, 2400.0)
    counted = 0.5 - 59 * 5.0 / 3600 / 5.0               # the first sample counts nothing
    assert out[60 + 1798] == pytest.approx(counted)     # 29 min 58 s into the rest: still counting
    assert out[-1] == pytest.approx(0.7, abs=2e-3)      # after 30 min: the OCV reading


def test_no_ocv_reset_on_the_lfp_plateau_but_at_the_knee() -> None:
    counted = 0.5 - 59 * 5.0 / 3600 / 5.0
    assert _ocv_reset_run("lfp", 0.5, 2400.0)[-1] == pytest.approx(counted)
    assert _ocv_reset_run("lfp", 0.05, 2400.0)[-1] == pytest.approx(0.05, abs=0.01)


def test_wake_up_reset_needs_a_long_park() -> None:
    short = _ocv_reset_run("nmc", 0.7, 10.0, blob=pack_state(soc=np.array([0.5]), t=-1200.0), load_s=0.0)
    long = _ocv_reset_run("nmc", 0.7, 10.0, blob=pack_state(soc=np.array([0.5]), t=-7200.0), load_s=0.0)
    assert short[0] == 0.5
    assert long[0] == pytest.approx(0.7, abs=2e-3)


def test_full_charge_end_resets_to_100_percent() -> None:
    p = pack("nmc", n=2)
    t = np.arange(0.0, 30.0, 1.0)
    i = np.full(30, 0.2)                              # C/25 taper
    v = np.column_stack([np.full(30, 4.2), np.full(30, 4.1)])   # only cell 0 is at the limit
    m = CoulombOcvReset(p, EvalSetup())
    m.start(0.0, None, np.array([0.9, 0.9]))
    out = m.run(t, i, v, np.full((30, 1), 25.0))
    assert out[5, 0] < 1.0 and out[-1, 0] == 1.0       # held for 10 s first
    assert out[-1, 1] < 0.91


# -- EKF on the identified ECM ------------------------------------------------------------------


def _run(cls, p: PackInfo, tab: EcmTable, d, stored: np.ndarray) -> np.ndarray:
    m = cls(p, EvalSetup(ecm={p.chemistry: tab}))
    m.start(float(d.t[0]), None, stored)
    return m.run(d.t, d.current, d.cell_v, d.cell_t)


def test_ekf_converges_from_a_wrong_start() -> None:
    t, i = profile(3, 1800.0)
    d = simulate_ecm_drive(TABLE, load_ocv("nmc"), t, i, 0.8, [5.0, 5.0], "nmc", noise_v=0.001)
    est = _run(EkfBaseline, pack("nmc"), TABLE, d, np.array([0.5, 0.5]))
    assert np.abs(est[120:] - d.soc[120:]).max() < 0.02     # after 10 min


def test_hysteresis_state_helps_on_lfp() -> None:
    tab = EcmTable(**{**TABLE.to_dict(), "m_hyst": 0.01, "kappa_hyst": 25.0, "r_v": 1e-5})
    t, i = profile(4, 3600.0)
    d = simulate_ecm_drive(tab, load_ocv("lfp"), t, i, 0.6, [5.0, 5.0], "lfp", noise_v=0.001)
    with_h = _run(EkfBaseline, pack("lfp"), tab, d, d.soc[0])
    without = _run(EkfBaseline, pack("lfp"), EcmTable(**{**tab.to_dict(), "m_hyst": 0.0}), d, d.soc[0])
    rmse = lambda e: float(np.sqrt(np.mean((e - d.soc) ** 2)))  # noqa: E731
    assert rmse(with_h) < 0.5 * rmse(without)


def test_bias_filter_estimates_a_current_offset() -> None:
    t, i = profile(5, 3600.0)
    d = simulate_ecm_drive(TABLE, load_ocv("nmc"), t, i, 0.9, [5.0, 5.0], "nmc", noise_v=0.001)
    d.current = d.current + 0.15                       # 0.03 C offset on the measured current
    p = pack("nmc")
    m = EkfBiasBaseline(p, EvalSetup(ecm={"nmc": TABLE}))
    m.start(0.0, None, d.soc[0])
    est = m.run(d.t, d.current, d.cell_v, d.cell_t)
    assert m.info()["offset_a"] == pytest.approx(0.15, abs=0.05)
    plain = _run(EkfBaseline, p, TABLE, d, d.soc[0])
    assert np.sqrt(np.mean((est - d.soc) ** 2)) < np.sqrt(np.mean((plain - d.soc) ** 2))


def test_ekf_restart_relaxes_over_the_park_and_keeps_the_soc() -> None:
    p = pack("nmc", n=1)
    m = EkfBaseline(p, EvalSetup(ecm={"nmc": TABLE}))
    m.start(0.0, None, np.array([0.6]))
    m.run(np.arange(0.0, 60.0), np.full(60, -10.0), np.full((60, 1), 3.6), np.full((60, 1), 25.0))
    s = unpack_state(m.stop())
    m2 = EkfBaseline(p, EvalSetup(ecm={"nmc": TABLE}))
    m2.start(60.0 + 86400.0, m.stop(), np.array([0.0]))
    assert m2.ekf.x[0, 0] == s["x"][0, 0]             # SOC: as stored
    assert abs(m2.ekf.x[0, 1]) < 1e-6 < abs(s["x"][0, 1])   # RC branch: relaxed over the day
    assert m2.ekf.P[0, 0, 0] > s["P"][0, 0, 0]         # and less sure of the SOC


def test_default_ecm_carries_the_chemistry_hysteresis() -> None:
    assert default_ecm("lfp").m_hyst == pytest.approx(0.01) and default_ecm("nmc").m_hyst == 0.0
    assert "not identified" in default_ecm("nmc").source


# -- identification -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ecm_drives() -> list:
    ocv = load_ocv("lfp")
    tab = EcmTable(**{**TABLE.to_dict(), "m_hyst": 0.01})
    out = []
    for s, temp in enumerate([0.0, 25.0, 25.0]):
        t, i = profile(10 + s, 3600.0)
        out.append(simulate_ecm_drive(tab, ocv, t, i, 0.9, [5.0, 5.0], "lfp", temp_c=temp, noise_v=0.001, seed=s))
    return out


def test_fit_ecm_table_recovers_the_parameters(ecm_drives) -> None:
    tab = fit_ecm_table(ecm_drives, "lfp", stride=1)
    r0, r1, tau = tab.lookup(np.array([0.0, 25.0]), np.array([0.5, 0.5]))
    assert r0 == pytest.approx([0.03, 0.02], rel=0.1)
    assert r1 == pytest.approx([0.02, 0.01], rel=0.25)
    assert tau.tolist() == [40.0, 20.0]
    assert tab.m_hyst == pytest.approx(0.01, rel=0.35)
    assert EcmTable.from_dict(tab.to_dict()).to_dict() == tab.to_dict()


def test_tune_noise_picks_from_the_grid(ecm_drives) -> None:
    tab = fit_ecm_table(ecm_drives[:2], "lfp", stride=1)
    tuned = tune_noise(tab, ecm_drives[2:], "lfp", max_seconds=600.0)
    assert tuned.q_soc in Q_SOC_GRID and "tuned" in tuned.source
    assert tuned.r0.tolist() == tab.r0.tolist()


def test_one_value_fit_for_model_manifests(ecm_drives) -> None:
    p = fit_ecm(ecm_drives, "lfp", stride=1)
    assert isinstance(p, ECMParams) and 0.015 < p.r0 < 0.035
    assert EcmTable.from_dict({"r0": p.r0, "r1": p.r1, "tau": p.tau, "capacity_ah": 5.0}).r0.shape == (1, 1)


# -- the shipped estimator -----------------------------------------------------------------------


def test_shipped_without_models_is_named_fallback(tmp_path) -> None:
    assert ShippedEstimator(pack("nmc"), EvalSetup(model_dir=None)).name == "shipped_fallback"
    m = ShippedEstimator(pack("nmc"), EvalSetup(model_dir=tmp_path))      # a directory without a manifest
    m.start(0.0, None, np.array([0.5, 0.5]))
    assert m.name == "shipped_fallback" and m.info()["fallback_reason"] and not m.info()["model"]


def test_shipped_with_models_restarts_from_its_stored_state(root) -> None:
    p = pack("nmc")
    m = ShippedEstimator(p, EvalSetup(model_dir=root / "models"))
    assert m.name == "shipped"
    m.start(0.0, None, np.array([0.7, 0.7]))
    for k in range(20):
        out = m.step(0.1 * k, -5.0, np.array([3.9, 3.9]), np.array([25.0]))
    blob = m.stop()
    m2 = ShippedEstimator(p, EvalSetup(model_dir=root / "models"))
    m2.start(1000.0, blob, np.array([0.1, 0.1]))
    assert np.allclose(m2.last, out)
    assert m2.info()["persistence"] in ("save_state", "restart from last SOC")


def test_rc_filter_equals_the_recursion_across_rate_changes_and_parks() -> None:
    rng = np.random.default_rng(0)
    t = np.cumsum(np.r_[0.0, np.full(3000, 0.1), 500.0, np.full(2000, 1.0)])
    i = rng.normal(size=t.size)
    ref = np.zeros_like(i)
    for k in range(1, len(i)):
        a = np.exp(-(t[k] - t[k - 1]) / 20.0)
        ref[k] = a * ref[k - 1] + (1 - a) * i[k]
    assert np.allclose(rc_filter(t, i, 20.0), ref, atol=1e-12)
