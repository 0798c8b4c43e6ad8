"""Diagnostics: foxBMS-style three-tier limits, plausibility, derating, incipient-fault detectors.

No rclpy here; bms_ai/nodes/fault_monitor.py adapts this to /diagnostics.
Diagnostic levels (OK, WARN, ERROR, STALE) live in bms_ai.core.levels.
"""

from bms_ai.diagnostics.config import LimitsConfig, LimitsConfigError, default_limits_path, load_limits, parse_limits
from bms_ai.diagnostics.rules import CheckResult, Event, RuleEngine

__all__ = ["LimitsConfig", "LimitsConfigError", "default_limits_path", "load_limits", "parse_limits",
           "RuleEngine", "CheckResult", "Event"]
