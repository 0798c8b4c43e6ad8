"""Pack config validation and DBC loading errors: each names the problem and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bms_ai.can.dbc import DbcError, load_dbc
from bms_ai.can.decoder import PackDecoder
from bms_ai.can.packconfig import PackConfigError, load_pack_config

OVERLAP_DBC = """VERSION ""
NS_ :
BS_:
BU_: BMS
BO_ 288 Meas: 8 BMS
 SG_ PackV : 0|16@1+ (0.01,0) [0|655.35] "V" Vector__XXX
 SG_ PackI : 8|16@1- (0.1,0) [-3276.8|3276.7] "A" Vector__XXX
 SG_ Cell0 : 32|16@1+ (0.001,0) [0|65] "V" Vector__XXX
"""


def _write_cfg(tmp_path: Path, base: Path, **changes) -> Path:
    data = yaml.safe_load(base.read_text())
    data["dbc"] = str((base.parent / data["dbc"]).resolve())
    for k, v in changes.items():
        if v is None:
            data.pop(k, None)
        else:
            data[k] = v
    p = tmp_path / "pack.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_reference_config_loads_and_covers_every_cell(pack_config_path):
    """The shipped config validates against its DBC and maps every one of the 96 cells."""
    cfg = load_pack_config(pack_config_path)
    dec = PackDecoder(cfg)
    assert cfg.n_cells == 96 and cfg.n_temps == 32 and cfg.chemistry == "nmc"
    cells = sorted(s.index for r in dec.routes.values() for slots in r.by_mux.values() for s in slots if s.kind == 0)
    assert cells == list(range(96))


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"cells": None}, "missing required key 'cells'"),
        ({"chemistry": "leadacid"}, "chemistry"),
        ({"cells": 95}, "outside 0..94"),
        ({"cells": 100}, "no signal maps to element(s) [96"),
        ({"pack_current": {"message": "BMS_PackMeas", "signal": "Amps"}}, "signal 'Amps' is not in message 'BMS_PackMeas'"),
        ({"pack_voltage": {"message": "NoSuchMsg", "signal": "X"}}, "message 'NoSuchMsg' is not in the DBC"),
        ({"bogus": 1}, "unknown key(s) ['bogus']"),
        ({"cells": "many"}, "expected an integer"),
    ],
)
def test_invalid_configs_name_the_entry(tmp_path, pack_config_path, changes, needle):
    """Each kind of mistake is reported with the YAML path of the entry at fault."""
    p = _write_cfg(tmp_path, pack_config_path, **changes)
    with pytest.raises(PackConfigError) as ei:
        PackDecoder(load_pack_config(p))
    assert needle in str(ei.value)


def test_missing_files_and_bad_yaml(tmp_path):
    """Missing files and broken YAML are one-line errors, not tracebacks."""
    with pytest.raises(PackConfigError, match="not found"):
        load_pack_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("cells: [1, 2\n")
    with pytest.raises(PackConfigError, match="not valid YAML"):
        load_pack_config(bad)
    with pytest.raises(DbcError, match="not found"):
        load_dbc(tmp_path / "x.dbc")


def test_strict_rejection_explains_how_to_load_anyway(tmp_path):
    """A DBC cantools rejects in strict mode names the switch that loads it anyway."""
    p = tmp_path / "overlap.dbc"
    p.write_text(OVERLAP_DBC)
    with pytest.raises(DbcError) as ei:
        load_dbc(p, strict=True)
    msg = str(ei.value)
    assert "overlap" in msg.lower() and "dbc_strict: false" in msg
    db = load_dbc(p, strict=False)
    assert db.get_message_by_name("Meas").get_signal_by_name("PackI").length == 16


def test_other_vehicle_dbc_with_config_only(tmp_path):
    """A DBC naming each cell's signal, discharge-positive current, no temperatures."""
    lines = ['VERSION ""', "NS_ :", "BS_:", "BU_: ECU", "BO_ 1024 Pack: 4 ECU",
             ' SG_ Volts : 0|16@1+ (0.1,0) [0|6553.5] "V" Vector__XXX',
             ' SG_ AmpsDischarge : 16|16@1- (1,0) [-32768|32767] "A" Vector__XXX']
    for blk in range(2):
        lines.append(f"BO_ {1040 + blk} Cells{blk}: 8 ECU")
        for k in range(4):
            lines.append(f' SG_ Cell{blk * 4 + k + 1:02d}_mV : {16 * k}|16@1+ (1,0) [0|65535] "mV" Vector__XXX')
    (tmp_path / "other.dbc").write_text("\n".join(lines) + "\n")
    cfg = {
        "pack_id": "other", "dbc": "other.dbc", "cells": 8, "chemistry": "lfp",
        "pack_voltage": {"message": "Pack", "signal": "Volts"},
        "pack_current": {"message": "Pack", "signal": "AmpsDischarge", "scale": -1},
        "cell_voltages": [
            {"message": f"Cells{b}", "scale": 0.001,
             "signals": {f"Cell{b * 4 + k + 1:02d}_mV": b * 4 + k for k in range(4)}} for b in range(2)
        ],
    }
    p = tmp_path / "other.yaml"
    p.write_text(yaml.safe_dump(cfg))
    from bms_ai.can.assembler import PackAssembler

    asm = PackAssembler(PackDecoder(load_pack_config(p)))
    assert asm.feed(1024, (3200).to_bytes(2, "little") + (25).to_bytes(2, "little", signed=True), 0.0)
    assert asm.feed(1041, b"".join(v.to_bytes(2, "little") for v in (3301, 3302, 3303, 3304)), 0.1)
    assert asm.sample.pack_current == -25.0  # discharge-positive DBC flipped to ROS convention
    assert asm.sample.pack_voltage == pytest.approx(320.0)
    assert asm.sample.cell_voltages[4:8].tolist() == pytest.approx([3.301, 3.302, 3.303, 3.304])


# ----------------------------------------------------------------------------- schema: types and limits

@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"dbc_strict": "false"}, "dbc_strict: expected a boolean true/false, got str 'false' (write true or false"),
        ({"dbc_strict": 0}, "dbc_strict: expected a boolean"),
        ({"pack_id": ["a", "b"]}, "pack_id: expected a non-empty string, got list"),
        ({"dbc": 12}, "dbc: expected a non-empty string, got int 12"),
        ({"cells": True}, "cells: expected an integer, got bool True"),
        ({"cells": 10**9}, "cells: expected an integer in 1..4096"),
        ({"design_capacity_ah": ".nan"}, "design_capacity_ah: expected a number, got str"),
        ({"design_capacity_ah": -5}, "design_capacity_ah: expected Ah > 0"),
        ({"status": ["bms_state"]}, "status: expected a mapping, got list"),
        ({"status": {"x": {"message": 5, "signal": "S"}}}, "status.x.message: expected a non-empty string, got int 5"),
        ({"checks": ["BMS_Status"]}, "checks: expected a mapping, got list"),
        ({"checks": {"BMS_Status": {"timeout": "fast"}}}, "checks.BMS_Status.timeout: expected a number"),
        ({"checks": {"BMS_Status": {"timeout": 0}}}, "checks.BMS_Status.timeout: expected seconds > 0"),
        ({"checks": {"BMS_Status": {"crc": "Status_Checksum"}}}, "checks.BMS_Status.crc: expected a mapping"),
        ({"cell_voltages": {"message": "BMS_CellVoltages", "slots": 4}}, "cell_voltages.slots: expected a list"),
        ({"cell_voltages": {"message": "BMS_CellVoltages", "signals": ["a"]}}, "cell_voltages.signals: expected a mapping"),
        ({"cell_voltages": {"message": "BMS_CellVoltages", "slots": [1, 2]}}, "cell_voltages.slots[0]: expected a non-empty string"),
        ({"cell_voltages": []}, "cell_voltages: expected a group or a non-empty list"),
        ({"cell_voltages": "BMS_CellVoltages"}, "cell_voltages: expected a mapping, got str"),
        ({"pack_voltage": {"message": "BMS_PackMeas", "signal": "PackVoltage", "scale": "2"}}, "pack_voltage.scale: expected a number"),
        ({"pack_voltage": {"message": "BMS_PackMeas", "signal": "PackVoltage", "valid": True}}, "pack_voltage.valid: expected a non-empty string"),
    ],
)
def test_wrong_types_are_one_line_errors_naming_the_key(tmp_path, pack_config_path, changes, needle):
    """Every value is type-checked: the error names the key and the expected type, never a TypeError."""
    p = _write_cfg(tmp_path, pack_config_path, **changes)
    with pytest.raises(PackConfigError) as ei:
        load_pack_config(p)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_dbc_strict_false_turns_strict_mode_off(tmp_path, pack_config_path):
    """A real boolean false is honoured (the string "false" is refused above, never read as true)."""
    assert load_pack_config(_write_cfg(tmp_path, pack_config_path, dbc_strict=False)).dbc_strict is False
    assert load_pack_config(pack_config_path).dbc_strict is True


def test_hostile_yaml_is_refused_as_pack_config_error(tmp_path):
    """Billion laughs and deep nesting reach the pack config loader as one-line PackConfigErrors."""
    laughs = 'a: &a ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]\n'
    prev = "a"
    for name in "bcdefghi":
        laughs += f"{name}: &{name} [{', '.join(['*' + prev] * 9)}]\n"
        prev = name
    laughs += "pack_id: *i\n"
    for text, needle in ((laughs, "aliases"), ("pack_id: " + "[" * 3000 + "]" * 3000, "nested deeper")):
        p = tmp_path / "hostile.yaml"
        p.write_text(text)
        with pytest.raises(PackConfigError, match=needle):
            load_pack_config(p)
