"""PackSample: the one record flowing from CAN to the models."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class PackSample:
    """A snapshot of every pack quantity, as last received.

    Values are NaN where nothing valid has been received yet (or the sender
    flagged the measurement invalid). Every value carries the CAN time of the
    frame it came from, so consumers can judge staleness themselves.
    Current is positive when charging (ROS BatteryState convention).
    """

    stamp: float
    pack_voltage: float
    pack_current: float
    cell_voltages: np.ndarray
    cell_temperatures: np.ndarray
    pack_voltage_stamp: float = float("nan")
    pack_current_stamp: float = float("nan")
    cell_voltage_stamps: np.ndarray = field(default_factory=lambda: np.empty(0))
    cell_temperature_stamps: np.ndarray = field(default_factory=lambda: np.empty(0))
    status: dict[str, float] = field(default_factory=dict)

    @classmethod
    def empty(cls, n_cells: int, n_temps: int) -> PackSample:
        """A sample with nothing received yet: every value and stamp NaN."""
        nan = float("nan")
        return cls(
            stamp=nan,
            pack_voltage=nan,
            pack_current=nan,
            cell_voltages=np.full(n_cells, np.nan),
            cell_temperatures=np.full(n_temps, np.nan),
            cell_voltage_stamps=np.full(n_cells, np.nan),
            cell_temperature_stamps=np.full(n_temps, np.nan),
        )

    @property
    def n_cells(self) -> int:
        """Number of series cells (length of the cell-voltage vector)."""
        return int(self.cell_voltages.shape[0])

    @property
    def complete(self) -> bool:
        """True when every pack quantity has a valid value."""
        return bool(
            np.isfinite(self.pack_voltage)
            and np.isfinite(self.pack_current)
            and np.isfinite(self.cell_voltages).all()
            and np.isfinite(self.cell_temperatures).all()
        )

    def oldest_stamp(self) -> float:
        """CAN time of the oldest value in the sample (NaN if any is missing)."""
        stamps = np.concatenate(
            ([self.pack_voltage_stamp, self.pack_current_stamp],
             self.cell_voltage_stamps, self.cell_temperature_stamps)
        )
        return float(np.min(stamps)) if np.isfinite(stamps).all() else float("nan")

    def copy(self) -> PackSample:
        """A deep copy, so a published sample never changes under its reader."""
        return PackSample(
            stamp=self.stamp,
            pack_voltage=self.pack_voltage,
            pack_current=self.pack_current,
            cell_voltages=self.cell_voltages.copy(),
            cell_temperatures=self.cell_temperatures.copy(),
            pack_voltage_stamp=self.pack_voltage_stamp,
            pack_current_stamp=self.pack_current_stamp,
            cell_voltage_stamps=self.cell_voltage_stamps.copy(),
            cell_temperature_stamps=self.cell_temperature_stamps.copy(),
            status=dict(self.status),
        )
