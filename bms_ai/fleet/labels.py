"""Fleet pseudo-labels: a vehicle's recorded timeline turned into SOC labels with an uncertainty.

The cloud learning loop retrains the SOC models on fleet data, which has no true SOC. Offline,
the whole timeline is known, so the label at each sample can use the future as well as the past:
points of known SOC (anchors) are joined by Coulomb counting in both directions.

- Anchors: (a) relaxed rests (>= 30 min at |I| < C/100, or the first sample after a park of
  >= 30 min): SOC from OCV inversion, sigma = OCV uncertainty over the local slope, so a rest on
  the flat LFP plateau is a weak anchor and a rest on a steep part a strong one; (b) the end of a
  CC-CV full charge (taper below C/20 with the cell at the top voltage): SOC 1 with a small sigma.
- Between anchors: a fixed-interval Rauch-Tung-Striebel smoother per cell over [SOC, current
  offset]. The offset is a state because a constant sensor offset is the dominant Coulomb-counting
  error over days; two anchors measure it, and the smoother then removes it everywhere.
- Capacity: weighted least squares of the offset-corrected Ah between consecutive anchors against
  their SOC difference, combined with the design capacity as a prior; the smoother then runs again
  with it (one iteration), because the label between anchors scales with 1/capacity.

Every label keeps its sigma: retraining weights samples by it, and a sample far from any anchor
(or on a plateau) is honestly uncertain rather than silently wrong. numpy only, no rclpy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry


@dataclass(frozen=True)
class LabelConfig:
    """Anchor rules and error model; current terms are fractions of the design capacity (C rate)."""

    rest_s: float = 1800.0            # a rest or park this long counts as relaxed
    rest_c: float = 0.01              # |I| below C/100 is rest
    taper_c: float = 0.05             # full charge: current tapered below C/20 ...
    top_tol_v: float = 0.015          # ... with the cell within this of the chemistry's top voltage
    charge_min_s: float = 600.0       # a charge lasts this long ...
    charge_min_c: float = 0.05        # ... and puts in this much of the capacity
    full_sigma: float = 0.01          # SOC sigma of a full-charge anchor (taper cut-off leaves ~1 %)
    voltage_sigma_v: float = 0.003    # cell voltage sensor (noise, offset, quantisation)
    ocv_sigma_v: float = 0.005        # OCV model error when the cell type's own curve is given
    family_band_scale: float = 2.0    # generic curve: the chemistry's family band is an RMS over known cell sets;
                                      # a cell set outside them lies further out (one NMC set: 0.19 SOC at 20 %)
    offset_sigma_c: float = 0.006     # prior current-sensor offset (0.3 A on a 50 Ah cell)
    walk_per_sqrt_h: float = 0.002    # SOC random walk per sqrt(counting hour): offset drift, noise
    gain_sigma: float = 0.005         # current-sensor gain error
    capacity_prior_sigma: float = 0.2  # design capacity as a prior on the true one (relative; fleets age to 70 %)
    min_dsoc: float = 0.1             # anchor pairs closer than this say little about capacity
    max_anchor_sigma: float = 0.1     # weaker anchors are not used (a plateau rest says nothing)


@dataclass
class Anchor:
    """One point of known SOC for one cell."""

    index: int          # sample index
    cell: int
    soc: float
    sigma: float
    kind: str           # "rest", "park", "full"


@dataclass
class Labels:
    """Per-cell SOC labels (T, n) with sigma, per-cell capacity with sigma, and the anchors used."""

    t: np.ndarray
    soc: np.ndarray
    sigma: np.ndarray
    capacity_ah: np.ndarray
    capacity_sigma_ah: np.ndarray
    offset_a: np.ndarray                     # smoothed current-sensor offset per cell (measured - true)
    anchors: list[Anchor] = field(default_factory=list)


def _counting(t: np.ndarray, current: np.ndarray, session: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative Ah, counting hours and |Ah| per sample; parks (session change, time gap) count nothing.

    A parked vehicle's BMS sleeps: no current is integrated and no offset error accrues, so the
    error model runs on counting time, not wall time.
    """
    dt = np.diff(t, prepend=t[0])
    med = float(np.median(dt[1:])) if len(t) > 1 else 1.0
    park = dt > 10.0 * max(med, 1e-3)
    if session is not None:
        park |= np.r_[False, np.asarray(session)[1:] != np.asarray(session)[:-1]]
    dt = np.where(park, 0.0, dt)
    # the mean current over (t[i-1], t[i]] is the one at i (as resample_drive keeps it)
    ah = np.cumsum(current * dt) / 3600.0
    return ah, np.cumsum(dt) / 3600.0, np.cumsum(np.abs(current) * dt) / 3600.0


def _park_before(t: np.ndarray, session: np.ndarray | None, first_park_s: float) -> np.ndarray:
    """Seconds parked before each sample (0 inside a session)."""
    gap = np.diff(t, prepend=t[0] - first_park_s)
    dt = np.diff(t)
    gap[1:][dt <= 10.0 * float(np.median(dt))] = 0.0
    if session is not None:
        same = np.r_[False, np.asarray(session)[1:] == np.asarray(session)[:-1]]
        gap[same] = 0.0
    return gap


def _ocv_sigma_v(soc: np.ndarray, chem: str, own_curve: bool, cfg: LabelConfig) -> np.ndarray:
    """Voltage uncertainty of an OCV reading: sensor, curve (family band for the generic one), hysteresis."""
    c = get_chemistry(chem)
    if own_curve:
        band = np.full_like(soc, cfg.ocv_sigma_v)
    else:
        b = np.atleast_1d(np.asarray(c.ocv_family_band_v, dtype=float))
        band = np.interp(soc, np.linspace(0, 1, b.size), b) if b.size > 1 else np.full_like(soc, b[0])
        band = cfg.family_band_scale * band
    return np.sqrt(band**2 + cfg.voltage_sigma_v**2 + (c.hysteresis_gap_v / 2) ** 2)


def _ocv_anchors(v: np.ndarray, ocv: OCVCurve, sig_fn) -> tuple[np.ndarray, np.ndarray]:
    """SOC and sigma of relaxed voltages (one per cell): the secant over +-sigma, so a flat plateau gives a wide sigma."""
    s = ocv.inverse(v)
    sv = sig_fn(s)
    lo, hi = ocv.inverse(v - sv), ocv.inverse(v + sv)
    return s, np.maximum((hi - lo) / 2.0, 1e-3)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) index pairs (end exclusive) of True runs."""
    d = np.diff(np.r_[0, mask.astype(np.int8), 0])
    return list(zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1)))


def find_anchors(t: np.ndarray, current: np.ndarray, cell_v: np.ndarray, chemistry: str, capacity_ah: float,
                 session: np.ndarray | None = None, ocv: OCVCurve | None = None, first_park_s: float = 0.0,
                 cfg: LabelConfig = LabelConfig()) -> list[Anchor]:
    """Anchors of every cell: relaxed rests, first samples after long parks, ends of full charges.

    ``first_park_s``: how long the vehicle was parked before the first sample (0 = unknown).
    """
    chem = get_chemistry(chemistry)
    own = ocv is not None
    ocv = ocv if own else load_ocv(chem.name)

    def sig_fn(s: np.ndarray) -> np.ndarray:
        return _ocv_sigma_v(s, chem.name, own, cfg)

    out: list[Anchor] = []
    rest = np.abs(current) < cfg.rest_c * capacity_ah
    park = _park_before(t, session, first_park_s)
    ses = np.zeros(len(t), int) if session is None else np.asarray(session)
    for a, b in _runs(rest):
        # a rest run may not span a park: split at session starts, judge each piece by its duration
        inner = a + 1 + np.flatnonzero((park[a + 1:b] > 0) | (ses[a + 1:b] != ses[a:b - 1]))
        cuts = [a, *inner.tolist(), b]
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            if t[hi - 1] - t[lo] >= cfg.rest_s:
                s, sg = _ocv_anchors(np.mean(cell_v[max(lo, hi - 5):hi], axis=0), ocv, sig_fn)
                out.extend(Anchor(hi - 1, k, float(s[k]), float(sg[k]), "rest") for k in range(len(s)))
    for i in np.flatnonzero((park >= cfg.rest_s) & (np.abs(current) < cfg.taper_c * capacity_ah)):
        s, sg = _ocv_anchors(cell_v[i], ocv, sig_fn)
        out.extend(Anchor(int(i), k, float(s[k]), float(sg[k]), "park") for k in range(len(s)))
    out.extend(_full_charge_anchors(t, current, cell_v, chem.v_max, capacity_ah, session, cfg))
    return [x for x in out if x.sigma <= cfg.max_anchor_sigma]


def _full_charge_anchors(t, current, cell_v, v_top, capacity_ah, session, cfg: LabelConfig) -> list[Anchor]:
    """End of each CC-CV charge, per cell at the top voltage: one anchor per charge.

    A charge is a stretch without discharge (I > -C/100) of >= ``charge_min_s`` that puts in
    >= ``charge_min_c`` of capacity; its last sample with the current tapered below C/20 and the cell
    at the top voltage is SOC 1. Requiring a whole charge keeps regenerative braking near full
    (a few seconds of small positive current at a high voltage) from passing for a taper.
    """
    ah, _, _ = _counting(t, current, session)
    taper = (current > 0) & (current < cfg.taper_c * capacity_ah)
    out: list[Anchor] = []
    for a, b in _runs(current > -cfg.rest_c * capacity_ah):
        if t[b - 1] - t[a] < cfg.charge_min_s or ah[b - 1] - ah[a] < cfg.charge_min_c * capacity_ah:
            continue
        hit = taper[a:b, None] & (cell_v[a:b] >= v_top - cfg.top_tol_v)     # (b - a, n)
        last = b - 1 - np.argmax(hit[::-1], axis=0)                          # last hit per cell
        out.extend(Anchor(int(last[k]), int(k), 1.0, cfg.full_sigma, "full") for k in np.flatnonzero(hit.any(axis=0)))
    return out


def _anchor_table(anchors: list[Anchor], n: int, n_t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Node indices (first, anchors, last) and per-node, per-cell SOC and variance (inf: no anchor).

    Several anchors of one cell at one sample are combined by inverse variance.
    """
    nodes = np.unique(np.r_[0, n_t - 1, [a.index for a in anchors]]).astype(int)
    w = np.zeros((len(nodes), n))
    wz = np.zeros((len(nodes), n))
    if anchors:
        j = np.searchsorted(nodes, [a.index for a in anchors])
        k = np.array([a.cell for a in anchors], dtype=int)
        soc, var = np.array([a.soc for a in anchors]), np.array([a.sigma for a in anchors]) ** 2
        np.add.at(w, (j, k), 1.0 / var)       # in list order, as a loop would add them
        np.add.at(wz, (j, k), soc / var)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(w > 0, 1.0 / w, np.inf)
        z = np.where(w > 0, wz / w, 0.0)
    return nodes, z, r


class _Segment:
    """Closed-form prediction from one node over later samples (no measurements in between).

    State per cell [soc, offset b]; true current = measured - b, so
    soc(t) = soc(a) + (dAh - b dT) / Q, with SOC process noise growing with counting time and throughput.
    """

    def __init__(self, ah, hours, thr, q, cfg: LabelConfig, cap_rel_sigma: np.ndarray) -> None:
        self.ah, self.hours, self.thr, self.q, self.cfg = ah, hours, thr, q, cfg
        self.g2 = cfg.gain_sigma**2 + cap_rel_sigma**2     # (n,) relative scale errors

    def predict(self, a: int, idx: np.ndarray, x: tuple, p: tuple) -> tuple[tuple, tuple, np.ndarray]:
        """Mean and covariance at samples ``idx`` (m,) from the node state at ``a``; also f = dsoc/db."""
        s, b = x
        p11, p12, p22 = p
        dt = (self.hours[idx] - self.hours[a])[:, None]
        f = -dt / self.q
        # additive process noise (so the smoother's segments compose): random walk in time, scale error in Ah
        qn = self.cfg.walk_per_sqrt_h**2 * dt + self.g2 * ((self.thr[idx] - self.thr[a])[:, None]) / self.q
        sm = s + (self.ah[idx] - self.ah[a])[:, None] / self.q + f * b
        return ((sm, np.broadcast_to(b, sm.shape)),
                (p11 + 2 * f * p12 + f * f * p22 + qn, p12 + f * p22, np.broadcast_to(p22, sm.shape)), f)


def _smooth_into(pf, xpn, ppn, fb, xsn, psn):
    """RTS correction of predicted states ``pf`` (x, P) given the next node's prediction and smoothing.

    ``fb``: dsoc/db from each sample to the next node. Returns smoothed soc, var soc, offset, var offset.
    """
    (s, b), (p11, p12, p22) = pf
    (q11, q12, q22), det = ppn, ppn[0] * ppn[2] - ppn[1] ** 2
    m11, m12 = p11 + fb * p12, p12          # P F^T, first row
    m21, m22 = p12 + fb * p22, p22          # second row
    c11, c12 = (m11 * q22 - m12 * q12) / det, (m12 * q11 - m11 * q12) / det
    c21, c22 = (m21 * q22 - m22 * q12) / det, (m22 * q11 - m21 * q12) / det
    ds, db = xsn[0] - xpn[0], xsn[1] - xpn[1]
    d11, d12, d22 = psn[0] - q11, psn[1] - q12, psn[2] - q22
    ss = s + c11 * ds + c12 * db
    bs = b + c21 * ds + c22 * db
    v11 = p11 + c11 * c11 * d11 + 2 * c11 * c12 * d12 + c12 * c12 * d22
    v12 = p12 + c11 * c21 * d11 + (c11 * c22 + c12 * c21) * d12 + c12 * c22 * d22
    v22 = p22 + c21 * c21 * d11 + 2 * c21 * c22 * d12 + c22 * c22 * d22
    return (ss, bs), (v11, v12, v22)


def _filter(seg: _Segment, nodes: np.ndarray, z: np.ndarray, r: np.ndarray, offset_sigma_a: float):
    """Forward Kalman filter over the anchor nodes: predicted and filtered (x, P) at each, all cells at once."""
    one = np.ones(z.shape[1])
    x = (0.5 * one, 0.0 * one)
    p = (1.0 * one, 0.0 * one, offset_sigma_a**2 * one)      # uninformative SOC prior, offset prior
    xf, pf, xp, pp = [], [], [], []
    for j, i in enumerate(nodes):
        if j > 0:
            (sx, bx), (a11, a12, a22), _ = seg.predict(nodes[j - 1], np.array([i]), xf[-1], pf[-1])
            x, p = (sx[0], bx[0]), (a11[0], a12[0], a22[0])
        xp.append(x)
        pp.append(p)
        k1, k2 = p[0] / (p[0] + r[j]), p[1] / (p[0] + r[j])   # r = inf: no update
        innov = np.where(np.isfinite(r[j]), z[j] - x[0], 0.0)
        x = (x[0] + k1 * innov, x[1] + k2 * innov)
        p = (p[0] - k1 * p[0], p[1] - k1 * p[1], p[2] - k2 * p[1])
        xf.append(x)
        pf.append(p)
    return xf, pf, xp, pp


def _smooth_nodes(seg: _Segment, nodes: np.ndarray, q: np.ndarray, filt) -> tuple[list, list]:
    """Backward RTS pass over the anchor nodes only: smoothed (x, P) at each node.

    The capacity iterations need only the smoothed offset, so they skip the per-sample evaluation.
    """
    xf, pf, xp, pp = filt
    xs, ps = list(xf), list(pf)
    for j in range(len(nodes) - 2, -1, -1):
        a, b = nodes[j], nodes[j + 1]
        pred = seg.predict(a, np.array([a]), xf[j], pf[j])
        fb = -(seg.hours[b] - seg.hours[a]) / q[None, :]
        (s_, b_), (v11, v12, v22) = _smooth_into(pred[:2], xp[j + 1], pp[j + 1], fb, xs[j + 1], ps[j + 1])
        xs[j], ps[j] = (s_[0], b_[0]), (v11[0], v12[0], v22[0])
    return xs, ps


def _segment_samples(seg: _Segment, a: int, b: int, filt_a, pred_b, smooth_b, soc: np.ndarray, var: np.ndarray) -> None:
    """Smoothed soc and var at samples a..b-1, written into ``soc[a:b]`` and ``var[a:b]`` (T, n).

    The RTS correction of ``_smooth_into`` with its algebra done once per segment and cell, not per sample.
    With h counting hours and u throughput since node a, a sample's f = -h/Q and its f to node b add up to
    the segment's F, so P F^T is affine in (h, u): m11 = A + B h + G u, m12 = P12 + H h. The gain is
    (m11, m12) Pb^-1 (Pb: node b's prediction), so the smoothed soc is linear in (h, u, dAh) and var quadratic
    in (h, u): one small matrix product per segment, straight into the outputs. On a 96-cell pack (m, n)
    temporaries cost more than the arithmetic; the rounding differs from the per-sample form by ~1e-15.
    """
    (sf, bf), (p11, p12, p22) = filt_a
    (xpn, (q11, q12, q22)), (xsn, psn) = pred_b, smooth_b
    q, w2, g = seg.q, seg.cfg.walk_per_sqrt_h**2, seg.g2 / seg.q
    det = q11 * q22 - q12**2
    e11, e12, e22 = q22 / det, -q12 / det, q11 / det              # Pb^-1
    ds, db = xsn[0] - xpn[0], xsn[1] - xpn[1]
    d11, d12, d22 = psn[0] - q11, psn[1] - q12, psn[2] - q22
    al, be = e11 * ds + e12 * db, e12 * ds + e22 * db             # soc correction = m11 al + m12 be
    t11, t12, t21, t22 = d11 * e11 + d12 * e12, d11 * e12 + d12 * e22, d12 * e11 + d22 * e12, d12 * e12 + d22 * e22
    k11, k12, k22 = e11 * t11 + e12 * t21, e11 * t12 + e12 * t22, e12 * t12 + e22 * t22   # Pb^-1 D Pb^-1
    f_seg = -(seg.hours[b] - seg.hours[a]) / q
    m_a, m_b, m_h = p11 + f_seg * p12, w2 - (p12 + f_seg * p22) / q, -p22 / q          # A, B, H (G = g)
    # soc = sf + dAh/Q + f bf + al m11 + be m12, over [1, h, u, dAh]
    soc_c = np.stack([sf + al * m_a + be * p12, -bf / q + al * m_b + be * m_h, al * g, 1.0 / q])
    # var = P11 + 2 f P12 + f^2 P22 + w2 h + g u + k11 m11^2 + 2 k12 m11 m12 + k22 m12^2, over [1, h, u, h^2, h u, u^2]
    var_c = np.stack([p11 + k11 * m_a**2 + 2 * k12 * m_a * p12 + k22 * p12**2,
                      w2 - 2 * p12 / q + 2 * (k11 * m_a * m_b + k12 * (m_a * m_h + m_b * p12) + k22 * p12 * m_h),
                      g * (1 + 2 * (k11 * m_a + k12 * p12)),
                      p22 / q**2 + k11 * m_b**2 + 2 * k12 * m_b * m_h + k22 * m_h**2,
                      2 * g * (k11 * m_b + k12 * m_h),
                      k11 * g**2])
    h, u = seg.hours[a:b] - seg.hours[a], seg.thr[a:b] - seg.thr[a]
    one = np.ones_like(h)
    np.matmul(np.stack([one, h, u, seg.ah[a:b] - seg.ah[a]], axis=1), soc_c, out=soc[a:b])
    np.matmul(np.stack([one, h, u, h * h, h * u, u * u], axis=1), var_c, out=var[a:b])


def smooth(ah, hours, thr, nodes, z, r, q, cfg: LabelConfig, cap_rel_sigma, offset_sigma_a: float):
    """Fixed-interval RTS smoother over the anchor nodes, then evaluated at every sample in closed form.

    Returns soc (T, n), var (T, n), offset (n,) and its variance at the first node.
    """
    n, n_t = z.shape[1], len(ah)
    seg = _Segment(ah, hours, thr, q, cfg, cap_rel_sigma)
    filt = _filter(seg, nodes, z, r, offset_sigma_a)
    xs, ps = _smooth_nodes(seg, nodes, q, filt)
    xf, pf, xp, pp = filt
    soc, var = np.empty((n_t, n)), np.empty((n_t, n))
    soc[n_t - 1], var[n_t - 1] = xs[-1][0], ps[-1][0]
    for j in range(len(nodes) - 1):
        a, b = nodes[j], nodes[j + 1]
        _segment_samples(seg, a, b, (xf[j], pf[j]), (xp[j + 1], pp[j + 1]), (xs[j + 1], ps[j + 1]), soc, var)
    np.maximum(var, 0.0, out=var)
    return soc, var, xs[0][1], ps[0][2]


def smoothed_offset(ah, hours, thr, nodes, z, r, q, cfg: LabelConfig, cap_rel_sigma, offset_sigma_a: float):
    """The smoothed current-sensor offset per cell (n,) alone: ``smooth``'s third output without the samples."""
    seg = _Segment(ah, hours, thr, q, cfg, cap_rel_sigma)
    xs, _ = _smooth_nodes(seg, nodes, q, _filter(seg, nodes, z, r, offset_sigma_a))
    return xs[0][1]


def estimate_capacity(anchors: list[Anchor], ah: np.ndarray, hours: np.ndarray, offset_a: np.ndarray,
                      design_ah: float, n: int, cfg: LabelConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per cell: Ah between consecutive anchors against their SOC difference, weighted, with the design prior.

    Weighted least squares through the origin of dAh = Q dSOC, weight 1 / var(dAh - Q dSOC), where the
    variance comes from both anchors' sigma and the counting error between them.
    """
    w0 = 1.0 / (cfg.capacity_prior_sigma * design_ah) ** 2
    sxy, sxx = np.full(n, w0 * design_ah), np.full(n, w0)
    if anchors:
        idx = np.array([x.index for x in anchors], dtype=int)
        cell = np.array([x.cell for x in anchors], dtype=int)
        order = np.argsort(cell * (len(ah) + 1) + idx, kind="stable")        # per cell by time, ties in list order
        idx, cell = idx[order], cell[order]
        soc, sg = np.array([x.soc for x in anchors])[order], np.array([x.sigma for x in anchors])[order]
        ds = soc[1:] - soc[:-1]
        use = np.flatnonzero((cell[1:] == cell[:-1]) & ~(np.abs(ds) < cfg.min_dsoc))   # consecutive pairs of one cell
        i0, i1, k, ds = idx[use], idx[use + 1], cell[use], ds[use]
        dh = hours[i1] - hours[i0]
        da = ah[i1] - ah[i0] - offset_a[k] * dh
        var = design_ah**2 * (sg[use] ** 2 + sg[use + 1] ** 2 + cfg.walk_per_sqrt_h**2 * dh) + (cfg.gain_sigma * da) ** 2
        np.add.at(sxy, k, ds * da / var)       # in pair order, as a loop would add them
        np.add.at(sxx, k, ds * ds / var)
    return sxy / sxx, 1.0 / np.sqrt(sxx)


def label_timeline(t, current, cell_v, chemistry: str, capacity_ah: float, session=None,
                   ocv: OCVCurve | None = None, first_park_s: float = 0.0,
                   cfg: LabelConfig = LabelConfig()) -> Labels:
    """SOC labels with sigma for every cell and sample of one vehicle's timeline (see the module doc).

    ``current`` is the measured pack (= cell, series string) current, + = charging; ``ocv`` the cell
    type's own OCV curve when the fleet operator has it (else the chemistry's, with its family band).
    """
    t = np.asarray(t, float)
    current = np.asarray(current, float)
    cell_v = np.asarray(cell_v, float)
    if t.ndim != 1 or len(t) < 2 or current.shape != t.shape or cell_v.ndim != 2 or len(cell_v) != len(t):
        raise ValueError("label_timeline needs t (T,), current (T,), cell_v (T, n) with T >= 2")
    if not capacity_ah > 0:
        raise ValueError(f"capacity_ah must be > 0, got {capacity_ah}")
    n = cell_v.shape[1]
    ah, hours, thr = _counting(t, current, session)
    anchors = find_anchors(t, current, cell_v, chemistry, capacity_ah, session, ocv, first_park_s, cfg)
    nodes, z, r = _anchor_table(anchors, n, len(t))
    off_sig = cfg.offset_sigma_c * capacity_ah
    q, qs = np.full(n, float(capacity_ah)), np.full(n, cfg.capacity_prior_sigma * capacity_ah)
    for _ in range(2):   # design capacity -> smoother -> capacity -> smoother
        off = smoothed_offset(ah, hours, thr, nodes, z, r, q, cfg, qs / q, off_sig)
        q, qs = estimate_capacity(anchors, ah, hours, off, capacity_ah, n, cfg)
    soc, var, off, _ = smooth(ah, hours, thr, nodes, z, r, q, cfg, qs / q, off_sig)
    return Labels(t=t, soc=soc, sigma=np.sqrt(var, out=var), capacity_ah=q, capacity_sigma_ah=qs, offset_a=off,
                  anchors=anchors)


def label_drive(d, ocv: OCVCurve | None = None, first_park_s: float = 0.0, cfg: LabelConfig = LabelConfig()) -> Labels:
    """Labels of a ``bms_ai.sim.dataset.RecordedDrive`` (its measured inputs only, never its truth)."""
    return label_timeline(d.t, d.current, d.cell_v, d.chemistry, d.capacity_ah, d.session, ocv, first_park_s, cfg)
