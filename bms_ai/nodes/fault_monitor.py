"""fault_monitor: three-tier limits, plausibility and incipient-fault detectors -> /diagnostics.

Rules step once per pack/measurements message, with the message's header
stamp as time: can_bridge publishes at fixed 10 Hz instants of CAN time, so
results are the same at any replay speed. A node-clock watchdog at
``rate_hz`` steps the rules on the last sample when messages stop, so the
stale-data (CAN timeout) check fires even when the bridge goes silent.
One DiagnosticStatus per check (``bms_ai: <check>``), 1 Hz and at once on
a level change; latched MSL events clear only on a reset message.
"""

from __future__ import annotations

import math
import time
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray
from rclpy.node import Node
from sensor_msgs.msg import BatteryState
from std_msgs.msg import Empty

from bms_ai.core.levels import ERROR, OK, STALE, WARN
from bms_ai.diagnostics.config import default_limits_path, load_limits
from bms_ai.diagnostics.rules import RuleEngine
from bms_ai.estimation import status
from bms_ai.nodes.common import GRAPH_SUB_QOS, Diagnostics, declare, spin_node
from bms_ai.nodes.convert import battery_state_to_sample, time_to_float
from bms_ai.pack import PackSample


class FaultMonitorNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs.pop("node_name", "fault_monitor"), **kwargs)
        self.p = {
            "pack_id": declare(self, "pack_id", "pack96-ref", "hardware_id for diagnostics"),
            "chemistry": declare(self, "chemistry", "nmc", "selects config/limits_<chemistry>.yaml when limits_file is empty"),
            "limits_file": declare(self, "limits_file", "", "limits YAML (three-tier limits, plausibility, derating)"),
            "rate_hz": declare(self, "rate_hz", 4.0, "watchdog rate on the node clock (rules step per measurement)"),
            "stale_after": declare(self, "stale_after", 1.0, "no measurement for this long (node clock, s) -> timeout"),
            "capacity_ah": declare(self, "capacity_ah", 50.0, "pack capacity for the SOC-jump check (overridden by battery_state)"),
            "detectors": declare(self, "detectors", True, "run the incipient-fault detectors"),
            "max_events": declare(self, "max_events", 8, "latched events listed in the 'events' status"),
        }
        path = self.p["limits_file"] or str(default_limits_path(self.p["chemistry"]))
        self.cfg = load_limits(path)
        self.diag = Diagnostics(self, self.p["pack_id"])
        self.engine: RuleEngine | None = None
        self.detectors = None
        self.sample: PackSample | None = None
        self.last_rx = math.nan     # node clock at last measurement
        self.last_t = math.nan      # time of the last rule step
        self.rejected = 0
        self.reject_reason = ""
        self.steps = 0
        self.step_time_max = 0.0
        self.step_time_sum = 0.0
        self.soc: float | None = None
        self.soc_stamp: float | None = None
        self.capacity = float(self.p["capacity_ah"])
        self.model_fallback: bool | None = None
        self.create_subscription(BatteryState, "pack/measurements", self._on_meas, GRAPH_SUB_QOS)
        self.create_subscription(BatteryState, "battery_state", self._on_state, GRAPH_SUB_QOS)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diag, 50)
        self.create_subscription(Empty, "fault_monitor/reset", self._on_reset, 10)
        self.create_timer(1.0 / float(self.p["rate_hz"]), self._watchdog)
        self.diag.update("fault monitor", STALE, "waiting for pack/measurements",
                         {"limits": path, "chemistry": self.cfg.chemistry})

    # ---------------------------------------------------------------- inputs
    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    def _reject(self, reason: str) -> None:
        self.rejected += 1
        self.reject_reason = reason

    def _on_meas(self, msg: BatteryState) -> None:
        try:
            s = battery_state_to_sample(msg)
        except Exception as exc:  # malformed message: count and report, never crash
            self._reject(f"unconvertible message: {exc}")
            return
        if self.engine is None:
            if s.n_cells == 0:
                self._reject("no cell voltages")
                return
            self.engine = RuleEngine(self.cfg, s.n_cells, s.cell_temperatures.size)
            if self.p["detectors"]:
                self.detectors = _make_detectors(s.n_cells, s.cell_temperatures.size, self.cfg.tick_hz,
                                                 self.cfg.chemistry)
        elif s.n_cells != self.engine.n_cells or s.cell_temperatures.size != self.engine.n_temps:
            self._reject(f"shape {s.n_cells}/{s.cell_temperatures.size} != {self.engine.n_cells}/{self.engine.n_temps}")
            return
        self.sample = s
        self.last_rx = self._now()
        t = s.stamp if s.stamp > 0 else self.last_rx
        if math.isfinite(self.last_t) and t <= self.last_t:
            self._reject("out-of-order stamp")
            return
        self._step(s, t)

    def _on_state(self, msg: BatteryState) -> None:
        if math.isfinite(msg.percentage):
            self.soc = float(msg.percentage)
            self.soc_stamp = time_to_float(msg.header.stamp) or None
        if math.isfinite(msg.capacity) and msg.capacity > 0:
            self.capacity = float(msg.capacity)

    def _on_diag(self, msg: DiagnosticArray) -> None:
        """Model fallback flag from this pack's estimator (bms_ai.estimation.status is the contract)."""
        for st in msg.status:
            if st.hardware_id != self.diag.hardware_id or not st.name.startswith("bms_ai: ") or \
                    self.diag.level(st.name[len("bms_ai: "):]) is not None:
                continue
            flag = status.model_fallback((kv.key, kv.value) for kv in st.values)
            if flag is not None:
                self.model_fallback = flag

    def _on_reset(self, _msg: Empty) -> None:
        if self.engine is not None:
            self.engine.reset(self.last_t if math.isfinite(self.last_t) else self._now())
            self.get_logger().info("latched diagnostic events reset")

    def _watchdog(self) -> None:
        if self.sample is None or self.engine is None:
            return
        now = self._now()
        if now - self.last_rx > float(self.p["stale_after"]) and now > self.last_t:
            self._step(self.sample, now)  # stale stamps -> the timeout check fires

    # ---------------------------------------------------------------- rules
    def _step(self, s: PackSample, t: float) -> None:
        assert self.engine is not None
        t0 = time.perf_counter()
        try:
            results = self.engine.step(s, t, soc=self.soc, soc_stamp=self.soc_stamp, capacity_ah=self.capacity,
                                       model_fallback=self.model_fallback)
            if self.detectors is not None:
                results += self.detectors.step(s, t)
        except Exception as exc:  # a rule bug must not take down the monitor
            self._reject(f"rule step failed: {exc!r}")
            self.diag.update("fault monitor", ERROR, f"rule step failed: {exc!r}", {"rejected": self.rejected})
            return
        dt = time.perf_counter() - t0
        self.steps += 1
        self.step_time_sum += dt
        self.step_time_max = max(self.step_time_max, dt)
        self.last_t = t
        # one DiagnosticArray with every status whose level changed (not one message per check)
        changed: list[str] = []
        for r in results:
            if self.diag.level(r.check) != r.level:
                changed.append(f"bms_ai: {r.check}")
            self.diag.update(r.check, r.level, r.message, r.values, publish_on_change=False)
        if changed:
            self.diag.publish(changed)
        self._publish_events()
        self.diag.update("fault monitor", WARN if self.rejected else OK,
                         f"{self.steps} steps, {self.rejected} rejected" + (f" ({self.reject_reason})" if self.rejected else ""),
                         {"steps": self.steps, "rejected": self.rejected, "last_reject": self.reject_reason,
                          "step_mean_us": 1e6 * self.step_time_sum / self.steps, "step_max_us": 1e6 * self.step_time_max,
                          "limits": self.cfg.source, "chemistry": self.cfg.chemistry})

    def _publish_events(self) -> None:
        assert self.engine is not None
        events = self.engine.active_events()
        if self.detectors is not None:
            events += self.detectors.active_events()
        level = max((e.level for e in events), default=OK)
        kv: dict[str, Any] = {"active": len(events), "total": len(self.engine.events)}
        for k, e in enumerate(events[: int(self.p["max_events"])]):
            where = f" #{e.index}" if e.index >= 0 else ""
            kv[f"event{k}"] = f"{e.check} {e.tier.upper()}{where} onset={e.onset:.1f} set={e.set_time:.1f} value={e.value:.4g}"
        msg = "no active events" if not events else f"{len(events)} active: " + ", ".join(
            sorted({f"{e.check} ({e.tier.upper()})" for e in events}))
        self.diag.update("events", level, msg, kv)


def _make_detectors(n_cells: int, n_temps: int, tick_hz: float, chemistry: str):
    """Incipient-fault detectors, if available (they are optional to the rules)."""
    from bms_ai.diagnostics.detectors import DetectorBank, PlatingModel

    try:
        plating = PlatingModel.load()
    except (ValueError, OSError):  # bad model file: run without it, the plating check says so
        plating = None
    return DetectorBank(n_cells, n_temps, tick_hz=tick_hz, plating=plating or False, chemistry=chemistry)


NODE_CLASS = FaultMonitorNode


def main(args: list[str] | None = None) -> None:
    spin_node(FaultMonitorNode, args)


if __name__ == "__main__":
    main()
