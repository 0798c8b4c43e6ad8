"""Pack config validation and DBC loading errors: each names the problem and the fix."""

from __future__ import annotations

import re
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
    for text, needle in ((laughs, "aliases"), ("pack_id: " + "[" * 600 + "]" * 600, "nested deeper")):
        p = tmp_path / "hostile.yaml"
        p.write_text(text)
        with pytest.raises(PackConfigError, match=needle):
            load_pack_config(p)


# ----------------------------------------------------------------------------- fuzzing (bounded per case)

REF_CFG = Path(__file__).resolve().parents[1] / "config" / "pack96.yaml"
REF = yaml.safe_load(REF_CFG.read_text())
REF["dbc"] = str((REF_CFG.parent / REF["dbc"]).resolve())
DELETE = object()


def _paths(d, prefix=()):
    """Every key path of the reference config (the places a mutation can hit)."""
    out = []
    for k, v in d.items():
        out.append((*prefix, k))
        if isinstance(v, dict):
            out += _paths(v, (*prefix, k))
    return out


PATHS = _paths(REF)


def _mutate(doc: dict, path: tuple, value) -> dict:
    import copy

    doc = copy.deepcopy(doc)
    node = doc
    for k in path[:-1]:
        node = node[k]
    if value is DELETE:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = value
    return doc


def _one_line_or_ok(fn, errors=(PackConfigError, DbcError)):
    """Run fn within the memory bound: success, or a one-line error of an expected type (never another exception)."""
    from testutil import within_memory

    try:
        within_memory(fn)
    except errors as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)


SLOW_CASES = 100  # in CI per DBC-building fuzz test (a case parses a DBC under tracemalloc, ~0.1 s)


def _fuzz_settings(max_examples: int | None = None):
    """The fuzz tests' settings; ``max_examples`` caps the profile's count where a case costs ~0.1 s."""
    from hypothesis import HealthCheck, settings
    from testutil import FUZZ_DEADLINE_MS

    n = settings.default.max_examples if max_examples is None else min(max_examples, settings.default.max_examples)
    return settings(max_examples=n, deadline=FUZZ_DEADLINE_MS,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.mark.fuzz
def test_fuzz_pack_config_mutations(tmp_path_factory):
    """Any value at any key of a valid config: a PackConfig (validated against the DBC) or one line."""
    from hypothesis import given
    from hypothesis import strategies as st
    from testutil import json_like

    d = _fuzz_dir(tmp_path_factory)

    @_fuzz_settings(max_examples=SLOW_CASES)
    @given(st.lists(st.tuples(st.sampled_from(PATHS), json_like(8) | st.just(DELETE)), min_size=1, max_size=3))
    def check(mutations):
        doc = REF
        for path, value in mutations:
            try:
                doc = _mutate(doc, path, value)
            except (KeyError, TypeError, AttributeError):  # an earlier mutation replaced the parent
                continue
        p = d / "pack.yaml"
        p.write_text(yaml.safe_dump(doc))
        _one_line_or_ok(lambda: PackDecoder(load_pack_config(p)))

    check()


def test_fuzz_pack_config_text(tmp_path_factory):
    """Arbitrary YAML-ish text (anchors, aliases, flow, tags): parsed within bounds or one line."""
    from hypothesis import given
    from hypothesis import strategies as st

    d = _fuzz_dir(tmp_path_factory)
    alphabet = st.sampled_from(list("[]{}:,&*!|>-#'\"? \n\tab01.") + ["&a ", "*a", "!!str ", "cells: ", "dbc: "])

    @_fuzz_settings()
    @given(st.lists(alphabet, max_size=200).map("".join))
    def check(text):
        p = d / "pack.yaml"
        p.write_text(text)
        _one_line_or_ok(lambda: load_pack_config(p))

    check()


@pytest.mark.fuzz
def test_fuzz_dbc_behind_a_config(tmp_path_factory):
    """The config's DBC mutated line by line (dropped, doubled, altered), strict or not: a decoder or one line."""
    from hypothesis import given
    from hypothesis import strategies as st

    d = _fuzz_dir(tmp_path_factory)
    lines = Path(REF["dbc"]).read_text().splitlines()
    ops = st.tuples(st.sampled_from(["drop", "double", "alter"]), st.integers(0, len(lines) - 1),
                    st.integers(0, 80), st.sampled_from(list("0123456789|@+-()[]:; \"xX")))

    @_fuzz_settings(max_examples=SLOW_CASES)
    @given(st.lists(ops, min_size=1, max_size=4), st.booleans())
    def check(edits, strict):
        out = list(lines)
        for op, i, col, ch in edits:
            i %= len(out) or 1
            if not out:
                break
            if op == "drop":
                out.pop(i)
            elif op == "double":
                out.insert(i, out[i])
            else:
                ln = out[i]
                out[i] = ln[:col] + ch + ln[col + 1:]
        (d / "pack.dbc").write_text("\n".join(out) + "\n")
        p = d / "pack.yaml"
        p.write_text(yaml.safe_dump({**REF, "dbc": "pack.dbc", "dbc_strict": strict}))
        _one_line_or_ok(lambda: PackDecoder(load_pack_config(p)))

    check()


def test_a_key_with_a_line_break_gives_a_one_line_error(tmp_path) -> None:
    """Found by the fuzz test: a status key '0\\n' was echoed into a two-line message."""
    err = PackConfigError("pack.yaml.status.0\n: expected a mapping, got NoneType None")
    assert "\n" not in str(err) and "status.0\\n" in str(err)


# ----------------------------------------------------------------------------- poll: diagnostic requests

KONA_LIKE_POLL = {"min_gap": 0.05, "requests": [
    {"request_id": 0x7E4, "response_id": 0x7EC, "service": 0x22, "did": 0x0100 + 2 + k, "period": 10,
     "values": {"cell_voltages": {"start": 4, "count": 32, "scale": 0.02, "index": 32 * k}}} for k in range(3)
] + [{"name": "leaf_group1", "request_id": 0x79B, "response_id": 0x7BB, "service": 0x21, "did": 0x01, "period": 5,
      "timeout": 2.5, "padding": 0xFF, "values": {"soh": {"start": 25, "bytes": 2, "scale": 0.01}}}]}


def test_poll_section_parses_and_may_replace_the_broadcast_cell_groups(tmp_path, pack_config_path):
    """Cells polled over UDS need no DBC group: the config loads, validates and maps every cell."""
    p = _write_cfg(tmp_path, pack_config_path, poll=KONA_LIKE_POLL, cell_voltages=None)
    cfg = load_pack_config(p)
    PackDecoder(cfg)  # validated against the DBC: the polls cover cells 0..95
    assert cfg.cell_voltages == () and cfg.poll.min_gap == 0.05
    r0, leaf = cfg.poll.requests[0], cfg.poll.requests[3]
    assert (r0.name, r0.payload, r0.header, r0.extended, r0.timeout) == ("7e4_22_0102", b"\x22\x01\x02", b"\x62\x01\x02",
                                                                         False, 1.0)
    assert (leaf.payload, leaf.header, leaf.timeout, leaf.padding) == (b"\x21\x01", b"\x61\x01", 2.5, 0xFF)
    assert r0.values[0].end == 36 and cfg.poll.requests[2].values[0].index == 64


def _poll_with(**changes):
    req = {"request_id": 0x7E4, "response_id": 0x7EC, "service": 0x22, "did": 0x0102, "period": 10,
           "values": {"cell_voltages": {"start": 4, "count": 32, "scale": 0.02}}}
    value = changes.pop("value", {})
    req["values"]["cell_voltages"].update(value)
    req.update(changes)
    return {"requests": [req]}


@pytest.mark.parametrize(
    ("poll", "needle"),
    [
        ([1], "poll: expected a mapping, got list"),
        ({"requests": []}, "poll.requests: expected a non-empty list"),
        ({"requests": [{}], "every": 1}, "poll: unknown key(s) ['every']"),
        (_poll_with(service=0x19), "poll.requests[0].service: 0x19 is not one of"),
        (_poll_with(did=0x10000), "poll.requests[0].did: expected a 2-byte identifier in 0x0..0xffff, got 0x10000"),
        (_poll_with(service=0x21, did=0x102), "did: expected a 1-byte identifier in 0..255"),
        (_poll_with(request_id=0x18DA10F1, extended=False), "poll.requests[0]: ids above 0x7ff need 29 bits; set extended: true"),
        (_poll_with(request_id=0x7EC), "request_id and response_id are both 0x7ec"),
        (_poll_with(request_id="0x7E4"), "poll.requests[0].request_id: expected an integer, got str"),
        (_poll_with(period=0), "poll.requests[0].period: expected seconds >= 0.01"),
        (_poll_with(timeout=-1), "poll.requests[0].timeout: expected seconds > 0"),
        (_poll_with(padding=256), "poll.requests[0].padding: expected a byte in 0..255"),
        (_poll_with(values={}), "poll.requests[0].values: expected at least one value"),
        (_poll_with(value={"bytes": 9}), "values.cell_voltages.bytes: expected an integer in 1..8"),
        (_poll_with(value={"byteorder": "middle"}), "byteorder: expected 'big' or 'little'"),
        (_poll_with(value={"index": 80}), "values.cell_voltages: elements 80..111 outside 0..95"),
        (_poll_with(value={"start": 4090}), "lie beyond the longest ISO-TP answer"),
        (_poll_with(value={"valid": [5, 1]}), "valid: low 5 is above high 1"),
        (_poll_with(value={"signed": "yes"}), "values.cell_voltages.signed: expected a boolean"),
        (_poll_with(values={"soh": {"start": 1, "index": 3}}), "values.soh.index: only ['cell_temperatures', 'cell_voltages']"),
        (_poll_with(value={"stride": 2}), "values.cell_voltages: unknown key(s) ['stride']"),
        ({"requests": _poll_with()["requests"] * 2}, "poll.requests[1]: same name '7e4_22_0102' as requests[0]"),
    ],
)
def test_invalid_poll_sections_name_the_key(tmp_path, pack_config_path, poll, needle):
    """Each poll mistake is one line naming the key (hex where ids are hex)."""
    p = _write_cfg(tmp_path, pack_config_path, poll=poll)
    with pytest.raises(PackConfigError) as ei:
        load_pack_config(p)
    assert needle in str(ei.value) and "\n" not in str(ei.value)


def test_polled_cells_must_still_cover_the_pack(tmp_path, pack_config_path):
    """Without the DBC group, cells no poll fills are named; a partial poll beside a DBC group is fine."""
    partial = {"requests": KONA_LIKE_POLL["requests"][:2]}
    with pytest.raises(PackConfigError, match=r"no signal maps to element\(s\) \[64, 65"):
        PackDecoder(load_pack_config(_write_cfg(tmp_path, pack_config_path, poll=partial, cell_voltages=None)))
    PackDecoder(load_pack_config(_write_cfg(tmp_path, pack_config_path, poll=partial)))
    no_cells = {"requests": [KONA_LIKE_POLL["requests"][3]]}
    # neither a group nor a polled cell: a pack-level config (the average cell), not an error
    assert load_pack_config(_write_cfg(tmp_path, pack_config_path, poll=no_cells, cell_voltages=None)).pack_level


# ----------------------------------------------------------------------------- pack-level configs

def test_pack_level_config_without_cells_publishes_the_average_cell(tmp_path, pack_config_path):
    """No cell voltages nor temperatures in the config: it loads (pack-level), the decoder keeps no cell
    channel, and the bridge's sample carries the average cell of the stated series count."""
    from bms_ai.can.assembler import PACK_LEVEL_KEY, PackAssembler, average_cell_sample

    p = _write_cfg(tmp_path, pack_config_path, cell_voltages=None, cell_temperatures=None, temperature_sensors=0,
                   cells=98, limits={"cell_voltage": {"over": {"mol": 4.15, "rsl": 4.17, "msl": 4.19}}})
    cfg = load_pack_config(p)
    assert cfg.pack_level and cfg.cell_channels == 0 and cfg.n_cells == 98 and cfg.n_temps == 0
    assert cfg.limits["cell_voltage"]["over"]["msl"] == 4.19
    asm = PackAssembler(PackDecoder(cfg))
    s = asm.snapshot()
    assert s.n_cells == 0
    s.pack_voltage, s.pack_voltage_stamp = 362.6, 5.0
    avg = average_cell_sample(s, cfg.n_cells)
    assert avg.cell_voltages.tolist() == [pytest.approx(3.7)] and avg.cell_voltage_stamps.tolist() == [5.0]
    assert avg.status[PACK_LEVEL_KEY] == 1.0 and s.n_cells == 0  # a copy
    full = load_pack_config(pack_config_path)
    assert not full.pack_level and full.cell_channels == 96 and full.limits == {}


def test_pack_config_limits_must_be_a_mapping(tmp_path, pack_config_path):
    """A wrong type in 'limits' is one line naming the key."""
    p = _write_cfg(tmp_path, pack_config_path, limits=[1])
    with pytest.raises(PackConfigError, match=r"\.limits: expected a mapping, got list"):
        load_pack_config(p)


# ----------------------------------------------------------------------------- the vehicle's own BMS values

def test_vehicle_bms_maps_dbc_signals_and_polled_values(tmp_path, pack_config_path):
    """The car's SOC/limits from DBC signals become status entries the decoder fills; SOH may be a polled value."""
    vehicle = {"discharge_power_limit_kw": {"message": "BMS_Limits", "signal": "MaxDischargeCurrent", "scale": 0.4},
               "soh": {"poll": "soh"}}
    cfg = load_pack_config(_write_cfg(tmp_path, pack_config_path, poll=KONA_LIKE_POLL, vehicle_bms=vehicle))
    assert cfg.vehicle_bms == {"discharge_power_limit_kw": "vehicle_bms.discharge_power_limit_kw", "soh": "soh"}
    assert cfg.status["vehicle_bms.discharge_power_limit_kw"].scale == 0.4
    assert "vehicle_bms.discharge_power_limit_kw" in PackDecoder(cfg).status_names  # validated against the DBC


@pytest.mark.parametrize(("vehicle", "needle"), [
    ({"soc": {"poll": "soc_bms"}}, "vehicle_bms.soc.poll: 'soc_bms' is not a value of any poll request"),
    ({"soc": {"poll": "soh", "scale": 2}}, "vehicle_bms.soc: unknown key(s) ['scale']"),
    ({"soc": {"message": "BMS_Limits"}}, "vehicle_bms.soc: missing required key 'signal'"),
    ({"soc": 3}, "vehicle_bms.soc: expected a mapping, got int 3"),
])
def test_vehicle_bms_errors_are_one_line(tmp_path, pack_config_path, vehicle, needle):
    """Each mistake names its key."""
    with pytest.raises(PackConfigError, match=re.escape(needle)):
        load_pack_config(_write_cfg(tmp_path, pack_config_path, poll=KONA_LIKE_POLL, vehicle_bms=vehicle))
