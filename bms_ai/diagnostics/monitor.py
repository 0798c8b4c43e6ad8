"""The fault monitor without ROS: rules and detectors for one pack, fed sample by sample.

bms_ai/nodes/fault_monitor.py only converts messages and publishes what this
returns: one :class:`CheckResult` per check (``fault_monitor: <check>``), plus the
latched-event summary (``events``) and the monitor's own health
(``fault monitor``). Rules step with the measurement's stamp as time, so the
results are the same at any replay speed; :meth:`FaultMonitor.watchdog` steps
them on the last sample when measurements stop, so the CAN timeout fires even
when the bridge goes silent. Watchdog steps run on the samples' own time
base (the last stamp plus the silence measured on the monitor clock), so a
node clock that differs from CAN time can neither reorder nor reject the
samples that follow a bus gap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from operator import attrgetter
from pathlib import Path
from typing import Any

from bms_ai.can.assembler import PACK_LEVEL, PACK_LEVEL_KEY
from bms_ai.core.levels import ERROR, OK, STALE, WARN, split_status_name
from bms_ai.diagnostics.config import LimitsConfig, default_limits_path, pack_limits
from bms_ai.diagnostics.rules import (
    CELL_CHECKS,
    FEW_SENSORS,
    NO_CELLS,
    SENSOR_SPREAD_CHECKS,
    CheckResult,
    Event,
    RuleEngine,
)
from bms_ai.estimation import status
from bms_ai.pack import PackSample

MONITOR_CHECK = "fault monitor"
EVENTS_CHECK = "events"
_GENERATION = attrgetter("generation")
REJECT_HOLD_STEPS = 50      # the monitor status stays WARN for this many steps after a rejection (5 s at 10 Hz)


def limits_path(limits_file: str, chemistry: str) -> Path:
    """The limits file to load: the explicit one, else the shipped one for the chemistry."""
    return Path(limits_file) if limits_file else default_limits_path(chemistry)


def make_detectors(n_cells: int, n_temps: int, tick_hz: float, chemistry: str) -> tuple[Any, list[str]]:
    """Incipient-fault detectors (optional to the rules) and what was wrong with their files.

    A broken plating model disables only that check; broken calibrated
    thresholds fall back to the defaults. Neither stops the monitor.
    """
    from bms_ai.diagnostics.detectors import DetectorBank, DetectorParams, PlatingModel

    problems = []
    try:
        plating = PlatingModel.load()
    except (ValueError, OSError) as exc:  # bad model file: run without it, the plating check says so
        plating = None
        problems.append(f"plating model not used: {exc}")
    try:
        params = DetectorParams.load(chemistry=chemistry)
    except (ValueError, OSError) as exc:
        params = DetectorParams.defaults(chemistry)
        problems.append(f"default detector thresholds: {exc}")
    bank = DetectorBank(n_cells, n_temps, tick_hz=tick_hz, params=params, plating=plating or False, chemistry=chemistry)
    return bank, problems


def format_event(e: Event) -> str:
    """One latched event as the ``eventN`` value: check, tier, element, onset, set time and value."""
    where = f" #{e.index}" if e.index >= 0 else ""
    return f"{e.check} {e.tier.upper()}{where} onset={e.onset:.1f} set={e.set_time:.1f} value={e.value:.4g}"


def events_status(events: list[Event], total: int, max_events: int) -> CheckResult:
    """The ``events`` status: level of the worst active event, the first ``max_events`` listed."""
    level = max((e.level for e in events), default=OK)
    values: dict[str, Any] = {"active": len(events), "total": total}
    for k, e in enumerate(events[:max_events]):
        values[f"event{k}"] = format_event(e)
    message = "no active events" if not events else f"{len(events)} active: " + ", ".join(
        sorted({f"{e.check} ({e.tier.upper()})" for e in events}))
    return CheckResult(EVENTS_CHECK, level, message, values)


class FaultMonitor:
    """Everything fault_monitor decides; the node feeds it converted messages and publishes its results.

    Bad input (wrong shape, out-of-order stamps, a failing rule) is counted and
    reported in the ``fault monitor`` status, never raised.
    """

    def __init__(self, cfg: LimitsConfig, hardware_id: str, detectors: bool = True, stale_after: float = 1.0,
                 capacity_ah: float = 50.0, max_events: int = 8) -> None:
        self.cfg = cfg
        self.hardware_id = hardware_id
        self.use_detectors = bool(detectors)
        self.stale_after = float(stale_after)
        self.max_events = int(max_events)
        self.engine: RuleEngine | None = None
        self.detectors: Any = None
        self.sample: PackSample | None = None
        self.last_rx = math.nan     # monitor clock at the last accepted measurement
        self.last_stamp = math.nan  # time (sample time base) of the last accepted measurement
        self.last_t = math.nan      # time of the last rule step (sample or watchdog)
        self.rejected = 0
        self._reject_step = -REJECT_HOLD_STEPS  # self.steps at the last rejection
        self.reject_reason = ""
        self.steps = 0
        self.received = 0           # measurements handed to on_sample (accepted or rejected)
        self.step_time_max = 0.0
        self.step_time_sum = 0.0
        self.soc: float | None = None
        self.soc_stamp: float | None = None
        self.capacity = float(capacity_ah)
        self.model_fallback: bool | None = None
        self._own_checks: set[str] = set()
        self.detector_problems: list[str] = []
        self.pack_level = False  # the measurements carry the average cell only (known from the first sample)
        self._events_key = -1
        self._debouncers: tuple[Any, ...] = ()  # every rule's and detector's, for the events status key
        self._events_last = events_status([], 0, self.max_events)

    @classmethod
    def load(cls, limits_file: str, chemistry: str, hardware_id: str, limits_overrides: dict | None = None,
             **kwargs: Any) -> FaultMonitor:
        """A monitor on the given limits file, or the shipped one for ``chemistry``, scaled to ``capacity_ah``.

        ``limits_overrides``: the pack config's ``limits:`` section (see
        :func:`~bms_ai.diagnostics.config.pack_limits`).
        """
        cfg = pack_limits(chemistry, kwargs.get("capacity_ah", math.nan), limits_overrides, limits_file)
        return cls(cfg, hardware_id, **kwargs)

    # ---------------------------------------------------------------- inputs
    def reject(self, reason: str) -> None:
        """Count a measurement that cannot be used; the reason shows in the next ``fault monitor`` status."""
        self.rejected += 1
        self.reject_reason = reason
        self._reject_step = self.steps

    def startup_status(self) -> list[CheckResult]:
        """What to publish before the first measurement."""
        return self._own([CheckResult(MONITOR_CHECK, STALE, "waiting for pack/measurements",
                                      {"limits": self.cfg.source, "chemistry": self.cfg.chemistry})])

    def on_sample(self, s: PackSample, now: float) -> list[CheckResult]:
        """One measurement at monitor time ``now``: the statuses to publish ([] if it was rejected)."""
        self.received += 1
        if not self._accepts_shape(s):
            return []
        stamp = s.stamp if s.stamp > 0 else now
        if not math.isfinite(stamp):
            self.reject("no stamp and no monitor clock yet")
            return []
        if math.isfinite(self.last_stamp) and stamp <= self.last_stamp:
            self.reject("out-of-order stamp")
            return []
        self.sample, self.last_rx, self.last_stamp = s, now, stamp
        # a watchdog step may have run a little past this stamp (delivery latency): time never goes back
        return self._step(s, stamp if not stamp < self.last_t else self.last_t)

    def _accepts_shape(self, s: PackSample) -> bool:
        """The first sample sizes the rules; later ones must match it."""
        n_temps = s.cell_temperatures.size
        if self.engine is None:
            if s.n_cells == 0:
                self.reject("no cell voltages")
                return False
            self.engine = RuleEngine(self.cfg, s.n_cells, n_temps)
            if self.use_detectors:
                self.detectors, self.detector_problems = make_detectors(s.n_cells, n_temps, self.cfg.tick_hz,
                                                                        self.cfg.chemistry)
            self._unmonitored(bool(s.status.get(PACK_LEVEL_KEY)), n_temps)
            self._debouncers = tuple(r.deb for part in (self.engine, self.detectors) if part is not None
                                     for r in part.rules)
            return True
        if s.n_cells != self.engine.n_cells or n_temps != self.engine.n_temps:
            self.reject(f"shape {s.n_cells}/{n_temps} != {self.engine.n_cells}/{self.engine.n_temps}")
            return False
        return True

    def _unmonitored(self, pack_level: bool, n_temps: int) -> None:
        """Checks this pack's data cannot support say so (STALE, never a fake OK) for the whole run."""
        self.pack_level = pack_level
        for checks, reason, applies in ((CELL_CHECKS, NO_CELLS, pack_level),
                                        (SENSOR_SPREAD_CHECKS, FEW_SENSORS, n_temps < 2)):
            if applies:
                for part in (self.engine, self.detectors):
                    if part is not None:
                        part.not_monitored(checks, reason)

    def on_estimate(self, soc: float, stamp: float, capacity_ah: float) -> None:
        """The estimator's battery_state: SOC (with its stamp) for the jump check, capacity when known."""
        if math.isfinite(soc):
            self.soc = float(soc)
            self.soc_stamp = stamp or None
        if math.isfinite(capacity_ah) and capacity_ah > 0:
            self.capacity = float(capacity_ah)

    def on_peer_status(self, hardware_id: str, name: str, values: Iterable[tuple[str, str]]) -> None:
        """A /diagnostics status from another node of this pack: the estimator's model-fallback flag.

        Same pack = same hardware_id; the status is ``<node>: soc`` (the
        estimator's check, whatever the node is named) and not one of our own
        checks (our own statuses come back on /diagnostics).
        """
        node, check = split_status_name(name)
        if hardware_id != self.hardware_id or not node or check != status.SOC_CHECK or check in self._own_checks:
            return
        flag = status.model_fallback(values)
        if flag is not None:
            self.model_fallback = flag

    def reset(self, now: float) -> bool:
        """Acknowledge latched events (at the last step time, else ``now``); False before the first sample."""
        if self.engine is None:
            return False
        self.engine.reset(self.last_t if math.isfinite(self.last_t) else now)
        return True

    def watchdog(self, now: float) -> list[CheckResult]:
        """Periodic: with no measurement for ``stale_after`` s, step on the last sample so the timeout check fires.

        The step's time is the last sample's stamp plus the silence on the
        monitor clock: the samples' time base, whatever the monitor clock is.
        """
        if self.sample is None or self.engine is None:
            return []
        silence = now - self.last_rx   # NaN while the monitor clock had no time (not a silence)
        t = self.last_stamp + silence
        if silence > self.stale_after and t > self.last_t:
            return self._step(self.sample, t)
        return []

    # ---------------------------------------------------------------- rules
    def _step(self, s: PackSample, t: float) -> list[CheckResult]:
        assert self.engine is not None
        t0 = time.perf_counter()
        try:
            results = self.engine.step(s, t, soc=self.soc, soc_stamp=self.soc_stamp, capacity_ah=self.capacity,
                                       model_fallback=self.model_fallback)
            if self.detectors is not None:  # the same per-sample reductions as the rules
                results += self.detectors.step(s, t, stats=self.engine.stats)
        except Exception as exc:  # a rule bug must not take down the monitor
            self.reject(f"rule step failed: {exc!r}")
            return self._own([CheckResult(MONITOR_CHECK, ERROR, f"rule step failed: {exc!r}",
                                          {"rejected": self.rejected})])
        dt = time.perf_counter() - t0
        self.steps += 1
        self.step_time_sum += dt
        self.step_time_max = max(self.step_time_max, dt)
        self.last_t = t
        results += (self.events_status(), self.health())
        # the same checks every step (fixed by the parts the first sample built): their names are known after one
        return self._own(results) if self.steps == 1 else results

    def all_events(self) -> list[Event]:
        """Every event latched so far (cleared ones too, up to each list's bound), rules then detectors."""
        events = list(self.engine.events) if self.engine is not None else []
        return events + (list(self.detectors.events) if self.detectors is not None else [])

    def active_events(self) -> list[Event]:
        """Active latched events of the rules, then of the detectors."""
        if self.engine is None:
            return []
        events = self.engine.active_events()
        if self.detectors is not None:
            events += self.detectors.active_events()
        return events

    def events_status(self) -> CheckResult:
        """The ``events`` status for the current state.

        Events are set, cleared and reset only with a debouncer transition, which
        counts up that debouncer's generation: while the sum of the generations
        stands still, the events (and what the status shows of them, fixed when
        each is set) are those of the last status, which is reused.
        """
        key = sum(map(_GENERATION, self._debouncers))
        if key != self._events_key or not self._debouncers:
            total = self.engine.event_count() if self.engine is not None else 0
            self._events_key, self._events_last = key, events_status(self.active_events(), total, self.max_events)
        r = self._events_last
        return CheckResult(r.check, r.level, r.message, dict(r.values))

    def health(self) -> CheckResult:
        """The ``fault monitor`` status: steps, rejections (WARN for a while after one), step cost, limits in use.

        The WARN clears ``REJECT_HOLD_STEPS`` steps after the last rejection; the
        count stays in the values, so one bad message does not raise the status forever.
        """
        rejected = f" ({self.reject_reason})" if self.rejected else ""
        recent = self.rejected and self.steps - self._reject_step < REJECT_HOLD_STEPS
        return CheckResult(MONITOR_CHECK, WARN if recent else OK,
                           f"{self.steps} steps, {self.rejected} rejected{rejected}",
                           {"steps": self.steps, "rejected": self.rejected, "last_reject": self.reject_reason,
                            "step_mean_us": 1e6 * self.step_time_sum / max(self.steps, 1),
                            "step_max_us": 1e6 * self.step_time_max,
                            "limits": self.cfg.source, "chemistry": self.cfg.chemistry,
                            "cell_data": PACK_LEVEL if self.pack_level else "per cell",
                            "detector_files": "; ".join(self.detector_problems) or "ok"})

    def _own(self, results: list[CheckResult]) -> list[CheckResult]:
        self._own_checks.update([r.check for r in results])
        return results
