"""Data factory: physics-simulated packs and recorded drives with ground truth.

Training-side only (needs PyBaMM); never imported by the nodes.

    from bms_ai.sim import simulate_drive, write_drive
    drive = simulate_drive("nmc_udds", seed=1)
    write_drive(drive, "out/nmc_udds_1")     # can.blf, truth.parquet, meta.json
"""

from bms_ai.sim.dataset import read_meta
from bms_ai.sim.io import read_truth, truth_arrays, truth_columns, write_drive
from bms_ai.sim.scenario import BUNDLED, SCENARIOS, Fault, Phase, Scenario, get_scenario
from bms_ai.sim.simulator import SimulatedDrive, simulate_drive

__all__ = ["BUNDLED", "SCENARIOS", "Fault", "Phase", "Scenario", "SimulatedDrive", "get_scenario", "read_meta",
           "read_truth", "simulate_drive", "truth_arrays", "truth_columns", "write_drive"]
