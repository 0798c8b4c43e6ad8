"""FaultMonitor (what fault_monitor decides, without ROS): rejections, events, watchdog, peer status, reset."""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bms_ai.core.levels import ERROR, OK, STALE, WARN
from bms_ai.diagnostics import workload
from bms_ai.diagnostics.monitor import FaultMonitor, events_status, format_event, limits_path
from bms_ai.diagnostics.rules import Event
from bms_ai.estimation import status
from bms_ai.pack import PackSample

N, NT = 96, 32


def sample(t: float, v: np.ndarray | None = None, n: int = N, status_: dict | None = None) -> PackSample:
    """A healthy 10 Hz measurement stamped ``t`` (cell voltages ``v``)."""
    v = np.full(n, 3.8) if v is None else v
    return PackSample(stamp=t, pack_voltage=float(v.sum()), pack_current=-10.0, cell_voltages=v.copy(),
                      cell_temperatures=np.full(NT, 25.0), pack_voltage_stamp=t, pack_current_stamp=t,
                      cell_voltage_stamps=np.full(n, t), cell_temperature_stamps=np.full(NT, t),
                      status=status_ or {})


@pytest.fixture
def mon() -> FaultMonitor:
    """A monitor on the shipped NMC limits, rules only (detectors have their own tests)."""
    return FaultMonitor.load("", "nmc", "packT", detectors=False, stale_after=1.0, max_events=2)


def by_check(results: list) -> dict:
    """Results keyed by check name."""
    return {r.check: r for r in results}


def test_startup_status_names_the_limits_in_use(mon: FaultMonitor) -> None:
    """Before any measurement the monitor says STALE and which limits file it loaded."""
    (r,) = mon.startup_status()
    assert (r.check, r.level) == ("fault monitor", STALE)
    assert r.values["limits"] == str(limits_path("", "nmc")) and r.values["chemistry"] == "nmc"


def test_every_check_plus_events_and_health_per_step(mon: FaultMonitor) -> None:
    """One step returns every rule check, then the event summary and the monitor's own health."""
    res = mon.on_sample(sample(0.1), now=100.0)
    checks = [r.check for r in res]
    assert checks[-2:] == ["events", "fault monitor"]
    assert {"cell overvoltage", "can timeout", "current derating"} <= set(checks)
    r = by_check(res)
    assert r["events"].level == OK and r["events"].message == "no active events"
    assert r["fault monitor"].level == OK and r["fault monitor"].message == "1 steps, 0 rejected"


def test_bad_samples_are_counted_not_raised(mon: FaultMonitor) -> None:
    """No cells, a changed shape, an old stamp: each is counted and named in the next health status."""
    assert mon.on_sample(sample(0.1, n=0, v=np.empty(0)), now=1.0) == []
    assert mon.rejected == 1 and mon.reject_reason == "no cell voltages"
    assert mon.on_sample(sample(0.2), now=1.1)
    assert mon.on_sample(sample(0.3, n=10), now=1.2) == []
    assert mon.reject_reason == "shape 10/32 != 96/32"
    assert mon.on_sample(sample(0.2), now=1.3) == []
    assert mon.reject_reason == "out-of-order stamp"
    health = by_check(mon.on_sample(sample(0.4), now=1.4))["fault monitor"]
    assert health.level == WARN and health.message == "2 steps, 3 rejected (out-of-order stamp)"
    assert health.values["rejected"] == 3 and health.values["steps"] == 2


def test_a_failing_rule_step_is_reported_as_error(mon: FaultMonitor) -> None:
    """A sample the rules cannot digest (non-numeric contactor state) gives an ERROR status, not a crash."""
    mon.on_sample(sample(0.1), now=1.0)
    (r,) = mon.on_sample(sample(0.2, status_={"contactor_plus": "closed"}), now=1.1)
    assert (r.check, r.level) == ("fault monitor", ERROR) and r.message.startswith("rule step failed: TypeError")
    assert mon.rejected == 1 and mon.steps == 1


def test_latched_event_is_listed_and_cleared_by_reset(mon: FaultMonitor) -> None:
    """Cell 7 beyond MSL: ERROR event listed as eventN, still there after recovery, gone after reset."""
    assert mon.reset(now=0.0) is False  # nothing to reset before the first sample
    v = np.full(N, 3.8)
    v[7] = 4.30
    t = 0.0
    for _ in range(12):
        t += 0.1
        res = by_check(mon.on_sample(sample(t, v), now=t))
    ev = res["events"]
    assert ev.level == ERROR and ev.values["active"] == 4  # MOL, RSL, MSL of cell 7 and the cell spread
    assert len([k for k in ev.values if k.startswith("event")]) == 2  # max_events
    assert ev.message == ("4 active: cell overvoltage (MOL), cell overvoltage (MSL), cell overvoltage (RSL), "
                          "cell voltage spread (PLAUSIBILITY)")
    for _ in range(20):
        t += 0.1
        res = by_check(mon.on_sample(sample(t), now=t))
    assert res["events"].level == ERROR and res["events"].values["event0"].startswith("cell overvoltage MSL #7 ")
    assert mon.reset(now=t) is True
    t += 0.1
    res = by_check(mon.on_sample(sample(t), now=t))
    assert res["events"].level == OK and res["cell overvoltage"].level == OK


def test_format_and_summary_of_events() -> None:
    """Event text: check, tier, element, onset, set time, value; pack-level events have no element."""
    cell = Event("cell overvoltage", "msl", 7, 1.25, 1.5, 4.3, level=ERROR)
    pack = Event("can timeout", "timeout", -1, 3.0, 3.0, 2.0, level=ERROR)
    assert format_event(cell) == "cell overvoltage MSL #7 onset=1.2 set=1.5 value=4.3"
    assert format_event(pack) == "can timeout TIMEOUT onset=3.0 set=3.0 value=2"
    r = events_status([cell, pack], total=5, max_events=8)
    assert (r.level, r.values["active"], r.values["total"]) == (ERROR, 2, 5)
    assert r.message == "2 active: can timeout (TIMEOUT), cell overvoltage (MSL)"
    assert events_status([], 0, 8).message == "no active events"


def test_watchdog_steps_on_stale_data_only_after_silence(mon: FaultMonitor) -> None:
    """No step while measurements flow; after stale_after of silence the timeout check fires."""
    assert mon.watchdog(now=10.0) == []  # nothing received yet
    mon.on_sample(sample(0.1), now=10.0)
    assert mon.watchdog(now=10.5) == []
    res = by_check(mon.watchdog(now=11.2))
    assert res["can timeout"].level == ERROR
    assert mon.last_t == pytest.approx(0.1 + 1.2)  # the sample's time base: last stamp + silence


def test_model_fallback_only_from_this_packs_estimator(mon: FaultMonitor) -> None:
    """The fallback flag counts from another node of this pack; other packs and own checks are ignored."""
    flag = [(status.MODEL_FALLBACK, "True")]
    mon.on_peer_status("other-pack", "estimator: soc", flag)
    mon.on_peer_status("packT", "foreign: limits", flag)
    mon.on_peer_status("packT", "soc", flag)                  # not a <node>: <check> name
    assert mon.model_fallback is None
    mon.startup_status()
    mon.on_peer_status("packT", "fault_monitor: fault monitor", flag)  # our own status is not the estimator's
    assert mon.model_fallback is None
    mon.on_peer_status("packT", "estimator: soc", [("soc", "0.5")])
    assert mon.model_fallback is None
    mon.on_peer_status("packT", "estimator: soc", flag)
    assert mon.model_fallback is True
    mon.on_peer_status("packT", "estimator_2: soc", [(status.MODEL_FALLBACK, "false")])  # a renamed estimator
    assert mon.model_fallback is False
    mon.on_peer_status("packT", "estimator: soc", flag)
    res = by_check(mon.on_sample(sample(0.1), now=1.0))
    assert res["estimator plausibility"].level == WARN and "model fallback" in res["estimator plausibility"].message


def test_estimate_inputs_ignore_unknown_values(mon: FaultMonitor) -> None:
    """NaN SOC and non-positive capacity keep the previous values; a zero stamp means 'use step time'."""
    mon.on_estimate(0.5, 12.0, 45.0)
    assert (mon.soc, mon.soc_stamp, mon.capacity) == (0.5, 12.0, 45.0)
    mon.on_estimate(math.nan, 13.0, 0.0)
    assert (mon.soc, mon.soc_stamp, mon.capacity) == (0.5, 12.0, 45.0)
    mon.on_estimate(0.4, 0.0, math.nan)
    assert (mon.soc, mon.soc_stamp, mon.capacity) == (0.4, None, 45.0)


def test_detectors_join_the_step_when_enabled() -> None:
    """With detectors on, their checks come with the rules' in one step."""
    mon = FaultMonitor.load("", "nmc", "packT", detectors=True)
    checks = {r.check for r in mon.on_sample(sample(0.1), now=1.0)}
    assert {"internal short", "thermal anomaly", "lithium plating", "anomaly score", "cell overvoltage"} <= checks


@pytest.mark.parametrize("clock_offset", [0.0, 5.0, -5.0])
def test_bus_gap_leaves_no_warning_behind(clock_offset: float) -> None:
    """After a real gap (watchdog steps, then samples resume) every status returns to OK.

    The monitor clock may run apart from the CAN stamps (live bus, node clock);
    the watchdog steps on the samples' time base, so the samples that follow
    are neither rejected as out of order nor held back until the clocks meet.
    """
    mon = FaultMonitor.load("", "nmc", "packT", detectors=False, stale_after=1.0)
    last: dict = {}
    t = 100.0
    for k in range(50):
        t = 100.0 + 0.1 * k
        last.update(by_check(mon.on_sample(sample(t), now=t + clock_offset)))
    for k in range(1, 13):                                 # 3 s of silence, 4 Hz watchdog
        last.update(by_check(mon.watchdog(now=t + clock_offset + 0.25 * k)))
    assert last["can timeout"].level == ERROR
    t0 = t + 3.0
    for k in range(100):
        t = t0 + 0.1 * k
        last.update(by_check(mon.on_sample(sample(t), now=t + clock_offset + 0.02)))
    assert mon.rejected == 0
    raised = {c: r.level for c, r in last.items() if r.level != OK}
    assert raised == {}


def test_monitor_warning_after_a_rejection_clears(mon: FaultMonitor) -> None:
    """One bad message raises the monitor's own status to WARN for a while, not forever; the count stays."""
    t = 1.0
    mon.on_sample(sample(t), now=t)
    mon.on_sample(sample(0.5), now=t)                    # out of order
    levels = []
    for k in range(1, 80):
        levels.append(by_check(mon.on_sample(sample(t + 0.1 * k), now=t + 0.1 * k))["fault monitor"])
    assert levels[0].level == WARN and levels[-1].level == OK
    assert levels[-1].values["rejected"] == 1 and levels[-1].values["last_reject"] == "out-of-order stamp"


# ----------------------------------------------------------------------------- pack-level configs and per-pack limits

def pack_level_sample(t: float, n_series: int = 98, n_temps: int = 2) -> PackSample:
    """What can_bridge publishes for a pack config without cell voltages: the average cell, marked."""
    from bms_ai.can.assembler import PACK_LEVEL_KEY

    v = 3.7 * n_series
    return PackSample(stamp=t, pack_voltage=v, pack_current=-10.0, cell_voltages=np.array([v / n_series]),
                      cell_temperatures=np.full(n_temps, 25.0), pack_voltage_stamp=t, pack_current_stamp=t,
                      cell_voltage_stamps=np.array([t]), cell_temperature_stamps=np.full(n_temps, t),
                      status={PACK_LEVEL_KEY: 1.0})


def test_pack_level_sample_reports_cell_checks_not_monitored_never_ok() -> None:
    """With the average cell only, checks that need real cells are STALE 'not monitored' and never set an event
    (the pack voltage is 98 x the one 'cell': a per-cell rule would call that an ERROR); the rest still run."""
    from bms_ai.diagnostics.rules import CELL_CHECKS, NO_CELLS

    m = FaultMonitor.load("", "nmc", "kona", detectors=True, stale_after=1.0)
    for k in range(1, 40):
        res = by_check(m.on_sample(pack_level_sample(0.1 * k), now=100.0 + 0.1 * k))
    for check in CELL_CHECKS:
        assert (res[check].level, res[check].message) == (STALE, NO_CELLS), check
        assert res[check].values["monitored"] is False
    assert res["charge overcurrent"].level == OK and res["cell overtemperature"].level == OK
    assert res["events"].level == OK and not m.active_events()
    assert res["fault monitor"].values["cell_data"] == "pack-level (average cell)"


def test_one_temperature_sensor_leaves_the_spread_checks_unmonitored() -> None:
    """A spread needs two sensors: with one, the temperature spread check says so."""
    from bms_ai.diagnostics.rules import FEW_SENSORS

    m = FaultMonitor.load("", "nmc", "p", detectors=False)
    res = by_check(m.on_sample(pack_level_sample(0.1, n_temps=1), now=1.0))
    assert (res["temperature spread"].level, res["temperature spread"].message) == (STALE, FEW_SENSORS)


def test_limits_follow_the_pack_capacity_and_its_overrides() -> None:
    """A 98s 180 Ah pack gets its own current limits (3.6 x the 50 Ah reference's) and its config's overrides;
    the reference pack's limits are unchanged."""
    from bms_ai.diagnostics.config import load_limits, pack_limits

    ref = load_limits(limits_path("", "nmc"))
    assert pack_limits("nmc", 50.0) == ref
    kona = pack_limits("nmc", 180.0, {"cell_voltage": {"over": {"mol": 4.15, "rsl": 4.17, "msl": 4.19}},
                                      "pack_current": {"discharge": {"mol": 400.0, "rsl": 450.0, "msl": 500.0}}})
    assert kona.current_charge.mol == pytest.approx(3.6 * ref.current_charge.mol)
    assert kona.derating.max_charge_a == pytest.approx(3.6 * ref.derating.max_charge_a)
    assert kona.current_discharge.mol == 400.0 and kona.cell_over.msl == 4.19
    assert kona.cell_under == ref.cell_under and kona.reference_capacity_ah == 180.0
    assert "scaled to 180 Ah + pack config limits" in kona.source
    m = FaultMonitor.load("", "nmc", "kona", capacity_ah=180.0, detectors=False)
    assert m.cfg.current_charge.mol == pytest.approx(360.0)


def test_the_shipped_reference_packs_keep_their_limits_files_unscaled(root) -> None:
    """Each shipped reference pack's capacity is its limits file's reference: no scaling, same limits."""
    from bms_ai.can.packconfig import load_pack_config
    from bms_ai.diagnostics.config import load_limits, pack_limits

    for name in ("pack96.yaml", "pack96_lfp.yaml"):
        cfg = load_pack_config(root / "config" / name)
        assert pack_limits(cfg.chemistry, cfg.design_capacity_ah) == load_limits(limits_path("", cfg.chemistry))


# ------------------------------------------------------------------ identical results over whole drives
RECORD = Path(__file__).parent / "data" / "diagnostics_monitor_record.json"
#: the OpenBLAS kernels the record was made with: the thermal model's matrix products differ in the last bits
#: between kernels (SkylakeX's AVX-512 ones on one test machine), and the detector's CUSUM carries that on
_BLAS_KERNELS = {"OPENBLAS_CORETYPE": "Haswell"}


def _record(faults: bool) -> dict:
    """:func:`workload.record` as JSON has it (NaN, tuples as lists), on the record's BLAS kernels where the CPU
    runs them (x86-64 with AVX2), in a fresh interpreter: OpenBLAS picks its kernels when it loads."""
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if platform.machine() not in ("x86_64", "AMD64") or " avx2" not in flags:
        return json.loads(json.dumps(workload.record(faults)))
    code = "import json, sys; from bms_ai.diagnostics import workload; print(json.dumps(workload.record(sys.argv[1] == '1')))"
    out = subprocess.run([sys.executable, "-c", code, "1" if faults else "0"], env=dict(os.environ, **_BLAS_KERNELS),
                         capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout)


@pytest.mark.drive
@pytest.mark.parametrize("variant", ["clean", "faulted"])
def test_monitor_output_over_a_drive_matches_the_stored_record(variant: str) -> None:
    """Every status (level, message, values in order), every event, call by call, as the rules gave before the
    per-sample cost was cut (recorded with the rules of commit 853b2d7).

    Regenerate only for an intended behaviour change, on the same kernels:
    ``OPENBLAS_CORETYPE=Haswell python -m bms_ai.diagnostics.workload record test/data/diagnostics_monitor_record.json``.
    """
    want = json.loads(RECORD.read_text())[variant]
    assert workload.first_difference(_record(variant == "faulted"), want) == ""


@pytest.mark.drive
def test_monitor_output_on_small_packs_matches_the_stored_record() -> None:
    """No sensor, one, two, five; pack-level cells; NaN and signed zeros: as recorded before the speed-up."""
    want = json.loads(RECORD.read_text())["edges"]
    got = json.loads(json.dumps(workload.record_edges()))
    assert workload.first_difference(got, want) == ""


def test_record_notices_a_changed_status() -> None:
    """The record's digest covers values, so a single changed number shows as a difference."""
    from bms_ai.diagnostics.rules import CheckResult

    a = workload.canonical([CheckResult("x", OK, "m", {"v": 1.0, "step_mean_us": 3.0})])
    b = workload.canonical([CheckResult("x", OK, "m", {"v": 1.0000000000000002, "step_mean_us": 4.0})])
    c = workload.canonical([CheckResult("x", OK, "m", {"v": 1.0, "step_mean_us": 9.0})])
    d = workload.canonical([CheckResult("x", OK, "m", {"w": 0, "v": 1.0})])
    e = workload.canonical([CheckResult("x", OK, "m", {"v": 1.0, "w": 0})])
    assert a != b and a == c
    assert d != e  # the order values are published in counts too


def test_a_bus_gap_during_a_rest_is_no_long_rest() -> None:
    """The watchdog's steps on the last sample during a silence are no rest observed.

    A 20 s stop at a 0.8 A accessory load, then the bus is silent for 110 s (a stalled replay, a bus
    fault), then the same stop resumes: the current-offset rule needs 120 s of rest seen at a steady
    voltage, and the repeated last sample (the same voltage at every watchdog step) must not make it one.
    """
    mon = FaultMonitor.load("", "nmc", "packT", detectors=False, stale_after=0.5)
    levels = []

    def at_rest(t: float) -> PackSample:
        s = sample(t)
        s.pack_current = -0.8
        return s

    t = 100.0
    for k in range(200):                                   # 20 s at rest
        t = 100.0 + 0.1 * k
        levels.append(by_check(mon.on_sample(at_rest(t), now=t))["current sensor offset"].level)
    for k in range(1, 441):                                # 110 s of silence, 4 Hz watchdog
        res = by_check(mon.watchdog(now=t + 0.25 * k))
        if "current sensor offset" in res:
            levels.append(res["current sensor offset"].level)
    t0 = t + 110.0
    for k in range(100):                                   # 10 s more at rest
        t = t0 + 0.1 * k
        levels.append(by_check(mon.on_sample(at_rest(t), now=t))["current sensor offset"].level)
    assert WARN not in levels


def test_a_monitor_clock_without_time_is_no_silence(mon: FaultMonitor) -> None:
    """Samples received while the monitor clock has no time (NaN: sim time before /clock) start no silence."""
    t0 = 1767225600.0
    for k in range(3):
        mon.on_sample(sample(t0 + 0.1 * k), now=math.nan)
    assert mon.watchdog(now=t0 + 5.0) == []                 # no silence measured from "no time"
    r = by_check(mon.on_sample(sample(t0 + 0.3), now=t0 + 0.3))
    assert r["can timeout"].level == OK and mon.last_t == pytest.approx(t0 + 0.3)
    unstamped = sample(0.0)
    assert mon.on_sample(unstamped, now=math.nan) == [] and mon.rejected == 1   # no stamp, no clock: no time
