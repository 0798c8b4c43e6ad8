"""SOC estimator: Coulomb counting corrected by cell voltages through a learned overpotential model.

Per step: the bar-delta filter (``estimation.filter``) integrates the current
with its estimated offset and capacity; the feature pipeline and the
overpotential model (learned ONNX model, or the classical ECM where the model
is missing, fails, or leaves its training domain) give each cell's
overpotential with its honest error; the OCV model gives the equilibrium
voltage with its band; the filter corrects the SOC as far as those errors
allow. Long rests commit the filter's estimate of the OCV-curve error into the
OCV model (field learning). ``state()``/``restore()`` carry everything across
power cycles.

Every inference passes the model's output guard: refused cells use the ECM
for that step, and a model refused in ``retire_after`` steps in a row is
retired by the owner of the model registry (``retire_request``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.estimation.features import FEATURE_VERSION, N_FEATURES, hysteresis_rate_for
from bms_ai.estimation.filter import E_OCV, BarDeltaFilter, FilterEvent, FilterInput, FilterParams, S, vsum
from bms_ai.estimation.ocvmodel import OcvModel
from bms_ai.estimation.overpotential import EcmEta, EcmParams, EtaTerms, LearnedEta, make_features
from bms_ai.models.runtime import LoadedModel

# Classical overpotential per chemistry, for a 50 Ah series group (scaled to the pack's capacity);
# identified on PyBaMM drives of the reference cells, sigmas from the residuals.
ECM_DEFAULTS: dict[str, EcmParams] = {
    "nmc": EcmParams(r0=0.0024, r1=0.0024, tau=80.0, activation_k=3500.0, hysteresis_v=0.0),
    "lfp": EcmParams(r0=0.0014, r1=0.0013, tau=40.0, activation_k=3500.0, hysteresis_v=0.01),
}
WARMUP_S = 60.0             # after a (re)start the current history is assumed: the model error is larger
WARMUP_FACTOR = 3.0
COMMIT_REST_S = 1800.0      # a rest this long has relaxed: commit the OCV-curve estimate once
COMMIT_AFTER_S = 10.0       # ... after this many seconds of samples in that rest
POSTERIOR_GRID = np.linspace(0.0, 1.0, 201)   # SOC points of a cold start's posterior on one voltage at rest
RETIRE_AFTER = 50           # consecutive steps with refused model outputs before the model is retired (5 s at 10 Hz)
# the outputs the filter reads, in order, with the span a sane model stays in (the output guard's range
# where a manifest declares none): an overpotential within +-2 V, its sigma up to 1 V
ETA_OUTPUTS = {"eta": (-2.0, 2.0), "sigma": (0.0, 1.0)}


@dataclass
class SocOutput:
    """One SOC step: pack and per-cell SOC with sigma, which overpotential model was used and why."""

    stamp: float
    soc: float
    sigma: float
    cell_soc: np.ndarray
    cell_sigma: np.ndarray
    method: str                   # "learned" | "classical" | "mixed" (per-cell fallback)
    fallback_reason: str = ""
    ood_cells: int = 0
    infer_s: float = math.nan
    offset_a: float = 0.0         # estimated current-sensor offset
    capacity_factor: float = 1.0  # estimated usable / design capacity (from the SOC filter)
    events: list[str] = field(default_factory=list)


def soc_model_expectation() -> dict:
    """What a SOC model must declare to be loaded: this pipeline's feature version and width."""
    return {"feature_version": FEATURE_VERSION, "n_features": N_FEATURES, "outputs": ETA_OUTPUTS}


@dataclass
class GuardCounts:
    """What the output guard refused in this estimator, kept across model swaps (the diagnostics report it)."""

    steps: int = 0                 # steps with at least one refused cell
    cells: int = 0                 # refused cell-steps
    consecutive: int = 0           # steps in a row with refused cells (retirement counts these)
    last_reason: str = ""
    last_t: float = math.nan       # stamp of the last step with refused cells
    retirements: int = 0

    def values(self) -> dict[str, int | str]:
        """Diagnostic key-values."""
        return {"guard_rejected_steps": self.steps, "guard_rejected_cells": self.cells,
                "guard_consecutive": self.consecutive, "guard_last_reason": self.last_reason,
                "guard_retirements": self.retirements}


def default_ocv_model(chemistry: str) -> OcvModel:
    """The chemistry's reference curve, trusted as far as its family agrees (band in the registry)."""
    chem = get_chemistry(chemistry)
    return OcvModel.from_curve(load_ocv(chem.name), chem.ocv_family_band_v, f"chemistry:{chem.name}")


class SocEstimator:
    """SOC of n series cells (pack SOC = mean of cells); ``step`` once per measurement sample."""

    def __init__(self, n_cells: int, n_temps: int, chemistry: str, capacity_ah: float,
                 model: LoadedModel | None = None, ocv: OcvModel | None = None,
                 ecm: EcmParams | None = None, params: FilterParams | None = None,
                 soc0: float | np.ndarray | None = None, sigma0_given: float = 0.01,
                 model_reason: str = "no model loaded", retire_after: int = RETIRE_AFTER,
                 update_period_s: float = 0.0) -> None:
        """``update_period_s``: the voltage update (model inference, filter correction) at most this often;
        Coulomb counting, the feature history and the classical overpotential's RC state advance every sample."""
        chem = get_chemistry(chemistry)
        self.n = n_cells
        self.chemistry = chem.name
        self.capacity_ah = float(capacity_ah)
        self.features = make_features(n_cells, n_temps, capacity_ah, hysteresis_rate_for(chem.name))
        self.ecm = EcmEta(n_cells, (ecm or ECM_DEFAULTS[chem.name]).scaled(self.capacity_ah))
        self.ocv = ocv or default_ocv_model(chem.name)
        # no hysteresis: the voltage at rest, and under moderate load, does not depend on the path
        self.hysteresis_gap_v = chem.hysteresis_gap_v
        self.filter = BarDeltaFilter(n_cells, self.capacity_ah, params or FilterParams(),
                                     path_free=chem.hysteresis_gap_v == 0.0)
        self.soc0 = soc0
        self.sigma0_given = sigma0_given
        self.check_stored = soc0 is not None      # a given start is checked against the first voltage at rest
        self.t_last = math.nan
        self.t_session = math.nan
        self.park_s = 0.0                        # length of the park before this session (set by restore)
        self.rest_committed = False
        self.notes: list[str] = []
        self.v_mean: np.ndarray | None = None    # gate-window means of the voltage and the overpotential:
        self.eta_mean: np.ndarray | None = None  # a reopened state restarts from their OCV inversion
        self.retire_after = int(retire_after)
        self.update_period_s = float(update_period_s)
        self.t_update = -math.inf                # time of the last voltage update
        self._dt, self._first = 0.0, True         # count()'s sample, for correct()
        self._counted: SocOutput | None = None    # count()'s output: correct()'s too when no update is due
        self.held: SocOutput | None = None        # the last update's output (method, reason, ...) between updates
        self.refused: tuple[int, str] = (0, "")   # the last update's cells refused by the output guard
        self.guard = GuardCounts()
        self.retire_request = ""
        self.learned: LearnedEta | None = None
        self.model_reason = ""
        self.set_model(model, model_reason)

    # -- model management ----------------------------------------------------

    @property
    def path_free(self) -> bool:
        """No hysteresis (the filter's flag: one home)."""
        return self.filter.path_free
    def set_model(self, model: LoadedModel | None, reason: str = "") -> None:
        """Swap the overpotential model (hot reload); the filter state is kept, so the output does not jump."""
        self.learned = LearnedEta(model) if model is not None else None
        self.model_reason = "" if model is not None else (reason or "no model loaded")
        self.guard.consecutive = 0
        self.retire_request = ""
        err = (self.learned or self.ecm).error
        p = self.filter.params
        p.tau_model, p.tau_fast = max(err.tau_model, p.tau_model_min), max(err.tau_fast, p.tau_fast_min)
        p.k_cell, p.k_cell_fast = err.k_cell, err.k_cell_fast

    # -- one step --------------------------------------------------------------
    def _eta(self, t: float, dt: float, current: float, feats: np.ndarray) -> tuple[EtaTerms, str, str, int]:
        if self.learned is None:
            return self.ecm.terms(feats), "classical", self.model_reason, 0
        nn, refused = self.learned.step(dt, current, feats)
        self.refused = refused
        why = self._count_refusals(t, refused, nn.in_domain.size)
        use = nn.in_domain
        n_out = int(self.n - np.count_nonzero(use))
        if n_out == 0:
            return nn, "learned", "", 0
        classical = self.ecm.terms(feats)
        mixed = EtaTerms(eta=np.where(use, nn.eta, classical.eta), sig_slow=np.where(use, nn.sig_slow, classical.sig_slow),
                         sig_fast=np.where(use, nn.sig_fast, classical.sig_fast), in_domain=use, infer_s=nn.infer_s)
        method = "classical" if n_out == self.n else "mixed"
        return mixed, method, why or f"{n_out} cell(s) outside the model's input domain or output range", n_out

    def _count_refusals(self, t: float, refused: tuple[int, str], n: int) -> str:
        """Count a step's cells refused by the output guard; the reason ("" if none); maybe request retirement."""
        n_bad, why = refused
        if not n_bad:
            self.guard.consecutive = 0
            return ""
        g = self.guard
        g.steps += 1
        g.cells += n_bad
        g.consecutive += 1
        g.last_reason, g.last_t = why, t
        if g.consecutive >= self.retire_after and not self.retire_request:
            self.retire_request = f"output guard refused cells in {g.consecutive} consecutive steps (last: {why})"
        return f"{n_bad} cell(s): model output refused: {why}"

    def _start(self, v: np.ndarray, eta: EtaTerms) -> None:
        if self.soc0 is not None:
            self.filter.initialise(np.clip(self.soc0, 0.0, 1.0), self.sigma0_given)
            return
        self.filter.initialise(*self._invert(v, eta))

    def _invert(self, v: np.ndarray, eta: EtaTerms, interval: bool = False) -> tuple[np.ndarray, float]:
        """SOC per cell from the OCV at ``v`` minus the overpotential, with the honest spread of that guess.

        The spread is sigma over the local slope, or with ``interval`` the SOC interval the voltage's
        +-1 sigma maps to. The interval is what a single voltage at rest needs: a short flat stretch of
        the curve next to the estimate (the NMC reference near 90 %) makes the local slope call a good
        inversion 20 % uncertain (7.6 % as an interval). The restart after a reopened state keeps the
        local slope: with the interval, a learned curve's gain on the fleet gate's synthetic unfamiliar
        vehicles fell from 27 % to 16 %.
        """
        # a cell needs its voltage and an overpotential with its error: a first sample without the current
        # (its frame not yet received) has neither, and 0 V inverted is an empty cell, not an unknown one
        finite = np.isfinite(v + eta.eta + eta.sig_slow + eta.sig_fast)
        ocv_v = np.where(finite, v - eta.eta, 0.0)
        s0 = np.where(finite, self.ocv.inverse(ocv_v), np.nan)
        s0 = np.where(np.isfinite(s0), s0, np.nanmean(s0) if np.isfinite(s0).any() else 0.5)
        if not finite.any():
            return s0, self.filter.params.sigma_reset
        terms = self.ocv.terms(s0)
        sig_v = np.sqrt(eta.sig_slow ** 2 + eta.sig_fast ** 2 + terms.sigma ** 2)
        if interval:
            spread = 0.5 * (self.ocv.inverse(ocv_v + sig_v) - self.ocv.inverse(ocv_v - sig_v))
        else:
            spread = sig_v / np.maximum(terms.docv, 1e-3)
        spread = spread[finite & np.isfinite(spread)]
        sig = float(np.median(spread)) if spread.size else self.filter.params.sigma_reset
        return s0, float(np.clip(sig, 0.02, self.filter.params.sigma_reset))

    def _restart_from_ocv(self, v: np.ndarray, eta_v: np.ndarray, eta: EtaTerms, why: str = "",
                          interval: bool = False) -> bool:
        """Start again from the OCV inversion of ``v`` where it is well conditioned and far off; whether it did.

        Used after a reopened state (on the gate window's means) and at a cold
        start's first sample at rest (a given SOC the pack contradicts). On a flat
        OCV or with a large model error the inversion is worth less than the
        filter's state, which then keeps its own estimate.
        """
        s_new, sig_new = self._invert(v, EtaTerms(eta_v, eta.sig_slow, eta.sig_fast, eta.in_domain), interval)
        jump = abs(float(np.mean(s_new)) - float(np.mean(self.filter.cell_soc)))
        p = self.filter.params
        if not (sig_new <= p.reset_sigma_max and jump > max(2.0 * sig_new, p.reset_min_jump)):
            return False
        self.filter.initialise(s_new, sig_new)
        self.filter.events.append(FilterEvent(self.t_last, "soc_restarted_from_ocv",
                                              f"moved {jump * 100:.1f} points, sigma {sig_new * 100:.1f} %{why}"))
        return True

    def _trust(self, current: float, docv: np.ndarray, wake: bool = False) -> tuple[float, bool]:
        """Inflation of the model errors (full trust only in a relaxed rest or at a wake) and whether the sample may gate."""
        p = self.filter.params
        trust = 1.0 if wake else 1.0 + (p.load_trust - 1.0) * math.exp(-self.features.rest_s / p.relax_s)
        limit_c = p.gate_current_c if self.path_free else p.gate_current_path_c
        gate = (abs(current) < limit_c * self.capacity_ah and float(vsum(docv)) >= p.gate_min_docv * docv.size
                and float(vsum(self.features.temp)) >= p.gate_min_temp_c * self.n)   # per cell, last finite value held
        return trust, gate

    def _relaxed(self, gate: bool, band: np.ndarray, wake: bool = False) -> bool:
        """A rest anchor: a long rest (or the wake after a long park), an OCV known to the anchor band, no hysteresis."""
        p = self.filter.params
        return (self.path_free and gate and (wake or self.features.rest_s >= p.rest_anchor_s)
                and float(np.max(band)) <= p.rest_anchor_band_v)

    def _wake_rest(self, current: float) -> bool:
        """The first sample after a park of >= ``rest_anchor_s`` at a key-on load below ``wake_rest_c``: the rest OCV.

        The BMS sleeps while the pack relaxes, so the sample at wake is the best voltage the
        estimator ever gets; the auxiliary load at key-on (~C/100) is above the feature
        pipeline's rest threshold and would otherwise hide it. Used once per wake.
        """
        p = self.filter.params
        wake = self.park_s >= p.rest_anchor_s and abs(current) < p.wake_rest_c * self.capacity_ah
        self.park_s = 0.0
        return wake

    def _check_stored(self, current: float, v: np.ndarray, eta: EtaTerms) -> bool:
        """At a cold start's first sample, at rest: does the pack's voltage contradict the given SOC? Then restart.

        A given start SOC can be far off (a value from another system, an old
        backup): the McMaster-style wrong start. A relaxed voltage that inverts
        well settles it at once, instead of the consistency gate's minutes of
        driving; on LFP's plateau, where it does not invert well, the given SOC
        is reopened instead. Only a cold start's given SOC: the estimator's own
        restored state is better than an unfamiliar cell's family-curve
        inversion (``FilterParams.stored_check_z``).
        """
        if not self.check_stored:
            return False
        self.check_stored = False
        p = self.filter.params
        if not (abs(current) < p.wake_rest_c * self.capacity_ah            # at rest (a NaN current: no check)
                and float(np.mean(self.features.temp)) >= p.gate_min_temp_c):   # cold cells relax for hours
            return False
        ocv = self.ocv.terms(self.filter.cell_soc)
        resid = float(np.nanmean(v - eta.eta - ocv.ocv))
        spread = float(np.nanmean(np.sqrt(eta.sig_slow ** 2 + eta.sig_fast ** 2 + ocv.sigma ** 2)))
        if not abs(resid) > p.stored_check_z * spread:   # the stored SOC explains the voltage well enough
            return False
        why = f": the voltage at rest is {resid * 1e3:+.0f} mV off the stored SOC's OCV (spread {spread * 1e3:.0f} mV)"
        if self._restart_from_ocv(v, eta.eta, eta, why, interval=True):
            return True
        if not self.path_free:
            # LFP: the voltage contradicts the given SOC but the plateau cannot say where it is: start from
            # what the voltage allows (a posterior over the whole curve, not one linear step from the wrong
            # SOC), with its own, wide sigma; the rests and knees that follow move it
            return self._restart_from_posterior(v, eta, "stored SOC" + why)
        return False

    def _restart_from_posterior(self, v: np.ndarray, eta: EtaTerms, why: str) -> bool:
        """Start each cell from the mean and spread of its SOC given one voltage at rest, on a flat prior.

        A linear update from the contradicted SOC takes the local slope there for the whole curve:
        on LFP's plateau, with a 69 mV innovation 30 points from the truth, the local slope put the
        restart 11 points past it with a 7 % sigma (eval: 60 % stored as 30 %, 12.6 % RMSE). The
        grid posterior sees every SOC the curve, its band and the unknown hysteresis branch allow.
        """
        p = self.filter.params
        g = POSTERIOR_GRID
        t = self.ocv.terms(g)
        ocv_v = (v - eta.eta)[:, None]
        var = ((eta.sig_slow ** 2 + eta.sig_fast ** 2)[:, None] + (t.sigma ** 2)[None, :]
               + (0.5 * self.hysteresis_gap_v) ** 2)
        ll = -0.5 * (ocv_v - t.ocv[None, :]) ** 2 / var - 0.5 * np.log(var)
        ok = np.all(np.isfinite(ll), axis=1)
        if not ok.any():
            return False
        w = np.exp(ll[ok] - np.max(ll[ok], axis=1, keepdims=True))
        w /= np.sum(w, axis=1, keepdims=True)
        mean = w @ g
        sig = float(np.median(np.sqrt(np.maximum(w @ (g * g) - mean * mean, 0.0))))
        soc = np.full(self.n, float(np.mean(mean)))
        soc[ok] = mean
        sig = min(max(sig, 0.02), p.sigma_reset)
        jump = float(np.mean(soc)) - float(np.mean(self.filter.cell_soc))
        self.filter.initialise(soc, sig)
        self.filter.events.append(FilterEvent(self.t_last, "soc_restarted_from_ocv",
                                              f"{why}; moved {jump * 100:+.1f} points, sigma {sig * 100:.1f} %"))
        return True

    def _track_means(self, dt: float, v: np.ndarray, eta: np.ndarray) -> None:
        a = min(dt / self.filter.params.gate_tau, 1.0) if self.v_mean is not None else 1.0
        self.v_mean = v.copy() if self.v_mean is None else self.v_mean + a * (v - self.v_mean)
        self.eta_mean = eta.copy() if self.eta_mean is None else self.eta_mean + a * (eta - self.eta_mean)

    def step(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> SocOutput:
        """Advance to time ``t`` with one measurement sample (NaN values are skipped, never integrated)."""
        self.count(t, current, output=False)
        return self.correct(t, current, cell_v, cell_t)

    def count(self, t: float, current: float, output: bool = True) -> SocOutput | None:
        """The first half of :meth:`step`: Coulomb counting to ``t``, and the SOC that gives.

        :meth:`correct` must follow with the same sample. A caller that publishes
        this before the correction (the running graph) has its estimate out
        without waiting for the voltage update and model inference; the state
        is :meth:`step`'s, and an update's correction shows one sample later.
        None before the first correction (the start needs the voltage), or without ``output``.
        """
        first = not math.isfinite(self.t_last)
        self._dt = 0.0 if first else max(t - self.t_last, 0.0)
        self._first = first
        self.t_last = t
        if first:
            self.t_session = t
        if self._dt > 0 and math.isfinite(current):
            self.filter.predict(self._dt, current)
        self._counted = None if self.held is None or not output else self._held_output(t)
        return self._counted

    def correct(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> SocOutput:
        """The second half of :meth:`step` after :meth:`count`: features, and the voltage update when one is due."""
        v = np.asarray(cell_v, dtype=np.float64)
        dt, first = self._dt, self._first
        soc_prior = self.filter.cell_soc
        feats = self.features.update(t, current, cell_t, soc_prior)
        self.ecm.advance(dt, current, feats)
        if t - self.t_update < self.update_period_s and self.held is not None:
            return self._between_updates(t)
        if math.isfinite(self.t_update):
            dt = t - self.t_update   # the update sees the time since the last update
        self.t_update = t
        eta, method, reason, n_out = self._eta(t, dt, current, feats)
        wake = self._wake_rest(current)
        if t - self.t_session < WARMUP_S and not wake:
            eta.sig_fast = eta.sig_fast * WARMUP_FACTOR
            eta.sig_slow = eta.sig_slow * WARMUP_FACTOR
        n_events = len(self.filter.events)
        if first:
            self._start(v, eta)
        restarted = self._check_stored(current, v, eta)
        ocv = self.ocv.terms(self.filter.cell_soc if first or restarted else soc_prior)
        self._track_means(dt, v, eta.eta)
        trust, gate = self._trust(current, ocv.docv, wake)
        self.filter.update(t, dt, FilterInput(v, eta.eta, eta.sig_slow, eta.sig_fast, ocv.ocv, ocv.docv, ocv.sigma,
                                              trust=trust, gate=gate,
                                              relaxed=self._relaxed(gate, ocv.sigma, wake)))
        if any(e.kind == "soc_reopened" for e in self.filter.events[n_events:]):
            self._restart_from_ocv(self.v_mean, self.eta_mean, eta)
        self._field_learning()
        f = self.filter
        cell_soc, cell_sigma = f.cell_soc, f.cell_sigma
        self.held = SocOutput(stamp=t, soc=float(vsum(cell_soc)) / self.n, sigma=float(vsum(cell_sigma)) / self.n,
                              cell_soc=cell_soc, cell_sigma=cell_sigma, method=method, fallback_reason=reason,
                              ood_cells=n_out, infer_s=eta.infer_s, offset_a=f.offset_c * self.capacity_ah,
                              capacity_factor=f.capacity_factor,
                              events=[f"{e.kind}: {e.detail}" for e in f.events[n_events:]])
        return self.held

    def _between_updates(self, t: float) -> SocOutput:
        """A sample between voltage updates: the counted SOC, everything else as the last update said.

        A refusal of the output guard holds until the next update, so it counts for this sample too:
        retirement comes after ``retire_after`` samples whatever the update period.
        """
        if self.guard.consecutive:
            self._count_refusals(t, self.refused, self.n)
        # the filter has not moved since count(): its output, when it built one, stands
        return self._counted if self._counted is not None else self._held_output(t)

    def _held_output(self, t: float) -> SocOutput:
        """The filter's SOC now, with what the last update said about the rest (method, reason, offset, ...)."""
        f, h = self.filter, self.held
        cell_soc, cell_sigma = f.cell_soc, f.cell_sigma
        return SocOutput(stamp=t, soc=float(vsum(cell_soc)) / self.n, sigma=float(vsum(cell_sigma)) / self.n,
                         cell_soc=cell_soc, cell_sigma=cell_sigma, method=h.method, fallback_reason=h.fallback_reason,
                         ood_cells=h.ood_cells, infer_s=h.infer_s, offset_a=h.offset_a, capacity_factor=h.capacity_factor)

    def _field_learning(self) -> None:
        rest = self.features.rest_s
        if rest < COMMIT_REST_S:
            self.rest_committed = False
            return
        if self.rest_committed or self.t_last - self.t_session < COMMIT_AFTER_S:
            return
        f = self.filter
        s = float(np.clip(f.x[S], 0.0, 1.0))
        band = float(self.ocv.terms(np.array([s])).sigma[0])
        self.ocv.commit(s, band * f.x[E_OCV], band * band * f.P[E_OCV, E_OCV])
        f.x[E_OCV] = 0.0
        f.P[E_OCV, :] = 0.0
        f.P[:, E_OCV] = 0.0
        f.P[E_OCV, E_OCV] = 1.0
        self.rest_committed = True

    # -- persistence -------------------------------------------------------------
    def state(self) -> dict:
        """Everything the next power cycle needs (JSON-serialisable)."""
        return {"chemistry": self.chemistry, "capacity_ah": self.capacity_ah,
                "filter": self.filter.to_dict(self.t_last), "features": self.features.state(),
                "ocv": self.ocv.state()}

    def restore(self, d: dict, t_now: float) -> str:
        """Continue from ``state()`` at the first sample time ``t_now``; '' or why (then a cold start)."""
        if d.get("chemistry") != self.chemistry or not math.isclose(float(d.get("capacity_ah", -1)), self.capacity_ah):
            return "stored estimator state is for another chemistry or capacity"
        why = self.filter.restore(d.get("filter", {}), t_now)
        if why:
            return why
        self.features.restore(d.get("features", {}), t_now)
        self.ecm.reset()
        self.t_last = t_now - 1e-3  # not a first step: no re-initialisation
        self.t_update = -math.inf   # the wake's sample is an update
        self.t_session = t_now
        t_saved = float(d.get("filter", {}).get("t", math.nan))
        self.park_s = t_now - t_saved if math.isfinite(t_saved) else 0.0
        self.notes = [n for n in (self.ocv.restore(d.get("ocv", {})),) if n]  # not fatal: reported only
        return ""
