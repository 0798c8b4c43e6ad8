"""Overpotential models: what the cell voltage adds to the OCV, with an honest error.

Two implementations behind one small interface (``step`` -> ``EtaTerms``):
- ``LearnedEta``: the ONNX model trained by `bms-ai train soc` on many cell
  parameter sets; it outputs eta and its own state-dependent sigma, which the
  model's manifest entry splits into a slow (bias-like) and a fast part
  measured on validation drives (``ErrorModel``);
- ``EcmEta``: the classical first-order RC equivalent circuit with Arrhenius
  temperature scaling and one-state hysteresis, the fallback when no valid
  model is loaded (and the measurement model of the EKF baseline's kind).
The filter turns either into SOC corrections weighted by these sigmas.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from bms_ai.estimation.features import EtaFeatures, domain_limits
from bms_ai.models.runtime import LoadedModel

T_REF_K = 298.15


@dataclass
class ErrorModel:
    """How the model's sigma splits into a slow and a fast part (measured on validation drives).

    sigma_slow = slow_scale * sigma_model + slow_floor; sigma_fast likewise.
    ``tau_model`` / ``tau_fast``: correlation times of the two parts [s].
    """

    slow_scale: float = 0.7
    slow_floor: float = 0.002
    fast_scale: float = 0.7
    fast_floor: float = 0.001
    tau_model: float = 1800.0
    tau_fast: float = 20.0
    k_cell: float = 0.5
    k_cell_fast: float = 0.3

    @classmethod
    def from_dict(cls, d: dict) -> ErrorModel:
        """From a manifest entry's ``extra["error_model"]`` (unknown keys ignored)."""
        return cls(**{k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__})

    def to_dict(self) -> dict:
        """For the manifest entry."""
        return asdict(self)


@dataclass
class EtaTerms:
    """Overpotential and its error split, per cell."""

    eta: np.ndarray
    sig_slow: np.ndarray
    sig_fast: np.ndarray
    in_domain: np.ndarray            # cells whose inputs are inside the model's training range
    infer_s: float = math.nan


@dataclass
class EcmParams:
    """First-order RC circuit per cell group at 25 degC, with Arrhenius scaling of the resistances."""

    r0: float = 0.0025              # ohm, series group of the reference pack (50 Ah)
    r1: float = 0.0015
    tau: float = 60.0               # s
    activation_k: float = 3500.0    # Ea/R [K]: resistance x exp(k (1/T - 1/T_ref))
    hysteresis_v: float = 0.0       # half the charge/discharge OCV gap [V] (LFP ~0.01)
    # honest error of this crude model [V]: small at rest, growing with current (now and recent)
    # and with the Arrhenius factor (cold cells), so the fallback never pulls hard where it is wrong
    sigma_rest: float = 0.004
    sigma_per_c: float = 0.03       # per C of recent (10 min) current
    sigma_fast_rest: float = 0.002
    sigma_fast_per_c: float = 0.02  # per C of present current
    error: ErrorModel = field(default_factory=lambda: ErrorModel(tau_model=900.0, tau_fast=30.0))

    def scaled(self, capacity_ah: float, reference_ah: float = 50.0) -> EcmParams:
        """The same cell chemistry in another capacity: resistances scale inversely."""
        k = reference_ah / capacity_ah
        return EcmParams(self.r0 * k, self.r1 * k, self.tau, self.activation_k, self.hysteresis_v,
                         self.sigma_rest, self.sigma_per_c, self.sigma_fast_rest, self.sigma_fast_per_c, self.error)


class EcmEta:
    """Classical overpotential: R0 I + RC branch + hysteresis, resistances scaled with temperature."""

    name = "ecm"

    def __init__(self, n_cells: int, params: EcmParams) -> None:
        self.p = params
        self.v1 = np.zeros(n_cells)
        self.error = params.error
        self._arr = np.ones(n_cells)
        self._temp: np.ndarray | None = None   # the temperatures ``_arr`` was computed for
        self._i = 0.0

    def reset(self) -> None:
        """Forget the RC branch (a restart after a park: the branch has relaxed)."""
        self.v1[:] = 0.0

    def advance(self, dt: float, current: float, feats: np.ndarray) -> None:
        """Move the RC branch on (every step, so a fallback takes over from a live state)."""
        temp = feats[:, 7]
        if self._temp is None or (temp != self._temp).any():   # temperatures change far slower than the samples
            temp_k = temp.astype(np.float64) + 273.15
            self._arr = np.exp(self.p.activation_k * (1.0 / np.minimum(np.maximum(temp_k, 233.0), 343.0) - 1.0 / T_REF_K))
            self._temp = temp.copy()
        self._i = current if math.isfinite(current) else 0.0
        if dt > 0:
            a = math.exp(-dt / self.p.tau)
            self.v1 = a * self.v1 + (1.0 - a) * self.p.r1 * self._arr * self._i

    def terms(self, feats: np.ndarray) -> EtaTerms:
        """eta per cell at the state of the last ``advance``, with its state-dependent error."""
        p, arr = self.p, self._arr
        eta = p.r0 * arr * self._i + self.v1 + p.hysteresis_v * feats[:, 9]
        cold = np.sqrt(arr)
        sig_slow = (p.sigma_rest + p.sigma_per_c * feats[:, 6].astype(np.float64)) * cold
        sig_fast = (p.sigma_fast_rest + p.sigma_fast_per_c * abs(float(feats[0, 0]))) * cold
        return EtaTerms(eta, sig_slow, sig_fast, np.ones(len(eta), bool))

    def step(self, dt: float, current: float, feats: np.ndarray) -> EtaTerms:
        """``advance`` then ``terms``."""
        self.advance(dt, current, feats)
        return self.terms(feats)


class LearnedEta:
    """The trained overpotential model (ONNX: features -> eta, sigma)."""

    name = "nn"

    def __init__(self, model: LoadedModel, domain_margin: float = 0.1) -> None:
        self.model = model
        extra = model.entry.extra
        self.error = ErrorModel.from_dict(extra.get("error_model", {}))
        self.sigma_max = float(extra.get("sigma_max_v", 0.2))
        dom = model.entry.domain
        n = model.entry.inputs[0].shape[-1] if model.entry.inputs else 0
        # the training range widened by the margin: what counts as inside the model's domain
        self.lo_m, self.hi_m = domain_limits(np.asarray(dom.get("min", [-np.inf] * n), dtype=np.float32),
                                             np.asarray(dom.get("max", [np.inf] * n), dtype=np.float32), domain_margin)

    def reset(self) -> None:
        """Nothing to forget: the model is stateless (its history is in the features)."""

    def step(self, dt: float, current: float, feats: np.ndarray) -> tuple[EtaTerms, tuple[int, str]]:
        """Run the model on every cell's features through its output guard; never raises.

        Returns the terms (refused cells are out of domain, so the caller uses
        the ECM for them) and (number of refused cells, the guard's reason).
        """
        t0 = time.perf_counter()
        # one reduction in the usual case (the ufunc itself: ndarray.sum adds a Python frame every cycle)
        x = feats if math.isfinite(np.add.reduce(feats, axis=None)) else np.nan_to_num(feats)
        outs, verdict = self.model.run_guarded(x)
        infer = time.perf_counter() - t0
        n = feats.shape[0]
        good, why = verdict.ok, verdict.reason
        if len(outs) < 2:   # loaded without this pipeline's expectation (which demands both outputs)
            good, why = np.zeros(n, dtype=bool), why or f"{len(outs)} model output(s), the filter reads eta and sigma"
        if not good.any():
            nan = np.full(n, np.nan)
            return EtaTerms(eta=nan, sig_slow=nan, sig_fast=nan, in_domain=good, infer_s=infer), (n, why)
        eta = outs[0].reshape(-1).astype(np.float64)
        sigma = np.minimum(np.maximum(outs[1].reshape(-1).astype(np.float64), 1e-4), self.sigma_max)  # NaN stays NaN
        ok = good & (np.abs(eta) < 2.0) & np.isfinite(sigma)   # |NaN| < 2 is False
        inside = (feats >= self.lo_m) & (feats <= self.hi_m)
        # every cell inside the domain (the usual case) is one reduction; the per-cell answer only otherwise
        dom = ok if np.logical_and.reduce(inside, axis=None) else ok & inside.all(axis=-1)
        e = self.error
        terms = EtaTerms(eta=eta if ok.all() else np.where(ok, eta, np.nan), sig_slow=e.slow_scale * sigma + e.slow_floor,
                         sig_fast=e.fast_scale * sigma + e.fast_floor, in_domain=dom, infer_s=infer)
        return terms, (int(n - np.count_nonzero(good)), why)


def make_features(n_cells: int, n_temps: int, capacity_ah: float, hysteresis_rate: float) -> EtaFeatures:
    """The one feature pipeline both models read (the ECM uses temperature and hysteresis from it)."""
    return EtaFeatures(n_cells, n_temps, capacity_ah, hysteresis_rate)
