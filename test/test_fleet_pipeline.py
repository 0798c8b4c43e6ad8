"""Fleet pipeline on Ray Data: uploaded segments -> timelines -> labels vs truth, SOH, the weak cell ranked first."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np
import pyarrow.parquet as pq
import pytest

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.fleet.edge import EdgeConfig, run_vehicle
from bms_ai.fleet.pipeline import (
    RANKING,
    SOH,
    TASKS_PER_WORKER,
    balanced_order,
    n_tasks,
    pack_resistance,
    rank_anomalies,
    robust_z,
    run_ingest,
    run_label,
    run_vehicles,
    start_ray,
)
from bms_ai.fleet.store import open_store
from bms_ai.sim.dataset import RecordedDrive

KEY = "fleet-test-key"
WEAK = (0, 2, 42.0)      # vehicle 0, cell 2 has 42 Ah where the others have ~50


def fleet_drive(k: int, n_cells: int = 4, sessions: int = 4, drive_s: int = 300, seed: int = 0) -> RecordedDrive:
    """Sessions of 5 s at rest then a 1.6 C discharge, parked an hour between: each session start is an anchor.

    Voltages are the chemistry's OCV of each cell's true SOC plus an IR drop and 1 mV noise, so the
    labeller's anchors are right and its labels can be checked against the truth.
    """
    rng = np.random.default_rng(seed + k)
    ocv = load_ocv("nmc")
    cap = 50.0 * (1 + 0.01 * rng.standard_normal(n_cells))
    if k == WEAK[0]:
        cap[WEAK[1]] = WEAK[2]
    n = drive_s + 5
    t = np.concatenate([np.arange(n, dtype=float) + s * (n + 3600.0) for s in range(sessions)])
    cur = np.tile(np.r_[np.zeros(5), np.full(drive_s, -80.0)], sessions)
    soc = 0.95 + np.cumsum(cur)[:, None] / 3600.0 / cap[None, :]
    v = ocv(soc) + 0.0015 * cur[:, None] + 0.001 * rng.standard_normal(soc.shape)
    d = RecordedDrive(f"veh{k}", "nmc", 50.0, t, cur, v, 25.0 + 0.1 * rng.random((len(t), 2)), soc,
                      meta={"vehicle_id": f"WVWZZZ1JZXW{k:06d}", "t0_unix": 1767225600.0 + 7200.0 * k},
                      cell_capacity_ah=cap)
    d.session = np.repeat(np.arange(sessions), n).astype(np.int32)
    return d


@dataclass
class _Uploaded:
    pseudonym: str
    segments: list[str]


@pytest.fixture(scope="module")
def ray_session():
    """One local Ray (127.0.0.1, 2 CPUs, quiet) for the whole module."""
    ray = pytest.importorskip("ray")
    start_ray(num_cpus=2, quiet=True)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, ray_session):
    """Three vehicles uploaded (estimator EKF only, no monitor: quick), one damaged segment, then the pipeline."""
    store = open_store(str(tmp_path_factory.mktemp("fleet")))
    drives = [fleet_drive(k) for k in range(3)]
    cfg = EdgeConfig(key=KEY, model_dir=None, monitor=False)
    rows = run_vehicles(drives, store, cfg, workers=2)                  # the edge of a fleet, on the same Ray
    results = [run_vehicle(d, store, cfg) for d in drives[:1]] + [None] * 2
    assert [r["pseudonym"] for r in rows][:1] == [results[0].pseudonym]  # a worker and the driver agree
    results[1:] = [_Uploaded(r["pseudonym"], sorted(store.list(f"segments/{r['pseudonym']}/"))) for r in rows[1:]]
    good = store.get(results[1].segments[0])
    store.put(f"segments/{results[1].pseudonym}/2026-01-01/damaged.mcap", good[: len(good) // 3])
    ingest = run_ingest(store, workers=2, batch_size=1)
    label = run_label(store, workers=2)
    return store, drives, results, ingest, label


@pytest.mark.drive
def test_ingest_counts_the_damaged_segment(fleet) -> None:
    """Every good segment ingested, the damaged one rejected with its reason; the run goes on."""
    _store, drives, results, ingest, _label = fleet
    assert ingest["segments"] == sum(len(r.segments) for r in results) + 1
    assert ingest["rejected"] == 1 and "damaged.mcap" in ingest["errors"][0]
    assert ingest["rows"] == sum(len(d.t) for d in drives)


@pytest.mark.drive
def test_labels_through_the_pipeline_track_the_truth(fleet) -> None:
    """Labels written per vehicle and day agree with the simulator's SOC; capacities with the true ones."""
    store, drives, results, _ingest, label = fleet
    assert label["vehicles"] == 3 and not label["label_errors"]
    for res in results:
        keys = list(store.list(f"labels/vehicle={res.pseudonym}/"))
        tab = pq.read_table(io.BytesIO(store.get(keys[0])))
        lab = np.stack(tab.column("label_soc").to_numpy(zero_copy_only=False))
        sig = np.stack(tab.column("label_sigma").to_numpy(zero_copy_only=False))
        truth = np.load(io.BytesIO(store.get(next(iter(store.list(f"truth/{res.pseudonym}/"))))))
        idx = np.searchsorted(truth["t_unix"], tab.column("t").to_numpy())
        err = np.abs(lab - truth["soc"][idx])
        assert np.sqrt(np.mean(err ** 2)) < 0.02
        assert np.mean(err <= 3 * sig + 0.005) > 0.95                 # sigma is honest
    soh = pq.read_table(io.BytesIO(store.get(SOH))).to_pandas()
    assert len(soh) == sum(d.n_cells for d in drives)
    true_cap = np.concatenate([d.cell_capacity_ah for d in drives])
    by_veh = {r.pseudonym: k for k, r in enumerate(results)}
    order = np.argsort([by_veh[v] * 100 + c for v, c in zip(soh.vehicle, soh.cell)])
    assert np.all(np.abs(soh.capacity_ah.to_numpy()[order] - true_cap) <= 3 * soh.capacity_sigma_ah.to_numpy()[order])
    weak = soh[(soh.vehicle == results[WEAK[0]].pseudonym) & (soh.cell == WEAK[1])]
    others = np.median(np.delete(drives[WEAK[0]].cell_capacity_ah, WEAK[1]))
    assert float(weak.capacity_rel.iloc[0]) == pytest.approx(WEAK[2] / others - 1, abs=0.02)   # against its pack


@pytest.mark.drive
def test_the_weak_cell_ranks_first(fleet) -> None:
    """The one cell with 16 % less capacity than its pack leads the fleet-relative ranking."""
    store, _drives, results, _ingest, _label = fleet
    ranking = json.loads(store.get(RANKING))
    top = ranking["cells"][0]
    assert (top["vehicle"], top["cell"]) == (results[WEAK[0]].pseudonym, WEAK[1])
    assert top["reason"] == "capacity below its peers" and top["score"] > 3 * ranking["cells"][1]["score"]


@pytest.mark.drive
def test_cli_ingest_and_label_on_the_running_ray(fleet, capsys) -> None:
    """`bms-ai fleet ingest|label --store DIR` print their figures as JSON (re-running is idempotent)."""
    from bms_ai.cli import main

    store = fleet[0]
    path = store.url.removeprefix("file://")
    assert main(["fleet", "ingest", "--store", path, "--quiet", "--workers", "2"]) == 0
    assert json.loads(capsys.readouterr().out)["rejected"] == 1
    assert main(["fleet", "label", "--store", path, "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["vehicles"] == 3


def test_robust_z_and_ranking_without_ray() -> None:
    """Known answer: one low-capacity cell and one leaking cell among identical peers."""
    assert robust_z(np.array([1.0, 1.0, 1.0, 2.0]), 0.1)[-1] == pytest.approx(10.0)
    vehicles = [{"vehicle": f"p-{k}", "chemistry": "nmc",
                 "capacity_rel": [0.0, 0.004, -0.003, -0.2 if k == 1 else 0.001],
                 "leak_per_h": [0.0, 0.01 if k == 2 else 1e-5, -1e-5, 0.0],
                 "resistance_rel": [0.01, -0.02, 0.6 if k == 3 else 0.03, 0.0]}
                for k in range(4)]
    r = rank_anomalies(vehicles)
    assert {(c["vehicle"], c["cell"], c["reason"]) for c in r[:3]} == {
        ("p-1", 3, "capacity below its peers"), ("p-2", 1, "self-discharge (leak)"),
        ("p-3", 2, "resistance above its peers")}
    assert r[3]["score"] < 3
    del vehicles[0]["resistance_rel"]       # a vehicle without the figure (older labels) still ranks
    assert rank_anomalies(vehicles)[0]["score"] > 6


@pytest.mark.drive   # seconds: a simulated 4-day life
def test_pack_resistance_finds_a_loose_connector_among_its_peers() -> None:
    """A cell with an injected +2.9 mOhm contact resistance stands out of its pack by > 6 peer sigmas; healthy
    cells spread by a few percent of the pack's own resistance."""
    from bms_ai.fleet.simulator import FleetConfig, simulate_vehicle
    from bms_ai.sim.dataset import resample_drive

    fc = FleetConfig(vehicles=1, days=4, seed=1, n_cells=24, mix={"NMC_Chen2020": 1.0}, fault_rate=1.0)
    d = resample_drive(simulate_vehicle(fc.validate(), 0), 0.1)
    bad = next(f["cell"] for f in d.meta["faults"] if f["kind"] == "contact_resistance")
    res = pack_resistance(d.t, d.current, d.cell_v, d.session, d.capacity_ah)
    z = robust_z(res, 0.02)
    assert int(np.argmax(z)) == bad and z[bad] > 6
    assert np.max(np.abs(np.delete(z, bad))) < 3
    assert np.isnan(pack_resistance(d.t[:10], d.current[:10], d.cell_v[:10], d.session[:10], d.capacity_ah)).all()


def test_a_stage_runs_in_a_few_tasks_per_worker() -> None:
    """A Ray Data task costs ~0.1 s of wall time: a stage is a few tasks per worker, never one per item."""
    assert n_tasks(2520, 1) == TASKS_PER_WORKER
    assert n_tasks(2520, 2) == 2 * TASKS_PER_WORKER
    assert n_tasks(3, 2) == 3       # never more tasks than items
    assert n_tasks(0, 2) == 1


def test_balanced_order_evens_the_blocks_ray_data_cuts():
    """Vehicles several-fold apart in samples: the contiguous blocks (counts as Ray Data splits them) carry
    near-equal work, where name order put the heavy ones together."""
    rng = np.random.default_rng(3)
    sizes = rng.integers(1000, 4000, 64).tolist()  # awake hours of a week differ up to ~4x between vehicles
    sizes.sort(reverse=True)                     # worst case for cutting in order
    order = balanced_order(sizes, 8)
    assert sorted(order) == list(range(64))
    cut = [list(c) for c in np.array_split(np.array(order), 8)]
    load = [sum(sizes[i] for i in c) for c in cut]
    naive = [sum(c) for c in np.array_split(np.array(sizes), 8)]
    assert max(load) / min(load) < 1.1 < max(naive) / min(naive)
    assert balanced_order([5, 1], 8) in ([0, 1], [1, 0]) and balanced_order([], 4) == []


@pytest.mark.drive   # starts a real Ray (~7 s): not the fast tier
def test_start_ray_turns_the_reservation_off_also_on_a_running_ray(ray_session):
    """Our one-map stages lose a worker's first second to Ray Data's per-operator reservation (BENCHMARKS.md);
    start_ray configures this driver's Ray Data whether it starts Ray or finds it running."""
    ctx = ray_session.data.DataContext.get_current()
    ctx.op_resource_reservation_enabled = True
    assert start_ray(num_cpus=2, quiet=True) is False
    assert ctx.op_resource_reservation_enabled is False and ctx.enable_progress_bars is False
