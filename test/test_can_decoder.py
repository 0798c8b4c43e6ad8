"""Frame decode and assembly: known answers, cantools agreement, bad frames, offline equality."""

from __future__ import annotations

import math
import struct

import cantools
import numpy as np
import pytest
from testutil import synthetic_messages, synthetic_sample

from bms_ai.can.assembler import PackAssembler
from bms_ai.can.checks import crc8_sae_j1850
from bms_ai.can.codec import compile_signal, frame_words
from bms_ai.can.decoder import PackDecoder
from bms_ai.can.offline import FrameArrays, decode_frames, sample, sample_times
from bms_ai.can.packconfig import load_pack_config
from bms_ai.can.sampler import FixedRateSampler


@pytest.fixture(scope="module")
def decoder(pack_config_path):
    return PackDecoder(load_pack_config(pack_config_path))


def test_crc8_sae_j1850_check_value():
    assert crc8_sae_j1850(b"123456789") == 0x4B  # catalogue check value of CRC-8/SAE-J1850


def _packmeas(counter: int, volts_raw: int, amps_raw: int, crc_ok: bool = True) -> bytes:
    # layout per DBC: byte0 CRC, bits 8-11 counter, bit 12/13 valid flags, 16-31 V, 32-47 I (signed)
    body = bytes([counter | 0x30]) + struct.pack("<Hhh", volts_raw, amps_raw, 0)
    crc = crc8_sae_j1850(body) ^ (0 if crc_ok else 0x5A)
    return bytes([crc]) + body


def test_known_answer_pack_meas_signed_scaled(decoder):
    asm = PackAssembler(decoder)
    assert asm.feed(0x120, _packmeas(5, 40000, -123), 1.0)
    assert asm.sample.pack_voltage == pytest.approx(400.00)
    assert asm.sample.pack_current == pytest.approx(-12.3)  # signed, 0.1 A
    assert asm.sample.pack_voltage_stamp == 1.0


def test_known_answer_multiplexed_cells_and_invalid_flag(decoder):
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


def test_agrees_with_cantools_on_every_frame(decoder):
    msgs = synthetic_messages(decoder, 0.0, 2.0)
    db = decoder.db
    for m in msgs:
        ref = db.get_message_by_frame_id(m.arbitration_id).decode(m.data, decode_choices=False)
        r = decoder.routes[(m.arbitration_id, False)]
        le, be = frame_words(m.data, r.length)
        for slots in r.by_mux.values():
            for s in slots:
                if s.plan.name in ref:
                    assert s.plan.value(le, be) == pytest.approx(ref[s.plan.name], abs=1e-9)


def test_bad_frames_are_counted_never_raised(decoder):
    asm = PackAssembler(decoder)
    good = _packmeas(0, 35000, 0)
    assert asm.feed(0x120, good, 10.0)
    assert not asm.feed(0x7FF, b"\x00" * 8, 10.1)  # unknown id
    assert not asm.feed(0x120, good[:5], 10.2)  # wrong DLC
    assert not asm.feed(0x120, _packmeas(1, 35000, 0, crc_ok=False), 10.3)  # checksum
    assert not asm.feed(0x120, good, 9.0)  # time going backwards
    assert not asm.feed(0x120, good, float("nan"))
    assert not asm.feed(0x120, None, 11.0)  # garbage payload object
    assert asm.feed(0x120, _packmeas(3, 35000, 0), 11.0)  # counter jumped 0 -> 3
    r = asm.counters.rejected
    assert (r["unknown_id"], r["dlc_error"], r["crc_error"], r["time_backwards"], r["bad_type"]) == (1, 1, 1, 2, 1)
    assert asm.unknown_ids == {0x7FF: 1}
    assert asm.stats["BMS_PackMeas"].counter_errors == 1
    assert asm.counters.accepted == 2


def test_timeouts_and_rates(decoder):
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
    asm = PackAssembler(decoder)
    for m in synthetic_messages(decoder, 0.0, 0.2):
        asm.feed_message(m)
    s = asm.snapshot()
    truth = synthetic_sample(s.cell_voltage_stamps.max())
    assert s.complete
    assert np.abs(s.cell_temperatures - truth.cell_temperatures).max() < 0.2
    assert np.abs(s.cell_voltages - truth.cell_voltages).max() < 0.002


def test_offline_vectorised_equals_per_frame_path(decoder):
    msgs = synthetic_messages(decoder, 0.0, 3.0)
    # sprinkle bad frames: corrupt CRC, unknown id, backwards time, wrong DLC
    msgs[10].data[0] ^= 0xFF
    msgs[20].arbitration_id = 0x555
    msgs[30].timestamp = msgs[29].timestamp - 1.0
    msgs[40].data = msgs[40].data[:4]
    msgs[40].dlc = 4
    sampler = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=0.5)
    live = [s for m in msgs for s in sampler.feed_message(m)]
    frames = FrameArrays.from_messages(msgs)
    dec = decode_frames(frames, decoder)
    times = sample_times(dec.t_first, dec.t_last, 0.1, dec.frame_ts)
    table = sample(dec, times, max_age=0.5)
    assert len(live) == len(table) > 25
    np.testing.assert_array_equal([s.stamp for s in live], table.t)
    np.testing.assert_array_equal(np.stack([s.cell_voltages for s in live]), table.cell_voltages)
    np.testing.assert_array_equal(np.stack([s.cell_temperatures for s in live]), table.cell_temperatures)
    np.testing.assert_array_equal([s.pack_current for s in live], table.pack_current)
    np.testing.assert_array_equal([s.pack_voltage for s in live], table.pack_voltage)
    assert table.rejected == sampler.asm.counters.rejected
    assert table.accepted == sampler.asm.counters.accepted


def test_sampler_caps_catchup_over_gaps_same_as_offline(decoder):
    msgs = synthetic_messages(decoder, 0.0, 1.0) + [
        m for m in synthetic_messages(decoder, 0.0, 1.0)]
    for m in msgs[len(msgs) // 2:]:
        m.timestamp += 500.0  # 499 s gap: more than max_catchup instants
    sampler = FixedRateSampler(PackAssembler(decoder), period=0.1, max_age=1.0, max_catchup=50)
    live = [s.stamp for m in msgs for s in sampler.feed_message(m)]
    dec = decode_frames(FrameArrays.from_messages(msgs), decoder)
    offline = sample_times(dec.t_first, dec.t_last, 0.1, dec.frame_ts, max_catchup=50)
    np.testing.assert_array_equal(live, offline)
    assert sampler.skipped > 4000


MOTOROLA_DBC = """VERSION ""
NS_ :
BS_:
BU_: A
BO_ 256 M: 8 A
 SG_ S1 : 7|12@0- (0.5,-3) [-2000|2000] "" A
 SG_ S2 : 11|16@0+ (0.01,0) [0|655.35] "" A
 SG_ S3 : 43|7@0- (1,0) [-64|63] "" A
 SG_ S4 : 56|8@1- (2,1) [-300|300] "" A
"""


def test_big_endian_and_signed_plans_match_cantools(tmp_path):
    from hypothesis import given, settings
    from hypothesis import strategies as st

    p = tmp_path / "m.dbc"
    p.write_text(MOTOROLA_DBC)
    db = cantools.database.load_file(str(p))
    m = db.get_message_by_name("M")
    plans = [compile_signal(s, m.length) for s in m.signals]

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=8, max_size=8))
    def check(data):
        ref = m.decode(data, decode_choices=False)
        le, be = frame_words(data, 8)
        for p_ in plans:
            assert p_.value(le, be) == pytest.approx(ref[p_.name])
        arr = np.frombuffer(data, dtype=np.uint8).reshape(1, 8)
        from bms_ai.can.codec import frames_to_words

        vle, vbe = frames_to_words(arr, 8)
        for p_ in plans:
            assert p_.values(vle, vbe)[0] == pytest.approx(ref[p_.name])

    check()
