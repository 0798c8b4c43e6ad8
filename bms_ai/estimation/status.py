"""What the estimator tells the rest of the vehicle: diagnostic keys, SOH verdicts, in one place.

The estimator writes these key-values into its ``soc`` status; the fault
monitor reads them back. Both go through this module, so a renamed key
cannot silently break the other side. The SOH thresholds here are the only
ones: the diagnostic level, the BatteryState health code and the end of life
the RUL counts to all come from them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bms_ai.core.levels import ERROR, OK, WARN

SOC_CHECK = "soc"                   # the estimator's DiagnosticStatus check names
SOH_CHECK = "soh"
RUL_CHECK = "rul"
MODEL_FALLBACK = "model_fallback"   # "True" while any cell runs on a classical fallback
_TRUE = {"true", "1", "yes", "on"}

# SOH = capacity / design capacity
SOH_EOL = 0.8       # end of life: the RUL counts cycles to here; below it the pack is no longer "good" (WARN)
SOH_ERROR = 0.7     # diagnostic ERROR below this
SOH_DEAD = 0.6      # BatteryState reports the pack dead below this

# sensor_msgs/BatteryState POWER_SUPPLY_HEALTH_* values, as plain ints (the library never imports ROS)
HEALTH_UNKNOWN, HEALTH_GOOD, HEALTH_DEAD, HEALTH_UNSPEC_FAILURE = 0, 1, 3, 5


def model_fallback(values: Iterable[tuple[str, str]]) -> bool | None:
    """The fallback flag from (key, value) pairs of the estimator's soc status; None if absent."""
    for key, value in values:
        if key == MODEL_FALLBACK:
            return value.strip().lower() in _TRUE
    return None


@dataclass(frozen=True)
class SohVerdict:
    """How one SOH value is reported: diagnostic level and BatteryState health code."""

    level: int      # bms_ai.core.levels
    health: int     # HEALTH_* (BatteryState.power_supply_health)


def soh_verdict(soh: float) -> SohVerdict:
    """Level OK / WARN / ERROR at SOH_EOL / SOH_ERROR; health GOOD, UNSPEC_FAILURE, DEAD (below SOH_DEAD)."""
    level = OK if soh >= SOH_EOL else WARN if soh >= SOH_ERROR else ERROR
    health = HEALTH_GOOD if soh >= SOH_EOL else HEALTH_DEAD if soh < SOH_DEAD else HEALTH_UNSPEC_FAILURE
    return SohVerdict(level, health)


@dataclass(frozen=True)
class CheckStatus:
    """One diagnostic check as the library decides it; a node only publishes it."""

    check: str
    level: int
    message: str
    values: dict[str, Any] = field(default_factory=dict)
