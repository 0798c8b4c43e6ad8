"""Cell capacity from anchors: a small Kalman filter per cell over charge content and capacity.

Capacity is Ah between two points of known SOC divided by their SOC
difference. Done pair by pair, pairs that share an anchor are correlated and a
plain average of them is over-confident; instead every cell carries the state

    z  charge above empty [Ah]            (z = SOC * C)
    C  capacity [Ah]                      (what SOH reports: C / design)
    G  feature scale [Ah]                 (where charging features sit: z_f = s_f * G)
    d  current-sensor offset left after the input's correction [A]
    tau  graphite diffusion time R^2 / (15 D) [s]: under charging current I the
       graphite surface runs I tau / 3600 Ah ahead of its average, so features
       show that early and a CV end sits that far below its voltage's SOC; the
       shift is common to every feature of one charge, so the distance between
       two features measures G free of it

Coulomb counting moves z by the Ah of the series current plus d times the
awake hours (a bias, so it cannot average out between anchors: anchors far
apart in awake time constrain d, and d's uncertainty weakens such pairs); an
anchor is a linear measurement:

    SOC anchor (end of a CC-CV full charge, relaxed rest):  z - s * C = 0   +- s_sd * C
    charging feature at reference position s_f:            z - s_f * G = 0 +- feature sd

so the filter is the recursive weighted least squares of SOC against Ah over
all anchors with the unknown start SOC as nuisance state (the same estimate as
the total-least-squares capacity estimators of Plett, "Recursive approximate
weighted total least squares estimation of battery cell total capacity",
J. Power Sources 196 (2011) 2319-2331, with the anchor errors in SOC and the
Ah errors in the process noise). A slow random walk on C and G is the
forgetting factor (capacity fades slowly; old anchors count less).

G exists because an incremental-capacity feature of a graphite cell sits at a
fixed stoichiometry of the graphite, not at a fixed SOC: lithium loss (LLI)
moves the SOC window over the graphite, loss of graphite (LAM_NE) scales it.
With the lower end of the window set by the empty graphite (true for the
graphite cells here), the charge from empty to a feature is ``s_f * G`` with
``s_f`` the feature's SOC on the fresh reference curve and G the graphite
capacity in units of that curve (Dubarry, Truchot, Liaw, "Synthesize battery
degradation modes via a diagnostic and prognostic model", J. Power Sources 219
(2012) 204-216; Birkl et al., "Degradation diagnostics for lithium ion cells",
J. Power Sources 341 (2017) 373-386). Two features seen in one charge measure
G; a feature and the end of a full charge then measure C - s_f G.

What no anchor can separate: a gain error of the current sensor scales every
Ah, so the capacity here is the *effective* capacity as the current sensor
sees it (a +0.5 % gain error reads as +0.5 % capacity). That is also the
capacity Coulomb counting needs, but it is not the cell's true Ah.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

Z, CAP, G, D, TAU = range(5)
N_STATE = 5
STATE_VERSION = 3


@dataclass
class CapacityParams:
    """Priors and process noise of the per-cell capacity filter."""

    prior_sd: float = 0.15            # capacity prior sigma, fraction of design (SOH somewhere 0.7 .. 1.1)
    feature_prior_sd: float = 0.15    # feature scale G prior sigma, fraction of design
    feature_prior_corr: float = 0.5   # prior correlation of C and G (both fall with lost graphite)
    z_sd: float = 0.5                 # charge content before the first anchor, fraction of design
    offset_sd_c: float = 0.004        # residual current offset prior (C: 0.2 A on a 50 Ah pack)
    offset_rw_c: float = 0.001        # its drift per sqrt(awake hour) (temperature, per-session drift) [C]
    tau_s: float = 0.0                # graphite diffusion time prior [s] (per chemistry: HealthParams.for_chemistry)
    tau_sd_s: float = 0.0             # its sigma [s]
    fade_sd_per_day: float = 1.5e-3   # random walk of C and G per sqrt(day) (fraction of design: ~1 % a month)
    leak_per_day: float = 5e-4        # mean self-discharge while asleep (fraction of capacity per day)
    leak_sd_per_day: float = 1e-3     # its spread between cells
    gate_sigma: float = 4.0           # an anchor further off than this (in predicted sigmas) is rejected
    min_info: float = 0.3             # an update counts as capacity information when it shrinks C's sd by >= this %


@dataclass
class AnchorResult:
    """What one anchor did, per cell: used, rejected as an outlier, or not applicable."""

    used: np.ndarray
    rejected: np.ndarray
    informative: np.ndarray           # used and shrank the capacity sigma noticeably


class CapacityFilter:
    """Per-cell [z, C, G] Kalman filters, vectorised over cells (each cell independent)."""

    def __init__(self, n_cells: int, design_capacity_ah: float, params: CapacityParams | None = None) -> None:
        self.n = int(n_cells)
        self.design = float(design_capacity_ah)
        self.p = params or CapacityParams()
        self.x = np.zeros((self.n, N_STATE))
        self.P = np.zeros((self.n, N_STATE, N_STATE))  # noqa: N815  (covariance: the conventional name)
        self.started = False
        self.reset_prior()

    def reset_prior(self) -> None:
        """Design capacity with the prior spread; charge content unknown until the first anchor."""
        p, q = self.p, self.design
        self.x[:] = [0.5 * q, q, q, 0.0, p.tau_s]
        cov = np.diag([(p.z_sd * q) ** 2, (p.prior_sd * q) ** 2, (p.feature_prior_sd * q) ** 2,
                       (p.offset_sd_c * q) ** 2, max(p.tau_sd_s, 1e-3) ** 2])
        cov[CAP, G] = cov[G, CAP] = p.feature_prior_corr * p.prior_sd * p.feature_prior_sd * q * q
        self.P[:] = cov
        self.started = False

    # -- time update -------------------------------------------------------------
    def start(self, soc: np.ndarray, sd: float = 0.5) -> None:
        """First sample ever: the charge content from a SOC guess (weak unless ``sd`` is small)."""
        s = np.clip(np.nan_to_num(np.asarray(soc, dtype=np.float64), nan=0.5), 0.0, 1.0)
        self.x[:, Z] = s * self.x[:, CAP]
        self.P[:, Z, :] = 0.0
        self.P[:, :, Z] = 0.0
        self.P[:, Z, Z] = (sd * self.design) ** 2 + (s * self.p.prior_sd * self.design) ** 2
        self.P[:, Z, CAP] = self.P[:, CAP, Z] = s * self.P[:, CAP, CAP]
        self.started = True

    def predict(self, dah: float, hours: float = 0.0, asleep_days: float = 0.0, days: float = 0.0) -> None:
        """Move z by ``dah`` (Ah) plus the offset over ``hours`` awake; leak while asleep; slow fade over ``days``."""
        p = self.p
        if asleep_days > 0:
            self.x[:, Z] -= p.leak_per_day * asleep_days * self.x[:, CAP]
        self.x[:, Z] += dah + self.x[:, D] * hours
        if hours > 0:       # P <- F P F^T with F = I + hours at (z, d)
            self.P[:, Z, :] += hours * self.P[:, D, :]
            self.P[:, :, Z] += hours * self.P[:, :, D]
            self.P[:, D, D] += (p.offset_rw_c * self.design) ** 2 * hours
            self.P[:, Z, Z] += (p.offset_rw_c * self.design) ** 2 * hours ** 3 / 3.0
            self.P[:, Z, D] += (p.offset_rw_c * self.design) ** 2 * hours ** 2 / 2.0
            self.P[:, D, Z] = self.P[:, Z, D]
        self.P[:, Z, Z] += (p.leak_sd_per_day * asleep_days * self.design) ** 2
        if days > 0:
            q = (p.fade_sd_per_day * self.design) ** 2 * days
            self.P[:, CAP, CAP] += q
            self.P[:, G, G] += q

    # -- measurement updates ---------------------------------------------------
    def _update(self, h: np.ndarray, y: np.ndarray, r: np.ndarray, ok: np.ndarray) -> AnchorResult:
        """Scalar measurement per cell: y = h . x + noise (variance r); cells with ok False are left alone."""
        ph = np.einsum("nij,nj->ni", self.P, h)
        s = np.einsum("ni,ni->n", h, ph) + r
        innov = y - np.einsum("ni,ni->n", h, self.x)
        good = ok & np.isfinite(innov) & (s > 0)
        rejected = good & (innov * innov > (self.p.gate_sigma ** 2) * np.where(s > 0, s, 1.0))
        use = good & ~rejected
        sd_before = np.sqrt(self.P[:, CAP, CAP])
        k = np.where(use[:, None], ph / np.where(s > 0, s, 1.0)[:, None], 0.0)
        self.x += k * np.where(use, innov, 0.0)[:, None]
        self.P -= np.einsum("ni,nj->nij", k, ph)
        self.P = 0.5 * (self.P + np.swapaxes(self.P, 1, 2))
        info = use & (np.sqrt(np.maximum(self.P[:, CAP, CAP], 0.0)) < sd_before * (1.0 - self.p.min_info / 100.0))
        return AnchorResult(use, rejected, info)

    def update_soc(self, soc: np.ndarray, soc_sd: np.ndarray, ok: np.ndarray | None = None,
                   ah_back: float = 0.0, current: float = 0.0) -> AnchorResult:
        """A SOC anchor per cell ``ah_back`` Ah ago: z - ah_back = soc * C - current tau / 3600.

        ``soc`` is what the voltage says (the graphite surface's view); under a charging
        ``current`` (the taper at the end of a full charge) the average lags it.
        """
        s = np.asarray(soc, dtype=np.float64)
        sd = np.asarray(soc_sd, dtype=np.float64)
        mask = np.isfinite(s) & np.isfinite(sd) & (sd > 0) if ok is None else np.asarray(ok, bool) & np.isfinite(s)
        h = np.zeros((self.n, N_STATE))
        h[:, Z] = 1.0
        h[:, CAP] = -np.nan_to_num(s)
        h[:, TAU] = max(float(current), 0.0) / 3600.0
        r = (np.nan_to_num(sd, nan=1.0) * np.maximum(self.x[:, CAP], 0.3 * self.design)) ** 2
        return self._update(h, np.full(self.n, float(ah_back)), r, mask)

    def update_feature(self, s_ref: float | np.ndarray, ah_back: np.ndarray, sd_ah: np.ndarray,
                       ok: np.ndarray, current: float = 0.0) -> AnchorResult:
        """A graphite position ``ah_back`` Ah ago, seen at charging ``current``: z - ah_back = s_ref G - current tau / 3600.

        Charging features (seen early by the surface lead) and rests on the graphite knee (current 0).
        """
        h = np.zeros((self.n, N_STATE))
        h[:, Z] = 1.0
        h[:, G] = -np.nan_to_num(np.broadcast_to(np.asarray(s_ref, dtype=np.float64), (self.n,)))
        h[:, TAU] = max(float(current), 0.0) / 3600.0
        back = np.nan_to_num(np.asarray(ah_back, dtype=np.float64))
        return self._update(h, back, np.asarray(sd_ah, dtype=np.float64) ** 2, np.asarray(ok, bool))

    def update_offset(self, current_a: float, sd_a: float) -> AnchorResult:
        """A stretch where the true current is known to be ~0 read ``current_a`` on average: d = -current_a."""
        h = np.zeros((self.n, N_STATE))
        h[:, D] = -1.0
        ok = np.full(self.n, math.isfinite(current_a) and math.isfinite(sd_a) and sd_a > 0)
        return self._update(h, np.full(self.n, float(current_a)), np.full(self.n, float(sd_a) ** 2), ok)

    # -- results ----------------------------------------------------------------
    @property
    def capacity(self) -> np.ndarray:
        """Capacity estimate per cell [Ah]."""
        return self.x[:, CAP].copy()

    @property
    def capacity_sd(self) -> np.ndarray:
        """Its sigma [Ah]."""
        return np.sqrt(np.maximum(self.P[:, CAP, CAP], 0.0))

    @property
    def soc(self) -> np.ndarray:
        """The charge content as SOC (z / C): the anchors' view, for diagnostics."""
        return self.x[:, Z] / np.maximum(self.x[:, CAP], 1e-6)

    # -- persistence -------------------------------------------------------------
    def state(self) -> dict:
        """JSON-serialisable state (restored by ``restore``; the tuning comes from the code, not the file)."""
        return {"version": STATE_VERSION, "n": self.n, "design": self.design, "started": self.started,
                "x": self.x.tolist(), "P": self.P.tolist()}

    def restore(self, d: dict) -> str:
        """Continue from ``state()``; '' or why not (then the prior stays)."""
        try:
            if int(d["version"]) != STATE_VERSION:
                return f"capacity state version {d['version']}, expected {STATE_VERSION}"
            x = np.asarray(d["x"], dtype=np.float64)
            cov = np.asarray(d["P"], dtype=np.float64)
            design = float(d["design"])
            started = bool(d["started"])
        except (KeyError, TypeError, ValueError) as exc:
            return f"capacity state malformed ({type(exc).__name__}: {exc})"
        if x.shape != (self.n, N_STATE) or cov.shape != (self.n, N_STATE, N_STATE):
            return f"capacity state is for {x.shape[0] if x.ndim else '?'} cells, this pack has {self.n}"
        if not (math.isclose(design, self.design) and np.isfinite(x).all() and np.isfinite(cov).all()):
            return "capacity state is for another design capacity or has non-finite values"
        if np.any(np.linalg.eigvalsh(cov) < -1e-9 * self.design ** 2):
            return "capacity state covariance is not positive semi-definite"
        self.x, self.P, self.started = x, cov, started
        return ""
