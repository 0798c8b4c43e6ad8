"""Scenarios: *what happens* to the pack (driving, charging, faults, sensors).

Kept apart from the chemistry (what the cells are) and the simulator (how it
is computed), like PyBaMM's model / parameters / experiment split. A scenario
is plain data: it round-trips through JSON (meta.json) unchanged.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from bms_ai.chemistry.registry import get_chemistry
from bms_ai.core.files import load_json

PHASE_KINDS = ("drive", "rest", "park", "charge", "discharge")
FAULT_KINDS = ("isc", "self_discharge", "thermal", "sensor_stuck", "sensor_drift", "open_wire", "can_timeout")


@dataclass
class Phase:
    """One phase of a drive.

    drive: ``cycle`` (udds|hwfet|us06|wltc_3b) run ``repeats`` times (fractions allowed).
    rest: contactors closed, zero current, BMS awake, ``duration_s``.
    park: BMS asleep (no CAN frames), zero current, ``duration_s``.
    charge: CC at ``c_rate`` then CV taper at the cell voltage limit until
    ``soc_target``, C/20 cut-off or ``duration_s`` (0 = unlimited).
    discharge: constant current ``c_rate`` down to ``soc_target`` or ``duration_s``.
    """

    kind: str
    cycle: str = "udds"
    repeats: float = 1.0
    duration_s: float = 0.0
    c_rate: float = 0.5
    soc_target: float = 0.9


@dataclass
class Fault:
    """An injected fault with ground-truth onset.

    kinds and ``magnitude`` meaning:
      isc            internal short on ``cell``: R_ISC [ohm] (e.g. 5..500)
      self_discharge extra leak current on ``cell`` [A] (growing imbalance)
      thermal        extra heat in ``cell`` [W]
      sensor_stuck   ``target`` cell_v|cell_t|current, channel ``cell`` holds its value
      sensor_drift   ``target`` channel drifts by ``magnitude`` units per hour
      open_wire      cell-voltage (target cell_v) or temperature (cell_t) channel
                     ``cell`` reports invalid
      can_timeout    message named ``target`` is not sent for ``duration_s``
    """

    kind: str
    onset_s: float
    cell: int = -1
    magnitude: float = 0.0
    target: str = ""
    duration_s: float = math.inf

    def active(self, t):
        """Mask (or bool) of the times ``t`` at which the fault acts."""
        return (t >= self.onset_s) & (t < self.onset_s + self.duration_s)


@dataclass
class Variation:
    """Cell-to-cell spread (1 sigma, relative unless noted)."""

    capacity: float = 0.01
    resistance: float = 0.05
    soc: float = 0.005              # absolute SOC
    self_discharge_a: float = 0.002  # mean leak per cell group [A]; lognormal spread 50 %
    cooling: float = 0.08


@dataclass
class Sensors:
    """Measurement chain (values as sigma unless noted)."""

    cell_v_noise: float = 0.0008     # V
    cell_v_offset: float = 0.0005    # V, per channel, fixed
    current_noise: float = 0.15      # A
    current_offset: float = 0.2      # A, fixed
    current_gain: float = 0.003      # relative, fixed
    pack_v_noise: float = 0.05       # V
    temp_noise: float = 0.15         # K
    temp_offset: float = 0.3         # K, per sensor, fixed
    temp_lag_s: float = 15.0         # first-order sensor lag
    jitter_s: float = 0.0002         # CAN timestamp jitter (sigma)
    drop_prob: float = 2e-5          # dropped frame probability


@dataclass
class Vehicle:
    """Road-load model of the car that carries the pack."""

    mass_kg: float = 1500.0
    cda_m2: float = 0.60
    crr: float = 0.009
    drivetrain_eff: float = 0.90
    regen_eff: float = 0.65         # share of braking power returned to the pack
    aux_w: float = 400.0


@dataclass
class Scenario:
    """A whole drive: chemistry, phases in order, ambient, start state, faults and the measurement chain.

    ``segments`` holds the phases; the name is the JSON key of recorded
    drives' meta.json (and part of their scenario hash), so it stays.
    """

    name: str
    chemistry: str = "nmc"
    segments: list[Phase] = field(default_factory=lambda: [Phase("drive", "udds")])
    ambient_c: float = 25.0
    soc0: float = 0.8
    soh: float = 1.0
    faults: list[Fault] = field(default_factory=list)
    variation: Variation = field(default_factory=Variation)
    sensors: Sensors = field(default_factory=Sensors)
    vehicle: Vehicle = field(default_factory=Vehicle)

    def validate(self) -> Scenario:
        """Self, if every value is in range and every name known; else a ValueError naming the bad one."""
        get_chemistry(self.chemistry)
        if not -40.0 <= self.ambient_c <= 60.0:
            raise ValueError(f"ambient_c {self.ambient_c} outside -40..60")
        if not 0.5 <= self.soh <= 1.0:
            raise ValueError(f"soh {self.soh} outside 0.5..1")
        if not 0.0 <= self.soc0 <= 1.0:
            raise ValueError(f"soc0 {self.soc0} outside 0..1")
        if not self.segments:
            raise ValueError("scenario has no phases (segments)")
        for s in self.segments:
            if s.kind not in PHASE_KINDS:
                raise ValueError(f"unknown phase kind {s.kind!r}; choose from {PHASE_KINDS}")
        for f in self.faults:
            if f.kind not in FAULT_KINDS:
                raise ValueError(f"unknown fault kind {f.kind!r}; choose from {FAULT_KINDS}")
        return self

    def to_dict(self) -> dict:
        """Plain data for meta.json (JSON has no infinity: open-ended faults get duration None)."""
        d = asdict(self)
        for f in d["faults"]:
            if math.isinf(f["duration_s"]):
                f["duration_s"] = None  # JSON has no Infinity
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Scenario:
        """Inverse of to_dict, validated; unknown keys are an error (a typo must not pass silently)."""
        d = dict(d)
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown scenario keys: {sorted(unknown)}")
        d["segments"] = [Phase(**s) for s in d.get("segments", [])]
        faults = []
        for f in d.get("faults", []):
            f = dict(f)
            if f.get("duration_s") is None:
                f["duration_s"] = math.inf
            faults.append(Fault(**f))
        d["faults"] = faults
        d["variation"] = Variation(**d.get("variation", {}))
        d["sensors"] = Sensors(**d.get("sensors", {}))
        d["vehicle"] = Vehicle(**d.get("vehicle", {}))
        return cls(**d).validate()


def _udds(chem: str, **kw) -> Scenario:
    return Scenario(name=kw.pop("name", f"{chem}_udds"), chemistry=chem, **kw)


# Named scenarios (CLI --scenario NAME). Bundled drives are the *_short ones.
SCENARIOS: dict[str, Scenario] = {
    "nmc_udds": _udds("nmc"),
    "lfp_udds": _udds("lfp", soc0=0.7),
    "nmc_isc": _udds("nmc", name="nmc_isc", faults=[Fault("isc", onset_s=300.0, cell=17, magnitude=3.0)]),
    "nmc_us06_cold": Scenario("nmc_us06_cold", "nmc", [Phase("drive", "us06")], ambient_c=-10.0, soc0=0.9),
    "nmc_hwfet_aged": Scenario("nmc_hwfet_aged", "nmc", [Phase("drive", "hwfet")], soh=0.8),
    "nmc_fastcharge_cold": Scenario("nmc_fastcharge_cold", "nmc",
                                    [Phase("rest", duration_s=30), Phase("charge", c_rate=1.5, soc_target=0.8, duration_s=1200)],
                                    ambient_c=-10.0, soc0=0.2),
    "lfp_charge_drive": Scenario("lfp_charge_drive", "lfp",
                                 [Phase("charge", c_rate=0.5, soc_target=0.7, duration_s=1200), Phase("rest", duration_s=300),
                                  Phase("drive", "udds", repeats=0.5), Phase("rest", duration_s=300)], soc0=0.3),
    "nmc_thermal": _udds("nmc", name="nmc_thermal", faults=[Fault("thermal", onset_s=200.0, cell=40, magnitude=4.0)]),
    "nmc_sensor_faults": _udds("nmc", name="nmc_sensor_faults", faults=[
        Fault("sensor_stuck", onset_s=200.0, cell=5, target="cell_v"),
        Fault("open_wire", onset_s=400.0, cell=60, target="cell_v"),
        Fault("sensor_drift", onset_s=300.0, target="current", magnitude=20.0),
        Fault("can_timeout", onset_s=600.0, target="BMS_CellTemps", duration_s=5.0)]),
}

# Short versions bundled under data/drives (a few minutes each, small files).
BUNDLED: dict[str, Scenario] = {
    "nmc_udds": replace(SCENARIOS["nmc_udds"], segments=[Phase("drive", "udds", repeats=0.13)]),
    "lfp_udds": replace(SCENARIOS["lfp_udds"], segments=[Phase("drive", "udds", repeats=0.13)]),
    "nmc_isc": replace(SCENARIOS["nmc_isc"], segments=[Phase("drive", "udds", repeats=0.13)],
                       faults=[Fault("isc", onset_s=60.0, cell=17, magnitude=2.0)]),
}


def get_scenario(name_or_path: str) -> Scenario:
    """A named scenario, ``bundled:NAME``, or a JSON file (Scenario.to_dict layout)."""
    if name_or_path in SCENARIOS:
        return SCENARIOS[name_or_path]
    if name_or_path.startswith("bundled:") and name_or_path[8:] in BUNDLED:
        return BUNDLED[name_or_path[8:]]
    p = Path(name_or_path)
    if p.suffix == ".json":
        if not p.exists():
            raise FileNotFoundError(f"scenario file {p} not found")
        d = load_json(p, "scenario")
        if not isinstance(d, dict):
            raise ValueError(f"{p}: a scenario must be a JSON object, got {type(d).__name__}")
        try:
            return Scenario.from_dict(d)
        except (TypeError, AttributeError) as exc:  # a field of the wrong JSON type (a string for a number, ...)
            raise ValueError(f"{p}: a scenario field has the wrong type: {exc}") from None
    raise ValueError(f"unknown scenario {name_or_path!r}; names: {sorted(SCENARIOS)}, bundled:{sorted(BUNDLED)} or a .json file")
