"""Pack values -> frames: the per-frame and vectorised paths agree, decode back, and equal cantools' encoding."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml
from testutil import synthetic_sample

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.decoder import PackDecoder
from bms_ai.can.encoder import PackEncoder
from bms_ai.can.packconfig import load_pack_config
from bms_ai.pack import PackSample


def _samples(rng, n, n_cells=96, n_temps=32):
    """Random samples with the awkward cases: NaN, infinities, values beyond the DBC range, missing status."""
    out = []
    for i in range(n):
        s = synthetic_sample(float(i))
        s.cell_voltages[:] = rng.uniform(-1.0, 9.0, n_cells)
        s.cell_temperatures[:] = rng.uniform(-60.0, 400.0, n_temps)
        s.cell_voltages[rng.integers(0, n_cells, 3)] = np.nan
        s.cell_temperatures[rng.integers(0, n_temps)] = np.inf
        s.pack_voltage = [np.nan, 700.0, -5.0, 355.123][i % 4]
        s.pack_current = [12.34, -np.inf, 5000.0, -0.05][i % 4]
        s.status = {"bms_state": float(i % 6), "isolation_kohm": 70000.0 if i % 3 else np.nan}
        out.append(s)
    return out


def _rows(enc: PackEncoder, name: str, mux: np.ndarray, samples: list[PackSample]) -> dict:
    """The vectorised call's values for frames of ``name`` built from one sample per frame."""
    names = enc.decoder.status_names
    values = {"pack_voltage": [s.pack_voltage for s in samples], "pack_current": [s.pack_current for s in samples],
              **{k: [s.status.get(k, 0.0) for s in samples] for k in names}}
    for key in ("cell_voltages", "cell_temperatures"):
        idx = enc.element_index(name, key, mux)
        if idx.shape[1]:
            values[key] = np.stack([getattr(s, key)[i] for s, i in zip(samples, idx)])
    return values


def test_per_frame_and_vectorised_paths_give_the_same_bytes(decoder):
    """encode() (one frame, plain integers) and encode_rows() (numpy) are the same encoder."""
    rng = np.random.default_rng(1)
    one, many = PackEncoder(decoder), PackEncoder(decoder)
    for name in one.messages():
        mux = np.tile(np.asarray(one.muxes(name)), 3)
        samples = _samples(rng, len(mux))
        ref = [one.encode(name, int(m), s) for m, s in zip(mux, samples)]
        got = many.encode_rows(name, mux, _rows(many, name, mux, samples))
        assert [bytes(r) for r in got] == ref, name
    # alive counters continue across calls and paths
    assert one.encode("BMS_PackMeas", -1, samples[0]) == bytes(many.encode_rows("BMS_PackMeas", [-1], _rows(
        many, "BMS_PackMeas", np.array([-1]), samples[:1]))[0])


def test_frames_decode_back_and_equal_cantools_encoding(decoder):
    """Decoding returns the values (NaN where flagged invalid); the bits are cantools' own encoding."""
    enc = PackEncoder(decoder)
    asm = PackAssembler(decoder)
    s = synthetic_sample(3.0)
    s.cell_voltages[[5, 50]] = np.nan
    s.cell_temperatures[7] = np.nan
    t = 0.0
    for t, name, mux in enc.schedule(0.0, 0.2):
        fid, ext = enc.frame_id(name)
        data = enc.encode(name, mux, s)
        assert asm.feed(fid, data, t, ext)
        m = decoder.db.get_message_by_name(name)
        assert m.encode(m.decode(data, decode_choices=False), scaling=True, strict=False) == data
    got = asm.snapshot()
    ok = np.isfinite(s.cell_voltages)
    assert np.isnan(got.cell_voltages[[5, 50]]).all() and math.isnan(got.cell_temperatures[7])
    assert np.abs(got.cell_voltages[ok] - s.cell_voltages[ok]).max() <= 0.0005 + 1e-9
    assert got.pack_current == pytest.approx(s.pack_current, abs=0.05)
    assert got.status["bms_state"] == 3.0 and got.status["charger_connected"] == 0.0  # missing status -> 0
    assert asm.counters.total_rejected == 0 and all(st.counter_errors == 0 for st in asm.stats.values())


def test_vectorised_invalid_flags_and_missing_quantities(decoder):
    """Explicit invalid flags keep the value bits; a quantity not given is sent invalid."""
    enc = PackEncoder(decoder)
    mux = np.array([2, 2])
    idx = enc.element_index("BMS_CellVoltages", "cell_voltages", mux)
    assert idx.tolist() == [[8, 9, 10, 11]] * 2
    v = np.full((2, 4), 3.3)
    inv = np.zeros((2, 4), np.uint8)
    inv[1, 2] = 1
    rows = enc.encode_rows("BMS_CellVoltages", mux, {"cell_voltages": v}, invalid={"cell_voltages": inv})
    asm = PackAssembler(decoder)
    for i, r in enumerate(rows):
        asm.feed(0x130, bytes(r), float(i))
    assert math.isnan(asm.sample.cell_voltages[10]) and asm.sample.cell_voltages[9] == pytest.approx(3.3)
    assert np.flatnonzero(rows[0] != rows[1]).tolist() == [1]  # only the flag byte differs
    meas = enc.encode_rows("BMS_PackMeas", np.array([-1]), {"pack_current": 10.0})
    asm.feed(0x120, bytes(meas[0]), 5.0)
    assert asm.sample.pack_current == pytest.approx(10.0) and math.isnan(asm.sample.pack_voltage)
    with pytest.raises(ValueError, match="not pack quantities: \\['pack_volts'\\]"):
        enc.encode_rows("BMS_PackMeas", np.array([-1]), {"pack_volts": 1.0})
    with pytest.raises(ValueError, match="multiplexer values outside"):
        enc.element_index("BMS_CellVoltages", "cell_voltages", np.array([24]))
    with pytest.raises(ValueError, match="multiplexer values outside"):
        enc.encode_rows("BMS_CellVoltages", np.array([1, 99]), {})


def test_cycle_times_follow_the_dbc(decoder):
    """Whole-drive send times: every DBC cycle from ``phase``, the mux values of a cycle spread over it."""
    enc = PackEncoder(decoder)
    assert enc.messages() == ["BMS_PackMeas", "BMS_Status", "BMS_Limits", "BMS_CellVoltages", "BMS_CellTemps"]
    assert (enc.cycle("BMS_PackMeas"), enc.cycle("BMS_CellVoltages")) == (0.01, 0.02)
    t, mux = enc.cycle_times("BMS_CellVoltages", 1.0, phase=0.0007, spread=0.5)
    assert len(t) == 50 * 24 and mux[:25].tolist() == list(range(24)) + [0]
    assert t[1] - t[0] == pytest.approx(0.02 / 24 * 0.5) and t[24] == pytest.approx(0.0207)
    t, mux = enc.cycle_times("BMS_PackMeas", 1.0)
    assert len(t) == 101 and (mux == -1).all()
    sched = [(tt, m) for tt, n, m in enc.schedule(0.0, 1.0) if n == "BMS_CellTemps"]
    t, mux = enc.cycle_times("BMS_CellTemps", 1.0)
    keep = t < 1.0
    np.testing.assert_allclose(t[keep], [e[0] for e in sched])
    assert mux[keep].tolist() == [e[1] for e in sched]


OTHER_DBC = '''VERSION ""
NS_ :
BS_:
BU_: BMS
BO_ 512 Pack: 8 BMS
 SG_ Volts : 7|16@0+ (0.01,0) [0|600] "V" BMS
 SG_ Amps : 16|16@1- (0.1,-5) [-3000|3000] "A" BMS
 SG_ Cnt : 35|4@0+ (1,0) [0|15] "" BMS
 SG_ Crc : 56|8@1+ (1,0) [0|255] "" BMS
BO_ 513 Cells: 5 BMS
 SG_ Mux M : 0|8@1+ (1,0) [0|1] "" BMS
 SG_ C0 m0 : 8|16@1+ (0.001,0) [0|65.535] "V" BMS
 SG_ C1 m0 : 24|16@1+ (0.001,0) [0|65.535] "V" BMS
BO_ 514 Extra: 4 BMS
 SG_ Temp : 0|32@1- (1,0) [-100|100] "" BMS
SIG_VALTYPE_ 514 Temp : 1;
SG_MUL_VAL_ 513 C0 Mux 0-1;
SG_MUL_VAL_ 513 C1 Mux 0-1;
'''


def test_motorola_signed_float_and_narrow_range_signals_equal_cantools(tmp_path):
    """Another vehicle's DBC: big-endian, offset, float and range-clamped signals, both paths equal cantools."""
    (tmp_path / "other.dbc").write_text(OTHER_DBC)
    cfg = {"pack_id": "other", "dbc": "other.dbc", "cells": 4, "chemistry": "lfp",
           "pack_voltage": {"message": "Pack", "signal": "Volts"},
           "pack_current": {"message": "Pack", "signal": "Amps", "scale": -1},
           "cell_voltages": {"message": "Cells", "slots": ["C0", "C1"]},
           "status": {"coolant_c": {"message": "Extra", "signal": "Temp"}},
           "checks": {"Pack": {"counter": "Cnt", "crc": {"signal": "Crc"}}}}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(cfg))
    dec = PackDecoder(load_pack_config(tmp_path / "other.yaml"))
    enc, vec = PackEncoder(dec), PackEncoder(dec)
    db = dec.db
    s = PackSample.empty(4, 0)
    for i, (volts, amps, temp) in enumerate([(355.5, 42.0, 21.5), (650.0, -4000.0, 150.0), (0.004, 0.0, -3.25)]):
        s.pack_voltage, s.pack_current, s.status = volts, amps, {"coolant_c": temp}
        s.cell_voltages[:] = [3.301 + i, 3.302, 3.303, 3.304]
        for name, mux, ref_values in (
                ("Pack", -1, {"Volts": min(volts, 600.0), "Amps": max(min(-amps, 3000.0), -3000.0), "Cnt": i}),
                ("Cells", 1, {"Mux": 1, "C0": s.cell_voltages[2], "C1": s.cell_voltages[3]}),
                ("Extra", -1, {"Temp": min(temp, 100.0)})):
            m = db.get_message_by_name(name)
            ref = bytearray(m.encode({**dict.fromkeys((x.name for x in m.signals), 0), **ref_values},
                                     scaling=True, strict=False))
            if name == "Pack":
                ref[7] = dec.routes[(512, False)].crc_fn(bytes(ref[:7]))
            got = enc.encode(name, mux, s)
            assert got == bytes(ref), (name, i)
            rows = vec.encode_rows(name, np.array([mux]), {"pack_voltage": volts, "pack_current": amps,
                                                         "coolant_c": temp, **({"cell_voltages": s.cell_voltages[
                                                             enc.element_index(name, "cell_voltages", [mux])]}
                                                             if name == "Cells" else {})})
            assert bytes(rows[0]) == got, (name, i)
    asm = PackAssembler(dec)
    assert asm.feed(512, enc.encode("Pack", -1, s), 1.0) and asm.sample.pack_current == pytest.approx(-0.0)
