"""`bms-ai decode`: a log to CSV / JSON lines through the pack config, one-line errors."""

from __future__ import annotations

import json

import pytest
from testutil import realdata, synthetic_messages, write_log

from bms_ai.can.decoder import PackDecoder
from bms_ai.can.packconfig import load_pack_config
from bms_ai.cli import main


@pytest.fixture(scope="module")
def messages(pack_config_path):
    """One second of the reference pack's traffic."""
    return synthetic_messages(PackDecoder(load_pack_config(pack_config_path)), 100.0, 101.0)


def test_decode_cli_csv_and_jsonl(tmp_path, messages, pack_config_path, capsys):
    """Both formats carry every sample instant strictly inside the log, with cells and status."""
    log = write_log(tmp_path / "d.blf", messages)
    for fmt in ("csv", "jsonl"):
        out = tmp_path / f"out.{fmt}"
        code = main(["decode", str(log), "--pack-config", str(pack_config_path), "--format", fmt, "-o", str(out)])
        err = capsys.readouterr().err
        assert code == 0, err
        assert "rejected none" in err
        lines = out.read_text().splitlines()
        if fmt == "csv":
            assert lines[0].startswith("t,pack_voltage,pack_current,cell_v_000")
            assert len(lines) == 10  # header + instants 100.1 .. 100.9
        else:
            rec = json.loads(lines[-1])
            assert len(rec["cell_voltages"]) == 96 and rec["status"]["bms_state"] == 3.0


def test_decode_cli_errors_are_clear(tmp_path, pack_config_path, capsys):
    """A missing log is exit status 1 and one line naming it, no traceback."""
    code = main(["decode", str(tmp_path / "missing.blf"), "--pack-config", str(pack_config_path)])
    err = capsys.readouterr().err
    assert code == 1 and "CAN log not found" in err and "Traceback" not in err


def test_decode_cli_warns_of_truncation_and_of_nothing_decoded(tmp_path, messages, pack_config_path, capsys):
    """A cut log: samples before the cut, a warning with the frames read, exit 0; damaged stamps only: exit 1."""
    log = write_log(tmp_path / "d.trc", messages)
    log.write_bytes(log.read_bytes()[:-20])
    code = main(["decode", str(log), "--pack-config", str(pack_config_path), "-o", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert code == 0 and "warning:" in err and "truncated" in err and "Traceback" not in err
    assert f"; {len(messages)} frames read before it are decoded" in err  # the cut last line still read
    assert len((tmp_path / "o.csv").read_text().splitlines()) > 5
    inf = tmp_path / "inf.log"
    inf.write_text("(inf) can0 120#E0306097F8FFE1FF\n(inf) can0 120#E0306097F8FFE1FF\n")
    code = main(["decode", str(inf), "--pack-config", str(pack_config_path), "-o", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert code == 1 and "'bad_time': 2" in err and "nothing decoded" in err


@pytest.mark.parametrize(("body", "why"), [
    ("", "no CAN frames in the log"),
    ("(100.000) can0 555#00\n(100.010) can0 556#00\n", "none of its 2 frames is a message of the pack config"),
    ("(100.000) can0 120#E0306097F8FFE1FF\n(100.050) can0 120#E0306097F8FFE1FF\n",
     "its frames span 0.05 s, less than one sample period (0.1 s at --rate 10)"),
])
def test_nothing_decoded_is_exit_1_with_a_one_line_reason(tmp_path, pack_config_path, capsys, body, why):
    """An empty log, one of other messages only, one too short for a sample: exit 1 and the reason in one line."""
    log = tmp_path / "x.log"
    log.write_text(body)
    code = main(["decode", str(log), "--pack-config", str(pack_config_path), "-o", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "error:" in x)
    assert code == 1 and f"bms-ai decode: error: {log}: nothing decoded ({why}" in line, err


def test_dbc_without_pack_config_never_falls_back_to_the_reference_pack(tmp_path, capsys):
    """--dbc alone: one line telling to pass --pack-config or --raw; nothing of the reference pack is named."""
    log = tmp_path / "x.log"
    log.write_text("(100.000) can0 120#E0306097F8FFE1FF\n")
    dbc = tmp_path / "vehicle.dbc"
    dbc.write_text('VERSION ""\n\nBU_: BMS\n\nBO_ 289 Status: 8 BMS\n SG_ A : 0|8@1+ (1,0) [0|255] "" BMS\n')
    code = main(["decode", str(log), "--dbc", str(dbc)])
    err = capsys.readouterr().err.strip()
    assert code == 1 and "\n" not in err and "Traceback" not in err
    assert "--pack-config" in err and "--raw" in err and "pack96" not in err
    code = main(["decode", str(log), "--raw"])
    assert code == 1 and "--raw decodes with a DBC: pass --dbc DBC" in capsys.readouterr().err



def _raw(argv: list[str], out, capsys) -> tuple[int, str, dict[str, list[float]]]:
    """Run ``bms-ai decode --raw`` (CSV to ``out``): exit code, stderr, values per signal."""
    import csv

    code = main(["decode", *argv, "--raw", "-o", str(out)])
    err = capsys.readouterr().err
    values: dict[str, list[float]] = {}
    with open(out, newline="") as f:
        for row in csv.DictReader(f):
            values.setdefault(row["signal"], []).append(float(row["value"]))
    return code, err, values


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_raw_decode_of_a_real_kona_drive_gives_the_known_values(tmp_path, capsys):
    """SavvyCAN log + the public Kona DBC (no BU_ line), no pack config: the independently decoded values."""
    log, dbc = realdata("kona/power-off-on-ready-off.gvret.csv"), realdata("kona/pcan.dbc")
    sigs = "Batt_HV_Status.[VI]Batt"
    code, err, v = _raw([str(log), "--dbc", str(dbc), "--bus", "0", "--signals", sigs], tmp_path / "a.csv", capsys)
    assert code == 0, err
    assert "no BU_ (nodes) line" in err and "decoded 24263 frames" in err  # bus 0 only
    assert (min(v["VBatt"]), max(v["VBatt"])) == (354.8, 355.1) and (min(v["IBatt"]), max(v["IBatt"])) == (0, 3.4)
    code = main(["decode", str(log), "--dbc", str(dbc), "--raw", "--signals", "TAkku|SocDisp"])
    err = capsys.readouterr().err
    assert code == 1 and "--signals 'TAkku|SocDisp' matches no signal of" in err  # a glob, not a regex
    code, err, v = _raw([str(log), "--dbc", str(dbc), "--bus", "0", "--signals", "uwe596_[67]_TAkku?"],
                        tmp_path / "c.csv", capsys)
    assert code == 0 and set(v["uwe596_6_TAkkuL"]) == {22} and set(v["uwe596_7_TAkkuH"]) == {23}


def test_raw_jsonl_of_the_precharge_log_one_record_per_frame(tmp_path, capsys):
    """Vector ASC of a Kona pack on a bench: VBatt 360.8 -> 363.4 V, SocDisp 50.5 -> 58.5 %, the 12 V dip to 8.3 V."""
    log, dbc = realdata("kona/precharge.asc"), realdata("kona/pcan.dbc")
    out = tmp_path / "p.jsonl"
    code = main(["decode", str(log), "--dbc", str(dbc), "--raw", "--format", "jsonl", "-o", str(out),
                 "--signals", "Batt*.*"])
    err = capsys.readouterr().err
    assert code == 0, err
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert {r["message"] for r in recs} == {"Batt_HV_Status", "BatteryLimits", "BatteryCharging"}
    vb = [r["signals"]["VBatt"] for r in recs if r["id"] == "0x595"]
    assert vb[0] == 360.8 and max(vb) == 363.4
    assert min(r["signals"]["Voltage_12V"] for r in recs if r["id"] == "0x596") == 8.3
    code, err, v = _raw([str(log), "--dbc", str(dbc), "--signals", "SocDisp"], tmp_path / "s.csv", capsys)
    assert code == 0 and (v["SocDisp"][0], max(v["SocDisp"])) == (50.5, 58.5)
