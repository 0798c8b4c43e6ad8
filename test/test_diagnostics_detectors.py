"""Incipient-fault detectors on synthetic packs (fast) and on data-factory drives (slow / bundled)."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import numpy as np
import pytest

from bms_ai.diagnostics.detectors import DetectorBank, DetectorParams, PlatingModel
from bms_ai.pack import PackSample

pytestmark = pytest.mark.drive   # whole synthetic 96-cell drives through the detector bank
N, NT = 96, 32
ROOT = Path(__file__).resolve().parents[1]


def synth_pack(minutes: float, leak_cell: int = -1, leak_a: float = 0.0, heat_sensor: int = -1,
               heat_k: float = 0.0, onset_s: float = 300.0, seed: int = 0):
    """Pulsed discharge with rests; linear-ish OCV; cell spread like the data factory's (1 % C, 0.5 % SOC)."""
    rng = np.random.default_rng(seed)
    dt = 0.1
    n = int(minutes * 600)
    t = np.arange(1, n + 1) * dt
    phase = t % 120.0
    cur = np.where(phase < 70, -40.0 + 10 * np.sin(t / 7), np.where(phase < 80, 15.0, 0.0))
    cap = 50.0 * (1 + 0.01 * rng.standard_normal(N))
    soc0 = 0.8 + 0.005 * rng.standard_normal(N)
    r0 = 0.0015 * np.exp(0.05 * rng.standard_normal(N))
    k_heat = 1 + 0.08 * rng.standard_normal(NT)
    t_off = 0.3 * rng.standard_normal(NT)
    noise = rng.standard_normal((n, N + NT))  # per tick: the cell-voltage draws, then the temperature draws
    leak = np.zeros((n, N))
    if leak_cell >= 0:
        leak[t >= onset_s, leak_cell] = leak_a
    soc = soc0 + np.cumsum((cur[:, None] - leak) * dt / 3600 / cap, axis=0)
    ocv = 3.3 + 0.85 * soc - 0.1 * (soc - 0.5) ** 2
    v_out = np.round(ocv + r0 * cur[:, None] + 0.0008 * noise[:, :N], 3)
    pack_heat = np.empty(n)
    heat = np.zeros(n)
    ph = h = 0.0
    for j in range(n):  # first-order thermal lags (scalars: cheap)
        ph += dt * (cur[j] ** 2 * 1e-4 - ph / 1500.0)
        pack_heat[j] = ph
        if heat_sensor >= 0 and t[j] >= onset_s:
            h += dt * (heat_k - h / 1020.0) / 1020.0 * 1020.0 / 680.0
        heat[j] = h
    temps = 25 + pack_heat[:, None] * k_heat + t_off + 0.15 * noise[:, N:]
    if heat_sensor >= 0:
        temps[:, heat_sensor] += heat / 3
    return t, cur, v_out, np.round(temps, 1)


def pack_sample(t: float, cur: float, v: np.ndarray, temps: np.ndarray) -> PackSample:
    """One measurement of a synthetic pack (all stamps at t)."""
    return PackSample(stamp=t, pack_voltage=float(v.sum()), pack_current=float(cur), cell_voltages=v,
                      cell_temperatures=temps)


def run_bank(t, cur, v, temps, bank: DetectorBank, step_times: list[float] | None = None):
    """Step the bank over a pack; the last tick's results by check (and each step's cost if asked)."""
    results = None
    for j in range(len(t)):
        s = pack_sample(t[j], cur[j], v[j], temps[j])
        t0 = time.perf_counter()
        results = bank.step(s, float(t[j]))
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)
    return {r.check: r for r in results}


# 13 min: the leak detector needs ~11.5 min of quiet data from five rests before it judges
MINUTES = 13


@pytest.fixture(scope="module")
def clean():
    """A fault-free pack through one bank, then 60 s of bus silence (every value NaN) on the same bank."""
    t, cur, v, temps = synth_pack(MINUTES)
    bank = DetectorBank(N, NT, tick_hz=10.0, params=DetectorParams.load(chemistry="nmc"))
    step_times: list[float] = []
    res = run_bank(t, cur, v, temps, bank, step_times)
    events_before_silence = list(bank.events)
    silent = []
    for j in range(600):
        s = PackSample.empty(N, NT)
        s.stamp = float(t[-1]) + 0.1 * (j + 1)
        silent.append(bank.step(s, s.stamp))
    return {"results": res, "events": events_before_silence, "step_times": step_times, "silent": silent,
            "bank": bank}


@pytest.fixture(scope="module")
def faulted():
    """One pack with an internal short (cell 30, 3 A from 300 s) and extra heat at sensor 11 (from 300 s)."""
    t, cur, v, temps = synth_pack(MINUTES, leak_cell=30, leak_a=3.0, heat_sensor=11, heat_k=4.0)
    bank = DetectorBank(N, NT, params=DetectorParams.load(chemistry="nmc"))
    return run_bank(t, cur, v, temps, bank), bank


def test_no_alarm_on_fault_free_pack(clean):
    """Fault-free driving with rests: judged (past learning) and silent."""
    events, res = clean["events"], clean["results"]
    assert not events, [(e.check, e.index, e.set_time) for e in events]
    assert res["internal short"].level == 0 and res["thermal anomaly"].level == 0
    assert res["internal short"].message == "no abnormal leak current"  # judged, not still learning


def test_internal_short_flagged_on_the_right_cell(faulted):
    """A 3 A leak in cell 30 is flagged on cell 30, after the onset, with about the right size."""
    res, bank = faulted
    ev = [e for e in bank.events if e.check == "internal short"]
    assert ev and ev[0].index == 30 and ev[0].set_time > 300.0
    assert res["internal short"].values["max_leak_cell"] == 30
    assert res["internal short"].values["max_leak_a"] == pytest.approx(3.0, rel=0.4)


def test_thermal_anomaly_flagged_on_the_right_sensor(faulted):
    """Extra heat at sensor 11 is flagged on sensor 11 after the onset; nothing else alarms."""
    _res, bank = faulted
    ev = [e for e in bank.events if e.check == "thermal anomaly"]
    assert ev and ev[0].index == 11 and ev[0].set_time > 300.0
    # nothing else alarms: the short's cell and the hot sensor only
    assert {(e.check, e.index) for e in bank.events} <= {("internal short", 30), ("imbalance growth", 30),
                                                          ("thermal anomaly", 11), ("anomaly score", -1)}


def test_plating_model_onnx_matches_numpy_and_flags_cold_fast_charge():
    """ONNX and numpy give the same probability; cold fast charge is risky, warm is not."""
    model = PlatingModel.load()
    if model is None:
        pytest.skip("no trained plating model in models/faults")
    x = np.array([[-10.0, 1.0, 3.9], [25.0, 0.3, 3.9], [25.0, 0.05, 4.0]], dtype=np.float32)
    p_onnx = model.predict(x)
    ref = PlatingModel(model.w, model.b, model.mean, model.std)  # numpy path, same weights
    np.testing.assert_allclose(p_onnx, ref.predict(x), atol=1e-5)
    assert p_onnx[0] > 0.5 > p_onnx[1]


def _trap_plating(path: Path, kind: str, w: np.ndarray, b: float, mean: np.ndarray, std: np.ndarray) -> Path:
    """The trained exporter's logistic graph, with NaN ("nan") or p x 1e30 ("huge") for rows below 0 degC."""
    import onnx
    from onnx import helper, numpy_helper

    from bms_ai.diagnostics.train import export_plating_onnx

    export_plating_onnx(path, w, b, mean, std)
    m = onnx.load(str(path))
    g = m.graph
    next(n for n in g.node if "p_plating" in n.output).output[:] = ["p_raw"]
    g.initializer.extend([numpy_helper.from_array(np.array(v, dt), name) for name, v, dt in (
        ("s0", [0], np.int64), ("s1", [1], np.int64), ("zero", [0.0], np.float32),
        ("nan", [np.nan], np.float32), ("big", [1e30], np.float32))])
    g.node.extend([helper.make_node("Slice", ["features", "s0", "s1", "s1"], ["t_min"]),
                   helper.make_node("Less", ["t_min", "zero"], ["cold"])])
    if kind == "nan":
        g.node.append(helper.make_node("Where", ["cold", "nan", "p_raw"], ["p_plating"]))
    else:
        g.node.extend([helper.make_node("Mul", ["p_raw", "big"], ["p_big"]),
                       helper.make_node("Where", ["cold", "p_big", "p_raw"], ["p_plating"])])
    onnx.save(m, str(path))
    return path


PLATING_W = (np.array([-0.4, 3.0, 2.0], np.float32), -1.0, np.array([10.0, 0.5, 3.8], np.float32),
             np.array([10.0, 0.5, 0.2], np.float32))


@pytest.mark.parametrize(("kind", "needle"), [("nan", "non-finite"), ("huge", "outside the declared range")])
def test_refused_plating_answers_come_from_numpy_and_a_bad_session_is_dropped(tmp_path, kind, needle):
    """The ONNX plating model refused on cold rows: those rows get the numpy value, counted; 50 in a row: numpy only."""
    from bms_ai.diagnostics.detectors import PLATING_RETIRE_AFTER

    w, b, mean, std = PLATING_W
    model = PlatingModel(w, b, mean, std, _trap_plating(tmp_path / "plating.onnx", kind, w, b, mean, std))
    ref = PlatingModel(w, b, mean, std)
    assert model.kind() == "onnx"
    x = np.array([[-10.0, 1.0, 3.9], [25.0, 0.3, 3.9]], np.float32)
    p = model.predict(x)
    assert np.isfinite(p).all() and p[0] == ref.predict(x)[0]
    np.testing.assert_allclose(p[1], ref.predict(x)[1], atol=1e-6)          # the ONNX answer, used
    assert model.guard.rejected_rows == 1 and needle in model.guard.last_reason
    for _ in range(PLATING_RETIRE_AFTER - 2):
        assert np.isfinite(model.predict(x[:1])).all()
    assert model.kind() == "onnx"
    model.predict(x[:1])                                                     # the 50th refusal in a row
    assert model.session is None and model.kind().startswith("numpy (onnx retired: plating.onnx: p_plating: ")
    assert np.array_equal(model.predict(x), ref.predict(x)) and model.guard.calls == PLATING_RETIRE_AFTER


def test_plating_check_with_a_nan_model_behaves_like_the_numpy_model(tmp_path):
    """A cold charge through the detector bank: same levels and probabilities as the numpy model, never NaN."""
    w, b, mean, std = PLATING_W
    trap = PlatingModel(w, b, mean, std, _trap_plating(tmp_path / "plating.onnx", "nan", w, b, mean, std))
    banks = [DetectorBank(N, NT, tick_hz=10.0, plating=m) for m in (trap, PlatingModel(w, b, mean, std))]
    for j in range(300):
        t = 0.1 * (j + 1)
        s = PackSample(stamp=t, pack_voltage=96 * 3.95, pack_current=50.0, cell_voltages=np.full(N, 3.95),
                       cell_temperatures=np.full(NT, -10.0), status={"charger_connected": 1.0})
        got, want = ({x.check: x for x in bank.step(s, t)}["lithium plating"] for bank in banks)
        assert got.level == want.level and got.values["p_plating"] == want.values["p_plating"]
        assert math.isfinite(got.values["p_plating"])
    assert got.values["p_plating"] > 0.5 and got.level > 0                  # the cold fast charge is flagged
    assert got.values["model"].startswith("numpy (onnx retired: plating.onnx: p_plating: non-finite")
    assert got.values["guard_rejected_rows"] == 50 and want.values["guard_calls"] == 0


def test_detector_step_is_cheap(clean):
    """The detectors fit a 10 Hz tick with room to spare."""
    times = clean["step_times"][:3000]
    p50 = float(np.percentile(times, 50))
    print(f"detector step p50 {p50 * 1e6:.0f} us p99 {np.percentile(times, 99) * 1e6:.0f} us")
    assert p50 < 2e-3


BUNDLED = sorted((ROOT / "data" / "drives").glob("*isc*/meta.json"))


@pytest.mark.skipif(not BUNDLED, reason="no bundled fault drive in data/drives")
def test_bundled_fault_drive_replays_without_false_alarm_before_onset(tmp_path):
    """A bundled internal-short drive replays through rules and detectors without a false alarm before the onset."""
    from bms_ai.diagnostics.evaluate import evaluate_drive
    from bms_ai.diagnostics.replay import load_measured, replay

    m = load_measured(BUNDLED[0].parent, tmp_path)
    # the first 75 s: the minute before the onset and 15 s of the fault (false alarms count before the onset)
    n = int(np.searchsorted(m.t, 75.0))
    m = dataclasses.replace(m, t=m.t[:n], pack_voltage=m.pack_voltage[:n], current=m.current[:n],
                            cell_v=m.cell_v[:n], cell_t=m.cell_t[:n], contactor=m.contactor[:n])
    assert m.faults and all(f["onset_s"] < m.t[-1] for f in m.faults)
    r = replay(m)
    rows, de = evaluate_drive(m, r)
    assert rows and all(math.isfinite(x.onset_s) for x in rows)
    assert not de.false_alarms["detector"], [(e.check, e.set_time) for e in de.false_alarms["detector"]]


def test_tampered_plating_model_is_refused(tmp_path):
    """A plating model whose bytes do not match the manifest is refused."""
    import shutil

    src = ROOT / "models" / "faults"
    if not (src / "plating.onnx").is_file():
        pytest.skip("no trained plating model")
    for f in ("plating.onnx", "plating.json", "manifest.json"):
        shutil.copy(src / f, tmp_path / f)
    assert PlatingModel.load(tmp_path) is not None
    blob = bytearray((tmp_path / "plating.onnx").read_bytes())
    blob[-1] ^= 0xFF
    (tmp_path / "plating.onnx").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="sha256"):
        PlatingModel.load(tmp_path)


def _cold_profile(current: np.ndarray, temp_c: float = -10.0, status: dict | None = None):
    """Bank results per tick for a cold pack driven with the given current (10 Hz)."""
    bank = DetectorBank(N, NT, tick_hz=10.0)
    levels, anomaly = [], []
    for j, i in enumerate(current):
        t = 0.1 * (j + 1)
        s = PackSample(stamp=t, pack_voltage=96 * 3.95, pack_current=float(i), cell_voltages=np.full(N, 3.95),
                       cell_temperatures=np.full(NT, temp_c), status=dict(status or {}))
        r = {x.check: x for x in bank.step(s, t)}
        levels.append(r["lithium plating"].level)
        anomaly.append(r["anomaly score"].level)
    return levels, anomaly, r


def test_plating_needs_a_charge_not_regen_pulses():
    """Regen pulses in the cold are no charge; a sustained or charger-connected charge is."""
    if PlatingModel.load() is None:
        pytest.skip("no trained plating model in models/faults")
    # 20 s regen at 1C between 30 s discharges at -10 degC: same (T, C-rate, V) as a cold charge
    t = np.arange(2000) * 0.1  # four regen pulses
    regen = np.where(t % 50.0 < 20.0, 50.0, -60.0)
    lv, an, _ = _cold_profile(regen)
    assert max(lv) == 0 and max(an) == 0
    # a sustained 1C charge at -10 degC: flagged within the charge (context + debounce)
    p = DetectorParams.load()
    lv, _, r = _cold_profile(np.full(int((p.plating_context_s + p.plating_debounce / 10.0) * 10) + 100, 50.0))
    k = next(j for j, x in enumerate(lv) if x > 0)
    assert (p.plating_context_s + p.plating_debounce / 10.0) * 10 - 2 <= k + 1 <= (
        p.plating_context_s + p.plating_debounce / 10.0) * 10 + 2
    assert r["lithium plating"].values["charging"] is True
    # a connected charger is charging context at once
    lv, _, _ = _cold_profile(np.full(p.plating_debounce + 50, 50.0), status={"charger_connected": 1.0})
    assert next(j for j, x in enumerate(lv) if x > 0) + 1 == p.plating_debounce


def test_all_nan_samples_raise_no_detector_alarm(clean):
    """Bus silence after a drive (all NaN) raises no detector alarm."""
    for res in clean["silent"]:  # 60 s of bus silence after the drive: every value NaN
        assert all(r.level == 0 for r in res), [(r.check, r.message) for r in res if r.level]
    assert not clean["bank"].events


def test_params_file_round_trip_and_old_files_load(tmp_path):
    """Calibration writes every parameter; files written before a parameter existed still load (defaults)."""
    import json

    base = DetectorParams.defaults("lfp")
    d = base.to_dict()
    assert {"resistance_ridge", "spread_rate", "anomaly_clear_score", "max_tick_gap_s"} <= set(d)
    f = tmp_path / "detectors.json"
    f.write_text(json.dumps({"params": {"lfp": dict(d, spread_rate=0.1)}}))
    got = DetectorParams.load(f, chemistry="lfp")
    assert got.spread_rate == 0.1 and tuple(got.resistance_ridge) == base.resistance_ridge
    assert got.dvdah_default == base.dvdah_default
    old = {k: v for k, v in d.items() if k not in ("resistance_ridge", "spread_rate")}
    f.write_text(json.dumps({"params": {"lfp": dict(old, leak_alarm_a=2.0)}}))
    got = DetectorParams.load(f, chemistry="lfp")
    assert got.leak_alarm_a == 2.0 and got.spread_rate == base.spread_rate
    f.write_text(json.dumps({"params": {"lfp": {"leak_alarm": 1.0}}}))
    with pytest.raises(ValueError, match=r"unknown detector parameters \['leak_alarm'\]"):
        DetectorParams.load(f, chemistry="lfp")


@pytest.mark.parametrize("text", ["null", "[1, 2, 3]", '{"models": null}', '{"models": [1, null]}', "{"])
def test_broken_fault_model_files_are_value_errors(tmp_path, text):
    """A broken fault-model manifest, plating model or threshold file is a one-line ValueError, not a crash."""
    import shutil

    src = ROOT / "models" / "faults"
    for f in ("plating.onnx", "plating.json"):
        if (src / f).is_file():
            shutil.copy(src / f, tmp_path / f)
    (tmp_path / "manifest.json").write_text(text)
    if (tmp_path / "plating.onnx").is_file():
        with pytest.raises(ValueError, match="sha256 does not match|not valid JSON"):
            PlatingModel.load(tmp_path)
    (tmp_path / "plating.json").write_text(text)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(ValueError) as ei:
        PlatingModel.load(tmp_path)
    assert "plating" in str(ei.value) and "\n" not in str(ei.value)
    (tmp_path / "detectors.json").write_text(text)
    if not text.startswith('{"'):             # an object without params for the chemistry means "defaults"
        with pytest.raises(ValueError, match="detector"):
            DetectorParams.load(tmp_path / "detectors.json")
    (tmp_path / "detectors.json").write_text('{"params": {"nmc": {"capacity_ah": "high"}}}')
    with pytest.raises(ValueError, match="wrong type"):
        DetectorParams.load(tmp_path / "detectors.json")


def test_monitor_runs_on_defaults_when_fault_model_files_are_broken(tmp_path, monkeypatch):
    """The fault monitor keeps its rules and detectors (default thresholds, no plating model) and says why."""
    from bms_ai.diagnostics import detectors
    from bms_ai.diagnostics.monitor import FaultMonitor

    for f in ("plating.json", "detectors.json"):
        (tmp_path / f).write_text("null")
    monkeypatch.setattr(detectors, "share_path", lambda *parts: tmp_path if parts[-1] == "faults" else tmp_path / parts[-1])
    mon = FaultMonitor.load("", "nmc", "packT", detectors=True)
    s = PackSample(stamp=0.1, pack_voltage=96 * 3.8, pack_current=-10.0, cell_voltages=np.full(N, 3.8),
                   cell_temperatures=np.full(NT, 25.0))
    res = {r.check: r for r in mon.on_sample(s, now=0.1)}
    files = res["fault monitor"].values["detector_files"]
    assert "plating model not used" in files and "default detector thresholds" in files
    assert "lithium plating" in res and mon.detectors.p == DetectorParams.defaults("nmc")


def _fleet_cell_alarms(fault_rate: float, imbalance_z: float | None = None) -> tuple[set[tuple[str, int]], list[dict]]:
    """A simulated 4-day vehicle life (24 cells, self-discharge differing between healthy cells) at 0.1 Hz
    through the fault monitor: the cell-drift alarms it raised and the injected faults."""
    from bms_ai.diagnostics.monitor import FaultMonitor
    from bms_ai.fleet.simulator import FleetConfig, simulate_vehicle
    from bms_ai.sim.dataset import resample_drive

    fc = FleetConfig(vehicles=1, days=4, seed=1, n_cells=24, mix={"NMC_Chen2020": 1.0}, fault_rate=fault_rate)
    d = resample_drive(simulate_vehicle(fc.validate(), 0), 0.1)
    mon = FaultMonitor.load("", d.chemistry, "hw", capacity_ah=d.capacity_ah)
    for k in range(len(d.t)):
        t, v, temp = float(d.t[k]), d.cell_v[k], d.cell_t[k]
        mon.on_sample(PackSample(t, float(np.sum(v)), float(d.current[k]), v, temp, t, t, np.full(v.shape, t),
                                 np.full(temp.shape, t)), t)
        if k == 0 and imbalance_z is not None:
            mon.detectors.p.imbalance_z = imbalance_z
    alarms = {(e.check, e.index) for e in mon.all_events() if e.check in ("imbalance growth", "internal short")}
    return alarms, d.meta["faults"]


def test_imbalance_growth_over_days_needs_a_cell_that_stands_out_from_its_peers() -> None:
    """Over days every cell's drift grows with its own self-discharge; only a cell far outside its peers' spread
    (the injected 120 mA short) is imbalance growth. A fixed voltage alone flags a third of a healthy pack."""
    healthy, _ = _fleet_cell_alarms(0.0)
    assert healthy == set()
    fixed_only, _ = _fleet_cell_alarms(0.0, imbalance_z=0.0)
    assert len(fixed_only) >= 5
    faulted, faults = _fleet_cell_alarms(1.0)
    short = next(f["cell"] for f in faults if f["kind"] == "internal_short")
    assert faulted == {("imbalance growth", short)}


@pytest.mark.parametrize("knee", [True, False])
def test_a_full_charge_on_the_lfp_knee_is_not_imbalance_growth(knee: bool) -> None:
    """The demo fleet's coldest, most aged LFP vehicle (LFP_H_graphiteC, SOH 0.70, no injected fault), its
    second week at 0.1 Hz: after a charge to 97.6 % its lowest-capacity cells sit 1.7-2.3 SOC points above the
    median, on the OCV knee, 117-244 mV above it. Judged only off the knees, no cell is imbalance growth;
    judged there too (no knee band), the knee's capacity mismatch is read as growth."""
    from bms_ai.diagnostics.monitor import FaultMonitor
    from bms_ai.fleet.demo import DemoConfig, _fleet
    from bms_ai.fleet.simulator import simulate_vehicle
    from bms_ai.sim.dataset import resample_drive

    d = resample_drive(simulate_vehicle(_fleet(DemoConfig(), 1), 7), 0.1)
    assert d.meta["variant"] == "LFP_H_graphiteC" and not d.meta["faults"]
    mon = FaultMonitor.load("", d.chemistry, "hw", capacity_ah=d.capacity_ah)
    for k in range(len(d.t)):
        t, v, temp = float(d.t[k]), d.cell_v[k], d.cell_t[k]
        mon.on_sample(PackSample(t, float(np.sum(v)), float(d.current[k]), v, temp, t, t, np.full(v.shape, t),
                                 np.full(temp.shape, t)), t)
        if k == 0 and not knee:
            mon.detectors.flat_v = (-math.inf, math.inf)
    flagged = {e.index for e in mon.all_events() if e.check == "imbalance growth"}
    assert (flagged == set()) if knee else len(flagged) >= 2, flagged


@pytest.mark.parametrize("park_s", [1800.0, 1e12])
def test_a_colder_day_after_a_park_is_not_heating(park_s: float) -> None:
    """Two trips 10 h apart, the second 15 degC colder: the sensors' gains on the pack's own heating still hold.
    (The median's rise counted from the first trip's start read the colder ambient as -15 degC of heating and
    flagged healthy sensors; the heating factor is read from the sensors, parks or not.)"""
    t1, c1, v1, tp1 = synth_pack(20, seed=0)
    t2, c2, v2, tp2 = synth_pack(20, seed=0)
    t = np.r_[t1, t2 + t1[-1] + 36000.0]
    bank = DetectorBank(N, NT, params=dataclasses.replace(DetectorParams.load(), thermal_park_s=park_s))
    res = run_bank(t, np.r_[c1, c2], np.r_[v1, v2], np.r_[tp1, tp2 - 15.0], bank)
    assert {e.index for e in bank.events if e.check == "thermal anomaly"} == set()
    assert res["thermal anomaly"].level == 0


def evening_pack(seed: int, minutes: float = 60.0, rise_c: float = 8.0, drop_c: float = 6.0, spread: float = 0.1):
    """1 Hz: the pack heats 8 degC over its ambient while the ambient falls 6 degC (a cooling evening);
    each sensor reads the ambient plus its own share of the rise, an offset, 0.15 degC noise, 0.1 degC LSB."""
    t, cur, v, _ = synth_pack(minutes, seed=seed)
    t, cur, v = t[::10], cur[::10], v[::10]
    rng = np.random.default_rng(seed + 100)
    gain = 1 + spread * rng.standard_normal(NT)
    rise = rise_c * (1 - np.exp(-t / 900.0))
    ambient = 25.0 - drop_c * t / t[-1]
    temps = ambient[:, None] + rise[:, None] * gain + 0.3 * rng.standard_normal(NT) \
        + 0.15 * rng.standard_normal((len(t), NT))
    return t, cur, v, np.round(temps, 1)


@pytest.mark.parametrize("seed", range(4))
def test_an_ambient_drifting_during_a_trip_is_not_heating(seed: int) -> None:
    """The sensors' deviations follow the pack's rise over the ambient, not the median's change since the wake
    (which the falling ambient moves too: that model flagged 3-5 healthy sensors on each of these packs)."""
    bank = DetectorBank(N, NT, tick_hz=1.0, params=DetectorParams.load())
    run_bank(*evening_pack(seed), bank)
    assert {e.index for e in bank.events if e.check == "thermal anomaly"} == set()


@pytest.mark.parametrize("every", [1, 10])
def test_extra_heat_on_a_heating_pack_is_flagged_on_its_sensor(every: int) -> None:
    """The same evening with 0.8 degC of extra heat growing at sensor 7 from minute 30, at 1 Hz and at the
    fleet run's 0.1 Hz: flagged there only."""
    t, cur, v, temps = evening_pack(1)
    temps = temps.copy()
    temps[:, 7] += np.round(np.clip((t - 1800.0) / 900.0, 0.0, 1.0) * 0.8, 1)
    bank = DetectorBank(N, NT, tick_hz=1.0 / every, params=DetectorParams.load())
    run_bank(t[::every], cur[::every], v[::every], temps[::every], bank)
    ev = [e for e in bank.events if e.check == "thermal anomaly"]
    assert {e.index for e in ev} == {7} and ev[0].set_time > 1800.0


def test_the_thermal_cusum_of_sensor_noise_does_not_grow_with_the_sampling_interval() -> None:
    """Sensor noise only (no heating), 90 min at 1 Hz and every tenth reading of it: each reading is one piece
    of evidence at either rate, so the CUSUM's time-average is alike (weighting each reading by its interval
    gave the 0.1 Hz CUSUM steps ten times as large: fleet weeks at 0.1 Hz flagged healthy sensors)."""
    t, cur, v, temps = evening_pack(2, minutes=90, rise_c=0.0, drop_c=0.0)
    mean_cusum = []
    for every in (1, 10):
        bank = DetectorBank(N, NT, tick_hz=1.0 / every, params=DetectorParams.load())
        seen = []
        for j in range(0, len(t), every):
            bank.step(pack_sample(t[j], cur[j], v[j], temps[j]), float(t[j]))
            if t[j] > 600.0:
                seen.append(float(np.mean(bank.thermal_cusum)))
        mean_cusum.append(float(np.mean(seen)))
        assert not [e for e in bank.events if e.check == "thermal anomaly"]
    assert 0.5 < mean_cusum[1] / mean_cusum[0] < 2.0, mean_cusum
