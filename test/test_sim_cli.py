"""`bms-ai simulate`: single drive with progress, suite with caching, listing."""

from __future__ import annotations

import json

import pytest

from bms_ai.cli import main  # noqa: E402
from bms_ai.sim import Phase, Scenario, read_meta  # noqa: E402
from bms_ai.sim.suite import SUITE_SIZES, suite  # noqa: E402

pytestmark = pytest.mark.pybamm


def test_simulate_scenario_file_with_progress(tmp_path, capsys):
    sc = Scenario("cli_tiny", "lfp", [Phase("drive", "us06", repeats=0.03)], soc0=0.6)
    f = tmp_path / "sc.json"
    f.write_text(json.dumps(sc.to_dict()))
    rc = main(["simulate", "--scenario", str(f), "--seed", "9", "--out", str(tmp_path / "o"), "--asc"])
    assert rc == 0
    err = capsys.readouterr().err
    assert "PyBaMM" in err and "h driving per minute" in err
    assert {p.name for p in (tmp_path / "o").iterdir()} == {"can.blf", "can.asc", "truth.parquet", "meta.json"}
    m = read_meta(tmp_path / "o")
    assert m["seed"] == 9 and m["chemistry"] == "lfp" and m["pack_config"] == "pack96_lfp.yaml"


def test_simulate_errors_are_clear(tmp_path, capsys):
    assert main(["simulate", "--scenario", "no_such_thing", "--out", str(tmp_path)]) == 1
    assert "unknown scenario" in capsys.readouterr().err


def test_suite_builds_in_parallel_and_caches(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["simulate", "--suite", "smoke", "--out", str(out), "--jobs", "2"]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["simulated"] == 2 and first["cached"] == 0 and first["hours_per_cpu_minute"] > 0
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("can.blf")}
    assert main(["simulate", "--suite", "smoke", "--out", str(out)]) == 0
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert second["simulated"] == 0 and second["cached"] == 2
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("can.blf")}


def test_suite_grids_are_deterministic_and_disjoint():
    train, val, test = suite("train"), suite("val"), suite("test")
    assert len(train) == SUITE_SIZES["train"] and len(val) == SUITE_SIZES["val"] and len(test) == SUITE_SIZES["test"]
    assert [n for n, _, _ in suite("train")] == [n for n, _, _ in train]
    seeds = [s for _, _, s in train + val + test]
    assert len(set(seeds)) == len(seeds)
    chems = {sc.chemistry for _, sc, _ in train}
    assert chems == {"nmc", "lfp"}
    assert {sc.faults[0].kind for _, sc, _ in train if sc.faults} >= {"isc", "thermal"}
    assert min(sc.soh for _, sc, _ in train) <= 0.75 and min(sc.ambient_c for _, sc, _ in train) <= -10
