"""`bms-ai fleet demo`: alarm scoring against injected faults, config errors, and one small loop end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from bms_ai.cli import main
from bms_ai.fleet.demo import DemoConfig, parse_event, score_alarms


def _drive(faults: list[dict], hours: float = 24.0, awake: float = 3.0) -> SimpleNamespace:
    return SimpleNamespace(meta={"faults": faults, "timing": {"calendar_h": hours, "awake_h": awake}})


def test_parse_event() -> None:
    assert parse_event("internal short#7@1234s") == ("internal short", 7)
    assert parse_event("current sensor offset#-1@5s") == ("current sensor offset", -1)
    assert parse_event("garbage") == ("garbage", -1)


def test_alarms_are_scored_against_the_injected_faults() -> None:
    drives = [_drive([{"cell": 3, "kind": "internal_short"}]), _drive([{"cell": 5, "kind": "capacity_fade"}]),
              _drive([])]
    edge = [{"pseudonym": "a", "events": ["internal short#3@100s", "cell undertemperature#0@5s"]},
            {"pseudonym": "b", "events": []},
            {"pseudonym": "c", "events": ["imbalance growth#9@50s", "cell undervoltage#2@9s"]}]
    ranking = [{"vehicle": "b", "cell": 5, "score": 9.0}, {"vehicle": "c", "cell": 1, "score": 5.9},
               {"vehicle": "a", "cell": 0, "score": 7.0}]
    r = score_alarms(drives, edge, ranking, anomaly_z=6.0)
    assert r["injected"] == 2 and r["detected"] == 2 and r["recall"] == 1.0
    # false: c#9 (a detector on a healthy vehicle) and a#0 (an anomaly on a healthy cell); c#1 is below the threshold
    assert r["false_alarms"] == 2
    assert r["per_1000_calendar_h"] == pytest.approx(1000 * 2 / 72.0)
    assert r["per_1000_awake_h"] == pytest.approx(1000 * 2 / 9.0)
    # operating-limit events are counted apart, never scored
    assert r["limit_events"] == {"cell undertemperature": 1, "cell undervoltage": 1}
    missed = score_alarms(drives, edge, [], anomaly_z=6.0)
    assert missed["detected"] == 1 and missed["false_alarms"] == 1


def test_sensor_and_signal_indices_are_not_cell_numbers() -> None:
    """A thermal anomaly names a temperature sensor (the cells under it), the estimator's plausibility check a
    signal of the pack: scored as such, not as cells 0, 1, 2."""
    groups = [0, 0, 0, 1, 1, 1]
    drives = [SimpleNamespace(meta={"faults": [{"cell": 4, "kind": "internal_short"}], "temp_sensor_cells": groups,
                                    "timing": {"calendar_h": 24.0, "awake_h": 3.0}}),
              SimpleNamespace(meta={"faults": [], "temp_sensor_cells": groups,
                                    "timing": {"calendar_h": 24.0, "awake_h": 3.0}})]
    edge = [{"pseudonym": "a", "events": ["thermal anomaly#1@10s", "estimator plausibility#0@5s"]},
            {"pseudonym": "b", "events": ["thermal anomaly#0@10s", "estimator plausibility#1@5s",
                                          "stuck signal#7@3s", "stuck signal#8@3s"]}]
    r = score_alarms(drives, edge, [], anomaly_z=6.0)
    assert r["detected"] == 1 and r["rows"][0]["by"] == ["thermal anomaly"]      # sensor 1 covers cell 4
    false = sorted(x["element"] + ": " + x["kind"] for x in r["rows"] if x["level"] == "false")
    # b: sensor 0, the pack (plausibility), stuck signal 7 = sensor 1 (6 cells first), 8 = the pack voltage
    assert false == ["pack: false alarm: estimator plausibility, stuck signal", "sensor 0: false alarm: thermal anomaly",
                     "sensor 1: false alarm: stuck signal"]


@pytest.mark.parametrize("kw", [{"vehicles": 1}, {"heldout_every": 1}, {"edge_rate_hz": 0.0}, {"workers": 0}])
def test_bad_demo_config_is_one_line(kw) -> None:
    with pytest.raises(ValueError) as e:
        DemoConfig(**kw).validate()
    assert "\n" not in str(e.value)


def test_cli_bad_arguments_are_one_line(tmp_path, capsys) -> None:
    assert main(["fleet", "demo", "--out", str(tmp_path), "--vehicles", "1"]) == 2
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "vehicles" in out[0]


@pytest.mark.drive
def test_a_small_loop_runs_end_to_end(tmp_path) -> None:
    """Four vehicles, one day each week, 12 cells: every stage runs, and what was installed is what was published."""
    rc = main(["fleet", "demo", "--out", str(tmp_path), "--vehicles", "4", "--days", "1", "--cells", "12",
               "--heldout-every", "2"])
    assert rc == 0
    run = json.loads((tmp_path / "demo.json").read_text())
    names = [s["name"] for s in run["stages"]]
    assert names[0] == "simulate week 1" and any(n.startswith("before/after") for n in names)
    assert run["fleet"]["week1"]["vehicles"] == 4 and run["fleet"]["week2"]["calendar_h"] == 96.0
    assert run["pipeline"]["ingest"]["rejected"] == 0 and run["pipeline"]["label"]["vehicles"] == 4
    assert run["update"]["installed"] == len(run["update"]["published"]) and run["update"]["rejected"] == 0
    assert bool(run["update"]["published"]) == bool(run["gate"]["accepted"])
    classes = run["after"]["summary"]["classes"]
    assert classes and all(m["cc_oracle"]["rmse"] is not None for m in classes.values())
    html = (tmp_path / "report" / "index.html").read_text()
    assert "Fleet SOH" in html and "Alarms against injected faults" in html and "<img" in html
    # nothing of a raw vehicle id in what the vehicles uploaded
    vins = {p.name for p in (tmp_path / "heldout_week1").iterdir()}
    for seg in (tmp_path / "store" / "segments").rglob("*.mcap"):
        data = seg.read_bytes()
        assert not any(v.encode() in data for v in vins)
