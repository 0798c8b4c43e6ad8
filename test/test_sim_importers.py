"""McMaster/Kollmeyer drive-cycle CSV importer -> the simulator's truth schema."""

from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
pa = pytest.importorskip("pyarrow")

from bms_ai.sim.dataset import read_meta  # noqa: E402
from bms_ai.sim.importers import import_kollmeyer_csv, read_kollmeyer_csv  # noqa: E402
from bms_ai.sim.io import read_truth  # noqa: E402

HEADER = [
    "Test Name,551_LA92", "Cycler Program: LA92 drive cycle", "Channel: 5", "Battery: LG HG2 3Ah",
] + [f"Info line {k}" for k in range(24)]
COLS = "Time Stamp,Step,Status,Prog Time,Step Time,Cycle,Cycle Level,Procedure,Voltage,Current,Temperature,Capacity,WhAccu,Cnt"
UNITS = ",,,,,,,,V,A,degC,Ah,Wh,"


def _write(path, n=600, dt=0.1, current=None, units=True):
    rng = np.random.default_rng(0)
    cur = current if current is not None else -3.0 + 2.0 * np.sin(np.arange(n) * 0.05) + 0.1 * rng.standard_normal(n)
    cap = np.concatenate([[0.0], np.cumsum(0.5 * (cur[1:] + cur[:-1]) * dt)]) / 3600.0
    lines = HEADER + [COLS] + ([UNITS] if units else [])
    for k in range(n):
        s = k * dt
        prog = f"{int(s // 3600)}:{int(s % 3600 // 60):02d}:{s % 60:06.3f}"
        lines.append(f"1/14/2019 3:00:00 PM,5,DCH,{prog},{prog},0,0,LA92,{4.1 - 0.0005 * k:.4f},{cur[k]:.4f},"
                     f"{25 + 0.001 * k:.3f},{cap[k]:.6f},0,1")
    path.write_text("\n".join(lines) + "\n")
    return cur, cap


def test_reads_layout_and_skips_units_row(tmp_path):
    cur, _ = _write(tmp_path / "551_LA92.csv")
    d = read_kollmeyer_csv(tmp_path / "551_LA92.csv")
    assert len(d["t"]) == 600 and int(d["skipped_rows"]) == 1
    assert d["t"][-1] == pytest.approx(59.9)
    assert np.allclose(d["current"], np.round(cur, 4))


def test_import_produces_truth_schema_with_coulomb_soc(tmp_path):
    _, cap = _write(tmp_path / "a.csv", n=3000)
    out = import_kollmeyer_csv(tmp_path / "a.csv", tmp_path / "drive", capacity_ah=2.9, rated_ah=3.0, ambient_c=25.0)
    tbl = read_truth(out)
    meta = read_meta(out)
    # the same columns as a simulated drive
    for c in ("t", "t_can", "current_a", "pack_voltage_v", "soc", "soh", "soc_c00", "cap_ah_c95", "r0_ohm_c00",
              "temp_c_c00", "v_c00", "tsens_c_s31", "fault_any", "fault_cell", "mode"):
        assert c in tbl.column_names
    soc = tbl["soc"].to_numpy()
    assert soc[0] == pytest.approx(1.0)
    # SOC change equals the tester's own Ah counter / capacity
    assert soc[-1] - soc[0] == pytest.approx(cap[-1] / 2.9, abs=2e-5)
    assert np.isnan(tbl["v_c01"].to_numpy()).all() and not np.isnan(tbl["v_c00"].to_numpy()).any()
    assert tbl["soh"].to_numpy()[0] == pytest.approx(2.9 / 3.0)
    assert meta["cells_present"] == 1 and meta["source"]["format"] == "mcmaster_kollmeyer_csv"


@pytest.mark.pybamm
def test_simulated_and_imported_share_columns(tmp_path):
    pytest.importorskip("pybamm")
    from bms_ai.sim import Phase, Scenario, simulate_drive, truth_columns

    _write(tmp_path / "a.csv", n=50)
    out = import_kollmeyer_csv(tmp_path / "a.csv", tmp_path / "d")
    sim = truth_columns(simulate_drive(Scenario("tiny", "nmc", [Phase("drive", "udds", repeats=0.01)]), seed=0))
    assert read_truth(out).column_names == list(sim)


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "x.csv").write_text("a,b,c\n1,2,3\n")
    with pytest.raises(ValueError, match="Time Stamp"):
        read_kollmeyer_csv(tmp_path / "x.csv")
    (tmp_path / "y.csv").write_text("Time Stamp,Prog Time,Voltage\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_kollmeyer_csv(tmp_path / "y.csv")
