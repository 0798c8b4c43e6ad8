"""Bus health: what the bridge reports on /diagnostics, and what it publishes while the bus is silent.

Decisions only. The caller measures silence on a steady clock (wall time
since the last frame, so a paused simulated clock cannot hide a dead bus)
and publishes the results.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bms_ai.can.sampler import FixedRateSampler
from bms_ai.core.levels import ERROR, OK, STALE, WARN


def can_time_now(last_rx_can: float, silence: float, speed: float = 1.0) -> float:
    """CAN time now, extrapolated from the last frame: a silent bus's clock keeps running at ``speed``."""
    return last_rx_can + silence * speed


def silence_sample_time(last_rx_can: float, silence: float, speed: float, stale_after: float,
                        replaying: bool) -> float | None:
    """CAN time of the sample to publish while the bus is silent, or None when none is due.

    Publishing goes on at the nominal rate with values ageing out to NaN, so
    consumers see the loss instead of the last values frozen. A replay that
    is paused (its readers catching up) is not a silent bus, and neither is
    a source without a CAN clock (maximum-speed replay).
    """
    if not (silence > stale_after and math.isfinite(silence) and math.isfinite(speed)) or replaying:
        return None
    return can_time_now(last_rx_can, silence, speed)


@dataclass
class BusStatus:
    """One check's verdict (maps 1:1 to a DiagnosticStatus)."""

    check: str
    level: int
    message: str
    values: dict[str, Any] = field(default_factory=dict)


class BusHealth:
    """Levels and values of the bridge's two checks: ``can_bus`` (the source) and ``can_messages`` (per message).

    ``can_bus``: ERROR while the source fails or after the reader stopped on an
    unexpected error, STALE on silence, WARN when
    frames were rejected since the last assessment, else OK.
    ``can_messages``: STALE on silence, WARN while a message is past its
    timeout, else OK.
    """

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self._last_rejected = 0

    def assess(self, sampler: FixedRateSampler, *, source: str, silence: float, samples_published: int,
               source_errors: int, last_error: str, reader_failed: str = "") -> tuple[BusStatus, BusStatus]:
        """Both checks now; ``silence``: steady-clock seconds since the last frame (inf: none yet).

        Advances the per-message timeout counters, so call it once per report.
        """
        asm = sampler.asm
        c = asm.counters
        rejected = c.total_rejected
        new_rej = rejected - self._last_rejected
        self._last_rejected = rejected
        now_can = asm.last_ts
        if math.isfinite(now_can):
            timeouts = asm.check_timeouts(can_time_now(now_can, silence if math.isfinite(silence) else 0.0))
        else:
            timeouts = [r.name for r in asm.decoder.routes.values()]
        rates = asm.rates()
        unknown = sorted(asm.unknown_ids.items(), key=lambda kv: -kv[1])[:5]
        values = {
            "source": source,
            "frames_accepted": c.accepted,
            "frames_rejected": rejected,
            **{f"rejected_{k}": v for k, v in c.rejected.items()},
            "unknown_ids": ",".join(f"0x{i:X}:{n}" for i, n in unknown),
            "samples_published": samples_published,
            "samples_skipped_gaps": sampler.skipped,
            "source_errors": source_errors,
            "last_error": last_error,
            "last_frame_age_s": silence,
        }
        if reader_failed:
            level, msg = ERROR, f"CAN reader stopped: {reader_failed}"
        else:
            level, msg = self._bus_level(silence, new_rej, source_errors, last_error)
        values["level_reason"] = msg
        per_msg: dict[str, Any] = {}
        for name, st in asm.stats.items():
            per_msg[f"{name}.rate_hz"] = rates.get(name, 0.0)
            per_msg[f"{name}.timeouts"] = st.timeouts
            per_msg[f"{name}.counter_errors"] = st.counter_errors
            per_msg[f"{name}.crc_errors"] = st.crc_errors
        if silence > self.stale_after:
            messages = BusStatus("can_messages", STALE, "no traffic", per_msg)
        elif timeouts:
            messages = BusStatus("can_messages", WARN, "timeout: " + ", ".join(timeouts), per_msg)
        else:
            messages = BusStatus("can_messages", OK, "all messages within timeout", per_msg)
        return BusStatus("can_bus", level, msg, values), messages

    def _bus_level(self, silence: float, new_rejected: int, source_errors: int, last_error: str) -> tuple[int, str]:
        silent = silence > self.stale_after
        if (source_errors and not math.isfinite(silence)) or (last_error and silent):
            return ERROR, f"CAN source failing: {last_error}"
        if silent:
            return STALE, ("no CAN frame received yet" if not math.isfinite(silence)
                           else f"CAN bus silent for {silence:.1f} s")
        if new_rejected:
            return WARN, f"{new_rejected} frames rejected in the last period"
        return OK, "receiving"
