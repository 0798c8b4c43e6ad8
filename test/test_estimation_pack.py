"""PackEstimator: the one model/fallback decision, input checks, and the SOH verdict thresholds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from testutil import good_soc_model, trap_soc_model

from bms_ai.core.levels import ERROR, OK, WARN
from bms_ai.core.registry import UnknownName
from bms_ai.estimation import status
from bms_ai.estimation.health import HealthOutput
from bms_ai.estimation.pack import GUARD_WARN_HOLD_S, PackEstimator, open_models
from bms_ai.models.manifest import read_manifest, write_manifest
from bms_ai.sim.dataset import load_drive

N, M = 4, 2
V, T = np.full(N, 3.7), np.full(M, 25.0)
DRIVE = Path(__file__).resolve().parent / "data" / "selftest_nmc"
DEMO = Path(__file__).resolve().parents[1] / "data" / "drives" / "nmc_udds"   # inside the shipped models' domains


def _run(est: PackEstimator, seconds: float, t0: float = 0.0, current: float = -5.0):
    step = None
    for k in range(int(seconds * 10)):
        step = est.step(t0 + 0.1 * k, current, V, T)
    return step


def test_without_model_directory_the_classical_fallback_runs_and_says_why() -> None:
    est = PackEstimator("nmc", 5.0, None, initial_soc=0.5)
    assert est.statuses()[0].values[status.MODEL_FALLBACK] is True
    step = _run(est, 2.0)
    assert step.soc.method == "classical" and step.soc.fallback_reason == "no model directory"
    assert 0.0 < step.soc.soc < 1.0 and step.capacity_ah == step.design_capacity_ah == 5.0
    assert step.health == status.HEALTH_GOOD          # no SOH estimate yet: design capacity
    soc = est.soc_status()
    assert soc.level == WARN and soc.message == "fallback: Coulomb counting + ECM overpotential (no model directory)"
    assert soc.values[status.MODEL_FALLBACK] is True and soc.values["model"] == "none"


def test_models_disabled_is_a_fallback_with_its_own_reason(root: Path) -> None:
    models = open_models(root / "models")
    models.poll()
    est = PackEstimator("nmc", 5.0, models, use_models=False, initial_soc=0.5)
    assert est.soc_model() == (None, "models disabled (use_models=false)")
    assert _run(est, 0.5).soc.method == "classical"
    assert est.poll_models() == ""                    # no reload while models are disabled


def test_model_used_and_hot_reload_swaps_it(root: Path, tmp_path: Path) -> None:
    entries, _ = read_manifest(root / "models")
    nmc = next(e for e in entries if e.key == ("soc", "nmc"))
    shutil.copy(root / "models" / nmc.file, tmp_path / nmc.file)
    write_manifest(tmp_path, [nmc])
    est = PackEstimator.from_model_dir(tmp_path, "nmc", 5.0, initial_soc=0.5)
    assert est.poll_models() == ""                    # loaded before any filter exists: nothing to swap
    model, reason = est.soc_model()
    assert model is not None and model.version == nmc.version and reason == ""
    step = _run(est, 61.0, current=-1.0)              # past the NN warm-up; 0.2 C: inside the model's domain
    assert step.soc.method == "learned" and est.soc_status().level == OK
    v2 = dict(nmc.to_dict(), version=nmc.version + 1, file=f"{nmc.name}_v{nmc.version + 1}.onnx")
    shutil.copy(root / "models" / nmc.file, tmp_path / v2["file"])
    (tmp_path / (v2["file"] + ".json")).write_text(json.dumps(v2))
    assert est.poll_models() == f"SOC model now {nmc.name}@{nmc.version + 1}"
    assert est.soc_est.learned.model.version == nmc.version + 1
    assert est.soc_status().values["model"] == f"{nmc.name}@{nmc.version + 1}"


def test_unusable_samples_are_counted_not_raised() -> None:
    est = PackEstimator("lfp", 2.3, None, initial_soc=0.5)
    assert est.step(1.0, -1.0, np.empty(0), T) is None and est.reject_reason == "no cell voltages"
    assert est.step(1.0, float("nan"), np.full(N, np.nan), T) is None and "communication lost" in est.reject_reason
    assert est.step(float("nan"), -1.0, V, T) is None and "time stamp" in est.reject_reason
    assert est.step(2.0, -1.0, V, T) is not None
    assert est.step(2.0, -1.0, V, T) is None and "not after" in est.reject_reason
    assert est.rejected == 4 and est.steps == 1
    first = est.soc_status()
    assert first.values["rejected"] == 4 and first.level == WARN and "4 sample(s) rejected: stamp" in first.message
    assert est.step(3.0, -1.0, V, T) is not None
    assert "rejected" not in est.soc_status().message  # old rejections count, they no longer warn


@pytest.mark.parametrize("use_models", [True, False])
def test_a_first_sample_without_the_current_waits_for_it(use_models: bool) -> None:
    """Found by a graph test: the bus's first sample had the cell voltages but not yet the current. The start
    read the voltage through an overpotential of NaN: SOC and sigma NaN for good, and the state file refused
    the NaN at shutdown (a traceback in destroy_node). Now that sample is a counted rejection, and the start
    comes with the current: the same estimate as a drive whose first sample had it."""
    from bms_ai.estimation.state import encode_state
    from bms_ai.sim.dataset import resample_drive

    d = resample_drive(load_drive(DEMO), 10.0)
    runs = []
    for late in (False, True):
        est = PackEstimator.from_model_dir("", "nmc", d.capacity_ah, use_models=use_models)
        est.poll_models()
        out = [est.step(float(d.t[k]), float("nan") if late and k == 0 else float(d.current[k]), d.cell_v[k],
                        d.cell_t[k]) for k in range(300)]
        runs.append(np.array([s.soc.soc if s is not None else np.nan for s in out]))
        if late:
            assert out[0] is None and est.rejected == 1 and "no valid current yet" in est.reject_reason
            assert "rejected" in est.soc_status().message
        encode_state(est.state_payload())  # finite: it saves
    truth = d.soc[:300].mean(axis=1)
    assert np.isfinite(runs[1][1:]).all() and np.max(np.abs(runs[1][1:] - truth[1:])) < 0.01
    assert np.max(np.abs(runs[1][50:] - runs[0][50:])) < 0.002


def test_config_errors_fail_at_construction() -> None:
    with pytest.raises(UnknownName, match="'nca'"):
        PackEstimator("nca", 50.0)
    with pytest.raises(ValueError, match="capacity_ah"):
        PackEstimator("nmc", 0.0)


@pytest.mark.parametrize("soh,level,health", [
    (1.0, OK, status.HEALTH_GOOD), (0.8, OK, status.HEALTH_GOOD), (0.79, WARN, status.HEALTH_UNSPEC_FAILURE),
    (0.7, WARN, status.HEALTH_UNSPEC_FAILURE), (0.69, ERROR, status.HEALTH_UNSPEC_FAILURE),
    (0.6, ERROR, status.HEALTH_UNSPEC_FAILURE), (0.59, ERROR, status.HEALTH_DEAD)])
def test_soh_verdict_thresholds(soh: float, level: int, health: int) -> None:
    assert status.soh_verdict(soh) == status.SohVerdict(level, health)


def test_health_checks_follow_the_verdict() -> None:
    est = PackEstimator("nmc", 50.0, None, initial_soc=0.5, health_period=1.0)
    assert [s.check for s in est.statuses()] == ["soc"]
    _run(est, 1.5)
    assert [s.check for s in est.statuses()] == ["soc", "soh", "rul"]
    assert est.rul_status().message == "RUL: not enough SOH history yet"
    cells = np.full(N, 0.65)
    est.last_health = HealthOutput(soh=0.65, cell_soh=cells, capacity_ah=32.5, r0=0.001, cell_r0=np.full(N, 0.001),
                                   rul_efc=float("nan"), rul_lo=float("nan"), rul_hi=float("nan"), efc=10.0,
                                   capacity_updates=1, r0_updates=1)
    soh = est.soh_status()
    assert soh.level == ERROR and soh.message == "SOH 65.0 %" and soh.values["capacity_ah"] == 32.5
    est.health_period = 1e9                            # keep the injected estimate for the next step
    step = est.step(10.0, -5.0, V, T)
    assert step.health == status.HEALTH_UNSPEC_FAILURE and step.capacity_ah == 32.5
    assert step.charge_ah == pytest.approx(step.soc.soc * 32.5)


# ----------------------------------------------------------------------------- output guard and retirement

@pytest.mark.drive
@pytest.mark.parametrize(("kind", "needle"), [("nan", "non-finite"), ("huge", "outside the declared range")])
def test_model_refused_everywhere_is_retired_and_a_new_version_loads(tmp_path: Path, kind: str, needle: str) -> None:
    """NaN / 1e30 on every real input: ECM-backed finite SOC, retirement after 50 steps, then hot reload of v2."""
    trap = trap_soc_model(tmp_path, kind, 0.0, feature=7)     # cell temperature above 0 degC: every real row
    write_manifest(tmp_path, [trap])
    d = load_drive(DEMO)
    est = PackEstimator.from_model_dir(tmp_path, "nmc", d.capacity_ah, initial_soc=d.soc[0])
    est.poll_models()
    label = f"{trap.name}@1"
    assert est.soc_model()[0].label == label            # passed every load-time check

    def run(k0: int, k1: int) -> None:
        for k in range(k0, k1):
            step = est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k])
            assert step is not None and np.isfinite(step.soc.soc) and np.isfinite(step.soc.cell_soc).all()
            assert np.isfinite(step.charge_ah)

    run(0, 49)
    o = est.last
    assert o.method == "classical" and o.fallback_reason.startswith(f"{d.n_cells} cell(s): model output refused: eta: ")
    st = est.soc_status()
    assert st.level == WARN and needle in st.message and st.values["guard_rejected_steps"] == 49
    assert needle in st.values["guard_last_reason"] and st.values["guard_retirements"] == 0
    run(49, 50)                                          # the 50th refused step: retired
    assert est.slot().model is None and est.slot().reason.startswith(f"{label} retired: output guard refused")
    run(50, 700)                                         # the ECM from here on
    o, st = est.last, est.soc_status()
    assert o.method == "classical" and o.fallback_reason.startswith(
        f"{label} retired: output guard refused cells in 50 consecutive steps (last: eta: ")
    assert needle in o.fallback_reason
    assert st.level == WARN and "retired" in st.message and st.values[status.MODEL_FALLBACK] is True
    assert st.values["guard_rejected_steps"] == 50 and st.values["guard_retirements"] == 1
    assert st.values["last_model_event"].startswith(f"retired {label} for soc/nmc")
    assert est.poll_models() == ""                       # nothing new: the retired file stays out
    good = good_soc_model(tmp_path, 2)
    (tmp_path / (good.file + ".json")).write_text(json.dumps(good.to_dict()))
    assert est.poll_models() == f"SOC model now {good.name}@2"
    run(700, 710)
    st = est.soc_status()
    assert est.last.method == "learned" and st.level == OK and st.values["model"] == f"{good.name}@2"
    assert st.values["guard_rejected_steps"] == 50 and st.values["guard_consecutive"] == 0


@pytest.mark.drive
def test_soc_status_warns_while_and_shortly_after_cells_are_refused(tmp_path: Path) -> None:
    """A model refused now and then (while charging): WARN on refused steps and for GUARD_WARN_HOLD_S after."""
    write_manifest(tmp_path, [trap_soc_model(tmp_path, "nan", 0.0)])
    d = load_drive(DEMO)
    est = PackEstimator.from_model_dir(tmp_path, "nmc", d.capacity_ah, initial_soc=d.soc[0], retire_after=10 ** 9)
    est.poll_models()
    last_refused, held, ok = -np.inf, 0, 0
    for k in range(len(d.t)):
        step = est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k])
        if np.float32(d.current[k] / d.capacity_ah) > 0:
            last_refused = d.t[k]
        st = est.soc_status()
        recent = d.t[k] - last_refused <= GUARD_WARN_HOLD_S
        assert st.level == (WARN if recent or step.soc.method != "learned" else OK), (d.t[k], st.message)
        if recent and step.soc.method == "learned":
            held += 1
            assert "output guard refused cells" in st.message and "non-finite" in st.message
        ok += st.level == OK
    assert held > 0 and ok > 0 and est.soc_est.learned is not None


# ----------------------------------------------------------------------------- voltage update rate

@pytest.mark.drive
def test_an_update_period_runs_the_model_on_one_sample_in_five_and_counts_every_sample() -> None:
    """At 10 Hz with a 0.5 s update period (the node's default, the rate the report measures) the model runs on
    every fifth sample only, the estimate is the per-sample one to 0.01 points on the bundled drive, and the
    first sample after a restored park is an update (the wake's rest voltage)."""
    from bms_ai.sim.dataset import resample_drive

    d = resample_drive(load_drive(DEMO), 10.0)

    def run(period: float) -> tuple[np.ndarray, int, PackEstimator]:
        est = PackEstimator.from_model_dir("", "nmc", d.capacity_ah, initial_soc=d.soc[0], update_period_s=period)
        est.poll_models()
        out, runs = np.empty(len(d.t)), 0
        for k in range(len(d.t)):
            s = est.step(float(d.t[k]), float(d.current[k]), d.cell_v[k], d.cell_t[k])
            out[k], runs = s.soc.soc, runs + (est.soc_est.t_update == float(d.t[k]))
        return out, runs, est

    every, n_every, _ = run(0.0)
    fifth, n_fifth, est = run(0.5)
    assert n_every == len(d.t) and abs(n_fifth - len(d.t) / 5) <= 2, (n_every, n_fifth)
    truth = d.soc.mean(axis=1)
    rmse = [float(np.sqrt(np.mean((x - truth) ** 2))) for x in (every, fifth)]
    assert abs(rmse[0] - rmse[1]) < 1e-4 and np.max(np.abs(every - fifth)) < 0.002, rmse
    again = PackEstimator.from_model_dir("", "nmc", d.capacity_ah, update_period_s=0.5)
    again.poll_models()
    assert again.restore_state(est.save_state()) == ""
    t_wake = float(d.t[-1]) + 3600.0
    again.step(t_wake, -0.3, d.cell_v[-1], d.cell_t[-1])
    again.step(t_wake + 0.1, -0.3, d.cell_v[-1], d.cell_t[-1])
    assert again.soc_est.t_update == t_wake


def test_emit_gives_the_counted_estimate_before_the_correction_and_the_state_is_unchanged() -> None:
    """The running graph publishes through ``emit`` once the charge is counted: the voltage update (and model
    inference) comes after, the corrected steps are bit-identical to a plain run, an update's correction shows in
    the next sample's output, and an emit that raises still leaves the step complete."""
    from bms_ai.sim.dataset import resample_drive

    d = resample_drive(load_drive(DEMO), 10.0)
    n = 300

    def make() -> PackEstimator:
        est = PackEstimator.from_model_dir("", "nmc", d.capacity_ah, initial_soc=min(d.soc[0].mean() + 0.15, 1.0),
                                           update_period_s=0.5)
        est.poll_models()
        return est

    plain, early = make(), make()
    seen: list[tuple[float, float, float]] = []  # (emitted SOC, last update time when emitted, steps done)
    gaps = {False: [], True: []}  # |emitted - corrected| on samples without / with a voltage update
    for k in range(n):
        t = float(d.t[k])
        a = plain.step(t, float(d.current[k]), d.cell_v[k], d.cell_t[k])
        b = early.step(t, float(d.current[k]), d.cell_v[k], d.cell_t[k],
                       emit=lambda s: seen.append((s.soc.soc, early.soc_est.t_update, early.steps)))
        assert b.soc.soc == a.soc.soc and np.array_equal(b.soc.cell_soc, a.soc.cell_soc)
        assert len(seen) == k + 1 and seen[-1][2] == (k + 1 if k == 0 else k)  # a first sample: after its step
        update = early.soc_est.t_update == t
        if k and update:
            assert seen[-1][1] < t  # emitted before the update ran
            gaps[True].append(abs(seen[-1][0] - b.soc.soc))
        elif k:
            gaps[False].append(abs(seen[-1][0] - b.soc.soc))
    assert max(gaps[False]) == 0.0 and len(gaps[True]) >= n // 5 - 2
    assert 0.0 < max(gaps[True]) < 0.02, max(gaps[True])  # the corrections of a wrong start: one sample late
    # an emit that fails: the exception reaches the caller, the step is complete
    t = float(d.t[n])

    def boom(_s) -> None:
        raise RuntimeError("publish failed")

    with pytest.raises(RuntimeError):
        early.step(t, float(d.current[n]), d.cell_v[n], d.cell_t[n], emit=boom)
    a = plain.step(t, float(d.current[n]), d.cell_v[n], d.cell_t[n])
    assert early.steps == plain.steps == n + 1 and early.last.soc == a.soc.soc
