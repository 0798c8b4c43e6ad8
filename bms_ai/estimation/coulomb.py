"""Coulomb counting: the classical baseline and the process model of every SOC filter."""

from __future__ import annotations

import numpy as np


class CoulombCounter:
    """Batched Coulomb counter (one SOC per cell; series cells share the pack current).

    Current is positive when charging (BatteryState convention).
    """

    def __init__(self, capacity_ah: float | np.ndarray, soc0: float | np.ndarray, n: int = 1,
                 efficiency: float = 1.0) -> None:
        self.capacity_ah = np.broadcast_to(np.asarray(capacity_ah, dtype=np.float64), (n,)).copy()
        self.soc = np.broadcast_to(np.asarray(soc0, dtype=np.float64), (n,)).copy()
        self.efficiency = efficiency

    def step(self, current: float | np.ndarray, dt: float) -> np.ndarray:
        """Integrate ``current`` over ``dt``; SOC per cell, held when current or dt is unusable."""
        i = np.asarray(current, dtype=np.float64)
        if not np.all(np.isfinite(i)) or not np.isfinite(dt) or dt < 0:
            return self.soc  # hold: an unknown current must not move the SOC
        eta = np.where(i > 0, self.efficiency, 1.0)
        self.soc = np.clip(self.soc + eta * i * dt / (3600.0 * self.capacity_ah), 0.0, 1.0)
        return self.soc
