"""What the estimator tells other nodes through /diagnostics: the key names and their parsing, in one place.

The estimator writes these key-values into its ``soc`` status; the fault
monitor reads them back. Both go through this module, so a renamed key
cannot silently break the other side.
"""

from __future__ import annotations

from collections.abc import Iterable

SOC_CHECK = "soc"                   # the estimator's DiagnosticStatus check name
MODEL_FALLBACK = "model_fallback"   # "True" while any cell runs on a classical fallback
_TRUE = {"true", "1", "yes", "on"}


def model_fallback(values: Iterable[tuple[str, str]]) -> bool | None:
    """The fallback flag from (key, value) pairs of the estimator's soc status; None if absent."""
    for key, value in values:
        if key == MODEL_FALLBACK:
            return value.strip().lower() in _TRUE
    return None
