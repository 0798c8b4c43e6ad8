"""Cell-level PyBaMM drives for SOC training when no sim drives are available.

Each drive: one random drive-like current profile (urban pulses, highway,
regen, rests, charge stops) applied to a few cells that differ in capacity
(electrode-area scale: capacity x s, resistance / s), at one ambient
temperature, solved with SPMe + lumped thermal; outputs at 10 Hz with sensor
noise (1 mV cell voltage, current noise + optional offset, 0.3 degC temps).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bms_ai.chemistry.pybamm_cell import published_parameters, window_capacity_ah
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.sim.dataset import RecordedDrive, save_npz


def current_profile(rng: np.random.Generator, duration: float, capacity_ah: float, soc0: float,
                    dt: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Piecewise-constant current (A, + charging) that keeps nominal SOC inside [0.08, 0.97]."""
    t = np.arange(0.0, duration, dt)
    i = np.zeros_like(t)
    soc, k = soc0, 0
    while k < len(t):
        mode = rng.choice(["urban", "highway", "rest", "charge"], p=[0.45, 0.25, 0.12, 0.18])
        if soc < 0.15:
            mode = "charge"
        elif soc > 0.93 and mode == "charge":
            mode = "highway"
        if mode == "urban":
            seg = [(rng.uniform(2, 20), rng.choice([rng.uniform(-2.5, -0.2), rng.uniform(0.1, 1.0), 0.0], p=[0.6, 0.25, 0.15]))
                   for _ in range(rng.integers(10, 40))]
        elif mode == "highway":
            seg = [(rng.uniform(60, 400), rng.uniform(-1.0, -0.25))]
        elif mode == "rest":
            seg = [(rng.uniform(60, 900), 0.0)]
        else:
            seg = [(rng.uniform(300, 1500), rng.uniform(0.3, 1.0))]
        for d, c in seg:
            n = max(1, int(d / dt))
            c = float(c)
            if soc + c * d / 3600 > 0.97 or soc + c * d / 3600 < 0.08:
                c = 0.0
            i[k:k + n] = c * capacity_ah
            soc += c * min(n, len(t) - k) * dt / 3600
            k += n
    return t, i


def simulate_cells(chemistry: str, t: np.ndarray, current: np.ndarray, soc0: float, scales: list[float],
                   ambient_c: float) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
    """Solve each cell; returns voltage (T,k), temperature degC (T,k), true SOC (T,k), nominal Ah."""
    import pybamm

    base = published_parameters(chemistry)
    q_nom = float(base["Nominal cell capacity [A.h]"])
    q_window = window_capacity_ah(base)   # Ah between the SOC 0/1 voltage limits
    volts, temps, socs = [], [], []
    for s in scales:
        pv = base.copy()
        pv["Electrode height [m]"] = base["Electrode height [m]"] * s
        pv["Current function [A]"] = pybamm.Interpolant(t, -current, pybamm.t)   # PyBaMM: + = discharge
        pv["Ambient temperature [K]"] = 273.15 + ambient_c
        pv["Initial temperature [K]"] = 273.15 + ambient_c
        # widen the cut-off events (SOC window above stays defined by the nominal limits) so a
        # charge pulse near full does not end the drive
        pv["Upper voltage cut-off [V]"] = base["Upper voltage cut-off [V]"] + 0.3
        pv["Lower voltage cut-off [V]"] = base["Lower voltage cut-off [V]"] - 0.3
        model = pybamm.lithium_ion.SPMe(options={"thermal": "lumped"})
        sim = pybamm.Simulation(model, parameter_values=pv, solver=pybamm.IDAKLUSolver())
        sol = sim.solve(t_eval=[0.0, float(t[-1])], t_interp=t, initial_soc=soc0)
        n = len(sol.t)
        v = np.full(len(t), np.nan)
        v[:n] = sol["Voltage [V]"].entries
        tc = np.full(len(t), np.nan)
        tc[:n] = sol["X-averaged cell temperature [K]"].entries - 273.15
        dc = np.full(len(t), np.nan)
        dc[:n] = sol["Discharge capacity [A.h]"].entries
        volts.append(v)
        temps.append(tc)
        socs.append(soc0 - dc / (q_window * s))
    return np.column_stack(volts), np.column_stack(temps), np.column_stack(socs), q_nom


def make_drive(chemistry: str, seed: int, n_cells: int = 2, duration: float = 3600.0,
               ambient_c: float | None = None, soh: float | None = None, current_offset_c: float = 0.0,
               soc0: float | None = None) -> RecordedDrive:
    """One cell-level drive with sensor noise; unset conditions are drawn from the seed."""
    rng = np.random.default_rng(seed)
    ambient_c = float(rng.choice([0.0, 10.0, 25.0, 25.0, 40.0])) if ambient_c is None else ambient_c
    soh = float(rng.uniform(0.8, 1.0)) if soh is None else soh
    soc0 = float(rng.uniform(0.3, 0.95)) if soc0 is None else soc0
    q_nom = get_chemistry(chemistry).cell_rated_ah
    t, i = current_profile(rng, duration, q_nom * soh, soc0)
    scales = list(soh * (1.0 + 0.02 * rng.standard_normal(n_cells)))
    volts, temps, socs, q_nom = simulate_cells(chemistry, t, i, soc0, scales, ambient_c)
    good = np.isfinite(volts).all(axis=1) & np.isfinite(socs).all(axis=1)
    last = int(np.argmin(good)) if not good.all() else len(t)
    t, i, volts, temps, socs = t[:last], i[:last], volts[:last], temps[:last], socs[:last]
    # sensors: 1 mV voltage resolution + noise, current noise (+ offset), temperature noise
    vm = np.round((volts + 0.001 * rng.standard_normal(volts.shape)) * 1000) / 1000
    im = i + 0.002 * q_nom * rng.standard_normal(i.shape) + current_offset_c * q_nom
    tm = np.round((temps + 0.3 * rng.standard_normal(temps.shape)) * 10) / 10
    meta = {"seed": seed, "ambient_c": ambient_c, "soh": soh, "cell_scales": scales, "soc0": soc0,
            "current_offset_a": current_offset_c * q_nom, "source": f"pybamm SPMe lumped {get_chemistry(chemistry).parameter_set}"}
    return RecordedDrive(name=f"{chemistry}_s{seed}", chemistry=chemistry, capacity_ah=q_nom, t=t, current=im,
                 cell_v=vm, cell_t=tm, soc=socs, meta=meta)


def make_suite(chemistry: str, out: Path, seeds: list[int], **kw) -> list[Path]:
    """One drive per seed into ``out``; returns the drive directories."""
    paths = []
    for s in seeds:
        d = make_drive(chemistry, s, **kw)
        paths.append(save_npz(Path(out) / d.name, d))
        print(f"  {d.name}: {len(d.t) / 36000:.2f} h, T={d.meta['ambient_c']} C, soh={d.meta['soh']:.3f}", flush=True)
    return paths


# Held-out evaluation conditions (seeds disjoint from training seeds 100-199).
EVAL_CONDITIONS: list[dict] = [
    {"tag": "25C", "seed": 901, "ambient_c": 25.0, "soh": 1.0},
    {"tag": "25C-b", "seed": 902, "ambient_c": 25.0, "soh": 0.95},
    {"tag": "0C", "seed": 903, "ambient_c": 0.0, "soh": 0.97},
    {"tag": "10C", "seed": 904, "ambient_c": 10.0, "soh": 0.97},
    {"tag": "40C", "seed": 905, "ambient_c": 40.0, "soh": 0.97},
    {"tag": "aged80", "seed": 906, "ambient_c": 25.0, "soh": 0.82},
    # 0.3 A on the 50 Ah reference pack = 0.006 C; also a harsh 0.03 C (1.5 A on 50 Ah)
    {"tag": "offset0.3A", "seed": 907, "ambient_c": 25.0, "soh": 0.97, "current_offset_c": 0.006},
    {"tag": "offset1.5A", "seed": 908, "ambient_c": 25.0, "soh": 0.97, "current_offset_c": 0.03},
]


def make_eval_suite(chemistry: str, out: Path, duration: float = 3600.0, n_cells: int = 2) -> list[Path]:
    """The held-out condition suite (EVAL_CONDITIONS) into ``out``."""
    paths = []
    for c in EVAL_CONDITIONS:
        kw = {k: v for k, v in c.items() if k not in ("tag", "seed")}
        d = make_drive(chemistry, c["seed"], n_cells=n_cells, duration=duration, **kw)
        d.name = f"{chemistry}_eval_{c['tag']}"
        d.meta["condition"] = c["tag"]
        paths.append(save_npz(Path(out) / d.name, d))
        print(f"  {d.name}: {len(d.t) / 36000:.2f} h", flush=True)
    return paths


def add_arguments(p) -> None:
    """`bms-ai train synth`."""
    from bms_ai.training.cli import add_common

    add_common(p)
    p.add_argument("--seeds", default="100-129",
                   help="drive seeds, e.g. 100-129,200, or 'eval' for the held-out condition suite")
    p.add_argument("--duration", type=float, default=3600.0, help="seconds per drive")
    p.add_argument("--cells", type=int, default=2, help="cells per drive")


def run(args) -> int:
    """Write the drives into --out."""
    from bms_ai.training.cli import seed_list

    if args.seeds == "eval":
        make_eval_suite(args.chemistry, Path(args.out), duration=args.duration, n_cells=args.cells)
    else:
        make_suite(args.chemistry, Path(args.out), seed_list(args.seeds), n_cells=args.cells, duration=args.duration)
    return 0
