"""Limits config (YAML) for the rule engine, validated with errors that name the entry.

The three tiers follow foxBMS 2: MOL (maximum operating limit) < RSL
(recommended safety limit) < MSL (maximum safety limit), ordered outwards
from the normal operating range. A config where the tiers are not ordered
is rejected: a swapped MSL/MOL would silently disable the hard limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bms_ai.chemistry.registry import find_chemistry
from bms_ai.core.paths import share_path
from bms_ai.core.yamlfile import load_yaml

TIERS = ("mol", "rsl", "msl")


class LimitsConfigError(ValueError):
    """A limits config is invalid; the message names the entry and the fix."""


@dataclass(frozen=True)
class TierLimits:
    """Thresholds per tier; ``upper`` True means a violation is value > threshold."""

    mol: float
    rsl: float
    msl: float
    upper: bool

    def as_tuple(self) -> tuple[float, float, float]:
        """(MOL, RSL, MSL), the order the debouncer's tiers use."""
        return (self.mol, self.rsl, self.msl)


@dataclass(frozen=True)
class Debounce:
    """Per-tier set counts (ticks) and the common clear count and hysteresis."""

    set_counts: tuple[int, int, int]
    clear_count: int
    hysteresis: float


@dataclass(frozen=True)
class TemperatureLimits:
    """Temperature tiers per current direction (cells tolerate less heat and cold while charging)."""

    charge_over: TierLimits
    charge_under: TierLimits
    discharge_over: TierLimits
    discharge_under: TierLimits
    charge_current_a: float
    debounce: Debounce
    charge_mode_s: float = 0.0


@dataclass(frozen=True)
class Plausibility:
    """Sensor plausibility thresholds; defaults apply to keys the YAML leaves out."""

    pack_voltage_tolerance_v: float = 3.0
    cell_voltage_spread_v: float = 0.3
    # on an OCV knee a small SOC imbalance is a large voltage spread (LFP's top: 2 SOC points = 240 mV); a
    # cell beyond the voltage spread is flagged only when its OCV-equivalent SOC is also this far off the
    # median's (0 = voltage alone). On the plateau any voltage spread is many SOC points and still flagged.
    cell_soc_spread: float = 0.05
    temperature_spread_c: float = 10.0
    open_wire_min_v: float = 0.5
    open_wire_pair_v: float = 0.15
    stuck_window_s: float = 30.0
    stuck_epsilon_v: float = 1e-4
    stuck_reference_move_v: float = 0.02
    stuck_temperature_window_s: float = 600.0
    stuck_epsilon_c: float = 1e-3
    stuck_reference_move_c: float = 1.0
    stuck_pack_move_v: float = 2.0
    rest_current_a: float = 2.0
    rest_window_s: float = 120.0
    rest_voltage_drift_v: float = 0.002
    current_offset_a: float = 0.5
    stale_s: float = 1.0
    soc_jump: float = 0.05
    # SOC stamps further apart than this span a sleep: the current over it was not measured (the one at wake
    # times hours read as a 10-point jump) and the estimator's wake-up may move the SOC: no jump test across it
    soc_jump_max_gap_s: float = 60.0
    debounce: int = 5
    clear_count: int = 10


@dataclass(frozen=True)
class Derating:
    """Current-limit recommendation (SOF trapezoid) inputs."""

    max_charge_a: float
    max_discharge_a: float
    charge_temperature_full: tuple[float, float]
    discharge_temperature_full: tuple[float, float]
    voltage_headroom_v: float


@dataclass(frozen=True)
class LimitsConfig:
    """A validated limits file: everything the rule engine reads, immutable."""

    chemistry: str
    tick_hz: float
    cell_over: TierLimits
    cell_under: TierLimits
    cell_voltage_debounce: Debounce
    temperature: TemperatureLimits
    current_charge: TierLimits
    current_discharge: TierLimits
    current_debounce: Debounce
    plausibility: Plausibility
    derating: Derating
    latch_until_reset: frozenset[str] = field(default_factory=lambda: frozenset({"msl"}))
    source: str = ""
    reference_capacity_ah: float = math.nan  # the pack the current limits are for (see :func:`pack_limits`)

    @property
    def latch_mask(self) -> tuple[bool, bool, bool]:
        """Per tier (MOL, RSL, MSL): stays active until an explicit reset."""
        return tuple(t in self.latch_until_reset for t in TIERS)  # type: ignore[return-value]


def _num(v: Any, where: str, positive: bool = False, nonneg: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
        raise LimitsConfigError(f"{where}: expected a finite number, got {v!r}")
    v = float(v)
    if positive and v <= 0:
        raise LimitsConfigError(f"{where}: must be > 0, got {v}")
    if nonneg and v < 0:
        raise LimitsConfigError(f"{where}: must be >= 0, got {v}")
    return v


def _count(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise LimitsConfigError(f"{where}: expected an integer tick count >= 1, got {v!r}")
    return v


def _map(d: Any, where: str, required: tuple[str, ...] = ()) -> dict[str, Any]:
    if not isinstance(d, dict):
        raise LimitsConfigError(f"{where}: expected a mapping, got {type(d).__name__}")
    missing = [k for k in required if k not in d]
    if missing:
        raise LimitsConfigError(f"{where}: missing {', '.join(missing)}")
    return d


def _tiers(d: Any, where: str, upper: bool) -> TierLimits:
    d = _map(d, where, TIERS)
    unknown = set(d) - set(TIERS)
    if unknown:
        raise LimitsConfigError(f"{where}: unknown keys {sorted(unknown)} (expected mol, rsl, msl)")
    mol, rsl, msl = (_num(d[t], f"{where}.{t}") for t in TIERS)
    ordered = mol <= rsl <= msl if upper else mol >= rsl >= msl
    if not ordered:
        rel = "mol <= rsl <= msl" if upper else "mol >= rsl >= msl"
        kind = "an upper" if upper else "a lower"
        raise LimitsConfigError(f"{where}: tiers out of order ({mol}, {rsl}, {msl}); {kind} limit needs "
                                f"{rel} (MSL is the outermost)")
    return TierLimits(mol, rsl, msl, upper)


def _debounce(d: dict[str, Any], where: str) -> Debounce:
    deb = d.get("debounce", 1)
    if isinstance(deb, dict):
        deb = _map(deb, f"{where}.debounce", TIERS)
        counts = tuple(_count(deb[t], f"{where}.debounce.{t}") for t in TIERS)
    else:
        c = _count(deb, f"{where}.debounce")
        counts = (c, c, c)
    return Debounce(counts, _count(d.get("clear_count", 1), f"{where}.clear_count"),  # type: ignore[arg-type]
                    _num(d.get("hysteresis", 0.0), f"{where}.hysteresis", nonneg=True))


def _check_gap(low: TierLimits, high: TierLimits, where: str) -> None:
    if not low.mol < high.mol:
        raise LimitsConfigError(f"{where}: under.mol ({low.mol}) must be below over.mol ({high.mol})")


def _pair(v: Any, where: str) -> tuple[float, float]:
    if not isinstance(v, (list, tuple)) or len(v) != 2:
        raise LimitsConfigError(f"{where}: expected [low, high]")
    a, b = _num(v[0], f"{where}[0]"), _num(v[1], f"{where}[1]")
    if a > b:
        raise LimitsConfigError(f"{where}: low {a} > high {b}")
    return a, b


def parse_limits(d: Any, source: str = "<dict>") -> LimitsConfig:
    """Build a validated LimitsConfig from a parsed YAML mapping."""
    d = _map(d, source, ("cell_voltage", "cell_temperature", "pack_current"))
    known = {"chemistry", "tick_hz", "latch_until_reset", "cell_voltage", "cell_temperature", "pack_current",
             "plausibility", "derating", "reference_capacity_ah"}
    unknown = set(d) - known
    if unknown:
        raise LimitsConfigError(f"{source}: unknown keys {sorted(unknown)}; known: {sorted(known)}")
    chem = str(d.get("chemistry", "unknown"))
    tick_hz = _num(d.get("tick_hz", 10.0), f"{source}.tick_hz", positive=True)
    latch = d.get("latch_until_reset", ["msl"]) or []
    if not isinstance(latch, list) or any(t not in TIERS for t in latch):
        raise LimitsConfigError(f"{source}.latch_until_reset: expected a list of mol/rsl/msl, got {latch!r}")

    cv = _map(d["cell_voltage"], "cell_voltage", ("over", "under"))
    cell_over = _tiers(cv["over"], "cell_voltage.over", upper=True)
    cell_under = _tiers(cv["under"], "cell_voltage.under", upper=False)
    _check_gap(cell_under, cell_over, "cell_voltage")

    ct = _map(d["cell_temperature"], "cell_temperature", ("charge", "discharge"))
    ch = _map(ct["charge"], "cell_temperature.charge", ("over", "under"))
    dis = _map(ct["discharge"], "cell_temperature.discharge", ("over", "under"))
    temp = TemperatureLimits(
        charge_over=_tiers(ch["over"], "cell_temperature.charge.over", True),
        charge_under=_tiers(ch["under"], "cell_temperature.charge.under", False),
        discharge_over=_tiers(dis["over"], "cell_temperature.discharge.over", True),
        discharge_under=_tiers(dis["under"], "cell_temperature.discharge.under", False),
        charge_current_a=_num(ct.get("charge_current_a", 1.0), "cell_temperature.charge_current_a", nonneg=True),
        debounce=_debounce(ct, "cell_temperature"),
        charge_mode_s=_num(ct.get("charge_mode_s", 0.0), "cell_temperature.charge_mode_s", nonneg=True),
    )
    _check_gap(temp.charge_under, temp.charge_over, "cell_temperature.charge")
    _check_gap(temp.discharge_under, temp.discharge_over, "cell_temperature.discharge")

    pc = _map(d["pack_current"], "pack_current", ("charge", "discharge"))
    cur_c = _tiers(pc["charge"], "pack_current.charge", True)
    cur_d = _tiers(pc["discharge"], "pack_current.discharge", True)
    for t, lim in (("charge", cur_c), ("discharge", cur_d)):
        if lim.mol <= 0:
            raise LimitsConfigError(f"pack_current.{t}: limits are magnitudes and must be > 0")

    pl = _map(d.get("plausibility", {}) or {}, "plausibility")
    fields = Plausibility.__dataclass_fields__
    bad = set(pl) - set(fields)
    if bad:
        raise LimitsConfigError(f"plausibility: unknown keys {sorted(bad)}; known: {sorted(fields)}")
    pvals: dict[str, Any] = {}
    for k, v in pl.items():
        pvals[k] = _count(v, f"plausibility.{k}") if k in ("debounce", "clear_count") else \
            _num(v, f"plausibility.{k}", nonneg=True)
    plaus = Plausibility(**pvals)

    dr = _map(d.get("derating", {}) or {}, "derating")
    derating = Derating(
        max_charge_a=_num(dr.get("max_charge_a", cur_c.mol), "derating.max_charge_a", positive=True),
        max_discharge_a=_num(dr.get("max_discharge_a", cur_d.mol), "derating.max_discharge_a", positive=True),
        charge_temperature_full=_pair(dr.get("charge_temperature_full",
                                             [temp.charge_under.mol, temp.charge_over.mol]),
                                      "derating.charge_temperature_full"),
        discharge_temperature_full=_pair(dr.get("discharge_temperature_full",
                                                [temp.discharge_under.mol, temp.discharge_over.mol]),
                                         "derating.discharge_temperature_full"),
        voltage_headroom_v=_num(dr.get("voltage_headroom_v", 0.1), "derating.voltage_headroom_v", positive=True),
    )
    lo, hi = derating.charge_temperature_full
    if lo < temp.charge_under.mol or hi > temp.charge_over.mol:
        raise LimitsConfigError("derating.charge_temperature_full: must lie inside the charge MOL range "
                                f"[{temp.charge_under.mol}, {temp.charge_over.mol}]")
    lo, hi = derating.discharge_temperature_full
    if lo < temp.discharge_under.mol or hi > temp.discharge_over.mol:
        raise LimitsConfigError("derating.discharge_temperature_full: must lie inside the discharge MOL range "
                                f"[{temp.discharge_under.mol}, {temp.discharge_over.mol}]")

    return LimitsConfig(
        chemistry=chem, tick_hz=tick_hz, cell_over=cell_over, cell_under=cell_under,
        cell_voltage_debounce=_debounce(cv, "cell_voltage"), temperature=temp,
        current_charge=cur_c, current_discharge=cur_d, current_debounce=_debounce(pc, "pack_current"),
        plausibility=plaus, derating=derating, latch_until_reset=frozenset(latch), source=source,
        reference_capacity_ah=_num(d.get("reference_capacity_ah", math.nan), "reference_capacity_ah", positive=True)
        if "reference_capacity_ah" in d else math.nan,
    )


def load_limits(path: str | Path) -> LimitsConfig:
    """Load and validate a limits YAML file (``config/limits_<chemistry>.yaml``)."""
    d = load_yaml(path, "limits config", LimitsConfigError)
    return parse_limits(d, source=str(path))


def default_limits_path(chemistry: str = "nmc") -> Path:
    """Shipped limits for a chemistry; a clear error names the ones that exist."""
    cdir = share_path("config")
    p = known.limits_path if (known := find_chemistry(chemistry)) else cdir / f"limits_{chemistry.lower()}.yaml"
    if not p.is_file():
        have = sorted(q.stem.removeprefix("limits_") for q in cdir.glob("limits_*.yaml"))
        raise LimitsConfigError(f"no limits config for chemistry {chemistry!r}; shipped: {have}")
    return p


#: limits in amperes that grow with the pack's capacity (the C-rate stays the chemistry's): (section, key) paths
CURRENT_LIMITS = (("pack_current", "charge"), ("pack_current", "discharge"), ("pack_current", "hysteresis"),
                  ("derating", "max_charge_a"), ("derating", "max_discharge_a"))


def _scaled(v: Any, factor: float) -> Any:
    if isinstance(v, dict):
        return {k: _scaled(x, factor) for k, x in v.items()}
    return v * factor if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def scale_to_capacity(d: dict[str, Any], capacity_ah: float) -> dict[str, Any]:
    """A limits mapping for a pack of ``capacity_ah``: its current limits scaled from ``reference_capacity_ah``.

    Cell voltages and temperatures are the chemistry's and stay; amperes are
    C-rates of the reference pack, so a 180 Ah pack gets 3.6 times the
    currents of the 50 Ah reference. Without a reference (or a capacity) the
    mapping is returned unchanged.
    """
    ref = d.get("reference_capacity_ah")
    ok = isinstance(ref, (int, float)) and not isinstance(ref, bool) and ref > 0
    if not ok or not (isinstance(capacity_ah, (int, float)) and math.isfinite(capacity_ah) and capacity_ah > 0):
        return d
    if capacity_ah == ref:  # the reference pack itself
        return d
    factor = capacity_ah / ref
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for section, key in CURRENT_LIMITS:
        if isinstance(out.get(section), dict) and key in out[section]:
            out[section][key] = _scaled(out[section][key], factor)
    out["reference_capacity_ah"] = float(capacity_ah)
    return out


def merge_limits(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``overrides`` (a pack config's ``limits:``) over ``base``, section by section, key by key."""
    out = dict(base)
    for k, v in overrides.items():
        out[k] = merge_limits(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def pack_limits(chemistry: str = "nmc", capacity_ah: float = math.nan, overrides: dict[str, Any] | None = None,
                limits_file: str | Path = "") -> LimitsConfig:
    """The limits of one pack: the chemistry's file (or ``limits_file``) scaled to its capacity, then its overrides.

    Nothing of the reference pack reaches another pack unless its file says
    so: currents follow the capacity, and any value may be overridden in the
    pack config's ``limits:`` section (same keys as the limits file).
    """
    path = Path(limits_file) if limits_file else default_limits_path(chemistry)
    d = load_yaml(path, "limits config", LimitsConfigError)
    if not isinstance(d, dict):
        raise LimitsConfigError(f"{path}: expected a mapping")
    scaled = scale_to_capacity(d, capacity_ah)
    source = str(path)
    if scaled is not d:
        source += f" scaled to {capacity_ah:g} Ah"
    if overrides:
        scaled = merge_limits(scaled, overrides)
        source += " + pack config limits"
    return parse_limits(scaled, source=source)
