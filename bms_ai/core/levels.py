"""Diagnostic levels as plain ints, the numbers of diagnostic_msgs/DiagnosticStatus (REP-107).

Plain ints (not an enum) so they format the same on every Python and compare
with the message constants after ``level[0]``; the library uses them without ROS.
"""

from __future__ import annotations

OK, WARN, ERROR, STALE = 0, 1, 2, 3
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR", STALE: "STALE"}


def level_name(level: int) -> str:
    """'OK', 'WARN', 'ERROR', 'STALE' (or the number for anything else)."""
    return LEVEL_NAMES.get(int(level), str(level))
