"""Per-frame assembly: known answers, bad frames counted (never raised), timeouts and rates."""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from testutil import realdata, synthetic_messages, synthetic_sample

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


# ----------------------------------------------------------------------------- fused decoders vs the signal plans

class PlanReference:
    """The per-frame decode spelled out from the routes' signal plans, one signal at a time (the
    semantics the fused decoders are compiled from): what each accepted frame must store."""

    def __init__(self, decoder) -> None:
        self.dec = decoder
        self.sample = PackAssembler(decoder).sample.copy()  # the same empty sample
        self.last_ts = -math.inf

    def _slots(self, route, le: int, be: int):
        plain = route.by_mux.get(-1, [])
        if route.mux is None:
            return plain
        key = route.mux.raw(le, be)
        mux = route.by_mux.get(key) if key != -1 else None
        return None if mux is None and not plain else plain + (mux or [])

    def feed(self, arb_id: int, data: bytes, ts: float, ext: bool) -> str:
        """'ok' or the reason the frame is rejected."""
        from bms_ai.can.codec import frame_words
        from bms_ai.can.frames import stamp_ok

        if not stamp_ok(ts):
            return "bad_time"
        if not ts >= self.last_ts:
            return "time_backwards"
        self.last_ts = ts
        route = self.dec.routes.get((arb_id, ext))
        if route is None:
            return "unknown_id"
        if len(data) != route.length:
            return "dlc_error"
        data = bytes(data)
        if route.crc_byte >= 0 and route.crc_fn(data[:route.crc_byte] + data[route.crc_byte + 1:]) != data[route.crc_byte]:
            return "crc_error"
        le, be = frame_words(data, route.length)
        slots = self._slots(route, le, be)
        if slots is None:
            return "unknown_mux"
        values = [s.plan.value(le, be) * s.scale + s.offset for s in slots]
        if not all(math.isfinite(v) for v in values):
            return "non_finite"
        for s, v in zip(slots, values):
            if (s.invalid is not None and s.invalid.raw(le, be)) or (s.valid is not None and not s.valid.raw(le, be)):
                v = math.nan
            self._store(s, v, ts)
        self.sample.stamp = ts
        return "ok"

    def _store(self, s, v: float, ts: float) -> None:
        from bms_ai.can.decoder import CELL_T, CELL_V, PACK_I, PACK_V

        smp = self.sample
        if s.kind in (CELL_V, CELL_T):
            vals, stamps = ((smp.cell_voltages, smp.cell_voltage_stamps) if s.kind == CELL_V
                            else (smp.cell_temperatures, smp.cell_temperature_stamps))
            vals[s.index], stamps[s.index] = v, ts
        elif s.kind == PACK_V:
            smp.pack_voltage, smp.pack_voltage_stamp = v, ts
        elif s.kind == PACK_I:
            smp.pack_current, smp.pack_current_stamp = v, ts
        else:
            smp.status[self.dec.status_names[s.index]] = v


def assert_same_sample(a, b) -> None:
    """Equal values, NaN pattern and stamps, bit for bit (the sign of a zero too)."""
    for name in ("stamp", "pack_voltage", "pack_current", "pack_voltage_stamp", "pack_current_stamp"):
        x, y = getattr(a, name), getattr(b, name)
        assert struct.pack("<d", x) == struct.pack("<d", y) or (math.isnan(x) and math.isnan(y)), name
    for name in ("cell_voltages", "cell_temperatures", "cell_voltage_stamps", "cell_temperature_stamps"):
        x, y = getattr(a, name), getattr(b, name)
        np.testing.assert_array_equal(x, y, err_msg=name)
        assert np.array_equal(np.signbit(x), np.signbit(y)), name
    assert a.status.keys() == b.status.keys()
    assert all(struct.pack("<d", a.status[k]) == struct.pack("<d", b.status[k])
               or math.isnan(a.status[k]) and math.isnan(b.status[k]) for k in a.status)


def check_against_plans(decoder, frames) -> int:
    """Feed (id, data, ts, ext) frames to an assembler and the plan reference; the same verdict and
    sample after every frame of a configured id. Returns the frames accepted."""
    asm, ref = PackAssembler(decoder), PlanReference(decoder)
    accepted = 0
    for fid, data, ts, ext in frames:
        verdict = ref.feed(fid, data, ts, ext)
        before = dict(asm.counters.rejected)
        ok = asm.feed(fid, data, ts, ext)
        assert ok == (verdict == "ok"), (hex(fid), data.hex(), verdict)
        if not ok:
            assert asm.counters.rejected[verdict] == before[verdict] + 1
        accepted += ok
        if (fid, ext) in decoder.routes:
            assert_same_sample(asm.sample, ref.sample)
    assert asm.counters.accepted == accepted
    return accepted


def random_frames(decoder, n: int, seed: int = 0, damaged: bool = True):
    """Frames of every routed id with random payloads (flags, signs, unknown multiplexer values),
    and with ``damaged`` some of the wrong length or a foreign id."""
    rng = np.random.default_rng(seed)
    routes = list(decoder.routes.values())
    t = 1.0
    for _ in range(n):
        r = routes[rng.integers(len(routes))]
        length = r.length if not damaged or rng.random() > 0.05 else int(rng.integers(0, 9))
        data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        if r.mux is not None and length and rng.random() < 0.7:  # mostly known multiplexer values
            keys = [k for k in r.by_mux if k >= 0] or [0]
            le = int.from_bytes(data, "little") & ~(r.mux.mask << r.mux.shift) if not r.mux.big_endian else None
            if le is not None:
                data = (le | (int(rng.choice(keys)) & r.mux.mask) << r.mux.shift).to_bytes(length, "little")
        fid = r.frame_id if not damaged or rng.random() > 0.03 else 0x7FF
        t += float(rng.exponential(0.001))
        yield fid, data, t, r.extended


def test_fused_decoders_equal_the_signal_plans_on_random_payloads(decoder):
    """The reference pack: every id with random payloads (checksums mostly wrong, flags and signs all
    ways, unknown multiplexer values): the same verdicts and samples as the plans give."""
    assert check_against_plans(decoder, random_frames(decoder, 1500)) > 500


FUSED_DBC = """VERSION ""
NS_ :
BS_:
BU_: A
BO_ 256 Pack: 8 A
 SG_ Volts : 7|16@0+ (0.02,1.5) [0|2000] "V" A
 SG_ Amps : 23|16@0- (0.05,-3) [-2000|2000] "A" A
 SG_ VoltsOk : 56|1@1+ (1,0) [0|1] "" A
 SG_ Power : 39|24@0- (0.001,0) [-8000|8000] "kW" A
BO_ 257 Cells: 8 A
 SG_ Mux M : 0|2@1+ (1,0) [0|3] "" A
 SG_ State : 2|6@1+ (1,0) [0|63] "" A
 SG_ C0 m0 : 8|16@1+ (0.001,0) [0|65] "V" A
 SG_ C1 m0 : 24|16@1- (0.001,2) [0|65] "V" A
 SG_ C0Bad m0 : 40|1@1+ (1,0) [0|1] "" A
 SG_ C2 m1 : 15|16@0+ (0.001,0) [0|65] "V" A
 SG_ C3 m1 : 31|16@0+ (0.001,0) [0|65] "V" A
BO_ 258 Temps: 8 A
 SG_ T0 : 0|32@1- (1,0) [-100|200] "degC" A
 SG_ T1 : 32|32@1- (0.5,-1) [-100|200] "degC" A
SIG_VALTYPE_ 258 T0 : 1;
SIG_VALTYPE_ 258 T1 : 1;
"""


def test_fused_decoders_equal_the_signal_plans_on_motorola_float_and_multiplexed_signals(tmp_path):
    """Big-endian, signed, offset, IEEE float (NaN and inf payloads rejected as non-finite), a plain
    signal in a multiplexed message and a valid flag: the same as the plans on random payloads."""
    import yaml

    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.packconfig import load_pack_config

    (tmp_path / "f.dbc").write_text(FUSED_DBC)
    cfg = {"pack_id": "fused", "dbc": "f.dbc", "cells": 4, "chemistry": "nmc", "temperature_sensors": 2,
           "pack_voltage": {"message": "Pack", "signal": "Volts", "valid": "VoltsOk"},
           "pack_current": {"message": "Pack", "signal": "Amps", "scale": -1},
           "cell_voltages": [{"message": "Cells", "signals": {"C0": 0, "C1": 1, "C2": 2, "C3": 3}}],
           "cell_temperatures": {"message": "Temps", "signals": {"T0": 0, "T1": 1}, "scale": 2.0, "value_offset": 0.5},
           "status": {"state": {"message": "Cells", "signal": "State"},
                      "power": {"message": "Pack", "signal": "Power", "scale": 1000.0}}}
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(cfg))
    dec = PackDecoder(load_pack_config(tmp_path / "f.yaml"))
    frames = list(random_frames(dec, 2000, seed=1))
    nan_inf = [(258, struct.pack("<ff", math.nan, 1.0), 100.0, False), (258, struct.pack("<ff", 1.0, math.inf), 100.1, False)]
    asm = PackAssembler(dec)
    assert check_against_plans(dec, frames + nan_inf) > 1000
    for f in nan_inf:
        asm.feed(*f)
    assert asm.counters.rejected["non_finite"] == 2


VEHICLES = Path(__file__).resolve().parents[1] / "config" / "vehicles"


@pytest.mark.parametrize("log,routed", [("precharge.asc", 30), ("power-off-on-ready-off.gvret.csv", 250)])
def test_fused_decoders_equal_the_signal_plans_on_real_kona_logs(log, routed):
    """Real Kona P-CAN logs (Motorola and signed signals in a real DBC): the same verdicts and samples."""
    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.logs import iter_log
    from bms_ai.can.packconfig import load_pack_config

    dec = PackDecoder(load_pack_config(VEHICLES / "kona_pcan.yaml", dbc=realdata("kona/pcan.dbc")))
    frames = [(m.arbitration_id, bytes(m.data), m.timestamp, bool(m.is_extended_id))
              for m in iter_log(realdata(f"kona/{log}"), []) if not (m.is_error_frame or m.is_remote_frame)]
    assert check_against_plans(dec, frames) >= routed


@pytest.mark.drive   # seconds: outside the fast library tier
def test_fused_decoders_equal_the_signal_plans_on_the_real_model3_dbc():
    """The Tesla Model 3 DBC (multiplexed messages, loaded non-strict): random payloads of its mapped ids."""
    from bms_ai.can.decoder import PackDecoder
    from bms_ai.can.packconfig import load_pack_config

    dec = PackDecoder(load_pack_config(VEHICLES / "model3.yaml", dbc=realdata("model3/Model3CAN.dbc")))
    assert check_against_plans(dec, random_frames(dec, 1500, seed=2)) > 500
