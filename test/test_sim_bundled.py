"""Bundled drives under data/drives replay through the lead's decoder and match their truth."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pyarrow")

import can  # noqa: E402

from bms_ai.can.assembler import PackAssembler  # noqa: E402
from bms_ai.can.decoder import PackDecoder  # noqa: E402
from bms_ai.can.packconfig import load_pack_config  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DRIVES = ROOT / "data" / "drives"
BUNDLED = ("nmc_udds", "lfp_udds", "nmc_isc")


@pytest.mark.drive
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_drive_replays_with_zero_rejections(name):
    import pyarrow.parquet as pq

    d = DRIVES / name
    meta = json.loads((d / "meta.json").read_text())
    assert (d / "can.blf").stat().st_size + (d / "truth.parquet").stat().st_size < 4.5e6
    cfg = load_pack_config(ROOT / "config" / meta["pack_config"])
    assert cfg.chemistry == meta["chemistry"] and cfg.design_capacity_ah == pytest.approx(meta["design_capacity_ah"])
    tbl = pq.read_table(d / "truth.parquet")
    t = tbl["t"].to_numpy()
    v = np.stack([tbl[f"v_c{i:02d}"].to_numpy() for i in range(96)], axis=1)
    cur = tbl["current_a"].to_numpy()
    asm = PackAssembler(PackDecoder(cfg))
    t0 = meta["can_time_origin"]
    ev, ei, n = [], [], 0
    for m in can.BLFReader(str(d / "can.blf")):
        asm.feed(m.arbitration_id, m.data, m.timestamp)
        n += 1
        if n % 997 == 0:
            s = asm.sample
            k = min(int(round((m.timestamp - t0) / 0.1)), len(t) - 1)
            if np.isfinite(s.cell_voltages).all():
                ev.append(np.abs(s.cell_voltages - v[k]).max())
                ei.append(abs(s.pack_current - cur[k]))
    assert n == meta["frames"] and asm.counters.accepted == n
    assert asm.counters.total_rejected == 0
    assert all(st.crc_errors == 0 for st in asm.stats.values())
    assert len(ev) > 100
    # sensor noise (0.8 mV) + channel offset (0.5 mV) + quantisation + up to 50 ms of dynamics
    assert np.median(ev) < 0.006 and max(ev) < 0.03
    assert np.median(ei) < 1.5
    if meta["faults"]:
        f = meta["faults"][0]
        lab = tbl[f"fault_{f['kind']}"].to_numpy()
        assert not lab[t < f["onset_s"]].any() and lab[t >= f["onset_s"]].all()


@pytest.mark.slow
@pytest.mark.parametrize("name", BUNDLED)
def test_bundled_drive_regenerates_identically(tmp_path, name):
    pytest.importorskip("pybamm")
    os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")
    from bms_ai.sim import BUNDLED as SC
    from bms_ai.sim import simulate_drive, write_drive

    meta = json.loads((DRIVES / name / "meta.json").read_text())
    out = write_drive(simulate_drive(SC[name], seed=meta["seed"]), tmp_path / name)
    for f in ("can.blf", "truth.parquet"):
        assert (out / f).read_bytes() == (DRIVES / name / f).read_bytes(), f
