"""RecordedDrive v2: optional arrays round-trip through drive.npz; drives without them load with defaults."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bms_ai.sim.dataset import V2_ARRAYS, RecordedDrive, find_drives, load_drive, save_npz

DATA = Path(__file__).resolve().parent / "data"


def _drive(**v2) -> RecordedDrive:
    t = np.arange(6) * 0.1
    return RecordedDrive(name="d", chemistry="nmc", capacity_ah=5.0, t=t, current=np.linspace(-1, 1, 6),
                         cell_v=np.full((6, 2), 3.7), cell_t=np.full((6, 1), 25.0), soc=np.full((6, 2), 0.5),
                         meta={"classes": ["b"], "soc_stored": [0.5, 0.5]}, **v2)


def test_v2_arrays_round_trip(tmp_path: Path) -> None:
    v2 = {"session": np.array([0, 0, 0, 1, 1, 2]), "cell_capacity_ah": np.array([4.9, 5.1]),
          "ocv_soc": np.linspace(0, 1, 5), "ocv_v": np.linspace(3.0, 4.2, 5), "current_true": np.linspace(-1, 1, 6) + 0.1}
    assert set(v2) == set(V2_ARRAYS)
    d = load_drive(save_npz(tmp_path / "d", _drive(**v2)))
    for k, v in v2.items():
        assert np.array_equal(getattr(d, k), v), k
    assert d.session.dtype == np.int32
    assert d.meta["classes"] == ["b"] and d.meta["soc_stored"] == [0.5, 0.5]
    assert np.array_equal(d.session_ids(), v2["session"])


def test_drive_without_v2_fields_loads_with_defaults(tmp_path: Path) -> None:
    d = load_drive(save_npz(tmp_path / "d", _drive()))
    assert d.session is None and d.cell_capacity_ah is None and d.ocv_v is None and d.current_true is None
    assert np.array_equal(d.session_ids(), np.zeros(6, dtype=np.int32))
    with np.load(tmp_path / "d" / "drive.npz") as z:
        assert set(z.files) == {"t", "current", "cell_v", "cell_t", "soc"}   # old readers see the old layout


def test_bundled_v1_drive_loads() -> None:
    d = load_drive(DATA / "selftest_nmc")
    assert d.session is None and d.session_ids().shape == d.t.shape
    assert json.loads((DATA / "selftest_nmc" / "meta.json").read_text())["chemistry"] == d.chemistry
    assert find_drives([DATA]) == [DATA / "selftest_lfp", DATA / "selftest_nmc"]


def test_resampling_keeps_the_charge_and_the_session_starts() -> None:
    from bms_ai.sim.dataset import RecordedDrive, resample_drive

    t = np.r_[np.arange(0, 100, 0.1), np.arange(500, 560, 0.1)]
    ses = np.r_[np.zeros(1000, np.int32), np.ones(600, np.int32)]
    cur = np.sin(t) * 10 + 3
    d = RecordedDrive("r", "nmc", 50.0, t, cur, np.ones((len(t), 2)) * 3.7, np.ones((len(t), 1)) * 25,
                      np.ones((len(t), 2)) * 0.5, session=ses)
    r = resample_drive(d, 1.0)
    assert r.meta["resampled_hz"] == 1.0 and set(np.flatnonzero(np.diff(r.session)) + 1) <= set(range(len(r.t)))
    for k in (0, 1):
        a, b = d.session == k, r.session == k
        assert r.t[b][0] == d.t[a][0]                                     # each session starts at its first sample
        # charge: sum(I dt) of the resampled windows equals the original's (rectangle rule on both)
        q0 = np.sum(d.current[a][1:] * np.diff(d.t[a]))
        q1 = np.sum(r.current[b][1:] * np.diff(r.t[b]))
        assert abs(q1 - q0) < 0.02 * np.sum(np.abs(d.current[a][1:]) * np.diff(d.t[a]))
    assert resample_drive(d, 10.0) is d and resample_drive(d, 0.0) is d
