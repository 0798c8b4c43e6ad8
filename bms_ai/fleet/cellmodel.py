"""Reduced-order cell types for the fleet simulator: one fitted ECM per cell set, shipped as small JSON.

PyBaMM costs about a second per cell per drive cycle; a fleet of 96-cell packs driving
for weeks needs a model a few thousand times cheaper. A ``CellType`` is the equivalent
circuit the classical estimator already uses (``bms_ai.estimation.ecm_fit``: R0 and R1
over temperature x SOC, tau per temperature, one RC branch), on the cell set's *true*
OCV (``bms_ai.sim.cells.true_ocv``), with the set's one-state hysteresis layer (the same
one ``bms_ai.sim.life`` adds to PyBaMM), a lumped thermal node and the self-discharge leak.

It is fitted once per cell set from a few short PyBaMM drives (``fit``) and checked on
other drives (other seeds, plans and ambients: ``validate``), both seeded:

    python -m bms_ai.fleet.cellmodel fit --variant NMC_Chen2020 --out bms_ai/fleet/data/cells

``run_cells`` evaluates the model for many cells over a whole timeline at once: every
state is a first-order linear recursion with known coefficients once the current is
known, solved in closed form by ``recur`` (no Python loop over samples).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve
from bms_ai.core.cliargs import out_dir

CELLS_DIR = Path(__file__).resolve().parent / "data" / "cells"
KAPPA_HYST = 25.0                     # bms_ai.sim.life.hysteresis default (per unit of SOC moved)
FIT_AMBIENTS = (-10.0, 0.0, 10.0, 25.0, 40.0, -5.0, 5.0, 15.0, 30.0, 45.0)
VALID_AMBIENTS = (-5.0, 18.0, 33.0)
TEMP_KNOTS = (-10.0, 0.0, 10.0, 25.0, 40.0)
RC_TAUS = (10.0, 60.0, 300.0, 1500.0)   # fixed branch time constants: the fit is linear, the recursion cheap
RIDGE = 1e-3                          # pull of every table entry towards the one-value fit (one value for every set)
SOC_KNOTS = (0.05, 0.2, 0.5, 0.8, 0.95)
LEAK_A_PER_AH = 2e-3 / 50.0
GRID_T0, GRID_DT, GRID_NT = -40.0, 0.5, 221        # fine lookup grid: -40..70 degC
GRID_DS, GRID_NS = 0.005, 201                      # 0..1 SOC
TABLE_EVERY = 8                                    # samples between table reads in run_cells           # bms_ai.sim.life: 2 mA per 50 Ah, mean self-discharge


@dataclass
class CellType:
    """One fitted cell set: everything the fleet simulator needs to turn a current into voltage, SOC, heat."""

    variant: str
    chemistry: str
    held_out: bool
    capacity_ah: float                  # one physical cell of the set (fresh, unrandomised)
    v_min: float
    v_max: float
    ocv_soc: list[float]
    ocv_v: list[float]                  # the set's true mid OCV
    hyst_gap_v: float                   # full charge / discharge gap (0: none)
    kappa_hyst: float
    temp_knots: list[float]
    soc_knots: list[float]
    r0: list[list[float]]               # (nT, nS) Ohm, series resistance of one cell
    rc_tau: list[float]                 # (B,) s, fixed time constants of the RC branches
    rc_r: list[list[list[float]]]       # (B, nT, nS) Ohm, branch resistances
    nl_r: list[list[list[float]]]       # (2, nT, nS) coefficients of I|I| and I^3 / 10 (kinetics: V is not linear in I)
    nl_i_max: float                     # |I| of one cell beyond which the nonlinear terms are held (the fitted range)
    heat_capacity_j_k: float            # lumped thermal node of one cell
    heat_transfer_w_k: float            # to ambient
    leak_a: float                       # mean self-discharge current of one cell
    fit: dict = field(default_factory=dict)   # how it was fitted and validated (commands, RMSE)

    def __post_init__(self) -> None:
        self._ocv = OCVCurve(np.asarray(self.ocv_soc), np.asarray(self.ocv_v), self.chemistry)
        self._tabs = np.concatenate([np.asarray(self.r0, dtype=np.float64)[None], np.asarray(self.rc_r, dtype=np.float64),
                                     np.asarray(self.nl_r, dtype=np.float64)])
        self._tk = np.asarray(self.temp_knots, dtype=np.float64)
        grid = np.linspace(0.0, 1.0, GRID_NS)
        self._ov = self._ocv(grid)
        self._dov = np.diff(self._ov, append=self._ov[-1])
        self._sk = np.asarray(self.soc_knots, dtype=np.float64)
        # the same bilinear tables sampled on a fine grid: one gather per lookup instead of four (speed)
        tg, sg = np.meshgrid(GRID_T0 + GRID_DT * np.arange(GRID_NT), GRID_DS * np.arange(GRID_NS), indexing="ij")
        self._grid = self.resistances(tg, sg).reshape(len(self._tabs), -1)

    def ocv_and_resistances(self, temp: np.ndarray, soc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(OCV, (1 + B, *soc.shape) resistances) from the fine grids, one SOC index for both (speed).

        ``temp`` broadcasts against ``soc`` (one pack temperature per sample is enough: the tables
        change by a few % per kelvin); OCV is linear in SOC, the resistances the nearest grid point
        below (0.5 % SOC, 0.5 degC).
        """
        x = np.clip(soc, 0.0, 1.0) * (GRID_NS - 1)
        k = x.astype(np.int32)
        np.minimum(k, GRID_NS - 2, out=k)
        ocv = self._ov[k] + (x - k) * self._dov[k]
        ti = ((np.asarray(temp) - GRID_T0) * (1.0 / GRID_DT) + 0.5).astype(np.int32)
        np.clip(ti, 0, GRID_NT - 1, out=ti)
        return ocv, np.take(self._grid, ti * GRID_NS + k, axis=1)

    def ocv_fast(self, soc: np.ndarray) -> np.ndarray:
        """OCV on the uniform grid by index arithmetic (no search)."""
        x = np.clip(soc, 0.0, 1.0) * (GRID_NS - 1)
        k = x.astype(np.int32)
        np.minimum(k, GRID_NS - 2, out=k)
        return self._ov[k] + (x - k) * self._dov[k]

    def resistances_fast(self, temp: np.ndarray, soc: np.ndarray) -> np.ndarray:
        """``resistances`` from the fine grid (what the simulator runs on)."""
        return self.ocv_and_resistances(temp, soc)[1]

    @property
    def ocv(self) -> OCVCurve:
        """The set's true OCV as a curve object (vectorised calls)."""
        return self._ocv

    def nonlinear(self, r: np.ndarray, i_cell: np.ndarray) -> np.ndarray:
        """The nonlinear overpotential of one cell at current ``i_cell`` (``r``: the last two table rows)."""
        x = np.clip(i_cell, -self.nl_i_max, self.nl_i_max)
        return r[0] * x * np.abs(x) + r[1] * (x * x * x) * 0.1

    def resistances(self, temp: np.ndarray, soc: np.ndarray) -> np.ndarray:
        """(1 + B + 2, *shape) R0, branch resistances and nonlinear coefficients at each temperature / SOC (bilinear in the knots, clamped)."""
        it, wt = _hat(self._tk, temp)
        js, ws = _hat(self._sk, soc)
        tabs = self._tabs
        lo = tabs[:, it, js] * (1.0 - ws) + tabs[:, it, js + 1] * ws
        hi = tabs[:, it + 1, js] * (1.0 - ws) + tabs[:, it + 1, js + 1] * ws
        return lo * (1.0 - wt) + hi * wt

    def to_json(self) -> dict:
        """Plain dict for the shipped file."""
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> CellType:
        """Inverse of ``to_json``; unknown keys fail (a file from another version is not silently half-read)."""
        return cls(**d)

    def save(self, out_dir: Path) -> Path:
        """Write ``<out_dir>/<variant>.json``; returns its path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"{self.variant}.json"
        path.write_text(json.dumps(_rounded(self.to_json()), indent=1) + "\n")
        return path


def _hat(knots: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left knot index and right-knot weight (clamped): the estimator's table interpolation."""
    i = np.clip(np.searchsorted(knots, x, side="right") - 1, 0, knots.size - 2)
    w = np.clip((x - knots[i]) / (knots[i + 1] - knots[i]), 0.0, 1.0)
    return i, w


def _rounded(x):
    """Floats to 7 significant digits: the shipped files stay small and diffable."""
    if isinstance(x, float):
        return float(f"{x:.7g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    return x


def available(cells_dir: Path | None = None) -> list[str]:
    """Variants with a fitted cell type shipped (or in ``cells_dir``)."""
    return sorted(p.stem for p in Path(cells_dir or CELLS_DIR).glob("*.json"))


_CACHE: dict[tuple[str, str], CellType] = {}


def load_cell_type(variant: str, cells_dir: Path | None = None) -> CellType:
    """The fitted cell type of ``variant``; one-line ValueError naming the fitted ones if there is none."""
    d = Path(cells_dir or CELLS_DIR)
    key = (str(d), variant)
    if key not in _CACHE:
        path = d / f"{variant}.json"
        if not path.is_file():
            raise ValueError(f"no fitted cell type for {variant!r} in {d}; fitted: {', '.join(available(d)) or 'none'} "
                             f"(fit one with: python -m bms_ai.fleet.cellmodel fit --variant {variant})")
        _CACHE[key] = CellType.from_json(json.loads(path.read_text()))
    return _CACHE[key]


# ---------------------------------------------------------------- the vectorised model


def recur(a: np.ndarray, x: np.ndarray, y0: np.ndarray | float = 0.0) -> np.ndarray:
    """y_k = a_k y_k-1 + x_k along axis 0 from y_-1 = y0, for 0 < a_k <= 1, without a Python loop per sample.

    Closed form y_k = P_k (y0 + sum_j<=k x_j / P_j) with P the running product of a,
    in blocks short enough that P never falls below e^-600 (so 1 / P stays finite).
    """
    a = np.asarray(a, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    shape = np.broadcast_shapes(a.shape, x.shape)
    la = np.maximum(np.log(np.maximum(np.broadcast_to(a, shape), 1e-300)), -500.0)
    x = np.broadcast_to(x, shape)
    big_l = np.cumsum(la, axis=0)
    lmin = big_l if big_l.ndim == 1 else big_l.min(axis=1)
    out = np.empty(shape)
    y = np.broadcast_to(np.asarray(y0, dtype=np.float64), shape[1:]).astype(np.float64)
    s, n = 0, shape[0]
    while s < n:
        base = big_l[s - 1] if s else np.zeros(shape[1:])
        lbase = lmin[s - 1] if s else 0.0
        e = int(np.searchsorted(-lmin, -(lbase - 600.0), side="right"))
        e = min(max(e, s + 1), n)
        p = np.exp(big_l[s:e] - base)
        out[s:e] = p * (y + np.cumsum(x[s:e] / p, axis=0))
        y = out[e - 1]
        s = e
    return out


@dataclass
class CellRun:
    """States of many cells over one timeline (T samples x n cells); ``f`` the common branch currents (T, B)."""

    soc: np.ndarray
    v: np.ndarray
    temp: np.ndarray
    h: np.ndarray
    f: np.ndarray


def branch_currents(ct: CellType, dt: np.ndarray, i: np.ndarray, f0: np.ndarray | float = 0.0) -> np.ndarray:
    """(T, B) RC-branch currents: the same for every series cell (fixed time constants)."""
    taus = np.asarray(ct.rc_tau, dtype=np.float64)
    a_rc = np.exp(-np.asarray(dt, dtype=np.float64)[:, None] / taus[None, :])
    return recur(a_rc, (1.0 - a_rc) * np.asarray(i, dtype=np.float64)[:, None], f0)


def _stepped(base: np.ndarray, steps, name: str, k0: int, k1: int) -> np.ndarray:
    """(k1 - k0, n) values of a per-cell quantity with step changes (fault onsets) ``(name, cell, k_on, add)``."""
    out = np.broadcast_to(base, (k1 - k0, base.shape[-1])).copy()
    for what, cell, k_on, add in steps:
        if what == name and k_on < k1:
            out[max(k_on - k0, 0):, cell] += add
    return out


def _overpotential(ct: CellType, temp: np.ndarray, soc: np.ndarray, i: np.ndarray, f: np.ndarray, k_r, k_i,
                   r_scale) -> tuple[np.ndarray, np.ndarray]:
    """(OCV, overpotential) (T, n); the tables are read every ``TABLE_EVERY`` samples and held in between.

    The resistances move with SOC and temperature only (0.1 % SOC per second at 3C), so reading
    the tables at every sample would cost most of the run for nothing; currents and branch
    currents enter at every sample.
    """
    nt, n = soc.shape
    m = TABLE_EVERY
    pad = (-nt) % m
    idx = np.arange(0, nt, m)
    ocv_s, r = ct.ocv_and_resistances(temp[idx, None], soc[idx])          # (1 + B + 2, T/m, n)
    x = np.column_stack([i, f])                                          # (T, 1 + B)
    x = np.concatenate([x, np.zeros((pad, x.shape[1]))]).reshape(-1, m, x.shape[1])
    nb = len(ct.rc_tau)
    lin = np.einsum("jtn,tkj->tkn", r[:1 + nb], x).reshape(-1, n)[:nt] * k_r
    ri = np.repeat(r[1 + nb:], m, axis=1)[:, :nt]
    ocv = ct.ocv_fast(soc)
    return ocv, lin + ct.nonlinear(ri, i[:, None] * k_i) * r_scale


def run_cells(ct: CellType, dt: np.ndarray, i: np.ndarray, ambient: np.ndarray, soc0: np.ndarray,
              cap_ah: np.ndarray, n_parallel: int = 1, session: np.ndarray | None = None,
              leak_a: np.ndarray | float = 0.0, r_scale: np.ndarray | float = 1.0, dv: np.ndarray | float = 0.0,
              h0: np.ndarray | float = 0.0, temp0: np.ndarray | float | None = None,
              cool_scale: np.ndarray | float = 1.0, steps=(), chunk: int = 8192,
              f0: np.ndarray | float = 0.0) -> CellRun:
    """Series cells (parallel groups of ``n_parallel`` cells of this type) on one current.

    One thermal node per pack (heat of the mean cell, each cell's rise over the ambient divided by its
    ``cool_scale``) and one hysteresis rate (the pack's mean capacity) keep those recursions 1-D.
    ``dt[k]`` is the time since sample k-1 (a park: the whole park), ``i[k]`` the mean group
    current over it (A, + charging; 0 over a park). ``cap_ah`` (n,) or (S, n) per ``session`` is
    each group's capacity, ``leak_a`` (n,) its self-discharge (always on; no sensor sees it),
    ``r_scale`` its resistance factor, ``dv`` an OCV offset, ``h0`` the hysteresis state at the
    start, ``cool_scale`` a heat-transfer factor (position in the pack), ``f0`` the branch currents
    at the start. ``steps`` are fault
    onsets ``("leak" | "r0", cell, k_on, added A | Ohm)``. Temperature and resistance are coupled
    through the heat (two fixed-point passes). Worked in chunks of ``chunk`` samples (memory).
    """
    dt = np.asarray(dt, dtype=np.float64)
    i = np.asarray(i, dtype=np.float64)
    ambient = np.broadcast_to(np.asarray(ambient, dtype=np.float64), i.shape)
    cap = np.atleast_2d(np.asarray(cap_ah, dtype=np.float64))
    ses = np.zeros(len(i), dtype=np.intp) if session is None else np.asarray(session, dtype=np.intp)
    n = cap.shape[1]
    nt = len(i)
    leak = np.broadcast_to(np.asarray(leak_a, dtype=np.float64), (n,))
    cool = np.broadcast_to(np.asarray(cool_scale, dtype=np.float64), (n,))
    ha = ct.heat_transfer_w_k * n_parallel * float(np.mean(cool))     # one thermal node per pack ...
    a_th = np.exp(-dt * ha / (ct.heat_capacity_j_k * n_parallel))
    f = branch_currents(ct, dt, i, f0)
    out = CellRun(soc=np.empty((nt, n)), v=np.empty((nt, n), np.float32), temp=np.empty((nt, n), np.float32),
                  h=np.empty((nt, n), np.float32), f=f)
    soc = np.broadcast_to(np.asarray(soc0, dtype=np.float64), (n,)).astype(np.float64)
    t_start = np.broadcast_to(np.asarray(ambient[0] if temp0 is None else temp0, dtype=np.float64), (n,))
    rise = float(np.mean((t_start - ambient[0]) * cool))                # ... each cell's rise scaled by 1 / cool
    h = np.broadcast_to(np.asarray(h0, dtype=np.float64), (n,)).copy()
    cap_mean = cap.mean(axis=1)[ses] if cap.shape[0] > 1 else np.full(nt, cap.mean())
    a_h = np.exp(-ct.kappa_hyst * np.abs(i) * dt / (3600.0 * cap_mean))   # the pack's mean capacity sets the rate
    for k0 in range(0, nt, chunk):
        k1 = min(k0 + chunk, nt)
        sl = slice(k0, k1)
        c = cap[ses[sl]] if cap.shape[0] > 1 else cap
        lk = _stepped(leak, steps, "leak", k0, k1) if any(w == "leak" for w, *_ in steps) else leak
        s = soc + np.cumsum((i[sl, None] - lk) * (dt[sl, None] / (3600.0 * c)), axis=0)
        k_r = ct.capacity_ah * r_scale / c          # table R is for one cell of capacity_ah; n_parallel of them
        rm = ct.resistances_fast(ambient[sl], s.mean(axis=1)) * float(np.mean(k_r))
        nb = len(ct.rc_tau)
        heat = i[sl] * (rm[0] * i[sl] + np.einsum("bt,tb->t", rm[1:1 + nb], f[sl]))
        rises = recur(a_th[sl], (1.0 - a_th[sl]) * heat / ha, rise)
        temp = ambient[sl, None] + rises[:, None] * (float(np.mean(cool)) / cool[None, :])
        ocv, over = _overpotential(ct, (ambient[sl] + rises), s, i[sl], f[sl], k_r, ct.capacity_ah / c, r_scale)
        if any(w == "r0" for w, *_ in steps):
            over += _stepped(np.zeros(n), steps, "r0", k0, k1) * i[sl, None]
        v = ocv + over
        if ct.hyst_gap_v > 0:
            p = recur(a_h[sl], 0.0, 1.0)
            g = recur(a_h[sl], (1.0 - a_h[sl]) * np.sign(i[sl]), 0.0)
            hh = p[:, None] * h[None, :] + g[:, None]
            v += 0.5 * ct.hyst_gap_v * hh
        else:
            hh = np.zeros((k1 - k0, n))
        out.soc[sl] = s
        out.v[sl] = v + dv
        out.temp[sl] = temp
        out.h[sl] = hh
        soc, rise, h = s[-1], float(rises[-1]), hh[-1]
    return out


# ---------------------------------------------------------------- fitting and validation against PyBaMM


def _clean_sensors() -> dict:
    from bms_ai.sim.life import SensorSpec, TempSensorSpec, VoltageSensorSpec

    return {"current_sensor": SensorSpec(offset_a=0.0, tc_a_per_k=0.0, drift_a=0.0, gain=0.0, noise_a=0.0, lsb_a=1e-6),
            "voltage_sensor": VoltageSensorSpec(noise_v=0.0, offset_v=0.0, lsb_v=1e-7),
            "temp_sensor": TempSensorSpec(noise_c=0.0, lsb_c=1e-5)}


def pybamm_drive(variant: str, seed: int, ambient_c: float, hours: float, hysteresis: bool, log=None,
                 cache: Path | None = None):
    """One PyBaMM drive of the unrandomised cell set with true (noise-free) sensors, resampled to 1 Hz.

    ``cache``: a directory keeping the drives (``save_npz``), so a refit does not solve them again.
    """
    from bms_ai.sim.dataset import load_drive, resample_drive, save_npz
    from bms_ai.sim.life import LifeConfig, simulate

    path = Path(cache) / f"{variant}_s{seed}_a{ambient_c:g}_h{hours:g}_{'hyst' if hysteresis else 'nohyst'}" if cache else None
    if path is not None and (path / "drive.npz").is_file():
        return load_drive(path)
    cfg = LifeConfig(variant=variant, seed=seed, mode="drive", hours=hours, n_cells=1, ambient_c=ambient_c,
                     spread=0.0, soc0_sigma=0.0, hyst_mv=None if hysteresis else 0.0, **_clean_sensors())
    d = resample_drive(simulate(cfg, log=log), 1.0)
    if path is not None:
        save_npz(path, d)
    return d


def _drive_ambient(d) -> float:
    return float(d.meta["day_ambient_c"][0])


def _fit_thermal(drives, ocv: OCVCurve) -> tuple[float, float]:
    """Lumped node m c dT/dt = I (V - OCV) - hA (T - T_amb) by least squares on 1 s steps within sessions."""
    rows, ys = [], []
    for d in drives:
        ses = d.session_ids()
        dt = np.diff(d.t)
        ok = (ses[1:] == ses[:-1]) & (dt > 0) & (dt < 2.0)
        temp = d.cell_t[:, 0]
        q = d.current_true * (d.cell_v[:, 0] - ocv(np.clip(d.soc[:, 0], 0, 1)))
        rows.append(np.column_stack([q[1:] * dt, -(temp[:-1] - _drive_ambient(d)) * dt])[ok])
        ys.append(np.diff(temp)[ok])
    a, b = np.linalg.lstsq(np.vstack(rows), np.concatenate(ys), rcond=None)[0]
    c_th = 1.0 / max(a, 1e-6)
    return float(c_th), float(max(b, 1e-6) * c_th)


def _park_free(d) -> np.ndarray:
    """The drive's true current with 0 at each wake-up sample: the park before it carries no current here."""
    i = np.asarray(d.current_true, dtype=np.float64).copy()
    ses = d.session_ids()
    i[1:][ses[1:] != ses[:-1]] = 0.0
    return i


def simulate_like(ct: CellType, d) -> CellRun:
    """The cell type on a PyBaMM drive's true current and ambient, from its start state (the validation run)."""
    dt = np.diff(d.t, prepend=d.t[0])
    i = _park_free(d)
    h0 = np.array([c.get("hyst_h0_v", 0.0) for c in d.meta["cells"]]) / (0.5 * ct.hyst_gap_v) if ct.hyst_gap_v else 0.0
    amb = np.full(len(d.t), _drive_ambient(d))
    cells = d.meta["cells"]
    return run_cells(ct, dt, i, amb, soc0=d.soc[0], cap_ah=np.array([c["capacity_ah"] for c in cells]),
                     leak_a=np.array([c["leak_a"] for c in cells]), h0=h0)


def rmse_mv(ct: CellType, d) -> float:
    """Terminal-voltage RMSE [mV] of the cell type against one PyBaMM drive (all cells, all samples)."""
    run = simulate_like(ct, d)
    return float(1000.0 * np.sqrt(np.mean((run.v - d.cell_v) ** 2)))


def _robust_drive(variant: str, seed: int, amb: float, hours: float, hysteresis: bool, cache, say):
    """A PyBaMM drive; a plan the solver cannot finish (it happens at the voltage limits) is redrawn once."""
    for s in (seed, seed + 1000):
        try:
            return pybamm_drive(variant, s, amb, hours, hysteresis=hysteresis, cache=cache), s
        except Exception as exc:  # noqa: BLE001 - PyBaMM solver failures have several types; a redraw answers all
            say(f"{variant}: drive seed {s} at {amb:g} degC failed ({str(exc)[:80]}); redrawn")
    return None, None


def _fit_tables(drives, ocv: OCVCurve, taus=RC_TAUS, nonlinear: bool = True, ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """R0, branch resistances and nonlinear terms over (temperature x SOC): ridge least squares on V - OCV(true SOC).

    With the time constants fixed the model is linear in every table entry (interpolation weights
    x current or branch current), so one solve fits all; the ridge pulls entries without data
    towards the one-value fit.
    """
    from bms_ai.estimation.ecm_fit import rc_filter
    from bms_ai.estimation.ekf import hat_weights

    ys, zs, z1s = [], [], []
    i_max = max(float(np.max(np.abs(d.current_true))) for d in drives)
    for d in drives:
        i, soc, temp = _park_free(d), d.soc[:, 0], d.cell_t[:, 0]
        y = d.cell_v[:, 0] - ocv(np.clip(soc, 0.0, 1.0))
        nl = [i * np.abs(i), i ** 3 * 0.1] if nonlinear else [np.zeros_like(i), np.zeros_like(i)]
        x = np.column_stack([i] + [rc_filter(d.t, i, tau) for tau in taus] + nl)
        w = (hat_weights(np.asarray(TEMP_KNOTS), temp)[:, :, None] * hat_weights(np.asarray(SOC_KNOTS), soc)[:, None, :])
        w = w.reshape(len(y), -1)
        ok = np.isfinite(y) & (soc > 0.01) & (soc < 0.995)
        ys.append(y[ok])
        zs.append((x[:, :, None] * w[:, None, :]).reshape(len(y), -1)[ok])
        z1s.append(x[ok])
    y, z, z1 = np.concatenate(ys), np.vstack(zs), np.vstack(z1s)
    c0 = np.linalg.lstsq(z1, y, rcond=None)[0]
    c0 = np.where(np.any(z1 != 0, axis=0), c0, 0.0)
    n_w = len(TEMP_KNOTS) * len(SOC_KNOTS)
    prior = np.repeat(c0, n_w)
    g = z.T @ z
    lam = ridge * float(np.mean(np.diag(g)))
    coef = np.linalg.solve(g + lam * np.eye(g.shape[0]), z.T @ y + lam * prior)
    if not nonlinear:
        coef[-2 * n_w:] = 0.0
    tabs = coef.reshape(3 + len(taus), len(TEMP_KNOTS), len(SOC_KNOTS))
    return tabs[0], tabs[1:1 + len(taus)], tabs[1 + len(taus):], i_max


def fit_cell_type(variant: str, seed: int = 0, hours: float = 1.0, ambients=FIT_AMBIENTS, log=None,
                  cache: Path | None = None) -> CellType:
    """Fit one cell set from PyBaMM drives (seeds seed.., one per ambient, hysteresis off: it is a known layer)."""
    from bms_ai.sim.cells import make_cell, true_ocv
    from bms_ai.sim.variants import draw_variant_cell, get_variant

    say = log or (lambda m: None)
    var = get_variant(variant)
    cs = draw_variant_cell(variant, 0, spread=0.0)
    p, info = make_cell(cs)
    soc, ocv_v, gap = true_ocv(cs, (p, info))
    ocv = OCVCurve(soc, ocv_v, var.chemistry)
    drives, used = [], []
    for k, amb in enumerate(ambients):
        t0 = time.perf_counter()
        d, s = _robust_drive(variant, seed + k, amb, hours, False, cache, say)
        if d is not None:
            drives.append(d)
            used.append({"seed": s, "ambient_c": amb, "hours": hours})
        say(f"{variant}: fit drive {k} ({amb:g} degC) in {time.perf_counter() - t0:.1f} s")
    c_th, ha = _fit_thermal(drives, ocv)
    ct = _assemble(variant, var, info, soc, ocv, gap, _fit_tables(drives, ocv, nonlinear=True, ridge=RIDGE), c_th, ha)
    ct.fit = {"pybamm_drives": used, "ridge": RIDGE, "fit_rmse_mv": [round(rmse_mv(ct, d), 2) for d in drives]}
    return ct


def _assemble(variant, var, info, soc, ocv, gap, tabs, c_th, ha) -> CellType:
    r0, rc_r, nl_r, i_max = tabs
    return CellType(variant=variant, chemistry=var.chemistry, held_out=var.held_out, capacity_ah=float(info["capacity_ah"]),
                  v_min=float(info["v_min"]), v_max=float(info["v_max"]), ocv_soc=soc.tolist(), ocv_v=ocv.ocv.tolist(),
                  hyst_gap_v=float(gap), kappa_hyst=KAPPA_HYST, temp_knots=list(TEMP_KNOTS), soc_knots=list(SOC_KNOTS),
                  r0=r0.tolist(), rc_tau=list(RC_TAUS), rc_r=rc_r.tolist(), nl_r=nl_r.tolist(), nl_i_max=i_max,
                  heat_capacity_j_k=c_th, heat_transfer_w_k=ha, leak_a=LEAK_A_PER_AH * float(info["capacity_ah"]))


def validate_cell_type(ct: CellType, seed: int = 100, hours: float = 1.0, ambients=VALID_AMBIENTS, log=None,
                       cache: Path | None = None) -> dict:
    """RMSE against PyBaMM drives the fit never saw (other seeds, plans, ambients; hysteresis on)."""
    say = log or (lambda m: None)
    rows = []
    for k, amb in enumerate(ambients):
        d, s = _robust_drive(ct.variant, seed + k, amb, hours, True, cache, say)
        if d is None:
            continue
        rows.append({"seed": s, "ambient_c": amb, "hours": hours, "rmse_mv": round(rmse_mv(ct, d), 2)})
        say(f"{ct.variant}: validation drive {rows[-1]}")
    worst = max(r["rmse_mv"] for r in rows)
    return {"drives": rows, "rmse_mv_max": worst, "rmse_mv_mean": round(float(np.mean([r["rmse_mv"] for r in rows])), 2)}


# ---------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """`python -m bms_ai.fleet.cellmodel fit|validate`: fit and check the shipped cell types (PyBaMM)."""
    ap = argparse.ArgumentParser(prog="python -m bms_ai.fleet.cellmodel", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("fit", "validate"):
        sp = sub.add_parser(name)
        sp.add_argument("--variant", required=True, action="append", help="cell set (repeatable)")
        sp.add_argument("--out", type=out_dir, default=str(CELLS_DIR), help="cell-type directory")
        sp.add_argument("--seed", type=int, default=0 if name == "fit" else 100)
        sp.add_argument("--hours", type=float, default=1.0, help="awake hours per PyBaMM drive")
        sp.add_argument("--cache", help="keep the PyBaMM drives here (a refit does not solve them again)")
    args = ap.parse_args(argv)

    def say(msg: str) -> None:
        print(msg, file=sys.stderr)

    try:
        for variant in args.variant:
            if args.cmd == "fit":
                ct = fit_cell_type(variant, args.seed, args.hours, log=say, cache=args.cache)
                cmd = f"python -m bms_ai.fleet.cellmodel fit --variant {variant} --seed {args.seed} --hours {args.hours:g}"
                ct.fit["command"] = cmd
                ct.fit["validation"] = validate_cell_type(ct, 100 + args.seed, args.hours, log=say, cache=args.cache)
                print(json.dumps({variant: {"fit_rmse_mv": ct.fit["fit_rmse_mv"], "validation": ct.fit["validation"]}}))
                say(f"wrote {ct.save(Path(args.out))}")
            else:
                ct = load_cell_type(variant, Path(args.out))
                print(json.dumps({variant: validate_cell_type(ct, args.seed, args.hours, log=say, cache=args.cache)}))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
