"""SOH: anchors on synthetic cells with a known OCV and capacity, persistence, the pack glue, and RUL."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.estimation.filter import CAP, FilterParams
from bms_ai.estimation.health import GRAPHITE_SHIFT_S, HealthEstimator
from bms_ai.estimation.ocvmodel import OcvModel
from bms_ai.estimation.pack import PackEstimator
from bms_ai.estimation.rul import (
    RulEstimator,
    RulParams,
    evaluate_rul,
    fit_rul,
    load_rul_estimator,
    sample_trajectories,
)
from bms_ai.models.runtime import default_model_dir


class SynthPack:
    """Series cells on their chemistry's OCV curve (capacity per cell), R0, one-state hysteresis, sensor noise.

    Samples at ``dt``; ``park`` is a sleep (no samples). Charging ends on the
    highest cell at v_max: constant voltage until the current tapers to C/20.
    """

    def __init__(self, chemistry: str, capacities: np.ndarray, soc0: float | np.ndarray, design: float = 50.0,
                 dt: float = 1.0, seed: int = 0, noise_v: float = 0.002, offset_a: float = 0.0) -> None:
        self.chem = get_chemistry(chemistry)
        self.curve = load_ocv(chemistry)
        self.cap = np.asarray(capacities, dtype=np.float64)
        self.q = self.cap * np.asarray(soc0, dtype=np.float64)
        self.lead_s = GRAPHITE_SHIFT_S[self.chem.name][0] * 0.8     # the graphite surface leads its average
        self.design, self.dt = design, dt
        self.r0 = 0.06 / design
        self.h = 0.0
        self.t = 0.0
        self.rng = np.random.default_rng(seed)
        self.noise_v, self.offset_a = noise_v, offset_a
        self.rows: list[tuple[float, float, np.ndarray]] = []

    @property
    def soc(self) -> np.ndarray:
        """True SOC per cell."""
        return self.q / self.cap

    def _v(self, i: float) -> np.ndarray:
        surface = self.soc + max(i, 0.0) * self.lead_s / 3600.0 / self.cap
        return self.curve(surface) + i * self.r0 + self.h * 0.5 * self.chem.hysteresis_gap_v

    def _sample(self, i: float) -> None:
        self.q += i * self.dt / 3600.0
        if self.chem.hysteresis_rate and i:
            a = min(self.chem.hysteresis_rate * abs(i) * self.dt / 3600.0 / self.design, 1.0)
            self.h += a * (math.copysign(1.0, i) - self.h)
        self.t += self.dt
        v = np.round((self._v(i) + self.rng.normal(0, self.noise_v, self.cap.size)) * 1000.0) / 1000.0
        i_meas = i + self.offset_a + self.rng.normal(0, 0.003 * self.design)
        self.rows.append((self.t, i_meas, v))

    def park(self, seconds: float) -> SynthPack:
        """Asleep: time passes, no samples."""
        self.t += seconds
        return self

    def hold(self, seconds: float, current: float = 0.0) -> SynthPack:
        """Constant current (0: an awake rest) for ``seconds``."""
        for _ in range(int(seconds / self.dt)):
            self._sample(current)
        return self

    def charge(self, rate_c: float, to_soc: float = 2.0) -> SynthPack:
        """CC at ``rate_c`` until the highest cell reaches ``to_soc`` or v_max, then CV down to C/20."""
        i = rate_c * self.design
        v_max = float(self.curve(1.0))
        while self.soc.max() < to_soc and self._v(i).max() < v_max:
            self._sample(i)
        while to_soc > 1.0 and i > 0.05 * self.design:
            lo, hi = 0.0, i                      # CV: the current that puts the highest cell at v_max
            for _ in range(30):
                lo, hi = (0.5 * (lo + hi), hi) if self._v(0.5 * (lo + hi)).max() < v_max else (lo, 0.5 * (lo + hi))
            i = lo
            self._sample(i)
        return self

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(t, measured current, measured cell voltages) of every sample so far."""
        t = np.array([r[0] for r in self.rows])
        return t, np.array([r[1] for r in self.rows]), np.stack([r[2] for r in self.rows])


def run_sessions(h_factory, pack: SynthPack, gap_s: float = 60.0) -> HealthEstimator:
    """Feed the samples session by session, each a fresh estimator restored from the last one's state."""
    t, i, v = pack.arrays()
    cut = np.flatnonzero(np.diff(t) > gap_s) + 1
    state = None
    for a, b in zip(np.r_[0, cut], np.r_[cut, len(t)]):
        h = h_factory()
        if state is not None:
            assert h.restore(json.loads(json.dumps(state))) == ""
        for k in range(a, b):
            h.update(float(t[k]), float(i[k]), v[k])
        state = h.state()
    return h


def _nmc_life(caps: np.ndarray, seed: int = 1, dt: float = 1.0) -> SynthPack:
    p = SynthPack("nmc", caps, 0.6, seed=seed, dt=dt)
    p.hold(10).hold(1200, -0.5 * p.design).park(7200)         # a trip, then a long park: rest at ~0.43
    p.hold(10).hold(600, -0.6 * p.design).park(5400)          # a shorter trip: rest at ~0.33
    return p.hold(10).charge(0.3).hold(30).park(3600).hold(10).hold(60, -0.2 * p.design)


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_nmc_rests_and_full_charge_give_each_cells_capacity() -> None:
    caps = np.array([0.97, 0.90, 0.84]) * 50.0
    pack = _nmc_life(caps)
    h = run_sessions(lambda: HealthEstimator(3, 50.0, ocv=load_ocv("nmc"), chemistry="nmc"), pack)
    o = h.output()
    np.testing.assert_allclose(o.cell_soh, caps / 50.0, atol=0.01)
    assert o.soh == pytest.approx(0.84, abs=0.01) and np.all(o.cell_soh_sd < 0.03)
    assert o.anchors["full"]["used"] == 3 and o.anchors["rest"]["used"] >= 6
    assert o.capacity_updates >= 2


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_a_curve_whose_top_lies_above_the_chargers_cv_voltage_still_finds_the_full_charge() -> None:
    """A (learned) curve 25 mV above the cells near the top: its 99 % OCV is above v_max, yet the CV phase is at v_max."""
    ref = load_ocv("nmc")
    high = OCVCurve(ref.soc, ref.ocv + 0.025 * np.clip((ref.soc - 0.5) / 0.5, 0.0, 1.0), "nmc")
    assert float(high(0.99)) > get_chemistry("nmc").v_max
    pack = _nmc_life(np.array([0.97, 0.90, 0.84]) * 50.0)
    h = run_sessions(lambda: HealthEstimator(3, 50.0, ocv=high, chemistry="nmc"), pack)
    assert h.output().anchors["full"]["used"] == 3


def test_rest_and_full_anchors_ignore_the_step_that_ends_them_and_the_offset_comes_from_the_rest() -> None:
    """Rest, charge at once, CC-CV to full, pause, drive at once; the current sensor reads +0.004 C.

    The anchors take the rest's averaged voltage, not the first sample of the
    charge or the drive (R0 alone does not explain that step), and the awake
    rest measures the offset, which would otherwise add 1.5 % to the capacity.
    """
    caps = np.array([0.93, 0.87, 0.9]) * 50.0
    pack = SynthPack("nmc", caps, 0.3, seed=5, offset_a=0.2, dt=5.0)
    pack.hold(10).hold(1800, -0.4 * pack.design).hold(3600).charge(0.3).hold(900).hold(600, -1.0 * pack.design)
    h = run_sessions(lambda: HealthEstimator(3, 50.0, ocv=load_ocv("nmc"), chemistry="nmc"), pack)
    o = h.output()
    assert o.anchors["zero_current"]["used"] == 3 and o.anchors["full"]["used"] == 3, o.anchors
    np.testing.assert_allclose(o.cell_soh, caps / 50.0, atol=0.01)


def test_a_regen_pulse_near_the_top_is_no_full_charge() -> None:
    """LFP near full: short charging pulses that taper through C/20 without a CV phase give no full anchor."""
    pack = SynthPack("lfp", np.array([0.9 * 50.0]), 0.985, seed=6)
    for _ in range(5):
        pack.hold(20, -0.5 * 50).hold(8, 0.3 * 50).hold(4, 0.03 * 50).hold(60)
    h = run_sessions(lambda: HealthEstimator(1, 50.0, ocv=load_ocv("lfp"), chemistry="lfp"), pack)
    assert "full" not in h.output().anchors


def test_lfp_plateau_rest_is_no_anchor_but_the_knees_are() -> None:
    pack = SynthPack("lfp", np.array([0.9 * 50.0]), 0.62)
    pack.hold(10).hold(600, -0.3 * 50).park(7200).hold(60).hold(600, -0.3 * 50).park(7200).hold(60)
    h = run_sessions(lambda: HealthEstimator(1, 50.0, ocv=load_ocv("lfp"), chemistry="lfp"), pack)
    o = h.output()
    assert o.anchors["rest"]["used"] == 0 and o.anchors["rest"]["not_steep"] == 2
    assert o.cell_soh[0] == pytest.approx(1.0, abs=1e-9) and o.capacity_updates == 0


def test_lfp_charging_features_and_full_charge_give_capacity() -> None:
    """LFP: rest below the plateau, one CC-CV charge at 0.2 C through the graphite features to full."""
    pack = SynthPack("lfp", np.array([0.86, 0.93]) * 50.0, np.array([0.15, 0.21]), seed=4, dt=2.0)
    pack.hold(10).park(7200).hold(60).charge(0.2).hold(60)
    h = run_sessions(lambda: HealthEstimator(2, 50.0, ocv=load_ocv("lfp"), chemistry="lfp"), pack)
    o = h.output()
    assert any(k.startswith("feature@") and v["used"] >= 2 for k, v in o.anchors.items()), o.anchors
    np.testing.assert_allclose(o.cell_soh, [0.86, 0.93], atol=0.01)


def test_state_round_trip_keeps_the_estimate_and_refuses_other_packs() -> None:
    caps = np.array([0.95, 0.88]) * 50.0
    pack = _nmc_life(caps, seed=2)
    h = run_sessions(lambda: HealthEstimator(2, 50.0, ocv=load_ocv("nmc"), chemistry="nmc"), pack)
    st = json.loads(json.dumps(h.state()))
    g = HealthEstimator(2, 50.0, ocv=load_ocv("nmc"), chemistry="nmc")
    assert g.restore(st) == ""
    a, b = h.output(), g.output()
    np.testing.assert_array_equal(a.cell_soh, b.cell_soh)
    np.testing.assert_array_equal(a.cell_soh_sd, b.cell_soh_sd)
    assert (a.efc, a.capacity_updates, a.anchors) == (b.efc, b.capacity_updates, b.anchors)
    assert "another pack" in HealthEstimator(3, 50.0).restore(st)
    assert "malformed" in HealthEstimator(2, 50.0).restore({"version": 1})


def _pack_sessions(chemistry: str, pack: SynthPack, soc0: float, **kw):
    """The pack estimator session by session, each restored from the last one's saved state.

    Yields each session's estimator and its last step's output (before the state is saved).
    """
    t, cur, v = pack.arrays()
    temps = np.full(2, 25.0)
    cut = np.flatnonzero(np.diff(t) > 60) + 1
    blob = None
    for a, b in zip(np.r_[0, cut], np.r_[cut, len(t)]):
        est = PackEstimator(chemistry, 50.0, None, initial_soc=soc0, **kw)
        if blob is not None:
            assert est.restore_state(blob) == ""
        for k in range(a, b):
            out = est.step(float(t[k]), float(cur[k]), v[k], temps)
        blob = est.save_state()
        yield est, out


def _run_pack(chemistry: str, pack: SynthPack, soc0: float, **kw) -> PackEstimator:
    """The estimator after the last session of ``_pack_sessions``."""
    return list(_pack_sessions(chemistry, pack, soc0, **kw))[-1][0]


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_pack_estimator_persists_soh_and_gives_the_soc_filter_the_cells_shares() -> None:
    """NMC: SOH survives the power cycles; the SOC filter takes the cells' relative capacities, not the pack's.

    On a sloped curve the filter learns the pack capacity itself (``PackEstimator._feed_capacity``).
    """
    caps = np.array([0.95, 0.88, 0.90]) * 50.0
    est = _run_pack("nmc", _nmc_life(caps, seed=3, dt=4.0), 0.6)
    h = est.health_output()
    np.testing.assert_allclose(h.cell_soh, caps / 50.0, atol=0.015)
    f = est.soc_est.filter
    np.testing.assert_allclose(f.cell_cap, h.cell_soh / h.cell_soh.mean(), rtol=1e-6)
    # its own estimate, not the SOH's: the estimator knows only the family prior (the pack's curve is exact
    # here, but nothing says so), so the reading is weaker than the filter's own and refused: 3 % high
    assert abs(f.capacity_factor - h.cell_soh.mean()) > 0.01


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_with_the_cells_own_curve_the_soh_capacity_reaches_the_soc_filter_on_nmc() -> None:
    """The same pack with its curve given (a pack config's, 3 mV): the rests' capacity is as sure as it claims.

    The filter's own capacity was 0.933 for a true 0.910 here; with the SOH estimator's reading it is within 1 %.
    """
    caps = np.array([0.95, 0.88, 0.90]) * 50.0
    est = _run_pack("nmc", _nmc_life(caps, seed=3, dt=4.0), 0.6,
                    ocv=OcvModel.from_curve(load_ocv("nmc"), 0.003, "pack config"))
    assert est.health_output().capacity_updates >= 1
    assert est.soc_est.filter.capacity_factor == pytest.approx(caps.mean() / 50.0, abs=0.01)


def test_a_rest_read_through_a_wide_band_curve_is_worth_less_soc() -> None:
    """The curve's SOC error at a rest scales with its band: the family prior's against a datasheet's 3 mV."""
    curve = load_ocv("nmc")
    tight = OcvModel.from_curve(curve, 0.003, "pack config").rest_soc_sigma()
    wide = OcvModel.from_curve(curve, 0.030, "pack config").rest_soc_sigma()
    assert wide == pytest.approx(10.0 * tight, rel=1e-6)
    assert 0.001 < tight < 0.01


@pytest.mark.drive   # ~2 s: outside the fast library tier
def test_on_lfp_the_soh_capacity_reaches_the_soc_filter() -> None:
    """LFP: the plateau teaches the SOC filter no capacity, so the SOH estimator's is read into it."""
    caps = np.array([0.86, 0.93]) * 50.0
    pack = SynthPack("lfp", caps, np.array([0.15, 0.21]), seed=4, dt=2.0)
    pack.hold(10).park(7200).hold(60).charge(0.2).hold(60)
    est = _run_pack("lfp", pack, 0.18)
    h = est.health_output()
    assert h.capacity_updates >= 1
    f = est.soc_est.filter
    assert f.capacity_factor == pytest.approx(caps.mean() / 50.0, abs=0.02)      # from the prior 1.0
    assert f.P[CAP, CAP] < 0.5 * FilterParams().sigma_cap0 ** 2


def test_an_awake_rest_at_zero_current_gives_the_soc_filter_the_sensors_offset() -> None:
    """The SOH estimator's zero-current rest (free of the OCV curve) reaches the SOC filter's offset state."""
    pack = SynthPack("nmc", np.full(3, 45.0), 0.6, seed=2, offset_a=-0.4, dt=2.0)
    pack.hold(10).hold(900, -0.4 * pack.design).hold(900).hold(600, -0.5 * pack.design)
    t, cur, v = pack.arrays()
    est = PackEstimator("nmc", 50.0, None, initial_soc=0.6)
    for k in range(len(t)):
        est.step(float(t[k]), float(cur[k]), v[k], np.full(2, 25.0))
    assert est.soc_status().values["offset_readings"] == 1
    assert est.soc_est.filter.offset_c * 50.0 == pytest.approx(0.4, abs=0.05)     # the correction: +0.4 A


@pytest.mark.drive   # ~2 s: outside the fast library tier
@pytest.mark.parametrize("anchors", [True, False])
def test_the_end_of_a_full_charge_anchors_the_soc_where_the_voltage_cannot(anchors: bool) -> None:
    """LFP on its plateau, the stored SOC 15 points low: the voltage cannot place it, the charger's CV end can.

    With the SOH estimator's anchors on, the end of the CC-CV charge puts the SOC filter back
    on the truth (the state reopened: the reading is far outside its 1 % sigma) and the soc
    check counts the anchor; without them a good part of the error stays (the first rest's voltage
    contradicts the stored SOC and the estimate restarts from what the plateau allows: 4 of the 15 points
    are left).
    """
    pack = SynthPack("lfp", np.array([0.92, 0.9, 0.94]) * 50.0, 0.55, seed=2, dt=2.0)
    pack.hold(10).hold(1200, -0.4 * 50).park(3600).hold(10).charge(0.25).hold(60).park(3600).hold(10).hold(900, -0.5 * 50)
    sessions = list(_pack_sessions("lfp", pack, 0.40, rest_capacity=anchors))
    counted = sum(est.soc_status().values["full_charge_anchors"] for est, _ in sessions)
    out = sessions[-1][1]
    err = out.soc.soc - float(np.mean(pack.soc))
    if anchors:
        assert counted == 1 and abs(err) < 0.02, (counted, err)
    else:
        assert counted == 0 and err < -0.03, (counted, err)


# -- RUL ------------------------------------------------------------------------------------------------------------

def test_trajectories_reproducible_and_reach_eol() -> None:
    a = sample_trajectories(5, 3)
    b = sample_trajectories(5, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.soh_obs, y.soh_obs)
        assert x.soh[0] > 0.95 and x.soh[-1] <= 0.8 + 0.01
        assert np.all(np.diff(x.r_rel) > 0)     # resistance grows
    assert any(not np.array_equal(x.soh, y.soh) for x, y in zip(a, sample_trajectories(5, 4)))


@pytest.mark.drive
def test_rul_interval_coverage_on_held_out() -> None:
    """Calibrated on one set, measured on another seed: 90 % interval covers 80..97 % (n = 240)."""
    train = sample_trajectories(60, 10)
    cal = sample_trajectories(60, 11)
    test = sample_trajectories(80, 12)
    p = fit_rul(train, cal, 0.01)
    # each held-out trajectory is predicted once: pooled = the knee and no-knee groups together
    no_knee = evaluate_rul(RulEstimator(p), [t for t in test if t.params["knee_efc"] == 0])["pooled"]
    knee = evaluate_rul(RulEstimator(p), [t for t in test if t.params["knee_efc"] > 0])["pooled"]
    pooled = {"n": no_knee["n"] + knee["n"],
              "coverage_90": (no_knee["coverage_90"] * no_knee["n"] + knee["coverage_90"] * knee["n"])
              / (no_knee["n"] + knee["n"])}
    assert pooled["n"] >= 200
    assert 0.80 <= pooled["coverage_90"] <= 0.97, pooled
    assert no_knee["rel_err_median"] <= 0.15, no_knee


def test_shipped_rul_params_load_and_predict() -> None:
    est, what = load_rul_estimator(default_model_dir(), "nmc")
    assert what == "rul_fadelaw_nmc_v1.json"
    tr = sample_trajectories(1, 99)[0]
    n = len(tr.efc) // 2
    rul, lo, hi = est.predict(tr.efc[:n], tr.soh_obs[:n])
    assert lo < rul < hi and math.isfinite(rul)
    bad, what = load_rul_estimator("/nonexistent", "nmc")
    assert what.startswith("defaults") and isinstance(bad, RulEstimator)
    assert math.isnan(RulEstimator(RulParams()).predict([1.0, 2.0], [1.0, 1.0])[0])   # too little history


def test_health_estimator_rul_from_history() -> None:
    tr = sample_trajectories(1, 5)[0]
    n = len(tr.efc) // 2
    h = HealthEstimator(2, 50.0, soh_history=list(zip(tr.efc[:n], tr.soh_obs[:n])), efc0=float(tr.efc[n - 1]))
    o = h.output()
    assert o.rul_lo <= o.rul_efc <= o.rul_hi
    assert abs(o.rul_efc - (tr.eol_efc - tr.efc[n - 1])) < 0.6 * (tr.eol_efc - tr.efc[n - 1])


@pytest.mark.pybamm
@pytest.mark.slow
def test_soh_on_a_short_simulated_life() -> None:
    """bms_ai.sim pack at SOH 0.88: trip, park, CC-CV full charge, park, trip; through PackEstimator sessions."""
    pytest.importorskip("pybamm")
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    from bms_ai.sim import Phase, Scenario, simulate_drive

    sc = Scenario("soh_life", chemistry="nmc", segments=[
        Phase("drive", "udds", repeats=1.0), Phase("park", duration_s=3600),
        Phase("charge", c_rate=0.3, soc_target=1.0), Phase("park", duration_s=3600),
        Phase("drive", "hwfet", repeats=1.0)], ambient_c=25, soc0=0.5, soh=0.88)
    d = simulate_drive(sc, seed=3)
    est = PackEstimator("nmc", d.design_capacity_ah, None, initial_soc=0.5)
    rng = np.random.default_rng(0)
    cur = d.current + 0.2 + rng.normal(0, 0.1, d.current.shape)
    v = np.round((d.v + rng.normal(0, 0.002, d.v.shape)) * 1000) / 1000
    awake = np.isfinite(d.current)
    blob = None
    for k in range(len(d.t)):
        if not awake[k]:
            continue
        if k and not awake[k - 1] and blob is None:
            blob = est.save_state()
            est = PackEstimator("nmc", d.design_capacity_ah, None)
            est.restore_state(blob)
            blob = None
        est.step(float(d.t[k]), float(cur[k]), v[k], np.full(2, 25.0))
    o = est.health_output()
    q_true = d.capacity[0] / d.design_capacity_ah
    assert float(np.sqrt(np.mean((o.cell_soh - q_true) ** 2))) <= 0.015
