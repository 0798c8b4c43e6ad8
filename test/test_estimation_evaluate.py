"""Evaluation protocol v2: conditions, the session harness, metrics, pooling, score, report, CLI."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation import evaluate as ev
from bms_ai.estimation.baselines import EvalSetup, Method, pack_state, unpack_state
from bms_ai.estimation.ecm_fit import simulate_ecm_drive
from bms_ai.estimation.ekf import EcmTable
from bms_ai.models.runtime import default_model_dir
from bms_ai.sim.dataset import RecordedDrive, load_drive, save_npz

DATA = Path(__file__).resolve().parent / "data"
TABLE = EcmTable(capacity_ah=5.0, temp_knots=[25.0], soc_knots=[0.5], r0=0.02, r1=0.01, tau=20.0, r_v=1e-5)
FAST = ["cc_oracle", "cc_stored", "cc_ocv_reset", "ekf"]
BASE = ev.Variant("base", "none", drives="*")


def two_session_drive(name: str = "life", classes=("b",), soc0: float = 0.8, seconds: float = 600.0,
                      park_s: float = 7200.0, **meta) -> RecordedDrive:
    """Two sessions of ``seconds`` at 1 Hz around a park; truth from the ECM; both cells 5 Ah."""
    rng = np.random.default_rng(7)
    n = int(seconds)
    t = np.concatenate([np.arange(n, dtype=float), n + park_s + np.arange(n, dtype=float)])
    i = np.repeat(rng.uniform(-1.5, 0.5, 2 * n // 30 + 1) * 5.0, 30)[:2 * n]
    i[n] = 0.0                                    # nothing flows over the park (the sim integrates over dt)
    d = simulate_ecm_drive(TABLE, load_ocv("nmc"), t, i, soc0, [5.0, 5.0], "nmc", name=name)
    d.session = np.repeat([0, 1], n).astype(np.int32)
    d.meta.update({"classes": list(classes), "soc_stored": d.soc[0].tolist(), **meta})
    return d


@pytest.fixture
def drives(tmp_path: Path) -> list[Path]:
    a = two_session_drive("clean", classes=("a",), seconds=300.0, park_s=0.0)
    a.session = None
    b = two_session_drive("life", classes=("b",), soc0=0.6)
    e = two_session_drive("heldout", classes=("a", "e"), soc0=0.9, held_out=True, cell_set="X", seconds=300.0)
    return [save_npz(tmp_path / d.name, d) for d in (a, b, e)]


# -- conditions and planning -----------------------------------------------------------------


def test_variants_are_declared_once_with_known_perturbations() -> None:
    names = [v.name for v in ev.VARIANTS]
    assert len(names) == len(set(names)) and ev.VARIANTS[0].kind == "none"
    assert {v.kind for v in ev.VARIANTS} <= set(ev.PERTURBATIONS)
    offsets = sorted(v.value for v in ev.VARIANTS if v.kind == "current_offset")
    assert offsets == [-0.03, -0.006, 0.006, 0.03]       # +-0.3 A / +-1.5 A on 50 Ah
    starts = {(v.value, round(v.value + v.stored_delta, 6)) for v in ev.VARIANTS if v.kind == "wrong_start"}
    assert starts == {(0.9, 0.6), (0.6, 0.3), (0.3, 0.6)}


def test_current_offset_is_added_to_the_measured_current_only() -> None:
    d = two_session_drive()
    x = ev.PERTURBATIONS["current_offset"](d, ev.Variant("o", "current_offset", 0.03))
    assert np.allclose(x.current - d.current, 0.03 * d.capacity_ah)
    assert x.cell_v is d.cell_v and np.array_equal(x.soc_stored, d.soc[0])


def test_wrong_start_changes_only_the_stored_soc() -> None:
    d = two_session_drive(soc0=0.9)
    x = ev.PERTURBATIONS["wrong_start"](d, ev.Variant("w", "wrong_start", 0.9, -0.3))
    assert np.allclose(x.soc_stored, d.soc[0] - 0.3) and x.current is d.current


def test_plan_selects_by_class_chemistry_cap_and_true_start(drives) -> None:
    heads = [ev.drive_head(p) for p in drives]
    v_off = ev.Variant("off", "current_offset", 0.03, drives="a", max_per_chemistry=1)
    v_ws = ev.Variant("ws", "wrong_start", 0.9, -0.3, drives="a")
    runs = ev.plan(heads, [BASE, v_off, v_ws])
    got = [(h.name, v.name) for h, v in runs]
    assert got == [("clean", "base"), ("life", "base"), ("heldout", "base"), ("clean", "off"), ("heldout", "ws")]
    with pytest.raises(ValueError, match="unknown perturbation"):
        ev.plan(heads, [ev.Variant("x", "gain")])


def test_drive_classes_from_meta_or_conditions() -> None:
    assert ev.drive_classes({"classes": ["b", "e"]}) == ("b", "e")
    assert ev.drive_classes({"ambient_c": 0.0}) == ("d",)
    assert ev.drive_classes({"current_offset_a": 0.3, "ambient_c": 25.0}) == ("c",)
    assert ev.drive_classes({"ambient_c": 25.0, "soh": 0.97}) == ("a",)
    assert ev.drive_classes({"soh": [0.85, 0.86, 0.84]}) == ("d",)      # one per cell (fleet vehicles)


# -- the harness --------------------------------------------------------------------------------


class Recorder(Method):
    """Counts in its blob; records how the harness calls it."""

    name = "recorder"
    calls: list = []

    def start(self, first_t, stored, soc_stored):
        self.k = 0 if stored is None else int(unpack_state(stored)["k"])
        self.soc = np.asarray(soc_stored, dtype=float)
        Recorder.calls.append((id(self), first_t, stored is None, self.soc.copy(), self.k))

    def step(self, t, current, cell_v, cell_t):
        self.k += 1
        return self.soc

    def stop(self):
        return pack_state(k=self.k)


class OracleRecorder(Recorder):
    name = "oracle_recorder"
    oracle_start = True


def test_harness_restarts_fresh_objects_from_their_own_blobs() -> None:
    d = two_session_drive()
    d.meta["soc_stored"] = [0.5, 0.5]
    Recorder.calls = []
    pack = ev.pack_info(d, "chemistry")
    x = ev.PERTURBATIONS["none"](d, BASE)
    stats, infos, last, trace = ev.run_methods(pack, EvalSetup(), [Recorder, OracleRecorder], x, d.soc, ev.marks(d))
    (a0, t0, fresh0, s0, k0), (a1, t1, fresh1, _, k1) = Recorder.calls[:2]
    assert a0 != a1 and fresh0 and not fresh1          # a new object per session, the second from the blob
    assert (t0, t1) == (d.t[0], d.t[600]) and (k0, k1) == (0, 600)
    assert np.allclose(s0, 0.5)                          # the stored start ...
    assert np.allclose(Recorder.calls[2][3], d.soc[0])   # ... the oracle gets the truth
    assert set(stats) == {"recorder", "oracle_recorder"} and trace["est"]["recorder"].shape[1] == 2


def test_cc_oracle_is_exact_on_ecm_truth_and_cc_stored_drifts_with_an_offset(drives) -> None:
    runs = ev.evaluate(drives[1:2], EvalSetup(ecm={"nmc": TABLE}), FAST,
                       [BASE, ev.Variant("off", "current_offset", 0.03, drives="*")], jobs=1, log=lambda s: None)
    base, off = runs
    assert base.sessions == 2 and base.methods["cc_oracle"].metrics["rmse"] < 1e-6    # truth stored as float32
    drift = 0.03 * 1199 / 3600                              # 0.03 C over the counted seconds
    assert off.methods["cc_stored"].metrics["max"] == pytest.approx(drift, rel=0.01)
    assert off.groups == ["all", "b", "c", "off"]


def test_missing_models_are_scored_as_a_fallback(drives, tmp_path) -> None:
    d = load_drive(drives[0])
    short = replace(d, t=d.t[:120], current=d.current[:120], cell_v=d.cell_v[:120], cell_t=d.cell_t[:120], soc=d.soc[:120])
    p = save_npz(tmp_path / "short", short)
    (r,) = ev.evaluate([p], EvalSetup(model_dir=tmp_path / "no_models"), ["shipped", "cc_oracle"], [BASE], jobs=1,
                       log=lambda s: None)
    assert "shipped" not in r.methods and "shipped_fallback" in r.methods
    assert r.methods["shipped_fallback"].info["fallback_reason"]
    wl = ev.win_loss([r], "cc_oracle")
    assert wl["win"] + wl["loss"] + wl["tie"] == 1          # the fallback run is compared (a 12 s drive may tie)


# -- metrics ----------------------------------------------------------------------------------------


def test_error_stats_on_known_errors() -> None:
    t = np.arange(0.0, 1000.0, 1.0)
    err = np.zeros((1000, 2))
    err[:400, 0] = 0.1                                   # wrong for the first 400 s, then within 2 points
    err[:, 1] = 0.01
    m = ev.Marks(k_5min=300, k_rest=700, sets={"charging": np.arange(1000) < 100, "high_load": np.zeros(1000, bool)})
    st = ev.ErrorStats(m)
    st.add(0, err[:600])
    st.add(600, err[600:])                              # fed in two sessions: same as one
    r = st.result(t)
    assert r["rmse"] == pytest.approx(np.sqrt(np.mean(err ** 2)))
    assert r["max"] == pytest.approx(0.1) and r["samples"] == 2000
    assert r["p95"] == pytest.approx(0.1001, abs=1e-4)   # 20 % of the values are 0.1
    assert r["err_5min"] == pytest.approx(0.1) and r["err_after_rest"] == pytest.approx(0.01)
    assert r["t_within_2pts_s"] == 400.0
    assert st.sets["charging"][1] == 200 and st.sets["high_load"][1] == 0
    never = ev.ErrorStats(m)
    never.add(0, np.full((1000, 1), 0.05))
    assert never.result(t)["t_within_2pts_s"] == np.inf


def test_marks_find_the_first_long_rest() -> None:
    d = two_session_drive(seconds=1200.0, park_s=0.0)
    d.current = np.where((d.t > 100) & (d.t < 650) | (d.t > 700) & (d.t < 1400), 0.0, -5.0)
    m = ev.marks(d)
    assert d.t[m.k_rest] == 1399.0 and d.t[m.k_5min] == 300.0      # the first rest is too short


# -- score, pooling, report ---------------------------------------------------------------------------


def test_score_weights_follow_the_mcmaster_benchmark() -> None:
    w = {c.mcmaster: c.weight for c in ev.SCORE_CASES}
    assert sum(w.values()) == pytest.approx(1.0) and len(w) == len(ev.SCORE_CASES) == 9
    assert w["payload conditions"] == 0.2 and all(v == 0.1 for k, v in w.items() if k != "payload conditions")
    assert {c.samples for c in ev.SCORE_CASES} <= {"all", *ev.SAMPLE_SETS}
    vals = {c.name: None for c in ev.SCORE_CASES} | {"held_out_cell": 0.02, "high_load": 0.05}
    assert ev.weighted_score(vals) == pytest.approx((0.1 * 0.02 + 0.2 * 0.05) / 0.3)
    assert ev.weighted_score({}) is None


def test_summary_pools_classes_and_counts_wins(drives) -> None:
    runs = ev.evaluate(drives, EvalSetup(ecm={"nmc": TABLE}), FAST, [BASE], jobs=1, log=lambda s: None)
    for r in runs:      # the oracle plays the shipped estimator here: it wins every run against the others
        r.methods["shipped"] = r.methods.pop("cc_oracle")
    s = ev.summary(runs)
    assert list(s["groups"]) == ["all", "a", "b", "e", "held_out"]
    allc = s["groups"]["all"]["all"]
    assert allc["runs"] == 3 and allc["methods"]["shipped"]["rmse"] < 1e-6
    assert allc["win_loss"]["cc_ocv_reset"]["loss"] == 0
    assert allc["win_loss"]["ekf"] == {"win": 3, "loss": 0, "tie": 0}
    cases = allc["methods"]["ekf"]["cases"]
    assert cases["held_out_cell"] is not None and cases["non_standard_cycles"] is not None and cases["temperatures"] is None
    assert s["groups"]["held_out"]["nmc"]["runs"] == 1


def test_report_files_and_tables(drives, tmp_path) -> None:
    runs = ev.evaluate(drives[:2], EvalSetup(ecm={"nmc": TABLE}), FAST, [BASE], jobs=1, log=lambda s: None)
    proto = ev.protocol(EvalSetup(ecm={"nmc": TABLE}), FAST, [BASE], "chemistry", None)
    page = ev.write_report(runs, tmp_path / "rep", proto, with_plots=False)
    md = (tmp_path / "rep" / "table.md").read_text()
    assert "## Class b - nmc" in md and "| high_load | 0.2 | payload conditions |" in md
    res = json.loads((tmp_path / "rep" / "results.json").read_text())
    assert res["protocol"]["version"] == 2 and len(res["runs"]) == 2
    assert res["runs"][1]["methods"]["ekf"]["metrics"]["rmse"] >= 0
    assert "<table>" in page.read_text()


def test_cli_options_and_unknown_condition() -> None:
    import argparse

    p = argparse.ArgumentParser()
    ev.add_arguments(p)
    a = p.parse_args(["d", "--report", "r", "--faults", "--no-soc", "--jobs", "3", "--variants", "base,offset+0.03C"])
    assert a.faults and a.no_soc and a.jobs == 3 and Path(a.models) == default_model_dir()
    assert [v.name for v in ev._choose_variants(a.variants)] == ["base", "offset+0.03C"]
    with pytest.raises(ValueError, match="unknown condition"):
        ev._choose_variants("base,nope")


@pytest.mark.slow
def test_cli_end_to_end_parallel_equals_serial(drives, tmp_path, capsys) -> None:
    """`bms-ai evaluate` with the shipped models, two jobs: the same numbers as one job, a full report."""
    from bms_ai.cli import main

    args = ["evaluate", *map(str, drives), "--variants", "base,offset+0.03C"]
    assert main([*args, "--report", str(tmp_path / "j2"), "--jobs", "2"]) == 0
    assert main([*args, "--report", str(tmp_path / "j1"), "--jobs", "1", "--no-plots"]) == 0
    r1, r2 = (json.loads((tmp_path / j / "results.json").read_text()) for j in ("j1", "j2"))
    measured = "cpu_us_per_sample"   # process time per sample: measured, so it differs from run to run
    assert {k: v for k, v in r1["summary"].items() if k != measured} == \
        {k: v for k, v in r2["summary"].items() if k != measured}
    assert set(r1["summary"][measured]) == set(r2["summary"][measured])
    assert (tmp_path / "j2" / "index.html").exists() and list((tmp_path / "j2").glob("class_*.png"))
    assert "shipped" in r2["runs"][0]["methods"]
