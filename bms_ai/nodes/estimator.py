"""estimator: SOC (10 Hz, per measurement) and SOH/RUL (slow) -> battery_state + /diagnostics.

Steps once per pack/measurements message with the header stamp as time
(can_bridge publishes at fixed 10 Hz instants of CAN time, so results are
identical at any replay speed) and publishes battery_state right after each
step. SOH/RUL run every ``health_period`` seconds of that same time. Node-clock
timers only publish diagnostics and poll the model directory (hot reload).
Every decision (model or fallback, input checks, levels, SOH verdicts) is
made by ``bms_ai.estimation.pack.PackEstimator``; this node translates ROS.
"""

from __future__ import annotations

import math
from typing import Any

from rclpy.node import Node
from sensor_msgs.msg import BatteryState

from bms_ai.can.assembler import PACK_LEVEL
from bms_ai.chemistry.registry import CHEMISTRIES
from bms_ai.core.cdr import BatteryFields, battery_state_bytes
from bms_ai.estimation.ocvmodel import ocv_model_from_file
from bms_ai.estimation.pack import PackEstimator, PackStep
from bms_ai.estimation.state import read_state, resolve_state_path, write_state
from bms_ai.nodes.common import GRAPH_SUB_QOS, PUB_QOS, Diagnostics, declare, spin_node
from bms_ai.nodes.convert import battery_fields_from_bytes, time_parts
from bms_ai.nodes.local import LocalPublisher, graph_subscription, guarded


class EstimatorNode(Node):
    """pack/measurements in, battery_state and the soc/soh/rul diagnostics out."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(kwargs.pop("node_name", "estimator"), **kwargs)
        self.p = {
            "pack_id": declare(self, "pack_id", "pack96-ref", "hardware_id for diagnostics"),
            "chemistry": declare(self, "chemistry", "nmc", "cell chemistry: selects SOC model and OCV table "
                                 f"({'|'.join(CHEMISTRIES.names())})"),
            "capacity_ah": declare(self, "capacity_ah", 50.0, "design capacity of the series string (Ah)"),
            "model_dir": declare(self, "model_dir", "", "directory with manifest.json + ONNX ('' = shipped models)"),
            "use_models": declare(self, "use_models", True, "false: classical estimators only (EKF / Coulomb counting)"),
            "initial_soc": declare(self, "initial_soc", -1.0, "stored SOC at start (0..1); < 0: from the first voltage"),
            "health_period": declare(self, "health_period", 10.0, "SOH/RUL update period (s of measurement time)"),
            "model_poll_period": declare(self, "model_poll_period", 2.0, "hot-reload check period (node clock, s)"),
            "efc0": declare(self, "efc0", 0.0, "equivalent full cycles before this run (RUL)"),
            "frame_id": declare(self, "frame_id", "battery", "frame_id of battery_state"),
            "ocv_file": declare(self, "ocv_file", "", "the cell's OCV curve (csv: soc, volts; '' = chemistry prior, "
                                "learned in the field)"),
            "ocv_sigma_v": declare(self, "ocv_sigma_v", 0.003, "how far ocv_file is trusted (V)"),
            "cell_type": declare(self, "cell_type", "", "the pack's cell type: a fleet-learned OCV curve for it in "
                                 "the SOC model's entry is used when ocv_file is ''"),
            "state_file": declare(self, "state_file", "auto", "estimator state kept across power cycles "
                                  "('auto': $ROS_HOME/bms_ai/<namespace>_estimator.json; '' = off)"),
            "state_period": declare(self, "state_period", 60.0, "state save period (node clock, s); also on shutdown"),
            "update_period": declare(self, "update_period", 0.5, "SOC voltage update (model inference, filter "
                                     "correction) at most this often (s of measurement time; 0 = every sample); "
                                     "Coulomb counting runs every sample. 0.5: the rate `bms-ai evaluate` reports"),
        }
        s0 = float(self.p["initial_soc"])
        self.est = PackEstimator.from_model_dir(
            self.p["model_dir"], self.p["chemistry"], float(self.p["capacity_ah"]),
            use_models=bool(self.p["use_models"]), initial_soc=s0 if 0.0 <= s0 <= 1.0 else None,
            health_period=float(self.p["health_period"]), efc0=float(self.p["efc0"]),
            ocv=ocv_model_from_file(self.p["ocv_file"], float(self.p["ocv_sigma_v"])) if self.p["ocv_file"] else None,
            cell_type=str(self.p["cell_type"]), update_period_s=float(self.p["update_period"]))
        self.state_path = resolve_state_path(self.p["state_file"], self.get_namespace())
        if self.state_path is not None:
            payload, why = read_state(self.state_path)
            note = self.est.restore_state(payload) if payload is not None else why
            self.get_logger().info(f"estimator state: {note or 'restored from ' + str(self.state_path)}")
        self.diag = Diagnostics(self, self.p["pack_id"])
        self.cell_data = "per cell"  # or PACK_LEVEL: the measurements carry the average cell only
        self.pub = LocalPublisher(self, BatteryState, "battery_state", PUB_QOS)
        # raw: the fields are read from the bytes (bms_ai.core.cdr), battery_state goes out as bytes; in a
        # composed graph the bridge's thread steps the estimator (bms_ai.nodes.local), so the timers hold its lock
        graph_subscription(self, BatteryState, "pack/measurements", self._on_meas, GRAPH_SUB_QOS)
        self._poll_models()
        self.create_timer(float(self.p["model_poll_period"]), guarded(self, self._poll_models))
        self.create_timer(1.0, guarded(self, self._update_diagnostics))
        if self.state_path is not None:
            self.create_timer(float(self.p["state_period"]), guarded(self, self._save_state))

    def _save_state(self) -> None:
        if self.est.last is None:
            return  # nothing learned yet: keep what is stored
        try:
            write_state(self.state_path, self.est.state_payload())
        except (OSError, ValueError) as exc:  # a full or read-only disk, or a state that does not encode
            # (a non-finite value): the estimator goes on, the stored state stays as it was
            self.est.state_note = f"cannot save state: {getattr(exc, 'strerror', None) or exc}"
            self.get_logger().warning(self.est.state_note, throttle_duration_sec=60.0)

    def destroy_node(self) -> None:
        """Save the state one last time (a clean shutdown keeps the freshest state)."""
        if self.state_path is not None:
            guarded(self, self._save_state)()
        super().destroy_node()

    def _poll_models(self) -> None:
        changed = self.est.poll_models()
        for ev in self.est.model_events[-5:]:
            self.get_logger().debug(ev)
        if changed:
            self.get_logger().info(changed)

    @property
    def steps(self) -> int:
        """Measurements estimated so far (apps and tests wait on these counters)."""
        return self.est.steps

    @property
    def rejected(self) -> int:
        """Measurements refused so far (reason in the soc diagnostic)."""
        return self.est.rejected

    def _on_meas(self, data: bytes) -> None:
        meas = battery_fields_from_bytes(data)
        self.cell_data = PACK_LEVEL if meas.location == PACK_LEVEL else "per cell"
        stamp = meas.stamp if meas.stamp > 0 else math.nan    # an unset header stamp is 0
        # battery_state goes out once the charge is counted, before the voltage update, model inference and
        # SOH (PackEstimator.step): frame -> battery_state does not wait for them (an update shows 0.1 s later)
        self.est.step(stamp, float(meas.current), meas.cell_voltage, meas.cell_temperature,
                      emit=lambda step: self.pub.publish(battery_state_bytes(self._battery_state(meas, step))))

    def _battery_state(self, meas: BatteryFields, step: PackStep) -> BatteryFields:
        """battery_state: the measurement's pack values and cells (float32 as received) with the estimate."""
        sec, nanosec = time_parts(step.soc.stamp)
        return BatteryFields(
            sec, nanosec, self.p["frame_id"], voltage=meas.voltage, temperature=meas.temperature,
            current=meas.current, charge=step.charge_ah, capacity=float(step.capacity_ah),
            design_capacity=float(step.design_capacity_ah), percentage=float(step.soc.soc),
            power_supply_status=meas.power_supply_status, power_supply_health=step.health,
            power_supply_technology=BatteryState.POWER_SUPPLY_TECHNOLOGY_LION, present=True,
            cell_voltage=meas.cell_voltage, cell_temperature=meas.cell_temperature,
            location="pack", serial_number=self.p["pack_id"])

    def _update_diagnostics(self) -> None:
        for st in self.est.statuses():
            if st.check == "soc":
                st.values["cell_data"] = self.cell_data
            self.diag.update(st.check, st.level, st.message, st.values)


NODE_CLASS = EstimatorNode


def main(args: list[str] | None = None) -> None:
    """Console entry point of the estimator node."""
    spin_node(EstimatorNode, args)


if __name__ == "__main__":
    main()
