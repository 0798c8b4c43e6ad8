"""estimator: SOC (10 Hz, per measurement) and SOH/RUL (slow) -> battery_state + /diagnostics.

Steps once per pack/measurements message with the header stamp as time
(can_bridge publishes at fixed 10 Hz instants of CAN time, so results are
identical at any replay speed) and publishes battery_state right after each
step. SOH/RUL run every ``health_period`` seconds of that same time. Node-clock
timers only publish diagnostics and poll the model directory (hot reload).
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from rclpy.node import Node
from sensor_msgs.msg import BatteryState

from bms_ai.core.levels import ERROR, OK, WARN
from bms_ai.estimation import status
from bms_ai.estimation.ekf import ECMParams
from bms_ai.estimation.health import HealthEstimator, HealthOutput, rest_ocv
from bms_ai.estimation.rul import load_rul_estimator
from bms_ai.estimation.soc import SocEstimator, SocOutput, soc_model_expectation
from bms_ai.models.runtime import ModelRegistry, default_model_dir
from bms_ai.nodes.common import GRAPH_SUB_QOS, PUB_QOS, Diagnostics, declare, spin_node
from bms_ai.nodes.convert import battery_state_to_sample, stamp_to_time


class EstimatorNode(Node):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs.pop("node_name", "estimator"), **kwargs)
        self.p = {
            "pack_id": declare(self, "pack_id", "pack96-ref", "hardware_id for diagnostics"),
            "chemistry": declare(self, "chemistry", "nmc", "cell chemistry: selects SOC model and OCV table (nmc|lfp)"),
            "capacity_ah": declare(self, "capacity_ah", 50.0, "design capacity of the series string (Ah)"),
            "model_dir": declare(self, "model_dir", "", "directory with manifest.json + ONNX ('' = shipped models)"),
            "use_models": declare(self, "use_models", True, "false: classical estimators only (EKF / Coulomb counting)"),
            "initial_soc": declare(self, "initial_soc", -1.0, "stored SOC at start (0..1); < 0: from the first voltage"),
            "health_period": declare(self, "health_period", 10.0, "SOH/RUL update period (s of measurement time)"),
            "model_poll_period": declare(self, "model_poll_period", 2.0, "hot-reload check period (node clock, s)"),
            "efc0": declare(self, "efc0", 0.0, "equivalent full cycles before this run (RUL)"),
            "frame_id": declare(self, "frame_id", "battery", "frame_id of battery_state"),
        }
        self.chem = str(self.p["chemistry"]).lower()
        self.diag = Diagnostics(self, self.p["pack_id"])
        self.registry = ModelRegistry(self.p["model_dir"] or default_model_dir(), {"soc": soc_model_expectation()})
        self.pub = self.create_publisher(BatteryState, "battery_state", PUB_QOS)
        self.sub = self.create_subscription(BatteryState, "pack/measurements", self._on_meas, GRAPH_SUB_QOS)
        self.soc_est: SocEstimator | None = None
        self.health: HealthEstimator | None = None
        self.last: SocOutput | None = None
        self.last_health: HealthOutput | None = None
        self.t_health = -math.inf
        self.rejected = 0
        self.reject_reason = ""
        self.steps = 0
        self.cycle_max = 0.0
        self.cycle_last = 0.0
        self._poll_models()
        self.create_timer(float(self.p["model_poll_period"]), self._poll_models)
        self.create_timer(1.0, self._update_diagnostics)

    # -- models --------------------------------------------------------------
    def _poll_models(self) -> None:
        if not self.p["use_models"]:
            return
        changed = self.registry.poll()
        for ev in self.registry.events[-5:]:
            self.get_logger().debug(ev)
        if changed and self.soc_est is not None:
            slot = self.registry.slot("soc", self.chem)
            self.soc_est.set_model(slot.model, slot.reason)
            self.get_logger().info(f"SOC model now {slot.model.label if slot.model else 'none'}")

    def _ecm(self) -> ECMParams:
        from bms_ai.estimation.evaluate import ecm_for

        return ecm_for(self.registry if self.p["use_models"] else None, self.chem, float(self.p["capacity_ah"]))

    def _create(self, n_cells: int, n_temps: int) -> None:
        slot = self.registry.slot("soc", self.chem)
        model = slot.model if self.p["use_models"] else None
        reason = slot.reason if self.p["use_models"] else "models disabled (use_models=false)"
        s0 = float(self.p["initial_soc"])
        self.soc_est = SocEstimator(n_cells, n_temps, self.chem, float(self.p["capacity_ah"]), model=model,
                                    ecm=self._ecm(),
                                    soc0=s0 if 0.0 <= s0 <= 1.0 else None, model_reason=reason)
        rul, _ = load_rul_estimator(self.p["model_dir"] or default_model_dir(), self.chem)
        self.health = HealthEstimator(n_cells, float(self.p["capacity_ah"]), efc0=float(self.p["efc0"]),
                                      ocv=rest_ocv(self.chem), rul=rul)

    # -- per measurement -----------------------------------------------------
    def _on_meas(self, msg: BatteryState) -> None:
        try:
            s = battery_state_to_sample(msg)
            if s.cell_voltages.size == 0:
                raise ValueError("no cell voltages")
            if not np.isfinite(s.cell_voltages).any() and not math.isfinite(s.pack_current):
                # communication lost (every value aged out): hold the estimate instead of
                # integrating nothing; fault_monitor reports the timeout
                raise ValueError("no valid measurement (communication lost)")
            if not math.isfinite(s.stamp) or s.stamp <= 0:
                raise ValueError("no header stamp")
            if self.soc_est is None or self.soc_est.n != s.n_cells:
                self._create(s.n_cells, s.cell_temperatures.size)
            if self.last is not None and s.stamp <= self.last.stamp:
                raise ValueError(f"stamp {s.stamp:.3f} not after {self.last.stamp:.3f}")
        except ValueError as exc:
            self.rejected += 1
            self.reject_reason = str(exc)
            return
        t0 = time.perf_counter()
        out = self.soc_est.step(s.stamp, s.pack_current, s.cell_voltages, s.cell_temperatures)
        meas = np.where(np.isfinite(out.nn_soc), out.nn_soc, out.ekf_soc)
        self.health.update(s.stamp, s.pack_current, s.cell_voltages, meas)
        if s.stamp - self.t_health >= float(self.p["health_period"]):
            self.t_health = s.stamp
            self.health.estimate_capacity()
            self.last_health = self.health.output()
        self.cycle_last = time.perf_counter() - t0
        self.cycle_max = max(self.cycle_max, self.cycle_last)
        self.steps += 1
        self.last = out
        self.pub.publish(self._battery_state(msg, out))

    def _battery_state(self, meas: BatteryState, o: SocOutput) -> BatteryState:
        m = BatteryState()
        m.header.stamp = stamp_to_time(o.stamp)
        m.header.frame_id = self.p["frame_id"]
        m.voltage, m.current, m.temperature = meas.voltage, meas.current, meas.temperature
        h = self.last_health
        design = float(self.p["capacity_ah"])
        cap = h.capacity_ah if h is not None else design
        m.percentage = float(o.soc)
        m.capacity = float(cap)
        m.design_capacity = design
        m.charge = float(o.soc * cap)
        m.power_supply_status = meas.power_supply_status
        m.power_supply_technology = BatteryState.POWER_SUPPLY_TECHNOLOGY_LION
        soh = h.soh if h is not None else 1.0
        m.power_supply_health = (BatteryState.POWER_SUPPLY_HEALTH_GOOD if soh >= 0.8
                                 else BatteryState.POWER_SUPPLY_HEALTH_DEAD if soh < 0.6
                                 else BatteryState.POWER_SUPPLY_HEALTH_UNSPEC_FAILURE)
        m.present = True
        m.cell_voltage = list(meas.cell_voltage)
        m.cell_temperature = list(meas.cell_temperature)
        m.location = "pack"
        m.serial_number = self.p["pack_id"]
        return m

    # -- diagnostics -----------------------------------------------------------
    def _update_diagnostics(self) -> None:
        slot = self.registry.slot("soc", self.chem)
        o = self.last
        model = slot.model.label if (slot.model is not None and self.p["use_models"]) else "none"
        if o is None:
            self.diag.update(status.SOC_CHECK, WARN, "no measurements yet",
                             {"model": model, "model_reason": slot.reason, "rejected": self.rejected,
                              status.MODEL_FALLBACK: slot.model is None or not self.p["use_models"]})
            return
        level = OK if o.method == "nn+cc" else WARN
        msg = {"nn+cc": "NN + Coulomb counting", "ekf": "fallback: EKF", "mixed": "partial fallback: EKF"}[o.method]
        if o.fallback_reason:
            msg += f" ({o.fallback_reason})"
        if self.rejected and level == OK:
            level = WARN
        self.diag.update(status.SOC_CHECK, level, msg, {
            "soc": o.soc, "soc_sigma": o.sigma, "soc_min": float(np.min(o.cell_soc)),
            "soc_max": float(np.max(o.cell_soc)), "method": o.method, "model": model,
            status.MODEL_FALLBACK: o.method != "nn+cc",
            "model_version": slot.model.version if slot.model is not None else 0,
            "fallback_reason": o.fallback_reason, "ood_cells": o.ood_cells,
            "inference_ms": o.infer_s * 1e3, "cycle_ms": self.cycle_last * 1e3, "cycle_max_ms": self.cycle_max * 1e3,
            "ekf_soc": float(np.mean(o.ekf_soc)), "cc_soc": float(np.mean(o.cc_soc)), "steps": self.steps,
            "rejected": self.rejected, "reject_reason": self.reject_reason,
            "model_reloads": self.registry.reloads, "last_model_event": (self.registry.events or [""])[-1]})
        h = self.last_health
        if h is None:
            self.diag.update("soh", OK, "collecting data", {"capacity_ah": float(self.p["capacity_ah"])})
            return
        lvl = OK if h.soh >= 0.8 else WARN if h.soh >= 0.7 else ERROR
        self.diag.update("soh", lvl, f"SOH {h.soh * 100:.1f} %", {
            "soh": h.soh, "capacity_ah": h.capacity_ah, "r0_ohm": h.r0, "r0_max_ohm": float(np.nanmax(h.cell_r0))
            if np.isfinite(h.cell_r0).any() else float("nan"), "soh_min_cell": int(np.argmin(h.cell_soh)),
            "capacity_updates": h.capacity_updates, "r0_updates": h.r0_updates, "method": "classical (field data)"})
        self.diag.update("rul", OK, "RUL (equivalent full cycles to 80 % SOH)" if math.isfinite(h.rul_efc)
                         else "RUL: not enough SOH history yet",
                         {"rul_efc": h.rul_efc, "rul_lo_90": h.rul_lo, "rul_hi_90": h.rul_hi, "efc": h.efc})


NODE_CLASS = EstimatorNode


def main(args: list[str] | None = None) -> None:
    spin_node(EstimatorNode, args)


if __name__ == "__main__":
    main()
