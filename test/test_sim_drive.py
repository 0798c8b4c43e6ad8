"""Simulated drives: truth consistency, determinism, CAN round trip through the DBC."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import can  # noqa: E402

from bms_ai.can.assembler import PackAssembler  # noqa: E402
from bms_ai.can.decoder import PackDecoder  # noqa: E402
from bms_ai.can.packconfig import load_pack_config  # noqa: E402
from bms_ai.sim import Phase, Scenario, read_meta, read_truth, simulate_drive, truth_arrays, write_drive  # noqa: E402
from bms_ai.sim.canlog import CAN_T0, build_frames, drive_encoder  # noqa: E402
from bms_ai.sim.scenario import Sensors  # noqa: E402

pytestmark = pytest.mark.pybamm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHORT = Scenario("t_short", "nmc", [Phase("drive", "udds", repeats=0.05), Phase("rest", duration_s=10),
                                    Phase("charge", c_rate=1.0, soc_target=0.95, duration_s=20)], soc0=0.6)
IDEAL = Sensors(cell_v_noise=0, cell_v_offset=0, current_noise=0, current_offset=0, current_gain=0, pack_v_noise=0,
                temp_noise=0, temp_offset=0, temp_lag_s=0, jitter_s=0, drop_prob=0)


@pytest.fixture(scope="module")
def drive():
    return simulate_drive(SHORT, seed=3)


@pytest.fixture(scope="module")
def ideal_dir(tmp_path_factory):
    d = simulate_drive(replace(SHORT, name="t_ideal", sensors=IDEAL), seed=4)
    return write_drive(d, tmp_path_factory.mktemp("ideal"))


def _cells(tbl, prefix: str) -> np.ndarray:
    return np.stack([tbl[f"{prefix}_c{i:02d}"].to_numpy() for i in range(96)], axis=1).astype(float)


def test_truth_soc_matches_coulomb_counting(tmp_path, drive):
    out = write_drive(drive, tmp_path / "d")
    tbl = read_truth(out)
    t, i = tbl["t"].to_numpy(), tbl["current_a"].to_numpy()
    soc, cap = _cells(tbl, "soc"), _cells(tbl, "cap_ah")
    assert np.ptp(i) > 20.0, "drive should have real current"
    # the profile current is held per 0.1 s step by the per-cell integrator
    ah = np.concatenate([[0.0], np.cumsum(i[:-1] * np.diff(t))]) / 3600.0
    cc = soc[0][None, :] + ah[:, None] / cap[0][None, :]
    # leak currents (self-discharge ~mA) are the only difference over a minute
    assert np.abs(soc - cc).max() < 2e-4
    pack = tbl["soc"].to_numpy()
    assert abs((pack[-1] - pack[0]) - ah[-1] / cap[0].mean()) < 2e-4


def test_truth_columns_and_meta(tmp_path, drive):
    out = write_drive(drive, tmp_path / "d")
    tbl = read_truth(out)
    meta = read_meta(out)
    for c in ("t", "t_can", "current_a", "pack_voltage_v", "soc", "soh", "v_c00", "temp_c_c95", "r0_ohm_c10",
              "cap_ah_c50", "tsens_c_s31", "fault_any", "fault_cell", "mode"):
        assert c in tbl.column_names
    t = tbl["t"].to_numpy()
    assert np.allclose(np.diff(t), 0.1)
    assert meta["seed"] == 3 and meta["chemistry"] == "nmc" and meta["pack_config"] == "pack96.yaml"
    assert meta["design_capacity_ah"] == pytest.approx(50.0)
    assert Scenario.from_dict(meta["scenario"]).to_dict() == SHORT.to_dict()
    v = _cells(tbl, "v")
    assert np.allclose(v.sum(axis=1), tbl["pack_voltage_v"].to_numpy(), atol=1e-3)
    assert v.min() > 3.3 and v.max() < 4.25
    assert set(np.unique(tbl["mode"].to_numpy())) == {1, 3, 4}
    arr = truth_arrays(out)
    assert arr["cell_v"].shape == (len(t), 96) and arr["tsens_c"].shape == (len(t), 32)
    assert np.array_equal(arr["cell_soc"][:, 7], tbl["soc_c07"].to_numpy())
    assert "soc" in arr and "fault_cell" in arr and "soc_c07" not in arr and "tsens_c_s01" not in arr


def test_same_seed_identical_files(tmp_path):
    a = write_drive(simulate_drive(SHORT, seed=11), tmp_path / "a", formats=("blf", "asc"))
    b = write_drive(simulate_drive(SHORT, seed=11), tmp_path / "b", formats=("blf", "asc"))
    c = write_drive(simulate_drive(SHORT, seed=12), tmp_path / "c")
    for name in ("can.blf", "can.asc", "truth.parquet", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "can.blf").read_bytes() != (c / "can.blf").read_bytes()
    assert (a / "truth.parquet").read_bytes() != (c / "truth.parquet").read_bytes()


def test_vectorised_packing_equals_cantools(drive):
    db = drive_encoder(drive).db
    fr = build_frames(drive, db)
    rng = np.random.default_rng(0)
    for arb in np.unique(fr.arb_id):
        msg = db.get_message_by_frame_id(int(arb))
        idx = np.nonzero(fr.arb_id == arb)[0]
        for k in rng.choice(idx, size=min(50, len(idx)), replace=False):
            data = fr.data[k, : msg.length].tobytes()
            decoded = msg.decode(data, decode_choices=False, scaling=True)
            assert msg.encode(decoded, scaling=True, strict=False) == data


def test_blf_decodes_to_truth_within_quantisation(ideal_dir):
    tbl = read_truth(ideal_dir)
    t = tbl["t"].to_numpy()
    v = _cells(tbl, "v")
    i_true = tbl["current_a"].to_numpy()
    ts_true = np.stack([tbl[f"tsens_c_s{s:02d}"].to_numpy() for s in range(32)], axis=1).astype(float)
    asm = PackAssembler(PackDecoder(load_pack_config(os.path.join(ROOT, "config", "pack96.yaml"))))
    n = 0
    ev, ei, et = [], [], []
    for m in can.BLFReader(str(ideal_dir / "can.blf")):
        assert asm.feed(m.arbitration_id, m.data, m.timestamp), f"rejected {m}"
        n += 1
        tr = m.timestamp - CAN_T0
        k = np.clip((tr - t[0]) / 0.1, 0, len(t) - 1.000001)
        j, f = int(k), k - int(k)

        def at(arr, j=j, f=f):
            return arr[j] * (1 - f) + arr[min(j + 1, len(t) - 1)] * f
        s = asm.sample
        if m.arbitration_id == 0x130:
            mux = m.data[0]
            cells = slice(mux * 4, mux * 4 + 4)
            ev.append(np.abs(s.cell_voltages[cells] - at(v)[cells]).max())
        elif m.arbitration_id == 0x120:
            ei.append(abs(s.pack_current - at(i_true)))
        elif m.arbitration_id == 0x131:
            mux = m.data[0]
            sl = slice(mux * 4, mux * 4 + 4)
            et.append(np.abs(s.cell_temperatures[sl] - at(ts_true)[sl]).max())
    assert n == read_meta(ideal_dir)["frames"]
    assert asm.counters.total_rejected == 0
    assert all(st.crc_errors == 0 and st.counter_errors == 0 for st in asm.stats.values())
    assert max(ev) <= 0.0005 + 1e-6      # 1 mV LSB
    assert max(ei) <= 0.05 + 1e-6        # 0.1 A LSB
    assert max(et) <= 0.05 + 1e-6        # 0.1 K LSB
    rates = asm.rates()
    assert rates["BMS_PackMeas"] == pytest.approx(100.0, rel=0.02)
    assert rates["BMS_CellVoltages"] == pytest.approx(1200.0, rel=0.02)
    assert rates["BMS_CellTemps"] == pytest.approx(80.0, rel=0.05)
    assert rates["BMS_Status"] == pytest.approx(10.0, rel=0.05)


def test_fast_blf_path_equals_python_can_messages(tmp_path, drive):
    from bms_ai.sim.canlog import write_blf

    fr = build_frames(drive)
    write_blf(fr, tmp_path / "fast.blf", fast=True)
    write_blf(fr, tmp_path / "slow.blf", fast=False)
    assert (tmp_path / "fast.blf").read_bytes() == (tmp_path / "slow.blf").read_bytes()
    back = list(can.BLFReader(str(tmp_path / "fast.blf")))
    assert len(back) == len(fr)
    assert back[10].arbitration_id == fr.arb_id[10] and bytes(back[10].data) == fr.data[10].tobytes()
    assert back[10].timestamp == pytest.approx(CAN_T0 + fr.t[10], abs=1e-6)
