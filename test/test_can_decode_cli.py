"""`bms-ai decode`: a log to CSV / JSON lines through the pack config, one-line errors."""

from __future__ import annotations

import json

import pytest
from testutil import synthetic_messages, write_log

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
    """A cut log: samples before the cut, a warning naming it, exit 1; a log of damaged stamps only: exit 1."""
    log = write_log(tmp_path / "d.trc", messages)
    log.write_bytes(log.read_bytes()[:-20])
    code = main(["decode", str(log), "--pack-config", str(pack_config_path), "-o", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert code == 1 and "warning:" in err and "truncated" in err and "Traceback" not in err
    assert len((tmp_path / "o.csv").read_text().splitlines()) > 5
    inf = tmp_path / "inf.log"
    inf.write_text("(inf) can0 120#E0306097F8FFE1FF\n(inf) can0 120#E0306097F8FFE1FF\n")
    code = main(["decode", str(inf), "--pack-config", str(pack_config_path), "-o", str(tmp_path / "o.csv")])
    err = capsys.readouterr().err
    assert code == 1 and "'bad_time': 2" in err and "nothing decoded" in err
