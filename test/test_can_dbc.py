"""DBC loading: one-line errors naming the file and line, a tolerant loader for public DBCs."""

from testutil import realdata


def test_a_cantools_message_over_several_lines_becomes_one_line(tmp_path) -> None:
    """Found by the config fuzz test: cantools lists unused VAL_ entries one per line."""
    from bms_ai.can.dbc import DbcError, load_dbc

    p = tmp_path / "pack.dbc"
    p.write_text('VERSION ""\n\nBU_: BMS\n\nBO_ 289 Status: 8 BMS\n SG_ A : 0|8@1+ (1,0) [0|255] "" BMS\n\n'
                 'VAL_ 289 Missing1 0 "off" 1 "on" ;\nVAL_ 289 Missing2 0 "off" 1 "on" ;\n')
    try:
        load_dbc(p, strict=True)
    except DbcError as exc:
        assert "\n" not in str(exc) and "cannot load DBC" in str(exc)
    else:
        import pytest

        pytest.skip("this cantools accepts unused VAL_ entries")


def test_public_dbc_without_nodes_line_loads_unmodified_with_a_warning() -> None:
    """The Kona DBC has no BU_ line: the tolerant loader adds one in memory and says so; the file is unchanged."""
    from bms_ai.can.dbc import load_dbc

    path = realdata("kona/pcan.dbc")
    before = path.read_bytes()
    warned: list[str] = []
    db = load_dbc(path, warn=warned.append)
    assert len(db.messages) == 107 and path.read_bytes() == before
    assert len(warned) == 1 and "no BU_ (nodes) line" in warned[0] and "file is unchanged" in warned[0]
    sig = db.get_message_by_frame_id(0x595).get_signal_by_name("VBatt")
    assert (sig.scale, sig.unit) == (0.1, "V")
    assert db.get_message_by_frame_id(0x596).get_signal_by_name("uwe596_6_TAkkuL").unit == "°C"


def test_unparsable_dbc_names_file_line_and_likely_cause_in_one_line(tmp_path) -> None:
    """Without the repair the Kona DBC fails at line 6 for want of BU_; the advice is not --no-strict."""
    import pytest

    from bms_ai.can.dbc import DbcError, load_dbc

    path = realdata("kona/pcan.dbc")
    with pytest.raises(DbcError) as exc:
        load_dbc(path, tolerant=False)
    msg = str(exc.value)
    assert "\n" not in msg and str(path) in msg and "line 6, column 9" in msg and "no BU_ (nodes) line" in msg
    assert "no-strict" not in msg and "dbc_strict" not in msg
    odd = tmp_path / "odd.dbc"  # no BU_ either: the error's line is the file's, not the repaired text's
    odd.write_text('VERSION ""\n\nBO_ 289 Status: 8 BMS\n SG_ A : 0|8@1+ (1,0) [0|255] "" BMS\nFOO_ bar\n')
    with pytest.raises(DbcError, match=r"odd\.dbc: line 5, column 1: 'FOO_ bar': likely a line cantools"):
        load_dbc(odd)


def test_strict_failure_keeps_the_switch_that_loads_it() -> None:
    """Model 3's DBC fails cantools' layout check: the error names dbc_strict / --no-strict (that it then
    loads is in test_can_draft.py)."""
    import pytest

    from bms_ai.can.dbc import DbcError, load_dbc

    path = realdata("model3/Model3CAN.dbc")
    with pytest.raises(DbcError, match=r"does not fit in message .*dbc_strict: false.*--no-strict"):
        load_dbc(path)
