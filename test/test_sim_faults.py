"""Injected faults carry ground-truth onset labels and show up where they should."""

from __future__ import annotations

import math
import os
from dataclasses import replace

import can  # noqa: E402
import numpy as np
import pytest

from bms_ai.can.assembler import PackAssembler  # noqa: E402
from bms_ai.can.decoder import PackDecoder  # noqa: E402
from bms_ai.can.packconfig import load_pack_config  # noqa: E402
from bms_ai.sim import Fault, Phase, Scenario, read_meta, simulate_drive, write_drive  # noqa: E402
from bms_ai.sim.canlog import CAN_T0  # noqa: E402
from bms_ai.sim.scenario import Sensors  # noqa: E402

pytestmark = pytest.mark.pybamm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = Scenario("t_fault", "nmc", [Phase("drive", "udds", repeats=0.06)], soc0=0.7)


def test_internal_short_onset_and_effects():
    sc = replace(BASE, faults=[Fault("isc", onset_s=20.0, cell=17, magnitude=1.0)])
    d = simulate_drive(sc, seed=5)
    lab = d.labels["fault_isc"]
    assert not lab[d.t < 20.0].any() and lab[d.t >= 20.0].all()
    assert (d.fault_cell[d.t >= 20.0] == 17).all() and (d.fault_cell[d.t < 20.0] == -1).all()
    assert d.events[0]["kind"] == "isc" and d.events[0]["onset_s"] == 20.0
    # the shorted cell loses SOC and heats relative to its own start, unlike the rest
    dsoc = d.soc[-1] - d.soc[0]
    others = np.delete(dsoc, 17)
    assert dsoc[17] < others.min() - 1e-4
    dtemp = d.temp[-1] - d.temp[0]
    assert dtemp[17] > np.delete(dtemp, 17).max() + 0.2
    # no injected fault -> no labels
    clean = simulate_drive(BASE, seed=5)
    assert not clean.labels["fault_any"].any() and (clean.fault_cell == -1).all()


def test_thermal_and_self_discharge_faults():
    sc = replace(BASE, faults=[Fault("thermal", onset_s=10.0, cell=40, magnitude=10.0),
                               Fault("self_discharge", onset_s=0.0, cell=3, magnitude=5.0)])
    d = simulate_drive(sc, seed=6)
    assert d.labels["fault_thermal"][d.t >= 10].all() and not d.labels["fault_thermal"][d.t < 10].any()
    assert d.labels["fault_self_discharge"].all()
    dtemp = d.temp[-1] - d.temp[0]
    assert np.argmax(dtemp) == 40
    dsoc = d.soc[-1] - d.soc[0]
    assert np.argmin(dsoc) == 3


def test_sensor_and_can_faults_reach_the_decoder(tmp_path):
    sc = replace(BASE, sensors=Sensors(drop_prob=0.0), faults=[
        Fault("open_wire", onset_s=30.0, cell=60, target="cell_v"),
        Fault("sensor_stuck", onset_s=20.0, cell=5, target="cell_v"),
        Fault("can_timeout", onset_s=40.0, target="BMS_CellTemps", duration_s=5.0)])
    d = simulate_drive(sc, seed=7)
    out = write_drive(d, tmp_path / "d")
    meta = read_meta(out)
    assert [f["kind"] for f in meta["faults"]] == ["sensor_stuck", "open_wire", "can_timeout"]
    assert d.labels["fault_sensor"][d.t >= 20].all() and not d.labels["fault_sensor"][d.t < 20].any()
    assert d.labels["fault_can"][(d.t >= 40) & (d.t < 45)].all() and not d.labels["fault_can"][d.t >= 45.1].any()
    asm = PackAssembler(PackDecoder(load_pack_config(os.path.join(ROOT, "config", "pack96.yaml"))))
    stuck_vals, v60_after, temps_in_gap = [], [], 0
    for m in can.BLFReader(str(out / "can.blf")):
        assert asm.feed(m.arbitration_id, m.data, m.timestamp)
        tr = m.timestamp - CAN_T0
        if m.arbitration_id == 0x130 and tr > 21.0 and m.data[0] == 1:
            stuck_vals.append(asm.sample.cell_voltages[5])
        if m.arbitration_id == 0x130 and tr > 30.5 and m.data[0] == 15:
            v60_after.append(asm.sample.cell_voltages[60])
        if m.arbitration_id == 0x131 and 40.0 <= tr < 45.0:
            temps_in_gap += 1
    assert len(set(stuck_vals)) == 1 and len(stuck_vals) > 100
    assert v60_after and all(math.isnan(x) for x in v60_after)
    assert temps_in_gap == 0


def test_cold_fast_charge_plates_warm_charge_does_not():
    cold = Scenario("t_cold", "nmc", [Phase("charge", c_rate=1.5, soc_target=0.9, duration_s=240)],
                    ambient_c=-10.0, soc0=0.3)
    d = simulate_drive(cold, seed=8)
    assert d.labels["fault_plating"].any()
    onset = [e for e in d.events if e["kind"] == "plating"][0]["onset_s"]
    k0 = int(np.argmax(d.labels["fault_plating"]))
    assert d.t[k0] == pytest.approx(onset)
    assert d.labels["fault_plating"][k0:].all()
    assert (d.capacity[-1] < d.capacity[0]).any()
    warm = simulate_drive(replace(cold, ambient_c=25.0, segments=[Phase("charge", c_rate=0.3, soc_target=0.9,
                                                                           duration_s=240)]), seed=8)
    assert not warm.labels["fault_plating"].any()
    assert np.array_equal(warm.capacity[-1], warm.capacity[0])


def test_bad_fault_is_a_clear_error():
    with pytest.raises(ValueError, match="cell 200"):
        simulate_drive(replace(BASE, faults=[Fault("isc", onset_s=1.0, cell=200, magnitude=1.0)]), seed=1)
    with pytest.raises(ValueError, match="unknown fault kind"):
        replace(BASE, faults=[Fault("meltdown", onset_s=1.0)]).validate()
