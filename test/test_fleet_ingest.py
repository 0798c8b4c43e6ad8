"""Fleet ingest: segments -> Parquet timelines equal to the drive's samples; damaged segments counted, not fatal."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bms_ai.fleet.edge import EdgeConfig, run_vehicle
from bms_ai.fleet.ingest import (
    TIMELINES,
    SegmentError,
    ingest_segment,
    list_segments,
    read_segment,
    read_timeline,
    sessions_from_gaps,
)
from bms_ai.fleet.store import open_store
from bms_ai.sim.dataset import RecordedDrive, resample_drive

KEY = "fleet-test-key"


def _drive(n_cells: int = 4, sessions: int = 2, n: int = 120, seed: int = 0) -> RecordedDrive:
    """A small two-session drive at 1 Hz (a one-hour park between the sessions)."""
    rng = np.random.default_rng(seed)
    t = np.concatenate([np.arange(n, dtype=float) + s * (n + 3600.0) for s in range(sessions)])
    cur = -20.0 + 5 * np.sin(t / 30.0)
    soc = 0.8 + np.cumsum(cur) / 3600.0 / 50.0
    v = 3.5 + 0.6 * soc[:, None] + 0.002 * rng.standard_normal((len(t), n_cells))
    d = RecordedDrive("small", "nmc", 50.0, t, cur, v, 25.0 + rng.random((len(t), 2)), np.repeat(soc[:, None], n_cells, 1),
                      meta={"vehicle_id": f"VIN{seed:014d}", "t0_unix": 1767225600.0 + 3600.0 * seed})
    d.session = np.repeat(np.arange(sessions), n).astype(np.int32)
    return d


@pytest.fixture(scope="module")
def uploaded(tmp_path_factory):
    """Two small vehicles, uploaded once for the module (EKF only: no model loading)."""
    store = open_store(str(tmp_path_factory.mktemp("fleet")))
    drives = [_drive(seed=1), _drive(n_cells=3, sessions=1, seed=2)]
    results = [run_vehicle(d, store, EdgeConfig(key=KEY, model_dir=None, detectors=False, max_duration_s=600.0))
               for d in drives]
    return store, drives, results


@pytest.mark.drive
def test_timeline_equals_the_drive_samples(uploaded) -> None:
    """Every measured value comes back (float32 as on the wire); sessions come back from the gaps."""
    store, drives, results = uploaded
    for d, res in zip(drives, results):
        rows = [r for k in res.segments for r in ingest_segment(store, k)]
        assert all(not r["error"] for r in rows) and sum(r["rows"] for r in rows) == len(d.t)
        tl = read_timeline(store, res.pseudonym)
        r = resample_drive(d, 1.0)
        np.testing.assert_allclose(tl.t, r.t + d.meta["t0_unix"], atol=1e-6)
        np.testing.assert_allclose(tl.current, r.current, rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(tl.cell_v, r.cell_v, rtol=1e-6)
        np.testing.assert_allclose(tl.cell_t, r.cell_t, rtol=1e-6)
        np.testing.assert_array_equal(tl.session, r.session_ids() - r.session_ids()[0])
        assert np.isfinite(tl.soc_est).mean() > 0.95 and np.isfinite(tl.sigma[5:]).all()
        parts = list(store.list(f"{TIMELINES}/vehicle={res.pseudonym}/"))
        assert parts and all("/day=2026-01-01/" in p for p in parts)
        assert pq.read_table(io.BytesIO(store.get(parts[0]))).num_rows > 0


@pytest.mark.drive
def test_ingest_twice_is_idempotent(uploaded) -> None:
    """Re-ingesting the same segments writes the same parts; the timeline has each stamp once."""
    store, drives, results = uploaded
    res = results[0]
    for k in res.segments:
        ingest_segment(store, k)
    before = sorted(store.list(f"{TIMELINES}/vehicle={res.pseudonym}/"))
    for k in res.segments:
        ingest_segment(store, k)
    assert sorted(store.list(f"{TIMELINES}/vehicle={res.pseudonym}/")) == before
    assert len(read_timeline(store, res.pseudonym).t) == len(drives[0].t)


@pytest.mark.drive
@pytest.mark.parametrize("damage", ["truncate", "flip", "empty", "garbage"])
def test_damaged_segment_is_a_counted_rejection(uploaded, tmp_path: Path, damage: str) -> None:
    """Truncated, bit-flipped, empty or foreign files: SegmentError with a reason, a manifest row with error."""
    store, _drives, results = uploaded
    data = bytearray(store.get(results[0].segments[0]))
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[len(data) // 2] ^= 0xFF
    elif damage == "empty":
        data = bytearray()
    else:
        data = bytearray(b"not an mcap file at all" * 10)
    bad = open_store(str(tmp_path))
    bad.put("segments/p-x/2026-01-01/bad.mcap", bytes(data))
    with pytest.raises(SegmentError):
        read_segment(bytes(data))
    rows = ingest_segment(bad, "segments/p-x/2026-01-01/bad.mcap")
    assert len(rows) == 1 and rows[0]["error"]
    assert list_segments(bad) == ["segments/p-x/2026-01-01/bad.mcap"]
    assert not list(bad.list(TIMELINES))


def test_sessions_from_gaps() -> None:
    """A gap longer than the threshold starts a new session."""
    t = np.array([0.0, 1, 2, 100, 101, 5000])
    np.testing.assert_array_equal(sessions_from_gaps(t, 10.0), [0, 0, 0, 1, 1, 2])


def test_a_segment_across_midnight_goes_to_two_day_partitions(tmp_path: Path) -> None:
    """A real Recorder's segment may span midnight: its rows split into the two days' partitions."""
    from bms_ai.core.cdr import BATTERY_STATE, encode_battery_states
    from bms_ai.uplink.segment import Message, SegmentWriter

    t = 1767225600.0 + 86400.0 - 30.0 + np.arange(60.0)
    msgs = encode_battery_states(t, np.full((60, 2), 3.7), np.full((60, 1), 25.0), current=np.zeros(60))
    w = SegmentWriter(tmp_path / "s.mcap", metadata={"vehicle": "p-mid", "chemistry": "nmc",
                                                     "design_capacity_ah": "50"})
    for m, ti in zip(msgs, t):
        w.write(Message("/bms/pack/measurements", BATTERY_STATE, m, int(ti * 1e9)))
    w.close()
    store = open_store(str(tmp_path / "store"))
    store.put("segments/p-mid/2026-01-01/s.mcap", (tmp_path / "s.mcap").read_bytes())
    rows = ingest_segment(store, "segments/p-mid/2026-01-01/s.mcap")
    assert [(r["day"], r["rows"]) for r in rows] == [("2026-01-01", 30), ("2026-01-02", 30)]
    tl = read_timeline(store, "p-mid")
    np.testing.assert_allclose(tl.t, t)
    assert tl.days == ["2026-01-01", "2026-01-02"] and np.isnan(tl.soc_est).all()
