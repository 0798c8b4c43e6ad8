"""Diagnostic levels as plain ints, the numbers of diagnostic_msgs/DiagnosticStatus (REP-107), and status names.

Plain ints (not an enum) so they format the same on every Python and compare
with the message constants after ``level[0]``; the library uses them without ROS.
Status names follow diagnostic_updater: ``<node name>: <check>``, so two nodes
reporting a check of the same name stay apart.
"""

from __future__ import annotations

OK, WARN, ERROR, STALE = 0, 1, 2, 3
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR", STALE: "STALE"}


def level_name(level: int) -> str:
    """'OK', 'WARN', 'ERROR', 'STALE' (or the number for anything else)."""
    return LEVEL_NAMES.get(int(level), str(level))


def status_name(node: str, check: str) -> str:
    """The DiagnosticStatus name of ``check`` reported by ``node`` (diagnostic_updater's convention)."""
    return f"{node}: {check}"


def split_status_name(name: str) -> tuple[str, str]:
    """(node, check) of a status name; ("", name) for a name not in the ``<node>: <check>`` form."""
    node, sep, check = name.partition(": ")
    return (node, check) if sep and node and check else ("", name)
