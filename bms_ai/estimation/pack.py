"""PackEstimator: SOC, SOH and RUL of one pack, with the model/fallback decision made in one place.

The estimator node and ``bms-ai evaluate`` both run this class, so what the
evaluation measures is what the vehicle runs. It owns:

- model selection: the SOC model from a ``ModelRegistry`` (hot reload swaps it
  in without a jump in the output), or the EKF fallback with the reason
  (no model directory, models disabled, no valid model, model retired);
- retirement: when the ``SocEstimator`` reports that the output guard kept
  refusing its model (``retire_request``), the registry retires it and the
  slot's fallback takes over; a new version dropped in later is loaded again;
- the ``SocEstimator`` (every measurement), the ``HealthEstimator`` (capacity,
  R0; capacity estimate every ``health_period`` s of measurement time) and its RUL;
- input checks: a sample the estimator cannot use is rejected, counted and its
  reason kept (never an exception into the caller);
- what gets reported: BatteryState figures per step and the diagnostic checks
  (``soc``, ``soh``, ``rul``) with keys from ``bms_ai.estimation.status``.

    est = PackEstimator.from_model_dir("", "nmc", 50.0)   # shipped models
    est.poll_models()
    step = est.step(t, current, cell_v, cell_t)           # None: rejected (est.reject_reason)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bms_ai.chemistry.registry import get_chemistry
from bms_ai.core.levels import OK, WARN
from bms_ai.estimation import status
from bms_ai.estimation.health import HealthEstimator, HealthOutput
from bms_ai.estimation.ocvmodel import OcvModel, ocv_model_from_entry
from bms_ai.estimation.rul import RulEstimator, load_rul_estimator
from bms_ai.estimation.soc import RETIRE_AFTER, SocEstimator, SocOutput, soc_model_expectation
from bms_ai.estimation.state import decode_state, encode_state
from bms_ai.models.runtime import LoadedModel, ModelRegistry, ModelSlot, default_model_dir

SOC_METHOD_TEXT = {"learned": "Coulomb counting + learned overpotential model",
                   "classical": "fallback: Coulomb counting + ECM overpotential",
                   "mixed": "partial fallback: ECM overpotential for some cells"}
# the soc check stays WARN this long (measurement time) after the output guard refused a cell, so a model
# that fails now and then shows at the 1 Hz diagnostics rate, not only when a report hits a bad step
GUARD_WARN_HOLD_S = 10.0
# SOC apart of the two anchors a capacity rests on in vehicle use: turns the curve's SOC error at a rest
# into the capacity error it leaves (sqrt(2) x sigma / swing)
ANCHOR_SWING = 0.5


@dataclass
class PackStep:
    """The result of one accepted measurement: SOC, plus the capacity view BatteryState carries."""

    soc: SocOutput
    capacity_ah: float            # latest capacity estimate (the design value until the first one)
    design_capacity_ah: float
    health: int                   # BatteryState power_supply_health code (status.HEALTH_*)

    @property
    def charge_ah(self) -> float:
        """Charge left: pack SOC times the estimated capacity."""
        return float(self.soc.soc * self.capacity_ah)


def open_models(model_dir: str | Path | None) -> ModelRegistry:
    """A model registry that checks SOC models against this feature pipeline ('' or None: the shipped models)."""
    return ModelRegistry(Path(model_dir) if model_dir else default_model_dir(), {"soc": soc_model_expectation()})


class PackEstimator:
    """SOC / SOH / RUL of one series string; call ``step`` once per measurement sample."""

    def __init__(self, chemistry: str, capacity_ah: float, models: ModelRegistry | None = None, *,
                 use_models: bool = True, initial_soc: float | np.ndarray | None = None,
                 health_period: float = 10.0, efc0: float = 0.0, rul: RulEstimator | None = None,
                 rest_capacity: bool = True, ocv: OcvModel | None = None, retire_after: int = RETIRE_AFTER,
                 cell_type: str = "", update_period_s: float = 0.0) -> None:
        """``models`` None: no model directory (EKF only); ``initial_soc`` None: from the first voltages.

        ``cell_type``: the pack's cell type; when no ``ocv`` is given and the SOC model's entry
        carries a fleet-learned curve for that type, the filter uses it instead of the family prior.

        ``rest_capacity`` False turns the capacity anchors off (SOH stays at the
        design value; R0 is still estimated). ``retire_after``: consecutive steps
        with cells refused by the output guard before the SOC model is retired. ``update_period_s``: the
        SOC filter's voltage update at most this often (``SocEstimator``); 0: every sample.
        """
        self.chemistry = get_chemistry(chemistry).name
        self.capacity_ah = float(capacity_ah)
        if not self.capacity_ah > 0:
            raise ValueError(f"capacity_ah must be > 0, got {capacity_ah}")
        self.models = models
        self.use_models = bool(use_models)
        self.initial_soc = initial_soc
        self.health_period = float(health_period)
        self.efc0 = float(efc0)
        self.rul = rul
        self.update_period_s = float(update_period_s)
        self.rest_capacity = rest_capacity
        self.ocv = ocv
        self.cell_type = str(cell_type)
        self.retire_after = int(retire_after)
        self._pending_state: dict | None = None
        self.state_note = ""
        self.soc_est: SocEstimator | None = None
        self.health: HealthEstimator | None = None
        self.last: SocOutput | None = None
        self.last_health: HealthOutput | None = None
        self._t_health = -math.inf
        self.steps = 0
        self.full_anchors = 0         # SOC anchors at the end of a full charge (reported in the soc check)
        self.offset_readings = 0      # current-offset readings at awake zero-current rests taken by the filter
        self.rejected = 0
        self.reject_reason = ""
        self._rejected_at_last_status = 0
        self.cycle_last_s = 0.0
        self.cycle_max_s = 0.0

    @classmethod
    def from_model_dir(cls, model_dir: str | Path | None, chemistry: str, capacity_ah: float,
                       **kwargs) -> PackEstimator:
        """SOC models and RUL parameters from one directory ('' or None: the shipped models)."""
        models = open_models(model_dir)
        rul, _ = load_rul_estimator(models.model_dir, get_chemistry(chemistry).name)
        return cls(chemistry, capacity_ah, models, rul=rul, **kwargs)

    # -- model selection -------------------------------------------------------
    def slot(self) -> ModelSlot:
        """The registry slot serving this chemistry's SOC (an empty one without a model directory)."""
        if self.models is None:
            return ModelSlot(reason="no model directory")
        return self.models.slot("soc", self.chemistry)

    def soc_model(self) -> tuple[LoadedModel | None, str]:
        """The SOC model to run, or None and why the EKF runs instead: the one fallback decision."""
        if not self.use_models:
            return None, "models disabled (use_models=false)"
        s = self.slot()
        return s.model, s.reason

    def poll_models(self) -> str:
        """Hot reload: re-scan the model directory and swap a changed SOC model in; a log line if one was."""
        if not self.use_models or self.models is None or not self.models.poll() or self.soc_est is None:
            return ""
        model, reason = self.soc_model()
        self.soc_est.set_model(model, reason)
        ocv = self._ocv_for(model)
        if ocv is not None and ocv.source != self.soc_est.ocv.source:   # the new model ships this cell type's curve
            self.soc_est.ocv = ocv
            if self.health is not None and self.health.ocv is not None:
                self.health.ocv = ocv
        return f"SOC model now {model.label if model else 'none'}"

    def _ocv_for(self, model: LoadedModel | None) -> OcvModel | None:
        """The OCV the filter uses: the given one, else the model's fleet-learned curve for this cell type."""
        if self.ocv is not None or model is None:
            return self.ocv
        return ocv_model_from_entry(model.entry.extra, self.cell_type, model.label)

    def _retire(self) -> None:
        """The SOC estimator reports its model refused for too long: the registry retires it, the slot decides next."""
        est = self.soc_est
        model = est.learned.model if est.learned is not None else None
        if self.models is not None and model is not None and self.models.retire(model, est.retire_request):
            est.guard.retirements += 1
        model, reason = self.soc_model()
        est.set_model(model, reason)

    @property
    def model_events(self) -> list[str]:
        """Recent model-directory events (loaded, rejected with reason), oldest first."""
        return self.models.events if self.models is not None else []

    # -- per measurement -------------------------------------------------------
    def _create(self, n_cells: int, n_temps: int) -> None:
        model, reason = self.soc_model()
        self.soc_est = SocEstimator(n_cells, n_temps, self.chemistry, self.capacity_ah, model=model,
                                    ocv=self._ocv_for(model), soc0=self.initial_soc, model_reason=reason,
                                    retire_after=self.retire_after, update_period_s=self.update_period_s)
        ocv = self.soc_est.ocv if self.rest_capacity else None
        self.health = HealthEstimator(n_cells, self.capacity_ah, efc0=self.efc0, ocv=ocv, rul=self.rul,
                                      chemistry=self.chemistry)
        self._cap_fed = -1
        self._full_fed = self.health.full_count
        self._zero_fed = self.health.zero_count

    def _admit(self, t: float, current: float, cell_v: np.ndarray, n_temps: int) -> str:
        """Why the sample cannot be used ("" if it can); (re)creates the filters for a new cell count."""
        if cell_v.size == 0:
            return "no cell voltages"
        if not np.isfinite(cell_v).any() and not math.isfinite(current):
            # communication lost (every value aged out): hold the estimate instead of integrating nothing
            return "no valid measurement (communication lost)"
        if not math.isfinite(t):
            return "no valid time stamp"
        if self.last is None and not math.isfinite(current):
            # the start reads the voltage through the overpotential, which needs the current (a bus whose
            # current frame has not arrived yet): started without it, the state was NaN for good
            return "no valid current yet (the first estimate needs it)"
        if self.soc_est is None or self.soc_est.n != cell_v.size:
            self._create(cell_v.size, n_temps)
            if self._pending_state is not None:
                self.state_note = self.soc_est.restore(self._pending_state.get("soc", {}), t) or "restored"
                if self.state_note != "restored":  # unusable: a fresh estimator (cold start)
                    self._create(cell_v.size, n_temps)
                stored_health = self._pending_state.get("health")
                why = self.health.restore(stored_health) if stored_health else ""   # SOH survives a SOC cold start
                if why:
                    self.state_note += f"; {why}"
                self._pending_state = None
        if self.last is not None and t <= self.last.stamp:
            return f"stamp {t:.3f} not after {self.last.stamp:.3f}"
        return ""

    def step(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray,
             emit: Callable[[PackStep], None] | None = None) -> PackStep | None:
        """SOC every call, capacity every ``health_period`` s of ``t``; None for a rejected sample.

        With ``emit``, the sample's Coulomb-counted estimate goes to ``emit``
        before the rest of the step (voltage update, model inference, SOH):
        the running graph publishes it without waiting for them. The state
        after the step is the same; an update's correction reaches the output
        one sample later. Returns the corrected step either way.
        """
        cell_v = np.asarray(cell_v, dtype=np.float64)
        cell_t = np.asarray(cell_t, dtype=np.float64)
        why = self._admit(t, current, cell_v, cell_t.size)
        if why:
            self.rejected += 1
            self.reject_reason = why
            return None
        t0 = time.perf_counter()
        counted = self.soc_est.count(t, current, output=emit is not None)
        if counted is not None:
            t_emit = time.perf_counter()
            try:
                emit(self._pack_step(counted))
            finally:  # the step completes even if emit fails; its time is not the estimator's
                step = self._correct(t, current, cell_v, cell_t, t0 + time.perf_counter() - t_emit)
            return step
        step = self._correct(t, current, cell_v, cell_t, t0)
        if emit is not None:  # a first sample: nothing was counted before its correction
            emit(step)
        return step

    def _correct(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray, t0: float) -> PackStep:
        """The step after Coulomb counting (``t0``: when the estimator's own work began)."""
        out = self.soc_est.correct(t, current, cell_v, cell_t)
        if self.soc_est.retire_request:
            self._retire()
        self.health.update(t, current, cell_v, out.cell_soc, offset_a=out.offset_a)
        if self.health.q_updates != self._cap_fed:
            self._feed_capacity()
        self._feed_anchors()
        if t - self._t_health >= self.health_period:
            self._t_health = t
            self.last_health = self.health.output()
        self.cycle_last_s = time.perf_counter() - t0
        self.cycle_max_s = max(self.cycle_max_s, self.cycle_last_s)
        self.steps += 1
        self.last = out
        return self._pack_step(out)

    def _pack_step(self, out: SocOutput) -> PackStep:
        h = self.last_health
        return PackStep(out, h.capacity_ah if h is not None else self.capacity_ah, self.capacity_ah,
                        status.soh_verdict(h.soh if h is not None else 1.0).health)

    def _feed_capacity(self) -> None:
        """A new capacity estimate: per-cell factors, and the pack factor as a reading as sure as its anchors.

        With hysteresis (LFP) the SOC filter learns no capacity on the plateau (its sigma stayed at
        the prior over a 3-day life), and the SOH estimator's comes mostly from anchors free of the
        curve (full charges, graphite features) besides rests at the knees: read as it is (held out,
        where the knees are not the family's, it is 13-23 % high; docs/estimation.md, SOH). On a sloped curve the filter
        learns its own through the voltage; the SOH estimator's rests are read through the same
        curve as independent 8-mV readings, but the curve's error is common to every rest, so the
        reading carries that error too (``OcvModel.rest_soc_sigma``). With a family prior (40-180 mV)
        it is then weaker than the filter's own and refused: fed as sure as claimed, it cost the NMC
        3-day life 2 SOC points (3.56 vs 1.53 %; 0.976 +- 0.010 for a true 0.948). With the cell's
        own curve (a pack config's, or a fleet curve) it is taken.
        """
        self._cap_fed = self.health.q_updates
        if not self.health.q_updates:
            return
        cells, mean, var = self.health.capacity_factors()
        f = self.soc_est.filter
        f.set_cell_capacity(cells)
        if self.soc_est.path_free:
            var += 2.0 * (self.soc_est.ocv.rest_soc_sigma() / ANCHOR_SWING) ** 2
        f.measure_capacity(mean, var)

    def _feed_anchors(self) -> None:
        """What the SOH estimator found since the last call (a full charge's end, a zero-current rest) to the SOC filter."""
        if self.health.full_count != self._full_fed:
            self._feed_full()
        if self.health.zero_count != self._zero_fed:
            self._feed_zero()

    def _feed_full(self) -> None:
        """The end of a CC-CV full charge (found by the SOH estimator) anchors the SOC, free of the OCV band.

        The charger's cut-off fixes the SOC near 100 % whatever the cell's curve below the top,
        so this anchor also holds for a cell type whose curve is only the family prior. The
        Coulomb counting since the anchor (a pause in the CV tail) is added on the filter's capacity.
        """
        h, f = self.health, self.soc_est.filter
        self._full_fed = h.full_count
        if h.full_soc is None:
            return
        ah_at, soc, sd, ok = h.full_soc
        since = (h.ah - ah_at) / (self.capacity_ah * max(f.capacity_factor, 0.3) * f.cell_cap)
        f.anchor_soc(self.soc_est.t_last, np.clip(soc + since, 0.0, 1.0), sd, ok)
        self.full_anchors += 1

    def _feed_zero(self) -> None:
        """An awake rest at zero current (found by the SOH estimator) reads the current sensor's offset."""
        h, f = self.health, self.soc_est.filter
        self._zero_fed = h.zero_count
        if h.zero_reading is None:
            return
        mean, sd = h.zero_reading
        if f.measure_offset(self.soc_est.t_last, -mean / self.capacity_ah, sd / self.capacity_ah):
            self.offset_readings += 1

    # -- persistence ---------------------------------------------------------------
    def save_state(self) -> bytes:
        """What the next power cycle continues from (files: ``estimation.state.write_state(path, state_payload())``)."""
        return encode_state(self.state_payload())

    def state_payload(self) -> dict:
        """``save_state`` before encoding (for ``write_state``)."""
        if self.health is not None and self.soc_est is not None:
            self.health.end_session()     # (as its ``state`` does) a full charge or rest that ends with the session ...
            self._feed_anchors()          # ... reaches the SOC state saved with it
        return {"chemistry": self.chemistry, "capacity_ah": self.capacity_ah,
                "soc": self.soc_est.state() if self.soc_est is not None else {},
                "health": self.health.state() if self.health is not None else {}}

    def restore_state(self, blob: bytes | dict | None) -> str:
        """Continue from ``save_state`` output at the next accepted sample; '' or why it is not used."""
        if blob is None:
            return ""
        payload, why = (blob, "") if isinstance(blob, dict) else decode_state(blob)
        if payload is None:
            self.state_note = why
            return why
        if payload.get("chemistry") != self.chemistry or payload.get("capacity_ah") != self.capacity_ah:
            self.state_note = "stored estimator state is for another pack (chemistry or capacity differ)"
            return self.state_note
        self._pending_state = payload
        self.soc_est = None  # re-created (and restored) with the next sample
        self.last = None
        return ""

    def health_output(self) -> HealthOutput | None:
        """SOH/R0/RUL now (the periodic snapshot is ``last_health``); None before the first sample."""
        return self.health.output() if self.health is not None else None

    # -- what is reported --------------------------------------------------------
    def soc_status(self) -> status.CheckStatus:
        """The ``soc`` check: OK on the NN, WARN on any fallback or after rejected samples."""
        model, _ = self.soc_model()
        label = model.label if model is not None else "none"
        o = self.last
        if o is None:
            return status.CheckStatus(status.SOC_CHECK, WARN, "no measurements yet", {
                "model": label, "model_reason": self.slot().reason, "rejected": self.rejected,
                status.MODEL_FALLBACK: model is None})
        level, msg = self._soc_verdict(o)
        events = self.model_events
        return status.CheckStatus(status.SOC_CHECK, level, msg, {
            "soc": o.soc, "soc_sigma": o.sigma, "soc_min": float(np.min(o.cell_soc)),
            "soc_max": float(np.max(o.cell_soc)), "method": o.method, "model": label,
            status.MODEL_FALLBACK: o.method != "learned",
            "model_version": model.version if model is not None else 0,
            "fallback_reason": o.fallback_reason, "ood_cells": o.ood_cells,
            "inference_ms": o.infer_s * 1e3, "cycle_ms": self.cycle_last_s * 1e3, "cycle_max_ms": self.cycle_max_s * 1e3,
            "current_offset_a": o.offset_a, "capacity_factor": o.capacity_factor,
            "ocv_source": self.soc_est.ocv.source if self.soc_est else "", "state": self.state_note,
            "steps": self.steps, "full_charge_anchors": self.full_anchors,
            "offset_readings": self.offset_readings,
            "rejected": self.rejected, "reject_reason": self.reject_reason,
            "model_reloads": self.models.reloads if self.models is not None else 0,
            "last_model_event": (events or [""])[-1], **self.soc_est.guard.values()})

    def _soc_verdict(self, o: SocOutput) -> tuple[int, str]:
        """Level and message of the soc check: OK only on the learned model, without new rejections or recent refusals.

        Rejected samples WARN while they happen (since the last status), with
        the reason; older ones only count. Output-guard refusals keep it WARN
        for ``GUARD_WARN_HOLD_S``.
        """
        new_rejects = self.rejected - self._rejected_at_last_status
        self._rejected_at_last_status = self.rejected
        g = self.soc_est.guard
        age = o.stamp - g.last_t   # NaN (never refused) compares False
        recent = age <= GUARD_WARN_HOLD_S
        level = OK if o.method == "learned" and not new_rejects and not recent else WARN
        msg = SOC_METHOD_TEXT[o.method] + (f" ({o.fallback_reason})" if o.fallback_reason else "")
        if recent and not o.fallback_reason:
            msg += f" (output guard refused cells {age:.0f} s ago: {g.last_reason})"
        if new_rejects:
            msg += f"; {new_rejects} sample(s) rejected: {self.reject_reason}"
        return level, msg

    def soh_status(self) -> status.CheckStatus:
        """The ``soh`` check: level from ``status.soh_verdict`` of the latest estimate."""
        h = self.last_health
        if h is None:
            return status.CheckStatus(status.SOH_CHECK, OK, "collecting data", {"capacity_ah": self.capacity_ah})
        r0_max = float(np.nanmax(h.cell_r0)) if np.isfinite(h.cell_r0).any() else float("nan")
        return status.CheckStatus(status.SOH_CHECK, status.soh_verdict(h.soh).level, f"SOH {h.soh * 100:.1f} %", {
            "soh": h.soh, "capacity_ah": h.capacity_ah, "r0_ohm": h.r0, "r0_max_ohm": r0_max,
            "soh_min_cell": int(np.argmin(h.cell_soh)), "capacity_updates": h.capacity_updates,
            "r0_updates": h.r0_updates, "method": "classical (field data)"})

    def rul_status(self) -> status.CheckStatus | None:
        """The ``rul`` check (always OK: a forecast, not a fault); None before the first SOH estimate."""
        h = self.last_health
        if h is None:
            return None
        msg = (f"RUL (equivalent full cycles to {status.SOH_EOL * 100:.0f} % SOH)" if math.isfinite(h.rul_efc)
               else "RUL: not enough SOH history yet")
        return status.CheckStatus(status.RUL_CHECK, OK, msg,
                                  {"rul_efc": h.rul_efc, "rul_lo_90": h.rul_lo, "rul_hi_90": h.rul_hi, "efc": h.efc})

    def statuses(self) -> list[status.CheckStatus]:
        """All checks to publish now: soc; soh once measurements came; rul once there is an SOH estimate."""
        if self.last is None:
            return [self.soc_status()]
        out = [self.soc_status(), self.soh_status()]
        rul = self.rul_status()
        return out + [rul] if rul is not None else out
