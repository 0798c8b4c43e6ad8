"""Estimator state files: atomic replacement, corruption refused with a reason, never an exception."""

from __future__ import annotations

import json
import os

import numpy as np

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation.ocvmodel import KNOTS, OcvModel, ocv_from_low_rate
from bms_ai.estimation.state import decode_state, encode_state, read_state, write_state


def test_round_trip_and_atomic_replace(tmp_path):
    p = tmp_path / "deep" / "state.json"
    write_state(p, {"a": 1, "x": [0.5, 0.6]})
    write_state(p, {"a": 2})
    payload, why = read_state(p)
    assert payload == {"a": 2} and why == ""
    assert [f.name for f in p.parent.iterdir()] == ["state.json"]  # no temporary left behind
    assert oct(os.stat(p).st_mode & 0o777) == "0o600"


def test_every_kind_of_damage_is_refused_with_a_reason(tmp_path):
    good = encode_state({"soc": {"x": [0.5]}})
    doc = json.loads(good)
    flipped = json.dumps(dict(doc, payload={"soc": {"x": [0.6]}})).encode()
    cases = {
        b"": "not valid JSON", b"\xff\xfe": "not valid JSON", b"[1, 2]": "not an estimator state",
        b"null": "not an estimator state", flipped: "checksum mismatch",
        json.dumps(dict(doc, version=99)).encode(): "version 99",
        json.dumps(dict(doc, payload=[1])).encode(): "checksum",
    }
    for blob, why in cases.items():
        payload, reason = decode_state(blob)
        assert payload is None and why in reason, (blob, reason)
    (tmp_path / "s.json").write_bytes(good[: len(good) // 2])  # power cut mid-write of a non-atomic writer
    payload, reason = read_state(tmp_path / "s.json")
    assert payload is None and "s.json" in reason
    payload, reason = read_state(tmp_path / "missing.json")
    assert payload is None and "no stored estimator state" in reason


def test_nan_cannot_be_written():
    try:
        encode_state({"x": float("nan")})
    except ValueError:
        return
    raise AssertionError("NaN must not reach a state file")


def test_field_learning_commits_shrink_the_band_where_the_pack_rested():
    m = OcvModel.from_curve(load_ocv("nmc"), 0.04, "chemistry:nmc")
    before = m.terms(np.array([0.5, 0.9]))
    for _ in range(5):
        m.commit(0.5, 0.02, 0.005 ** 2)  # the curve is 20 mV low at 50 %
    after = m.terms(np.array([0.5, 0.9]))
    assert after.ocv[0] - before.ocv[0] > 0.015 and after.sigma[0] < 0.01
    assert after.sigma[1] == before.sigma[1]  # nothing learned where it never rested
    fresh = OcvModel.from_curve(load_ocv("nmc"), 0.04, "chemistry:nmc")
    assert fresh.restore(m.state()) == "" and np.allclose(fresh.correction, m.correction)
    other = OcvModel.from_curve(load_ocv("nmc"), 0.003, "pack-config")
    assert "starting over" in other.restore(m.state())
    assert len(KNOTS) == len(m.correction)


def test_ocv_from_a_low_rate_charge_and_discharge():
    soc = np.linspace(0, 1, 101)  # the grid the curve is rebuilt on: no interpolation error at the steep ends
    true = load_ocv("lfp")(soc)
    curve, half_gap = ocv_from_low_rate(np.column_stack([soc, true + 0.012]), np.column_stack([soc, true - 0.012]))
    assert abs(half_gap - 0.012) < 1e-6 and np.abs(curve(soc) - true).max() < 0.003
    try:
        ocv_from_low_rate(np.column_stack([soc, true - 0.05]), np.column_stack([soc, true + 0.05]))
    except ValueError as exc:
        assert "swapped" in str(exc)
    else:
        raise AssertionError("swapped branches must be refused")
