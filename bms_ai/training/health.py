"""SOH/RUL model training: not in this version (SOH and RUL are classical, see docs/estimation.md)."""

from __future__ import annotations


def train_health(task: str, chemistry: str, data, out, seed: int = 0, epochs: int = 30) -> dict:
    raise ValueError(f"`bms-ai train {task}` is not implemented yet: SOH (capacity from partial charges, R0 from "
                     "current steps) and RUL (fade-law fit with 90 % interval) run as classical estimators in "
                     "bms_ai.estimation.health; a learned model needs aging trajectories from the sim (issue 4 notes)")
