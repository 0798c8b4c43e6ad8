"""SOC estimator: NN (ONNX) as the measurement of a Kalman filter whose process model is Coulomb counting.

Per cell, scalar filter:  predict  SOC += I dt / (3600 Q),  P += q dt
                          update   z = NN(features), R = (k * sigma_NN)^2 + r_floor
The NN gives absolute SOC (no drift, knows the initial SOC); Coulomb counting
gives smoothness. The NN reports its own sigma (large on the LFP plateau), so
the filter leans on Coulomb counting exactly where the voltage says little.
An EKF on a 1-RC ECM runs alongside as baseline and fallback: it takes over
(with the reason reported) when no valid model is loaded, a cell's features
leave the model's training domain, or the model's output guard refuses a
cell's output (non-finite, outside the declared range); a model refused for
``retire_after`` steps in a row is retired (see ``SocEstimator``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry.ocv import load_ocv
from bms_ai.estimation.coulomb import CoulombCounter
from bms_ai.estimation.ekf import BatchedEKF, ECMParams
from bms_ai.estimation.features import FEATURE_VERSION, N_SOC_FEATURES, SocFeatures, in_domain
from bms_ai.models.runtime import LoadedModel


@dataclass
class FusionParams:
    """Tuning of the NN+CC filter (process noise, NN trust, wrong-state detector, warm-up)."""

    q_soc: float = 2e-9          # SOC^2/s: current-sensor offset and capacity error
    r_scale: float = 3.0         # inflates NN sigma: 10 Hz NN errors are strongly correlated
    r_floor: float = 1e-5        # SOC^2
    sigma0: float = 0.3          # initial SOC sigma when nothing is known
    sigma0_given: float = 0.03   # initial sigma when an initial SOC is supplied (stored value)
    reinit_threshold: float = 0.1  # |NN - state| averaged over reinit_tau s beyond this: state is wrong, reopen P
    reinit_tau: float = 60.0
    domain_margin: float = 0.1
    max_sigma_nn: float = 0.5
    warmup_s: float = 60.0       # feature EMAs start from an assumed steady state: NN not trusted before

    @classmethod
    def from_dict(cls, d: dict) -> FusionParams:
        """From a manifest's ``extra.fusion``; keys that are not parameters are ignored."""
        return cls(**{k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__})


@dataclass
class SocOutput:
    """One SOC step: pack and per-cell SOC with sigma, the method used and why, and the side filters."""

    stamp: float
    soc: float
    sigma: float
    cell_soc: np.ndarray
    cell_sigma: np.ndarray
    method: str                   # "nn+cc" | "ekf" | "mixed"
    fallback_reason: str = ""
    ood_cells: int = 0
    infer_s: float = float("nan")
    ekf_soc: np.ndarray = field(default_factory=lambda: np.empty(0))
    cc_soc: np.ndarray = field(default_factory=lambda: np.empty(0))
    nn_soc: np.ndarray = field(default_factory=lambda: np.empty(0))   # raw NN measurement (NaN: not used)


# the outputs the filter reads, in order, with the span a sane model stays in (the output guard's range
# where a manifest declares none): SOC a little beyond 0..1, sigma up to ten times the whole range
SOC_OUTPUTS = {"soc": (-0.1, 1.1), "sigma": (0.0, 10.0)}
RETIRE_AFTER = 50     # consecutive steps with refused model outputs before the model is retired (5 s at 10 Hz)


def soc_model_expectation() -> dict:
    """What a SOC model must declare to be loaded: this pipeline's feature version and width, its outputs."""
    return {"feature_version": FEATURE_VERSION, "n_features": N_SOC_FEATURES, "outputs": SOC_OUTPUTS}


@dataclass
class GuardCounts:
    """What the output guard refused in this estimator, kept across model swaps (the diagnostics report it)."""

    steps: int = 0                 # steps with at least one refused cell
    cells: int = 0                 # refused cell-steps
    consecutive: int = 0           # steps in a row with refused cells (retirement counts these)
    last_reason: str = ""
    last_t: float = float("nan")   # stamp of the last step with refused cells
    retirements: int = 0

    def values(self) -> dict[str, int | str]:
        """Diagnostic key-values."""
        return {"guard_rejected_steps": self.steps, "guard_rejected_cells": self.cells,
                "guard_consecutive": self.consecutive, "guard_last_reason": self.last_reason,
                "guard_retirements": self.retirements}


class SocEstimator:
    """Per-cell batched SOC (pack SOC = mean of cells); step() once per measurement sample.

    Every inference goes through the model's output guard: refused cells
    follow the EKF for that step. After ``retire_after`` consecutive steps
    with refused cells the estimator sets ``retire_request`` (the reason);
    the owner of the model registry (``PackEstimator``) retires the model and
    hands over the fallback. ``retire_after`` is not a ``FusionParams`` field
    on purpose: a model's manifest tunes those, and a model must not be able
    to postpone its own retirement.
    """

    def __init__(self, n_cells: int, n_temps: int, chemistry: str, capacity_ah: float,
                 model: LoadedModel | None = None, ecm: ECMParams | None = None,
                 fusion: FusionParams | None = None, soc0: float | np.ndarray | None = None,
                 model_reason: str = "no model loaded", retire_after: int = RETIRE_AFTER) -> None:
        self.n = n_cells
        self.chemistry = chemistry
        self.capacity_ah = float(capacity_ah)
        self._fusion_given = fusion is not None
        self.fusion = fusion or FusionParams()
        self.features = SocFeatures(n_cells, n_temps, capacity_ah)
        ecm = ecm or ECMParams(capacity_ah=capacity_ah)
        ecm.capacity_ah = self.capacity_ah
        self.ocv = load_ocv(chemistry)
        self.ekf = BatchedEKF(n_cells, chemistry, ecm, soc0=0.5, ocv=self.ocv)
        self.cc = CoulombCounter(capacity_ah, 0.5, n_cells)
        self.soc = np.full(n_cells, 0.5)
        self.P = np.full(n_cells, self.fusion.sigma0 ** 2)
        self.soc0 = soc0
        self.innov = np.zeros(n_cells)
        self.t_last = float("nan")
        self.t_start = float("nan")
        self._sigma_scale = 1.0
        self.retire_after = int(retire_after)
        self.guard = GuardCounts()
        self.retire_request = ""
        self.model: LoadedModel | None = None
        self.model_reason = ""
        self.set_model(model, model_reason)

    # -- model management -------------------------------------------------
    def set_model(self, model: LoadedModel | None, reason: str = "") -> None:
        """Swap the model (hot reload); filter state is kept, so the output does not jump."""
        self.model = model
        self.model_reason = "" if model is not None else (reason or "no model loaded")
        self.guard.consecutive = 0
        self.retire_request = ""
        if model is not None:
            # sigma calibration from training (90 % coverage on validation drives)
            self._sigma_scale = float(model.entry.extra.get("sigma_scale", 1.0))
            # filter tuning found on the model's validation drives (bms_ai.training.tune)
            tuned = model.entry.extra.get("fusion", {})
            if tuned and not self._fusion_given:
                self.fusion = FusionParams.from_dict({**self.fusion.__dict__, **tuned})
            domain = model.entry.domain
            self._domain_min = np.asarray(domain.get("min", [-np.inf] * N_SOC_FEATURES), dtype=np.float32)
            self._domain_max = np.asarray(domain.get("max", [np.inf] * N_SOC_FEATURES), dtype=np.float32)

    # -- main cycle -------------------------------------------------------
    def _initialise(self, v: np.ndarray) -> None:
        if self.soc0 is not None:
            s0 = np.broadcast_to(np.asarray(self.soc0, dtype=np.float64), (self.n,)).copy()
            sig = self.fusion.sigma0_given
        else:
            # no stored SOC: inverse OCV of the first voltage (rough under load, hence the wide sigma)
            s0 = np.where(np.isfinite(v), self.ocv.inverse(np.nan_to_num(v)), 0.5)
            sig = self.fusion.sigma0
        self.soc[:] = s0
        self.P[:] = sig ** 2
        self.ekf.soc[:] = s0
        self.ekf.P00[:] = sig ** 2
        self.cc.soc[:] = s0

    def step(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> SocOutput:
        """One measurement sample (current > 0 charging); a failing model never stops the estimate."""
        v = np.asarray(cell_v, dtype=np.float64)
        if not np.isfinite(self.t_last):
            self._initialise(v)
            self.t_start = t
            dt = 0.0
        else:
            dt = t - self.t_last
            if not np.isfinite(dt) or dt < 0:
                dt = 0.0
        self.t_last = t
        feats = self.features.update(t, current, v, cell_t)
        current_ok = np.isfinite(current)
        if dt > 0 and current_ok:
            self.ekf.step(current, v, dt)
            self.cc.step(current, dt)
            self.soc = self.soc + current * dt / (3600.0 * self.capacity_ah)
            self.P = self.P + self.fusion.q_soc * dt
        elif dt > 0:
            self.P = self.P + 1e-6 * dt  # unknown current: SOC held, uncertainty grows fast
        method, reason, n_ood, infer = "ekf", self.model_reason, 0, float("nan")
        nn_soc = np.full(self.n, np.nan)
        if self.model is not None:
            method, reason, n_ood, infer, nn_soc = self._fuse(t, dt, feats)
        else:
            self.soc[:] = self.ekf.soc
            self.P[:] = self.ekf.P00
        self.soc = np.clip(self.soc, 0.0, 1.0)
        cell_sigma = np.sqrt(np.maximum(self.P, 0.0))
        return SocOutput(stamp=t, soc=float(np.mean(self.soc)), sigma=float(np.mean(cell_sigma)),
                         cell_soc=self.soc.copy(), cell_sigma=cell_sigma, method=method,
                         fallback_reason=reason, ood_cells=n_ood, infer_s=infer,
                         ekf_soc=self.ekf.soc.copy(), cc_soc=self.cc.soc.copy(), nn_soc=nn_soc)

    def _infer(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
        """NN SOC, sigma and the guard's per-cell verdict; refused cells get placeholder values, never NaN."""
        outs, verdict = self.model.run_guarded(np.nan_to_num(feats))
        ok, why = verdict.ok, verdict.reason
        if len(outs) < len(SOC_OUTPUTS):   # loaded without this pipeline's expectation (which demands both)
            ok, why = np.zeros(self.n, dtype=bool), why or f"{len(outs)} model output(s), the filter reads {list(SOC_OUTPUTS)}"
        if not ok.any():
            return np.full(self.n, 0.5), np.full(self.n, self.fusion.max_sigma_nn), ok, why
        z = outs[0].reshape(self.n, -1)[:, 0].astype(np.float64)
        sig = outs[1].reshape(self.n, -1)[:, 0].astype(np.float64)
        if not verdict.all_ok:
            z = np.where(ok, z, 0.5)
            sig = np.where(ok, sig, self.fusion.max_sigma_nn)
        return z, sig, ok, why

    def _count_refusals(self, t: float, ok: np.ndarray, why: str) -> str:
        """Count this step's refused cells; the fallback reason for them ("" if none); maybe request retirement."""
        n_bad = int(self.n - np.count_nonzero(ok))
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

    def _fuse(self, t: float, dt: float, feats: np.ndarray) -> tuple[str, str, int, float, np.ndarray]:
        """NN measurement update of the NN+CC filter; refused and out-of-domain cells follow the EKF.

        Returns method, fallback reason, out-of-domain cells, inference time and the NN SOC used (NaN: not used).
        """
        f = self.fusion
        valid = np.isfinite(feats).all(axis=1)
        in_dom = valid & in_domain(feats, self._domain_min, self._domain_max, f.domain_margin)
        n_ood = int(self.n - in_dom.sum())
        t0 = time.perf_counter()
        z, sig, ok, why = self._infer(feats)
        infer = time.perf_counter() - t0
        warm = t - self.t_start >= f.warmup_s
        trusted = in_dom & ok if warm else np.zeros(self.n, dtype=bool)
        sig = np.clip(sig * self._sigma_scale, 1e-3, f.max_sigma_nn)
        meas_var = (f.r_scale * sig) ** 2 + f.r_floor
        zc = np.clip(z, 0.0, 1.0)
        # wrong-state detector: a persistent NN disagreement far beyond the NN's own error
        # (a bad stored SOC, a missed charge while asleep) reopens the covariance
        a = min(dt / f.reinit_tau, 1.0) if dt > 0 else 0.0
        self.innov = np.where(trusted, self.innov + a * (zc - self.soc - self.innov), self.innov)
        wrong = trusted & (np.abs(self.innov) > f.reinit_threshold)
        if wrong.any():
            self.P[wrong] = np.maximum(self.P[wrong], f.sigma0 ** 2)   # as if nothing were known
            self.innov[wrong] = 0.0
        gain = np.where(trusted, self.P / (self.P + meas_var), 0.0)
        self.soc = self.soc + gain * (zc - self.soc)
        self.P = (1.0 - gain) * self.P
        refused = self._count_refusals(t, ok, why)
        reason = "; ".join(([f"{n_ood} cell(s) outside model input domain"] if warm and n_ood else [])
                           + ([refused] if refused else []))
        if not warm:   # the NN is not used yet (Coulomb counting from the start): refusals are only counted
            return "nn+cc", reason, n_ood, infer, np.where(trusted, zc, np.nan)
        # cells outside the training domain or with a refused output follow the EKF (and restart from it later)
        n_bad = self.n - int(np.count_nonzero(trusted))
        if n_bad:
            self.soc[~trusted] = self.ekf.soc[~trusted]
            self.P[~trusted] = self.ekf.P00[~trusted]
        method = "nn+cc" if not n_bad else "ekf" if n_bad == self.n else "mixed"
        return method, reason, n_ood, infer, np.where(trusted, zc, np.nan)
