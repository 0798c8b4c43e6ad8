"""Shipped vehicle pack configs (config/vehicles) on real third-party DBCs and logs from shared/realdata."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from testutil import realdata_dir

from bms_ai.can.decoder import PackDecoder
from bms_ai.can.packconfig import load_pack_config
from bms_ai.cli import main

ROOT = Path(__file__).resolve().parents[1]
VEHICLES = ROOT / "config" / "vehicles"
REALDATA = realdata_dir() or ROOT / "no-realdata"   # tests skip with the reason when the folder is absent
KONA, MODEL3 = REALDATA / "kona", REALDATA / "model3"
needs_kona = pytest.mark.skipif(not (KONA / "pcan.dbc").is_file(), reason=f"real Kona data not found in {KONA}")


def _decode(tmp_path: Path, log: Path, config: str, dbc: Path, *extra: str) -> list[dict[str, float]]:
    out = tmp_path / f"{log.stem}.csv"
    code = main(["decode", str(log), "--pack-config", str(VEHICLES / config), "--dbc", str(dbc), "-o", str(out),
                 *extra])
    assert code == 0
    with out.open() as f:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def test_every_shipped_vehicle_config_loads():
    """Each config parses; the DBC path is the user's (none is shipped)."""
    for path in sorted(VEHICLES.glob("*.yaml")):
        cfg = load_pack_config(path)
        assert not cfg.dbc_path.exists(), f"{path.name}: third-party DBCs are not shipped"
    assert {p.stem for p in VEHICLES.glob("*.yaml")} == {"kona", "kona_pcan", "leaf", "model3"}


@needs_kona
def test_kona_pcan_decodes_the_real_precharge_log_through_the_cli(tmp_path):
    """precharge.asc (a 2021 Kona pack on a bench): VBatt 360.8 -> 363.4 V, displayed SOC 50.5 -> 58.5 %;
    a pack-level config writes no cell column."""
    rows = _decode(tmp_path, KONA / "precharge.asc", "kona_pcan.yaml", KONA / "pcan.dbc")
    v = [r["pack_voltage"] for r in rows]
    soc = [r["vehicle_bms.soc"] for r in rows]
    assert v[0] == pytest.approx(360.8) and max(v) == pytest.approx(363.4)
    assert soc[0] == 50.5 and max(soc) == 58.5
    assert not [k for k in rows[0] if k.startswith("cell_v_")]
    assert min(r["aux_12v"] for r in rows) == pytest.approx(8.3)


@needs_kona
def test_kona_pcan_decodes_the_real_savvycan_log_through_the_cli(tmp_path):
    """power-off-on-ready-off (2019 Kona, GVRET CSV, bus 0 = P-CAN): 354.8-355.1 V, 0-3.4 A, SOC 36.5 %,
    pack temperatures 22/23 degC."""
    rows = _decode(tmp_path, KONA / "power-off-on-ready-off.gvret.csv", "kona_pcan.yaml", KONA / "pcan.dbc",
                   "--bus", "0")
    v = np.array([r["pack_voltage"] for r in rows])
    i = np.array([r["pack_current"] for r in rows])
    v, i = v[np.isfinite(v)], i[np.isfinite(i)]
    assert v.size and v.min() >= 354.8 - 1e-6 and v.max() <= 355.1 + 1e-6
    assert i.size and i.min() >= -3.4 - 1e-6 and i.max() <= 1e-6  # discharging (the car's consumers), our sign
    assert {r["vehicle_bms.soc"] for r in rows if np.isfinite(r["vehicle_bms.soc"])} == {36.5}
    temps = {(r["cell_t_00"], r["cell_t_01"]) for r in rows if np.isfinite(r["cell_t_00"])}
    assert temps == {(22.0, 23.0)}


@needs_kona
def test_kona_with_uds_cells_validates_and_is_not_pack_level():
    """kona.yaml: the P-CAN broadcast plus 98 polled cells and 4 polled sensors (docs/uds.md)."""
    cfg = load_pack_config(VEHICLES / "kona.yaml", dbc=KONA / "pcan.dbc")
    PackDecoder(cfg)
    assert not cfg.pack_level and cfg.cell_channels == 98 and cfg.n_temps == 4
    assert cfg.vehicle_bms["soh"] == "soh" and {r.did for r in cfg.poll.requests} == set(range(0x0101, 0x0106))
    pack_level = load_pack_config(VEHICLES / "kona_pcan.yaml", dbc=KONA / "pcan.dbc")
    assert pack_level.pack_level and pack_level.n_cells == 98 and pack_level.design_capacity_ah == 180.0


@pytest.mark.drive   # ~1 s: outside the fast library tier
@pytest.mark.skipif(not (MODEL3 / "Model3CAN.dbc").is_file(), reason=f"real Model 3 DBC not found in {MODEL3}")
def test_model3_config_validates_against_its_dbc():
    """0x132 pack V/I, 0x292 SOC, 0x332 brick extremes and temperatures (multiplexed) all exist in the DBC."""
    cfg = load_pack_config(VEHICLES / "model3.yaml", dbc=MODEL3 / "Model3CAN.dbc")
    dec = PackDecoder(cfg)
    assert cfg.pack_level and cfg.n_cells == 96 and cfg.design_capacity_ah == 230.0
    assert {r.frame_id for r in dec.routes.values()} == {0x132, 0x292, 0x332}


LEAF_DBC = """VERSION ""
NS_ :
BS_:
BU_: LBC
BO_ 475 LBC_1DB: 8 LBC
 SG_ LB_Current : 7|11@0- (0.5,0) [-400|400] "A" Vector__XXX
 SG_ LB_Total_Voltage : 23|10@0+ (0.5,0) [0|450] "V" Vector__XXX
BO_ 1371 LBC_55B: 8 LBC
 SG_ LB_SOC : 7|10@0+ (0.1,0) [0|100] "%" Vector__XXX
"""


def test_leaf_config_validates_against_the_documented_layout(tmp_path):
    """The two EV-CAN messages docs/vehicles.md describes (0x1DB, 0x55B) carry what leaf.yaml maps;
    a 0x1DB frame of 360 V and 20 A discharge decodes to those values in our sign."""
    dbc = tmp_path / "leaf-evcan.dbc"
    dbc.write_text(LEAF_DBC)
    cfg = load_pack_config(VEHICLES / "leaf.yaml", dbc=dbc)
    dec = PackDecoder(cfg)
    assert not cfg.pack_level and cfg.vehicle_bms["soc"] == "vehicle_bms.soc"
    from bms_ai.can.assembler import PackAssembler

    asm = PackAssembler(dec)
    cur, volt = 40, 720  # 20 A at 0.5 A/bit (discharge), 360 V at 0.5 V/bit
    data = bytes([cur >> 3, (cur & 7) << 5, volt >> 2, (volt & 3) << 6, 0, 0, 0, 0])
    assert asm.feed(0x1DB, data, 1.0)
    assert asm.sample.pack_voltage == 360.0 and asm.sample.pack_current == -20.0


# ----------------------------------------------------------------------------- the running graph on a real log

@pytest.mark.ros
@needs_kona
def test_graph_with_the_pack_level_kona_config_on_the_real_log():
    """can_bridge, estimator and fault_monitor with the parameters `bms-ai run --pack-config kona_pcan.yaml`
    gives them, on the real precharge log: battery_state comes out on the average cell, every node says
    pack-level, and the cell checks say 'not monitored' (STALE), never OK."""
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.parameter import Parameter
    from sensor_msgs.msg import BatteryState
    from testutil import RosHarness, diag_levels, diag_values

    from bms_ai.graph import pack_overrides
    from bms_ai.nodes.can_bridge import CanBridgeNode
    from bms_ai.nodes.estimator import EstimatorNode
    from bms_ai.nodes.fault_monitor import FaultMonitorNode

    params = pack_overrides(VEHICLES / "kona_pcan.yaml")
    params["can_bridge"].update(dbc=str(KONA / "pcan.dbc"), can_log=str(KONA / "precharge.asc"), replay_speed=2.0,
                                wait_for_subscribers=2, stale_after=5.0)
    params["estimator"]["use_models"] = False  # the classical estimator: the pack-level path is under test
    ros = RosHarness()
    try:
        states = ros.collect(BatteryState, "/bms/battery_state")
        meas = ros.collect(BatteryState, "/bms/pack/measurements")
        diags = ros.collect(DiagnosticArray, "/diagnostics")
        for cls, name in ((EstimatorNode, "estimator"), (FaultMonitorNode, "fault_monitor"),
                          (CanBridgeNode, "can_bridge")):
            overrides = [Parameter(k, value=v) for k, v in params[name].items()]
            ros.add(cls(context=ros.context, namespace="/bms", parameter_overrides=overrides))
        assert ros.wait_for(lambda: len(states) >= 20, timeout=20), (len(meas), len(states))
        m = next(x for x in reversed(meas) if np.isfinite(x.voltage))
        assert m.location == "pack-level (average cell)" and len(m.cell_voltage) == 1
        assert m.cell_voltage[0] == pytest.approx(m.voltage / 98, rel=1e-6)
        s = states[-1]
        assert 0.0 <= s.percentage <= 1.0 and s.design_capacity == pytest.approx(180.0)
        for check in ("open wire", "cell voltage spread", "cell overvoltage", "pack voltage plausibility"):
            name = f"fault_monitor: {check}"
            assert ros.wait_for(lambda name=name: bool(diag_levels(diags, name)), timeout=5), name
            assert set(diag_levels(diags, name)) == {3}, (name, diag_levels(diags, name))
        st = next(st for a in reversed(diags) for st in a.status if st.name == "fault_monitor: open wire")
        assert st.message == "not monitored: no cell voltages in this pack config"
        assert ros.wait_for(lambda: diag_values(diags, "estimator: soc").get("cell_data")
                            == "pack-level (average cell)", timeout=5)
        assert diag_values(diags, "can_bridge: can_bus")["cell_data"] == "pack-level (average cell)"
        ok = ros.wait_for(lambda: diag_values(diags, "can_bridge: vehicle_bms").get("soc") == "50.5", timeout=5)
        assert ok, diag_values(diags, "can_bridge: vehicle_bms")
        def diff() -> float:  # the car's displayed 50.5 % (where the log ends) minus ours, in points
            return float(diag_values(diags, "can_bridge: vehicle_bms").get("soc_difference_points", "nan"))

        assert ros.wait_for(lambda: np.isfinite(diff()), timeout=5)
        assert diff() == pytest.approx(50.5 - 100.0 * states[-1].percentage, abs=5.0)
        assert diag_levels(diags, "fault_monitor: charge overcurrent")[-1] == 0  # pack-level checks still run
    finally:
        ros.close()
