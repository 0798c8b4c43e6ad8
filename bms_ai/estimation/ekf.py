"""Extended Kalman filter on a first-order RC equivalent circuit, batched over cells.

State per cell: x = [SOC, v1] (v1: RC-branch voltage). With current I (>0 charging):
    SOC' = SOC + I dt / (3600 Q)
    v1'  = a v1 + R1 (1 - a) I,   a = exp(-dt / tau)
    V    = OCV(SOC) + v1 + R0 I
All 2x2 algebra is written out element-wise so 96 cells cost a handful of numpy ops.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv

if TYPE_CHECKING:
    from bms_ai.models.runtime import LoadedModel


@dataclass
class ECMParams:
    """Cell-level ECM parameters (defaults: identified on the sim training drives, see docs/estimation.md)."""

    capacity_ah: float = 5.0
    r0: float = 0.03
    r1: float = 0.015
    tau: float = 30.0
    q_soc: float = 1e-10   # process noise SOC (per s)
    q_v1: float = 1e-7     # process noise v1 (V^2 per s)
    r_v: float = 1e-4      # measurement noise (V^2)
    sigma_soc0: float = 0.3

    @classmethod
    def from_dict(cls, d: dict) -> ECMParams:
        """From a manifest's ``extra.ecm``; keys that are not parameters are ignored."""
        known = {k: float(v) for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def ecm_for(model: LoadedModel | None, capacity_ah: float) -> ECMParams:
    """The EKF's ECM for a cell of ``capacity_ah``: identified with the SOC model when there is one.

    Resistances identified on the training cells are scaled to this cell's
    capacity (parallel cells: R ~ 1/capacity); without a model, the defaults.
    """
    d = dict(model.entry.extra.get("ecm", {})) if model is not None else {}
    p = ECMParams.from_dict(d) if d else ECMParams()
    if d:
        k = float(d.get("capacity_ah", capacity_ah)) / capacity_ah
        p.r0, p.r1 = p.r0 * k, p.r1 * k
    p.capacity_ah = capacity_ah
    return p


DEFAULT_ECM = {
    "nmc": ECMParams(capacity_ah=5.0, r0=0.025, r1=0.012, tau=30.0),
    "lfp": ECMParams(capacity_ah=2.3, r0=0.02, r1=0.01, tau=30.0, r_v=4e-5),
}


class BatchedEKF:
    """EKF SOC estimator for n cells in parallel."""

    def __init__(self, n: int, chemistry: str, params: ECMParams | None = None,
                 soc0: float | np.ndarray = 0.5, ocv: OCVCurve | None = None) -> None:
        self.n = n
        self.ocv = ocv or load_ocv(chemistry)
        self.p = params or DEFAULT_ECM.get(chemistry, ECMParams())
        self.soc = np.broadcast_to(np.asarray(soc0, dtype=np.float64), (n,)).copy()
        self.v1 = np.zeros(n)
        s0 = self.p.sigma_soc0 ** 2
        self.P00 = np.full(n, s0)
        self.P01 = np.zeros(n)
        self.P11 = np.full(n, 1e-4)

    @property
    def sigma(self) -> np.ndarray:
        """SOC standard deviation per cell."""
        return np.sqrt(np.maximum(self.P00, 0.0))

    def step(self, current: float, voltage: np.ndarray, dt: float) -> np.ndarray:
        """Predict over ``dt`` with ``current``, update on the cells whose voltage is known; returns SOC per cell."""
        p = self.p
        if not np.isfinite(current) or not np.isfinite(dt) or dt <= 0:
            return self.soc
        a = np.exp(-dt / p.tau)
        b = dt / (3600.0 * p.capacity_ah)
        # predict (F = diag(1, a))
        self.soc = self.soc + b * current
        self.v1 = a * self.v1 + p.r1 * (1.0 - a) * current
        self.P00 = self.P00 + p.q_soc * dt
        self.P01 = a * self.P01
        self.P11 = a * a * self.P11 + p.q_v1 * dt
        # update where a voltage is available
        v = np.asarray(voltage, dtype=np.float64)
        ok = np.isfinite(v)
        soc_c = np.clip(self.soc, 0.0, 1.0)
        h0 = self.ocv.slope(soc_c)
        vhat = self.ocv(soc_c) + self.v1 + p.r0 * current
        y = np.where(ok, v - vhat, 0.0)
        ph0 = self.P00 * h0 + self.P01          # P H^T, row 0
        ph1 = self.P01 * h0 + self.P11          # row 1
        s = h0 * ph0 + ph1 + p.r_v
        k0 = np.where(ok, ph0 / s, 0.0)
        k1 = np.where(ok, ph1 / s, 0.0)
        self.soc = np.clip(self.soc + k0 * y, 0.0, 1.0)
        self.v1 = self.v1 + k1 * y
        # Joseph-free update is fine here: P - K S K^T keeps symmetry by construction.
        self.P00 = self.P00 - k0 * k0 * s
        self.P01 = self.P01 - k0 * k1 * s
        self.P11 = self.P11 - k1 * k1 * s
        return self.soc


def _hat(knots: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left knot index and weight of the right knot for linear interpolation (clamped at the ends)."""
    if knots.size == 1:
        return np.zeros(x.shape, dtype=np.intp), np.zeros(x.shape)
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, knots.size - 2)
    w = np.clip((x - knots[i]) / (knots[i + 1] - knots[i]), 0.0, 1.0)
    return i, w


def hat_weights(knots: np.ndarray, x: np.ndarray) -> np.ndarray:
    """(len(x), len(knots)) linear-interpolation weights: a table's value at x is weights @ table."""
    knots = np.asarray(knots, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    i, w = _hat(knots, x)
    out = np.zeros((x.size, knots.size))
    rows = np.arange(x.size)
    out[rows, i] += 1.0 - w
    if knots.size > 1:
        out[rows, i + 1] += w
    return out


@dataclass
class EcmTable:
    """1-RC ECM with one-state hysteresis: R0, R1 over (temperature x SOC), tau over temperature.

    Identified by least squares on drives with SOC truth (``bms_ai.estimation.ecm_fit``), noise
    covariances tuned there on validation drives. Resistances are for a cell of ``capacity_ah``;
    a filter for another capacity scales them by capacity_ah / its capacity (parallel cells).
    Hysteresis (Plett, J. Power Sources 134 (2004) 262-276, one-state model): the OCV is
    offset by ``m_hyst * h``, h in [-1, 1] moving towards +1 (charge) / -1 (discharge) at
    ``kappa_hyst`` per unit of SOC moved; ``m_hyst`` 0 switches the hysteresis state off.
    """

    capacity_ah: float
    temp_knots: np.ndarray            # (nT,) degC
    soc_knots: np.ndarray             # (nS,)
    r0: np.ndarray                    # (nT, nS) Ohm
    r1: np.ndarray                    # (nT, nS) Ohm
    tau: np.ndarray                   # (nT,) s
    m_hyst: float = 0.0               # V (half the charge/discharge OCV gap)
    kappa_hyst: float = 25.0          # 1 / unit SOC
    r_v: float = 1e-4                 # V^2 voltage model + sensor error
    q_soc: float = 1e-9               # 1/s SOC random walk
    q_v1: float = 1e-7                # V^2/s RC-voltage diffusion
    q_h: float = 1e-6                 # 1/s hysteresis-state random walk
    q_bias: float = 1e-10             # C^2/s current-offset random walk (bias-estimating filter)
    sigma_soc0: float = 0.05          # SOC sigma at a stored start
    sigma_bias0: float = 0.02         # C, current-offset sigma at the first start
    source: str = "default"

    def __post_init__(self) -> None:
        self.temp_knots = np.atleast_1d(np.asarray(self.temp_knots, dtype=np.float64))
        self.soc_knots = np.atleast_1d(np.asarray(self.soc_knots, dtype=np.float64))
        shape = (self.temp_knots.size, self.soc_knots.size)
        self.r0 = np.broadcast_to(np.asarray(self.r0, dtype=np.float64), shape).copy()
        self.r1 = np.broadcast_to(np.asarray(self.r1, dtype=np.float64), shape).copy()
        self.tau = np.broadcast_to(np.asarray(self.tau, dtype=np.float64), shape[:1]).copy()

    def lookup(self, temp: np.ndarray, soc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """R0, R1, tau per cell at its temperature and SOC (bilinear, clamped to the table)."""
        it, wt = _hat(self.temp_knots, temp)
        js, ws = _hat(self.soc_knots, soc)
        jt = np.minimum(it + 1, self.temp_knots.size - 1)
        ks = np.minimum(js + 1, self.soc_knots.size - 1)

        def bil(tab: np.ndarray) -> np.ndarray:
            lo = tab[it, js] * (1.0 - ws) + tab[it, ks] * ws
            hi = tab[jt, js] * (1.0 - ws) + tab[jt, ks] * ws
            return lo * (1.0 - wt) + hi * wt

        return bil(self.r0), bil(self.r1), self.tau[it] * (1.0 - wt) + self.tau[jt] * wt

    def to_dict(self) -> dict:
        """JSON-ready (a manifest's ``extra.ecm`` or an evaluation report's ecm_<chemistry>.json)."""
        out = {}
        for k in self.__dataclass_fields__:
            v = getattr(self, k)
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v
        return out

    @classmethod
    def from_dict(cls, d: dict) -> EcmTable:
        """A table dict, or a scalar ECM dict (``ECMParams`` keys: one value for every temperature and SOC)."""
        if "temp_knots" in d:
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        return cls.from_params(ECMParams.from_dict(d), source=str(d.get("source", "scalar ECM")))

    @classmethod
    def from_params(cls, p: ECMParams, source: str = "scalar ECM") -> EcmTable:
        """A scalar ECM as a one-cell table (no hysteresis)."""
        return cls(capacity_ah=p.capacity_ah, temp_knots=[25.0], soc_knots=[0.5], r0=p.r0, r1=p.r1, tau=p.tau,
                   r_v=p.r_v, q_soc=p.q_soc, q_v1=p.q_v1, source=source)


class EcmEKF:
    """EKF on the table ECM, batched over cells: states [SOC, v1, (h), (current offset)].

    Plett, "Extended Kalman filtering for battery management systems of LiPB-based HEV
    battery packs", Parts 2-3, J. Power Sources 134 (2004): 1-RC cell model, one-state
    hysteresis, and (``bias=True``) a current-sensor offset augmented into the state (a
    joint EKF). Every per-cell matrix is an (n, k, k) stack, so 96 cells cost the same
    handful of numpy calls as one. ``q_soc`` and ``r_v`` may be (n,) arrays: a noise grid
    search runs every candidate as extra columns of one filter (``sigma_soc0`` too). The table is looked up
    again once per ``lookup_s`` of measurement time (parameters move with temperature
    and SOC, not within a second), which keeps a 10 Hz step cheap.
    """

    lookup_s = 1.0
    max_step = 0.005      # largest SOC correction of one update

    def __init__(self, n: int, table: EcmTable, ocv: OCVCurve, capacity_ah: float,
                 soc0: float | np.ndarray = 0.5, bias: bool = False,
                 q_soc: np.ndarray | float | None = None, r_v: np.ndarray | float | None = None,
                 sigma_soc0: np.ndarray | float | None = None) -> None:
        self.n = n
        self.tab = table
        self.ocv = ocv
        self.q = float(capacity_ah)
        self.r_scale = table.capacity_ah / self.q
        self.hyst = table.m_hyst > 0
        self.bias = bias
        self.ih = 2 if self.hyst else -1
        self.ib = (2 + self.hyst) if bias else -1
        self.k = 2 + int(self.hyst) + int(bias)
        self.q_soc = np.broadcast_to(np.asarray(table.q_soc if q_soc is None else q_soc, dtype=np.float64), (n,))
        self.r_v = np.broadcast_to(np.asarray(table.r_v if r_v is None else r_v, dtype=np.float64), (n,))
        self.x = np.zeros((n, self.k))
        self.x[:, 0] = soc0
        p0 = [0.0, 1e-4] + ([0.5] if self.hyst else []) + ([(table.sigma_bias0 * self.q) ** 2] if bias else [])
        self._diag = (slice(None), np.arange(self.k), np.arange(self.k))
        self.P = np.zeros((n, self.k, self.k))
        self.P[self._diag] = p0
        self.P[:, 0, 0] = np.asarray(table.sigma_soc0 if sigma_soc0 is None else sigma_soc0, dtype=np.float64) ** 2
        self._t_lookup = -np.inf
        self._clock = 0.0
        self._par: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self._rc: tuple | None = None      # (dt, a, D, Q, D D^T) of the last time step and parameters
        self._h = np.ones((n, self.k))       # measurement Jacobian; constant columns set once
        if self.hyst:
            self._h[:, self.ih] = table.m_hyst

    @property
    def soc(self) -> np.ndarray:
        """SOC per cell (clipped to [0, 1] by every update)."""
        return self.x[:, 0]

    @property
    def offset_a(self) -> np.ndarray:
        """Estimated current-sensor offset per cell (A, measured minus true); zeros without the bias state."""
        return self.x[:, self.ib] if self.bias else np.zeros(self.n)

    def _params(self, temp: np.ndarray, force: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if force or self._par is None or self._clock - self._t_lookup >= self.lookup_s:
            temp = np.where(np.isfinite(temp), temp, 25.0)
            r0, r1, tau = self.tab.lookup(temp, np.minimum(np.maximum(self.x[:, 0], 0.0), 1.0))
            self._par = (r0 * self.r_scale, r1 * self.r_scale, tau)
            self._t_lookup = self._clock
            self._rc = None
        return self._par

    def step(self, current: float, voltage: np.ndarray, temp: np.ndarray, dt: float) -> np.ndarray:
        """Predict over ``dt`` with the measured ``current``, update on the finite voltages; SOC per cell."""
        if not np.isfinite(current) or not np.isfinite(dt) or dt < 0:
            return self.soc
        self._clock += dt
        r0, r1, tau = self._params(temp)
        i_eff = current - self.x[:, self.ib] if self.bias else current
        if dt > 0:
            self._predict(i_eff, dt, r1, tau, sensed=True)
        self._update(i_eff, np.asarray(voltage, dtype=np.float64), r0)
        return self.soc

    def park(self, seconds: float, temp: float = 25.0) -> None:
        """The vehicle slept ``seconds`` (no current, nothing measured): RC relaxes, SOC uncertainty grows."""
        if not np.isfinite(seconds) or seconds <= 0:
            return
        _, r1, tau = self._params(np.full(self.n, temp), force=True)
        self._predict(0.0, float(seconds), r1, tau, sensed=False)
        self._rc = None

    def _predict(self, i_eff: np.ndarray | float, dt: float, r1: np.ndarray, tau: np.ndarray, sensed: bool) -> None:
        if self._rc is None or self._rc[0] != dt:
            a = np.exp(-dt / tau)
            d = np.ones((self.n, self.k))
            d[:, 1] = a
            qd = np.zeros((self.n, self.k))
            qd[:, 0] = self.q_soc * dt
            qd[:, 1] = self.tab.q_v1 * tau * 0.5 * (1.0 - a * a)   # exact discretisation of the RC diffusion
            if self.hyst:
                qd[:, self.ih] = self.tab.q_h * dt
            if self.bias:
                qd[:, self.ib] = self.tab.q_bias * self.q * self.q * dt
            self._rc = (dt, a, d, qd, d[:, :, None] * d[:, None, :])
        _, a, d, qd, dd = self._rc
        b = dt / (3600.0 * self.q)
        x = self.x
        x[:, 0] += b * i_eff
        x[:, 1] = a * x[:, 1] + r1 * (1.0 - a) * i_eff
        if self.hyst:
            ah = np.exp(-self.tab.kappa_hyst * np.abs(i_eff) * b)
            x[:, self.ih] = ah * x[:, self.ih] + (1.0 - ah) * np.sign(i_eff)
            d[:, self.ih] = ah
            dd = d[:, :, None] * d[:, None, :]
        p = self.P * dd                                      # D P D (F = D + u e_b^T)
        if self.bias and sensed:    # SOC and v1 move with -offset; a parked (unmeasured) vehicle carries no offset
            u = np.zeros((self.n, self.k))
            u[:, 0] = -b
            u[:, 1] = -r1 * (1.0 - a)
            cross = (d * self.P[:, :, self.ib])[:, :, None] * u[:, None, :]      # D P e_b u^T
            p += cross + cross.transpose(0, 2, 1) + self.P[:, self.ib, self.ib, None, None] * (
                u[:, :, None] * u[:, None, :])
        p.reshape(self.n, -1)[:, ::self.k + 1] += qd
        self.P = p

    def _update(self, i_eff: np.ndarray | float, v: np.ndarray, r0: np.ndarray) -> None:
        x = self.x
        soc_c = np.minimum(np.maximum(x[:, 0], 0.0), 1.0)
        h = self._h
        h[:, 0] = self.ocv.slope(soc_c)
        vhat = self.ocv(soc_c) + x[:, 1] + r0 * i_eff
        if self.hyst:
            vhat += self.tab.m_hyst * x[:, self.ih]
        if self.bias:
            h[:, self.ib] = -r0
        y = v - vhat
        ph = (self.P * h[:, None, :]).sum(axis=2)
        s = (h * ph).sum(axis=1) + self.r_v
        gain = ph / s[:, None]
        ok = y == y
        if not ok.all():                # a missing voltage (NaN): no update for that cell
            gain[~ok] = 0.0
            y[~ok] = 0.0
        # trust region: a linearisation on a flat OCV stretch (LFP plateau) can ask for a jump of
        # tens of points; the step is shortened to max_step and P reduced as for that shorter gain
        # (Joseph form of a gain c K: P - (2c - c^2) K S K^T), so P stays honest and the filter keeps listening
        c = np.minimum(1.0, self.max_step / np.maximum(np.abs(gain[:, 0] * y), 1e-12))
        x += (c * y)[:, None] * gain
        self.P -= (gain[:, :, None] * gain[:, None, :]) * (s * c * (2.0 - c))[:, None, None]
        x[:, 0] = np.minimum(np.maximum(x[:, 0], 0.0), 1.0)
        if self.hyst:
            x[:, self.ih] = np.minimum(np.maximum(x[:, self.ih], -1.0), 1.0)

    def get_state(self) -> dict[str, np.ndarray]:
        """What a BMS stores at shutdown: state and covariance."""
        return {"x": self.x.copy(), "P": self.P.copy()}

    def set_state(self, state: dict[str, np.ndarray]) -> None:
        """Restore ``get_state`` (same cell count and state layout)."""
        x, p = np.asarray(state["x"], dtype=np.float64), np.asarray(state["P"], dtype=np.float64)
        if x.shape != self.x.shape or p.shape != self.P.shape:
            raise ValueError(f"stored EKF state has shape {x.shape}, this filter {self.x.shape}")
        self.x, self.P = x.copy(), p.copy()
        self._par = None
