"""Per-frame assembly: known answers, bad frames counted (never raised), timeouts and rates."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testutil import synthetic_messages, synthetic_sample

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.checks import crc8_sae_j1850


def _packmeas(counter: int, volts_raw: int, amps_raw: int, crc_ok: bool = True) -> bytes:
    # layout per DBC: byte0 CRC, bits 8-11 counter, bit 12/13 valid flags, 16-31 V, 32-47 I (signed)
    body = bytes([counter | 0x30]) + struct.pack("<Hhh", volts_raw, amps_raw, 0)
    crc = crc8_sae_j1850(body) ^ (0 if crc_ok else 0x5A)
    return bytes([crc]) + body


def test_known_answer_pack_meas_signed_scaled(decoder):
    """Hand-packed PackMeas: scaled voltage, signed current, value stamps."""
    asm = PackAssembler(decoder)
    assert asm.feed(0x120, _packmeas(5, 40000, -123), 1.0)
    assert asm.sample.pack_voltage == pytest.approx(400.00)
    assert asm.sample.pack_current == pytest.approx(-12.3)  # signed, 0.1 A
    assert asm.sample.pack_voltage_stamp == 1.0


def test_known_answer_multiplexed_cells_and_invalid_flag(decoder):
    """Multiplexed cells and temperatures land at mux*4+slot; an invalid flag gives NaN."""
    # mux 2 carries cells 8..11; slot 2 flagged invalid
    word = 2 | (1 << 10) | (3300 << 12) | (4200 << 25) | (1234 << 38) | (2500 << 51)
    temps = 1 | (650 << 12) | (0 << 24) | (4095 << 36) | (1000 << 48)  # mux 1: sensors 4..7
    asm = PackAssembler(decoder)
    assert asm.feed(0x130, word.to_bytes(8, "little"), 2.0)
    assert asm.feed(0x131, temps.to_bytes(8, "little"), 2.5)
    cv = asm.sample.cell_voltages
    assert cv[8] == pytest.approx(3.300) and cv[9] == pytest.approx(4.200) and cv[11] == pytest.approx(2.500)
    assert math.isnan(cv[10])  # invalid flag -> NaN, not the 1.234 V in the payload
    assert np.isnan(cv[:8]).all() and np.isnan(cv[12:]).all()
    ct = asm.sample.cell_temperatures
    assert ct[4] == pytest.approx(25.0) and ct[5] == pytest.approx(-40.0)
    assert ct[6] == pytest.approx(369.5) and ct[7] == pytest.approx(60.0)


def test_bad_frames_are_counted_never_raised(decoder):
    """Every kind of bad frame is rejected under its reason; a counter jump is counted, not rejected."""
    asm = PackAssembler(decoder)
    good = _packmeas(0, 35000, 0)
    assert asm.feed(0x120, good, 10.0)
    assert not asm.feed(0x7FF, b"\x00" * 8, 10.1)  # unknown id
    assert not asm.feed(0x120, good[:5], 10.2)  # wrong DLC
    assert not asm.feed(0x120, _packmeas(1, 35000, 0, crc_ok=False), 10.3)  # checksum
    assert not asm.feed(0x120, good, 9.0)  # time going backwards
    for damaged in (float("nan"), float("inf"), -1.0, 1e300):  # stamps no instant can count from
        assert not asm.feed(0x120, good, damaged)
    assert not asm.feed(-5, good, 10.4)  # an impossible id (a damaged python-can CSV)
    assert not asm.feed(0x120, None, 11.0)  # garbage payload object
    assert asm.feed(0x120, _packmeas(3, 35000, 0), 11.0)  # counter jumped 0 -> 3
    r = asm.counters.rejected
    assert (r["unknown_id"], r["dlc_error"], r["crc_error"], r["time_backwards"], r["bad_type"]) == (1, 1, 1, 1, 1)
    assert (r["bad_time"], r["bad_id"]) == (4, 1)
    assert asm.unknown_ids == {0x7FF: 1}
    assert asm.stats["BMS_PackMeas"].counter_errors == 1
    assert asm.counters.accepted == 2


def test_timeouts_and_rates(decoder):
    """Per-message timeouts follow the pack config; rates follow the DBC cycle times."""
    asm = PackAssembler(decoder)
    for _i, m in enumerate(synthetic_messages(decoder, 0.0, 1.0)):
        asm.feed_message(m)
    assert asm.check_timeouts(1.0) == []
    late = asm.check_timeouts(1.2)
    assert "BMS_PackMeas" in late and "BMS_Status" not in late  # 50 ms vs 300 ms timeouts
    assert asm.stats["BMS_PackMeas"].timeouts == 1
    assert asm.rates()["BMS_PackMeas"] == pytest.approx(100.0, rel=0.02)
    assert asm.rates()["BMS_CellVoltages"] == pytest.approx(24 * 50.0, rel=0.02)


def test_assembled_sample_matches_source_within_quantisation(decoder):
    """A fifth of a second of traffic completes the sample, within one LSB of the truth."""
    asm = PackAssembler(decoder)
    for m in synthetic_messages(decoder, 0.0, 0.2):
        asm.feed_message(m)
    s = asm.snapshot()
    truth = synthetic_sample(s.cell_voltage_stamps.max())
    assert s.complete
    assert np.abs(s.cell_temperatures - truth.cell_temperatures).max() < 0.2
    assert np.abs(s.cell_voltages - truth.cell_voltages).max() < 0.002



@settings(deadline=None)
@given(st.lists(st.tuples(
    st.sampled_from([0x120, 0x121, 0x122, 0x130, 0x131, 0x7FF, 0x1FFFFFFF]),
    st.binary(min_size=0, max_size=12),
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0, 1e6)),
    st.booleans()), max_size=40))
def test_fuzzed_frames_are_counted_never_raised(decoder, frames):
    """Any id, payload, timestamp and id type: each frame is accepted or counted as rejected."""
    asm = PackAssembler(decoder)
    for fid, data, ts, ext in frames:
        asm.feed(fid, data, ts, ext)
    assert asm.counters.accepted + asm.counters.total_rejected == len(frames)
