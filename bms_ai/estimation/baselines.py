"""The SOC methods `bms-ai evaluate` compares: one contract, the classical baselines and the shipped estimator.

Every method, shipped or baseline, runs through the same harness on the same inputs:

    m = METHODS.get(name)(pack, setup)        # a fresh object at every session start
    m.start(first_t, stored, soc_stored)      # stored: m's own blob from the last stop (None at first)
    soc = m.step(t, current, cell_v, cell_t)  # every sample -> (n,) cell SOC
    blob = m.stop()                           # session end: all m carries into the next session

``soc_stored`` is what a BMS stored before the first sample (the drive's meta; the
oracle gets the true SOC instead, ``oracle_start``). A method may also implement
``run`` (a whole session at once, vectorised); it must give what stepping gives.
``capacity_ah()`` is the method's per-cell capacity estimate (SOH), None if it has none.

Adding a method: subclass ``Method`` (``start``/``step``/``stop``; ``name``), constructor
``(pack: PackInfo, setup: EvalSetup)``, and register it: ``METHODS.add("mine", "pkg.mod:Mine", "...")``.
"""

from __future__ import annotations

import functools
import inspect
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.core.registry import Registry
from bms_ai.estimation.coulomb import clamped_path, soc_increments
from bms_ai.estimation.ekf import DEFAULT_ECM, EcmEKF, EcmTable


@dataclass(frozen=True)
class PackInfo:
    """What every method may know about the pack in one run (never the truth)."""

    chemistry: str
    capacity_ah: float          # design capacity per cell (series group)
    n_cells: int
    n_temps: int
    ocv: OCVCurve               # the OCV table every method is given in this run
    ocv_source: str = "chemistry"

    @property
    def temp_index(self) -> np.ndarray:
        """The temperature sensor each cell reads (sensors spread evenly over the string)."""
        return (np.arange(self.n_cells) * self.n_temps) // self.n_cells


@dataclass
class EvalSetup:
    """What the methods share in one evaluation: the model directory and the EKF's identified ECM."""

    model_dir: Path | None = None            # None: no models (the shipped estimator runs its fallback)
    ecm: dict[str, EcmTable] = field(default_factory=dict)    # chemistry -> identified table
    rate_hz: float = 0.0                     # every method sees the drive resampled to this rate (0: as recorded)

    def ecm_for(self, chemistry: str) -> EcmTable:
        """The identified table, else the chemistry default (labelled as not identified)."""
        return self.ecm.get(chemistry) or default_ecm(chemistry)


def default_ecm(chemistry: str) -> EcmTable:
    """The chemistry default ECM with the chemistry's published hysteresis (no identification)."""
    chem = get_chemistry(chemistry)
    tab = EcmTable.from_params(DEFAULT_ECM.get(chem.name, DEFAULT_ECM["nmc"]), source="chemistry default (not identified)")
    tab.m_hyst = chem.hysteresis_gap_v / 2.0
    tab.kappa_hyst = chem.hysteresis_rate or tab.kappa_hyst
    return tab


def pack_state(**arrays) -> bytes:
    """A method's stored state as bytes (npz: no pickles, what an embedded BMS could keep)."""
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})
    return buf.getvalue()


def unpack_state(blob: bytes) -> dict[str, np.ndarray]:
    """The arrays of ``pack_state``."""
    with np.load(io.BytesIO(blob), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


class Method:
    """Base of every evaluated method: the contract, and ``run`` as a loop over ``step``."""

    name = "method"
    oracle_start = False        # True: the first session starts from the true SOC instead of the stored one

    def __init__(self, pack: PackInfo, setup: EvalSetup) -> None:
        self.pack = pack
        self.setup = setup

    def start(self, first_t: float, stored: bytes | None, soc_stored: np.ndarray) -> None:
        """Session start: from ``stored`` (this method's own last blob), else from ``soc_stored``."""
        raise NotImplementedError

    def step(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """One measurement sample -> (n,) cell SOC."""
        raise NotImplementedError

    def stop(self) -> bytes:
        """Session end: everything this method keeps while the vehicle sleeps."""
        raise NotImplementedError

    def run(self, t: np.ndarray, current: np.ndarray, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """A whole session's samples -> (T, n); vectorised methods override it (same result as stepping)."""
        out = np.empty((len(t), self.pack.n_cells))
        for k in range(len(t)):
            out[k] = self.step(float(t[k]), float(current[k]), cell_v[k], cell_t[k])
        return out

    def capacity_ah(self) -> np.ndarray | None:
        """Per-cell capacity estimate (SOH output), None for a method without one."""
        return None

    def info(self) -> dict:
        """What the report states about this method in this run (source of parameters, fallbacks)."""
        return {}


# -- Coulomb counting ------------------------------------------------------------


class CoulombCounting(Method):
    """Plain Coulomb counting on the design capacity, clipped to [0, 1] like a BMS display.

    ``cc_stored`` starts from the stored SOC (what a plain BMS has after a shutdown and
    what drifts with a current offset); ``cc_oracle`` starts from the true SOC of the first
    sample and is never corrected: the best any open-loop method can do on a drive without
    sensor errors (Ng et al., "Enhanced coulomb counting method for estimating
    state-of-charge and state-of-health of lithium-ion batteries", Applied Energy 86 (2009)).
    """

    name = "cc_stored"

    def start(self, first_t: float, stored: bytes | None, soc_stored: np.ndarray) -> None:
        """From the stored blob, else the stored (oracle: true) SOC."""
        s = unpack_state(stored) if stored is not None else {}
        self.soc = np.array(s.get("soc", np.broadcast_to(soc_stored, (self.pack.n_cells,))), dtype=np.float64)
        self.t_last = float("nan")          # no current is measured while parked: the first sample adds nothing

    def run(self, t: np.ndarray, current: np.ndarray, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """Vectorised: clipped cumulative sums (``clamped_path``)."""
        if len(t) == 0:
            return np.empty((0, self.pack.n_cells))
        inc = soc_increments(t, current, np.full(self.pack.n_cells, self.pack.capacity_ah), t_prev=self.t_last)
        out = np.column_stack([clamped_path(self.soc[c], inc[:, c]) for c in range(self.pack.n_cells)])
        self.soc = out[-1].copy()
        self.t_last = float(t[-1])
        return out

    def step(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """One sample (the same code path as ``run``)."""
        return self.run(np.array([t]), np.array([current]), cell_v[None], cell_t[None])[0]

    def stop(self) -> bytes:
        """The SOC (and when it was last counted)."""
        return pack_state(soc=self.soc, t=self.t_last)


class CoulombOracle(CoulombCounting):
    """Coulomb counting from the true SOC of the first sample, never corrected (see ``CoulombCounting``)."""

    name = "cc_oracle"
    oracle_start = True


@dataclass(frozen=True)
class ResetRules:
    """When the production method trusts the voltage (thresholds in C of the design capacity)."""

    rest_c: float = 0.02          # |I| below this is rest (C/50)
    rest_s: float = 1800.0        # relaxed after this long at rest
    wake_park_s: float = 3600.0   # a park this long: the first voltage after wake-up is an OCV
    wake_c: float = 0.05          # ... if the current at that sample is below this (contactors just closed)
    ocv_sigma_v: float = 0.005    # OCV reading error (V) besides hysteresis
    max_sigma_soc: float = 0.03   # trust the OCV only where that error is below this in SOC (not on a plateau)
    taper_c: float = 0.05         # full charge: charging current below C/20 ...
    full_tol_v: float = 0.015     # ... with the cell voltage within this of the upper limit ...
    full_hold_s: float = 10.0     # ... for this long


class CoulombOcvReset(Method):
    """The common production method: Coulomb counting, re-anchored on the voltage when it can be trusted.

    - after a rest of ``rest_s`` (30 min), and at wake-up after a park of ``wake_park_s``
      (1 h): SOC = OCV^-1(cell voltage), for each cell whose OCV reading is informative
      (error ``ocv_sigma_v`` plus half the chemistry's hysteresis gap, divided by the OCV
      slope, below ``max_sigma_soc``: an LFP plateau is not used);
    - at the end of a CC-CV charge (cell at the upper voltage limit, taper current below
      C/20): that cell to 100 %.
    The OCV table is the one every method gets in the run. References: Ng et al., Applied
    Energy 86 (2009) 1506-1511; Plett, "Battery Management Systems Vol. II", Artech House
    (2015), ch. 3 (voltage-based SOC only where the OCV slope allows it).
    """

    name = "cc_ocv_reset"
    rules = ResetRules()

    def __init__(self, pack: PackInfo, setup: EvalSetup) -> None:
        super().__init__(pack, setup)
        chem = get_chemistry(pack.chemistry)
        self.v_full = chem.v_max - self.rules.full_tol_v
        self.sigma_v = self.rules.ocv_sigma_v + chem.hysteresis_gap_v / 2.0

    def start(self, first_t: float, stored: bytes | None, soc_stored: np.ndarray) -> None:
        """From the blob (SOC, stop time), else the stored SOC; a long park arms the wake-up reading."""
        n = self.pack.n_cells
        s = unpack_state(stored) if stored is not None else {}
        self.soc = np.array(s.get("soc", np.broadcast_to(soc_stored, (n,))), dtype=np.float64)
        t_stop = float(s.get("t", np.nan))
        self.wake = bool(np.isfinite(t_stop) and first_t - t_stop >= self.rules.wake_park_s)
        self.t_last = float("nan")
        self.rest_t0 = float("nan")               # start of the current rest (NaN: not resting)
        self.full_t0 = np.full(n, np.nan)         # start of the full-charge condition per cell

    def informative(self, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC from OCV and whether that reading is precise enough to reset to."""
        s = np.asarray(self.pack.ocv.inverse(v), dtype=np.float64)
        sd = self.sigma_v / np.maximum(np.abs(np.asarray(self.pack.ocv.slope(s), dtype=np.float64)), 1e-6)
        return s, np.isfinite(v) & (sd <= self.rules.max_sigma_soc)

    def _since(self, t: np.ndarray, cond: np.ndarray, t0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Time each (T, n) condition has held (carrying ``t0`` from the previous chunk); and the new t0."""
        idx = np.arange(len(t))[:, None]
        last_false = np.maximum.accumulate(np.where(cond, -1, idx), axis=0)
        first = np.minimum(last_false + 1, len(t) - 1)
        began = np.where(last_false < 0, np.where(np.isfinite(t0), t0, t[0])[None, :], t[first])
        held = np.where(cond, t[:, None] - began, -1.0)
        return held, np.where(cond[-1], began[-1], np.nan)

    def _resets(self, t, current, cell_v) -> tuple[np.ndarray, np.ndarray]:
        """(T, n) reset mask and value: relaxed rest, wake-up, end of a full charge."""
        r, q = self.rules, self.pack.capacity_ah
        i = np.asarray(current, dtype=np.float64)
        rest = np.isfinite(i) & (np.abs(i) <= r.rest_c * q)
        held, rest_t0 = self._since(t, rest[:, None], np.array([self.rest_t0]))
        self.rest_t0 = float(rest_t0[0])
        s_ocv, good = self.informative(cell_v)
        reset = (held >= r.rest_s) & good
        if self.wake:
            reset[0] |= good[0] & (abs(i[0]) <= r.wake_c * q)
            self.wake = False
        val = np.where(reset, s_ocv, np.nan)
        full = (np.isfinite(i) & (i > 0) & (i <= r.taper_c * q))[:, None] & (cell_v >= self.v_full)
        held_full, self.full_t0 = self._since(t, full, self.full_t0)
        done = held_full >= r.full_hold_s
        return reset | done, np.where(done, 1.0, val)

    def run(self, t: np.ndarray, current: np.ndarray, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """Vectorised: resets where the rules hold, clipped Coulomb counting in between."""
        n = self.pack.n_cells
        if len(t) == 0:
            return np.empty((0, n))
        t = np.asarray(t, dtype=np.float64)
        cell_v = np.asarray(cell_v, dtype=np.float64)
        reset, val = self._resets(t, current, cell_v)
        inc = soc_increments(t, current, np.full(n, self.pack.capacity_ah), t_prev=self.t_last)
        out = np.empty((len(t), n))
        for c in range(n):
            out[:, c] = _anchored_path(self.soc[c], inc[:, c], reset[:, c], val[:, c])
        self.soc = out[-1].copy()
        self.t_last = float(t[-1])
        return out

    def step(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """One sample (the same code path as ``run``)."""
        return self.run(np.array([t]), np.array([current]), np.asarray(cell_v)[None], np.asarray(cell_t)[None])[0]

    def stop(self) -> bytes:
        """SOC and the stop time (the next start knows how long the park was)."""
        return pack_state(soc=self.soc, t=self.t_last)


def _anchored_path(x0: float, inc: np.ndarray, reset: np.ndarray, val: np.ndarray) -> np.ndarray:
    """Clipped Coulomb counting that jumps to ``val`` wherever ``reset``; one ``clamped_path`` per gap."""
    out = np.where(reset, val, np.nan)
    free = ~reset
    starts = np.flatnonzero(free & ~np.concatenate([[False], free[:-1]]))
    ends = np.flatnonzero(free & ~np.concatenate([free[1:], [False]])) + 1
    for s, e in zip(starts, ends):
        out[s:e] = clamped_path(x0 if s == 0 else out[s - 1], inc[s:e])
    return out


# -- Kalman filters on the identified ECM -----------------------------------------


class EkfBaseline(Method):
    """1-RC ECM EKF with one-state hysteresis where the chemistry has it (``EcmEKF``).

    Parameters are identified on the learned model's training drives and the noise tuned
    on its validation drives (``bms_ai.estimation.ecm_fit``); the table used and its source
    are in the report. Plett, J. Power Sources 134 (2004) 252-292 (Parts 1-3).
    """

    name = "ekf"
    bias = False

    def start(self, first_t: float, stored: bytes | None, soc_stored: np.ndarray) -> None:
        """From the stored state (the RC branch relaxes over the park), else the stored SOC."""
        self.table = self.setup.ecm_for(self.pack.chemistry)
        self.ekf = EcmEKF(self.pack.n_cells, self.table, self.pack.ocv, self.pack.capacity_ah,
                          soc0=np.broadcast_to(soc_stored, (self.pack.n_cells,)), bias=self.bias)
        self.t_last = float("nan")
        if stored is not None:
            s = unpack_state(stored)
            self.ekf.set_state(s)
            self.ekf.park(first_t - float(s["t"]))

    def step(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """Predict with the measured current, update on the cell voltages."""
        dt = 0.0 if self.t_last != self.t_last else t - self.t_last
        self.t_last = t
        return self.ekf.step(current, cell_v, cell_t[self.pack.temp_index], dt).copy()

    def run(self, t: np.ndarray, current: np.ndarray, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """The step loop with the per-sample indexing hoisted."""
        out = np.empty((len(t), self.pack.n_cells))
        temps = np.asarray(cell_t)[:, self.pack.temp_index]
        dts = np.diff(np.asarray(t, dtype=np.float64), prepend=t[0] if self.t_last != self.t_last else self.t_last)
        ekf = self.ekf
        for k, (i, dt) in enumerate(zip(np.asarray(current, dtype=np.float64).tolist(), dts.tolist())):
            out[k] = ekf.step(i, cell_v[k], temps[k], dt)
        if len(t):
            self.t_last = float(t[-1])
        return out

    def stop(self) -> bytes:
        """State, covariance and the stop time."""
        return pack_state(**self.ekf.get_state(), t=self.t_last)

    def info(self) -> dict:
        """Where the ECM came from; the offset estimate of the bias filter."""
        out = {"ecm": self.table.source, "hysteresis": self.table.m_hyst > 0}
        if self.bias:
            out["offset_a"] = float(np.mean(self.ekf.offset_a))
        return out


class EkfBiasBaseline(EkfBaseline):
    """The EKF with the current-sensor offset as an extra state (joint estimation, Plett 2004 Part 3).

    Adaptive against the drift that defeats Coulomb counting; on a flat OCV the offset is
    weakly observable, so it helps most where the OCV has slope.
    """

    name = "ekf_bias"
    bias = True


# -- the shipped estimator ----------------------------------------------------------


@functools.lru_cache(maxsize=4)
def shipped_models(model_dir: str | None):
    """The polled ModelRegistry of one model directory (None: no models), opened once per process."""
    from bms_ai.estimation.pack import open_models

    if model_dir is None:
        return None
    reg = open_models(model_dir)
    reg.poll()
    return reg


def stored_cell_soc(blob: bytes, default: np.ndarray) -> np.ndarray:
    """The cell SOC a saved PackEstimator state holds (what it outputs until its first sample)."""
    from bms_ai.estimation.state import decode_state

    payload, _ = decode_state(blob)
    f = (payload or {}).get("soc", {}).get("filter", {})
    try:
        soc = np.clip(np.asarray(f["ds"], dtype=np.float64) + float(f["x"][0]), 0.0, 1.0)
    except (KeyError, TypeError, ValueError, IndexError):
        return default
    return soc if soc.shape == default.shape else default


class ShippedEstimator(Method):
    """The shipped estimator exactly as the node runs it: ``PackEstimator`` with the model directory's models.

    Named ``shipped`` when a SOC model for the chemistry is loaded, ``shipped_fallback``
    otherwise (so a missing model is never scored under the learned estimator's name).
    Persistence: ``PackEstimator.save_state()`` / ``restore_state()`` where it has them;
    until then a restart re-creates it with ``initial_soc`` = the last SOC it output (its
    health state then starts over every session; the report says which was used).
    """

    name = "shipped"

    def __init__(self, pack: PackInfo, setup: EvalSetup) -> None:
        from bms_ai.estimation.pack import PackEstimator
        from bms_ai.estimation.rul import load_rul_estimator

        super().__init__(pack, setup)
        self._cls = PackEstimator
        self.models = shipped_models(str(setup.model_dir) if setup.model_dir is not None else None)
        self.rul = load_rul_estimator(self.models.model_dir, pack.chemistry)[0] if self.models is not None else None
        probe = PackEstimator(pack.chemistry, pack.capacity_ah, self.models)
        model, self.reason = probe.soc_model()
        self.model_label = model.label if model is not None else ""
        self.name = "shipped" if model is not None else "shipped_fallback"
        self.persist = "save_state" if hasattr(PackEstimator, "save_state") and hasattr(PackEstimator, "restore_state") \
            else "restart from last SOC"
        self.takes_ocv = "ocv" in inspect.signature(PackEstimator.__init__).parameters
        self.methods: dict[str, int] = {}

    def _new(self, initial_soc: np.ndarray | None):
        kw = {}
        if self.takes_ocv and self.pack.ocv_source != "chemistry":
            from bms_ai.estimation.ocvmodel import OcvModel

            # a datasheet curve of the user's cell: known to the sensor's accuracy, not the family band
            kw = {"ocv": OcvModel.from_curve(self.pack.ocv, 0.003, self.pack.ocv_source)}
        return self._cls(self.pack.chemistry, self.pack.capacity_ah, self.models, initial_soc=initial_soc,
                         rul=self.rul, **kw)

    def start(self, first_t: float, stored: bytes | None, soc_stored: np.ndarray) -> None:
        """First session: ``initial_soc`` = the stored SOC; later: its own saved state (or last SOC)."""
        self.last = np.broadcast_to(np.asarray(soc_stored, dtype=np.float64), (self.pack.n_cells,)).copy()
        if stored is None:
            self.est = self._new(self.last.copy())
        elif self.persist == "save_state":
            self.est = self._new(None)
            self.est.restore_state(stored)
            self.last = stored_cell_soc(stored, self.last)
        else:
            self.last = unpack_state(stored)["soc"]
            self.est = self._new(self.last.copy())

    def step(self, t: float, current: float, cell_v: np.ndarray, cell_t: np.ndarray) -> np.ndarray:
        """``PackEstimator.step``; a rejected sample holds the last output."""
        s = self.est.step(t, current, cell_v, cell_t)
        if s is not None:
            self.last = s.soc.cell_soc
            self.methods[s.soc.method] = self.methods.get(s.soc.method, 0) + 1
        return self.last

    def stop(self) -> bytes:
        """``save_state()``, or the last SOC until PackEstimator has it."""
        if self.persist == "save_state":
            return self.est.save_state()
        return pack_state(soc=self.last)

    def capacity_ah(self) -> np.ndarray | None:
        """The health estimator's per-cell capacity, once it made an estimate."""
        h = self.est.health_output()
        if h is None or not h.capacity_updates:
            return None
        return np.asarray(h.cell_soh, dtype=np.float64) * self.pack.capacity_ah

    def info(self) -> dict:
        """Model label or fallback reason, the SOC method per sample, rejections and the persistence used."""
        return {"model": self.model_label, "fallback_reason": "" if self.model_label else self.reason,
                "soc_method_samples": dict(self.methods), "rejected": self.est.rejected,
                "persistence": self.persist, "ocv": self.pack.ocv_source if self.takes_ocv else "chemistry"}


METHODS: Registry = Registry("evaluation method")
METHODS.add("shipped", ShippedEstimator, "the shipped estimator (PackEstimator + models)")
METHODS.add("cc_oracle", CoulombOracle, "Coulomb counting from the true start, never corrected")
METHODS.add("cc_stored", CoulombCounting, "Coulomb counting from the stored SOC")
METHODS.add("cc_ocv_reset", CoulombOcvReset, "Coulomb counting with OCV resets after rests and full charges")
METHODS.add("ekf", EkfBaseline, "1-RC ECM EKF with hysteresis, identified and tuned on the training drives")
METHODS.add("ekf_bias", EkfBiasBaseline, "the EKF with a current-offset state")
