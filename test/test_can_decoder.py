"""Routes compiled from the pack config and DBC: signal plans agree with cantools, checksums are right."""

from __future__ import annotations

import cantools
import numpy as np
import pytest
from testutil import synthetic_messages

from bms_ai.can.checks import crc8_sae_j1850
from bms_ai.can.codec import compile_signal, frame_words


def test_crc8_sae_j1850_check_value():
    """The checksum matches the published check value of its catalogue entry."""
    assert crc8_sae_j1850(b"123456789") == 0x4B  # catalogue check value of CRC-8/SAE-J1850


def test_agrees_with_cantools_on_every_frame(decoder):
    """Every compiled plan decodes every frame of a drive to cantools' value."""
    msgs = synthetic_messages(decoder, 0.0, 0.5)  # every message and multiplexer value, several times
    db = decoder.db
    plans = {key: {s.plan.name: s.plan for slots in r.by_mux.values() for s in slots}  # one check per signal
             for key, r in decoder.routes.items()}
    for m in msgs:
        ref = db.get_message_by_frame_id(m.arbitration_id).decode(m.data, decode_choices=False)
        r = decoder.routes[(m.arbitration_id, False)]
        le, be = frame_words(m.data, r.length)
        for name, plan in plans[(m.arbitration_id, False)].items():
            if name in ref:
                assert plan.value(le, be) == pytest.approx(ref[name], abs=1e-9)


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
    """Motorola, signed and offset signals: scalar and vectorised plans equal cantools on any payload."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    p = tmp_path / "m.dbc"
    p.write_text(MOTOROLA_DBC)
    db = cantools.database.load_file(str(p))
    m = db.get_message_by_name("M")
    plans = [compile_signal(s, m.length) for s in m.signals]

    @settings(deadline=None)
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
