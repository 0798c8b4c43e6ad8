"""`bms-ai pack-config draft`: a commented pack config guessed from a real DBC (and a log)."""

from __future__ import annotations

import pytest
import yaml
from testutil import realdata

from bms_ai.can.dbc import load_dbc
from bms_ai.can.draft import guess, render
from bms_ai.can.packconfig import parse_pack_config, validate_against_dbc
from bms_ai.cli import main


def test_kona_draft_with_a_log_picks_the_battery_signals_and_their_ranges(tmp_path, capsys):
    """Kona DBC (no BU_ line) + a SavvyCAN log, bus 0: VBatt, IBatt, SocDisp, TAkkuL/H with the known ranges."""
    dbc, log = realdata("kona/pcan.dbc"), realdata("kona/power-off-on-ready-off.gvret.csv")
    out = tmp_path / "kona.yaml"
    code = main(["pack-config", "draft", "--dbc", str(dbc), "--log", str(log), "--bus", "0", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    text = out.read_text()
    d = yaml.safe_load(text)
    assert d["pack_voltage"] == {"message": "Batt_HV_Status", "signal": "VBatt"}
    assert d["pack_current"] == {"message": "Batt_HV_Status", "signal": "IBatt"}
    assert d["status"]["soc_reported"] == {"message": "BMS_542", "signal": "SocDisp"}
    assert d["cell_temperatures"]["signals"] == {"uwe596_6_TAkkuL": 0, "uwe596_7_TAkkuH": 1}
    assert d["temperature_sensors"] == 2 and d["cells"] == "TODO"  # no cell voltages on this bus
    assert "observed 354.8 .. 355.1 V" in text and "observed 0 .. 3.4 A" in text and "observed 36.5 .. 36.5 %" in text
    assert "observed 22 .. 22 °C" in text and "no per-cell voltages" in text
    assert "no BU_ (nodes) line" in err


@pytest.fixture(scope="module")
def model3():
    """The Model 3 DBC (cantools loads it only with strict mode off)."""
    path = realdata("model3/Model3CAN.dbc")
    return path, load_dbc(path, strict=False)


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_model3_draft_is_a_pack_config_that_validates_against_its_dbc(model3):
    """Model 3: 0x132 voltage/current, 0x292 SOC, 0x332 min/max temperatures, the 0x401 cells; the draft loads."""
    path, db = model3
    text = render(guess(db), path, strict=False)
    d = yaml.safe_load(text)
    assert d["pack_voltage"] == {"message": "ID132HVBattAmpVolt", "signal": "BattVoltage132"}
    assert d["pack_current"]["signal"] in ("SmoothBattCurrent132", "RawBattCurrent132")
    assert d["status"]["soc_reported"]["message"] == "ID292BMS_SOC"
    assert d["cell_temperatures"]["message"] == "ID332BattCellMinMax"
    assert d["cell_voltages"]["message"] == "ID401CellVoltages" and d["cell_voltages"]["signals"]["Cell0"] == 0
    assert d["dbc_strict"] is False and "TODO" in text
    cfg = parse_pack_config(d, path.parent, path)
    assert cfg.n_cells == len(d["cell_voltages"]["signals"]) and cfg.n_temps == 2
    validate_against_dbc(cfg, db)  # every named message and signal exists


def test_draft_of_an_unreadable_dbc_is_one_line(tmp_path, capsys):
    """A DBC cantools cannot parse: exit 1, the file and the line named."""
    bad = tmp_path / "bad.dbc"
    bad.write_text('VERSION ""\n\nBU_: A\n\nBO_ 1 M: 8 A\n SG_ S : 0|8@1+ (1,0) [0|1] "" A\nFOO_ x\n')
    code = main(["pack-config", "draft", "--dbc", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "bad.dbc: line 7" in err


@pytest.mark.drive   # reads the whole bundled drive twice (~5 s): not the fast tier
def test_a_log_with_no_frame_of_the_dbc_is_an_error_not_an_unannotated_draft(tmp_path, capsys):
    """The bundled pack's DBC and log, but a bus the log does not have: one line, exit 1 (it drafted 'from' it)."""
    from bms_ai.core.paths import share_path

    dbc, log = share_path("dbc", "bms_ai_pack96.dbc"), share_path("data", "drives", "nmc_udds", "can.blf")
    code = main(["pack-config", "draft", "--dbc", str(dbc), "--log", str(log), "--bus", "7", "-o", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and err[-1] == f"bms-ai pack-config: error: {log}: no frame on bus 7 in the log"
    assert not (tmp_path / "d").exists()
    assert main(["pack-config", "draft", "--dbc", str(dbc), "--log", str(log), "-o", str(tmp_path / "d")]) == 0
    assert "observed" in (tmp_path / "d").read_text()
