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

#: fastest watchdog tick (s): a faster timer would only burn CPU for a few milliseconds of STALE accuracy
MIN_WATCHDOG_PERIOD = 0.005


def watchdog_period(rate_hz: float, stale_after: float) -> float:
    """Tick of the steady-clock watchdog: every sample instant of a silent bus, STALE within a tenth of ``stale_after``.

    ``1 / rate_hz`` lets silence samples go out at the sample rate (none is
    ever late by more than one tick); ``stale_after / 10`` reports STALE
    within ``1.1 * stale_after`` of the last frame (plus executor latency).
    """
    return max(min(1.0 / rate_hz, stale_after / 10.0), MIN_WATCHDOG_PERIOD)


def watchdog_delay(silence: float, stale_after: float, tick: float) -> float:
    """Seconds to the watchdog's next tick: one ``tick`` on a silent bus, else until silence could reach ``stale_after``.

    While frames flow the watchdog has nothing to do; ticking at 20 Hz anyway
    was a fifth of the graph's timed wake-ups (BENCHMARKS.md). Sleeping until
    ``stale_after - silence`` plus one tick keeps the STALE report within
    ``stale_after + tick`` of the last frame, the bound of a steady tick.
    """
    if not silence < stale_after:  # silent, or no frame yet (inf)
        return tick
    return stale_after - silence + tick


def can_time_now(last_rx_can: float, silence: float, speed: float = 1.0) -> float:
    """CAN time now, extrapolated from the last frame: a silent bus's clock keeps running at ``speed``."""
    return last_rx_can + silence * speed


def silence_sample_time(last_rx_can: float, silence: float, speed: float, stale_after: float,
                        replaying: bool) -> float | None:
    """CAN time up to which a silent bus's sample instants are due, or None while none is.

    Once the bus has been silent for ``stale_after``, publishing goes on at
    the nominal rate, on the sampler's grid of instants
    (:meth:`~bms_ai.can.sampler.FixedRateSampler.close_until`), with values
    ageing out to NaN, so consumers see the loss instead of the last values
    frozen. Silence runs in real time: after a replay at ``speed`` x has
    ended, CAN time goes on at 1x, so the samples follow at ``rate_hz`` of
    wall time like a live bus's, not ``speed`` times as many (a flood the
    readers could not take). A replay that is paused (its readers catching
    up, or a gap in the log: the next frame closes those instants) is not a
    silent bus, and neither is a source without a CAN clock (maximum-speed
    replay, ``speed`` inf).
    """
    if not (silence > stale_after and math.isfinite(silence) and math.isfinite(speed)) or replaying:
        return None
    return can_time_now(last_rx_can, silence)


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
    frames were rejected since the last periodic report, else OK. Frames of
    ids the pack config does not use are *foreign* (``frames_foreign``, the
    busiest in ``unknown_ids``): a shared vehicle bus carries them, so they
    are counted, never a rejection and never WARN.
    ``can_messages``: STALE on silence, WARN while a message is past its
    timeout, else OK.
    """

    def __init__(self, stale_after: float) -> None:
        self.stale_after = stale_after
        self._last_rejected = 0

    def assess(self, sampler: FixedRateSampler, *, source: str, silence: float, samples_published: int,
               source_errors: int, last_error: str, reader_failed: str = "",
               closes_period: bool = True, uncounted: bool = False) -> tuple[BusStatus, BusStatus]:
        """Both checks now; ``silence``: steady-clock seconds since the last frame (inf: none yet).

        Advances the per-message timeout counters (a message going late is
        counted once). ``closes_period``: the periodic report closes the window
        in which rejected frames make the bus WARN; an interim assessment
        between reports (silence starting or ending, a timeout clearing) leaves
        it open, so assessing more often never shortens a WARN for rejections.
        ``uncounted``: frames are due that the sampler has not counted yet (a
        paced replay within a chunk); message timeouts are then judged at the
        last counted frame, not that frame plus the silence since a later one.
        """
        asm = sampler.asm
        c = asm.counters
        # frames of ids the pack config does not use: another ECU on a shared bus, not damage
        foreign = c.rejected.get("unknown_id", 0)
        rejected = c.total_rejected - foreign
        new_rej = rejected - self._last_rejected
        if closes_period:
            self._last_rejected = rejected
        now_can = asm.last_ts
        if math.isfinite(now_can):
            since = silence if math.isfinite(silence) and not uncounted else 0.0
            timeouts = asm.check_timeouts(can_time_now(now_can, since))
        else:
            timeouts = [r.name for r in asm.decoder.routes.values()]
        rates = asm.rates()
        unknown = sorted(asm.unknown_ids.items(), key=lambda kv: -kv[1])[:5]
        values = {
            "source": source,
            "frames_accepted": c.accepted,
            "frames_rejected": rejected,
            **{f"rejected_{k}": v for k, v in c.rejected.items() if k != "unknown_id"},
            "frames_foreign": foreign,
            "frames_poll": c.poll,
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


class PollHealth:
    """The bridge's ``uds_poll`` check: answers to the pack config's diagnostic requests.

    STALE before the first answer (nothing polled yet, or a replayed log
    without poll traffic), WARN when requests timed out or answers were
    rejected since the last periodic report (the reason is the last error),
    else OK. Counts stay in the values, so one timeout does not hold WARN forever.
    """

    def __init__(self) -> None:
        self._last_bad = 0

    def assess(self, stats: Any, closes_period: bool = True) -> BusStatus:
        """The check now from a :class:`~bms_ai.can.uds.PollStats`."""
        bad = sum(stats.timeouts.values()) + sum(stats.rejected.values())
        new_bad = bad - self._last_bad
        if closes_period:
            self._last_bad = bad
        answers = sum(stats.answers.values())
        values = {"requests_sent": sum(stats.sent.values()), "answers": answers,
                  "timeouts": sum(stats.timeouts.values()), "rejected": sum(stats.rejected.values()),
                  "pending": stats.pending, "ignored": stats.ignored, "last_error": stats.last_error,
                  **{f"answers.{k}": v for k, v in stats.answers.items()},
                  **{f"timeouts.{k}": v for k, v in stats.timeouts.items()},
                  **{f"rejected.{k}": v for k, v in stats.rejected.items()}}
        if new_bad:
            return BusStatus("uds_poll", WARN, f"{new_bad} poll failures in the last period: {stats.last_error}",
                             values)
        if not answers:
            return BusStatus("uds_poll", STALE, "no poll answer yet", values)
        return BusStatus("uds_poll", OK, f"{answers} answers", values)


def vehicle_bms_status(keys: dict[str, str], status: dict[str, float], our_soc: float = math.nan) -> BusStatus:
    """The ``vehicle_bms`` check: what the car's own BMS says (displayed SOC, SOH, power limits, contactors).

    ``keys``: the pack config's name -> sample status key; ``status``: the
    last published sample's status; ``our_soc``: the estimator's SOC (0..1).
    ``soc_difference_points`` is the car's SOC minus ours in percentage
    points (the agreement of the two estimates). STALE until the car gave a
    value, else OK: the car's values are information, not a verdict.
    """
    values: dict[str, Any] = {name: status.get(key, math.nan) for name, key in keys.items()}
    car_soc = values.get("soc", math.nan)
    diff = car_soc - 100.0 * our_soc if math.isfinite(car_soc) and math.isfinite(our_soc) else math.nan
    if "soc" in keys:
        values["soc_difference_points"] = diff
    known = [n for n, x in values.items() if isinstance(x, float) and math.isfinite(x)]
    if not known:
        return BusStatus("vehicle_bms", STALE, "no value from the vehicle's BMS yet", values)
    msg = ", ".join(f"{n} {values[n]:.4g}" for n in keys if n in known)
    if math.isfinite(diff):
        msg += f"; ours {100.0 * our_soc:.1f} % ({diff:+.1f} points)"
    return BusStatus("vehicle_bms", OK, msg, values)
