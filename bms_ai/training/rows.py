"""Training rows for the overpotential models: targets, the SOC the filter would feed, features, splits.

Target: eta = v_cell - OCV_true(SOC_true), everything the current history,
temperature, SOC and hysteresis add to the equilibrium voltage of the drive's
own cell (its true OCV curve; drives without one use the chemistry table).
Inputs: ``eta_features_table`` (the estimator's own streaming code) fed with
truth + a slowly varying SOC error of about 1 %, like the filter's. Rows of
the first ``WARMUP_S`` of every session are masked (the estimator inflates its
sigmas there). Validation drives come from a val suite or a seeded split by
drive; an eval suite is refused.
"""

from __future__ import annotations

import math
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bms_ai.chemistry.ocv import OCVCurve, load_ocv
from bms_ai.chemistry.registry import get_chemistry
from bms_ai.estimation.features import DEFAULT_HYSTERESIS_RATE, cell_sensor_map, eta_features_table
from bms_ai.estimation.soc import WARMUP_S
from bms_ai.sim.dataset import RecordedDrive
from bms_ai.training.common import gauss_markov, load_training_drives, session_of

TRAIN_ROW_S = 1.0          # one training row per cell every this many seconds
VAL_ROW_S = 1.0            # the fast error's correlation is measured on these rows: not coarser than ~tau_fast
TRAIN_CELLS = 8            # cells per drive used (cells of one string share most inputs)
VAL_CELLS = 16
MAX_ROWS = 3_000_000
SOC_NOISE = 0.01           # the filter's SOC error the model must tolerate
SOC_NOISE_TAU = 1800.0     # ... slowly varying
SOC_NOISE_CELL_SHARE = 0.5


def true_ocv(d: RecordedDrive) -> OCVCurve:
    """The equilibrium OCV of the drive's own cell: its v2 curve, else the chemistry's table."""
    s, v = getattr(d, "ocv_soc", None), getattr(d, "ocv_v", None)
    if s is not None and v is not None and len(s) >= 3:
        return OCVCurve(np.asarray(s, float), np.asarray(v, float), d.chemistry)
    return load_ocv(d.chemistry)


def eta_target(d: RecordedDrive, cells: np.ndarray | None = None) -> np.ndarray:
    """eta = v - OCV_true(SOC_true) per sample and cell [V] (NaN where the voltage is missing)."""
    sl = slice(None) if cells is None else cells
    return d.cell_v[:, sl] - true_ocv(d)(np.clip(d.soc[:, sl], 0.0, 1.0))


def soc_input(t: np.ndarray, soc: np.ndarray, rng: np.random.Generator, sigma: float = SOC_NOISE,
              tau: float = SOC_NOISE_TAU, cell_share: float = SOC_NOISE_CELL_SHARE) -> np.ndarray:
    """What the filter would feed the model: truth + a slow error common to the string + a per-cell part."""
    n = soc.shape[1]
    s_common = sigma / math.sqrt(1.0 + cell_share ** 2)
    err = gauss_markov(t, (), rng, s_common, tau)[:, None] + gauss_markov(t, (n,), rng, s_common * cell_share, tau)
    return np.clip(soc + err, 0.0, 1.0)


def hysteresis_rate(chemistry: str) -> float:
    """The feature pipeline's hysteresis rate for a chemistry (as the estimator sets it up)."""
    return get_chemistry(chemistry).hysteresis_rate or DEFAULT_HYSTERESIS_RATE


def variant_of(d: RecordedDrive) -> str:
    """The cell variant a drive was recorded with (cell set, else the simulator's parameter set)."""
    m = d.meta or {}
    for k in ("cell_set", "variant"):
        if m.get(k):
            return str(m[k])
    src = str(m.get("source", "")).split()
    return src[-1] if src else "default"


def after_warmup(t: np.ndarray, session: np.ndarray, warmup_s: float = WARMUP_S) -> np.ndarray:
    """Rows at least ``warmup_s`` after their session's first sample (before, the history is assumed)."""
    start = np.r_[True, np.diff(session) != 0]
    t_start = np.maximum.accumulate(np.where(start, np.arange(len(t)), 0))
    return (t - t[t_start]) >= warmup_s


def split_drives(names: list[str], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded split by drive (by sorted name: independent of the order found): (train, val) indices."""
    order = sorted(range(len(names)), key=lambda i: names[i])
    perm = np.random.default_rng(seed).permutation(len(order))
    n_val = max(1, int(round(val_fraction * len(order)))) if len(order) > 1 else 0
    val = sorted(order[j] for j in perm[:n_val])
    return [i for i in order if i not in set(val)], val


def drive_rng(seed: int, name: str) -> np.random.Generator:
    """A generator per (seed, drive): a drive's noise does not depend on which other drives are used."""
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


@dataclass
class DriveRows:
    """One drive's rows for training or validation (a strided subset of its samples and cells)."""

    name: str
    variant: str
    idx: np.ndarray          # (R,) sample indices into the drive
    cells: np.ndarray        # (n,) cell indices
    t: np.ndarray            # (R,) s
    session: np.ndarray      # (R,)
    feats: np.ndarray        # (R, n, F) float32
    eta: np.ndarray          # (R, n) target [V]
    keep: np.ndarray         # (R,) after warm-up
    full_t: np.ndarray       # (T,) the drive's own time, current [C] and sessions (the ECM runs at full rate)
    full_i_c: np.ndarray
    full_session: np.ndarray
    r_oof: np.ndarray | None = None   # (R, n) eta error of a model that never saw this drive's cell variant

    def valid(self) -> np.ndarray:
        """(R, n) rows usable as targets: after warm-up, finite features and target."""
        return self.keep[:, None] & np.isfinite(self.eta) & np.isfinite(self.feats).all(axis=2)


def drive_rows(d: RecordedDrive, rng: np.random.Generator, row_s: float, max_cells: int) -> DriveRows:
    """Features via the estimator's own streaming code, targets, warm-up mask; ``max_cells`` random cells."""
    n = d.n_cells
    cells = np.sort(rng.choice(n, size=min(n, max_cells), replace=False)) if n > max_cells else np.arange(n)
    session = session_of(d)
    dt = float(np.median(np.diff(d.t))) if len(d.t) > 1 else 1.0
    stride = max(1, int(round(row_s / max(dt, 1e-6))))
    # each chosen cell reads the sensor it has in the whole string
    sens = cell_sensor_map(n, d.cell_t.shape[1])[cells] if d.cell_t.shape[1] else None
    cell_t = d.cell_t[:, sens] if sens is not None else d.cell_t
    soc_in = soc_input(d.t, d.soc[:, cells], rng)
    feats = eta_features_table(d.t, d.current, cell_t, soc_in, d.capacity_ah, hysteresis_rate(d.chemistry),
                               session, stride)
    idx = np.arange(0, len(d.t), stride)
    return DriveRows(name=d.name, variant=variant_of(d), idx=idx, cells=cells, t=d.t[idx], session=session[idx],
                     feats=feats, eta=eta_target(d, cells)[idx], keep=after_warmup(d.t, session)[idx],
                     full_t=d.t, full_i_c=d.current / d.capacity_ah, full_session=session)


def stack_rows(rows: list[DriveRows], rng: np.random.Generator, max_rows: int,
               target: str = "eta") -> tuple[np.ndarray, np.ndarray]:
    """(X, y) over all valid rows and cells, uniformly subsampled to at most ``max_rows``; y: that attribute."""
    xs, ys = [], []
    for r in rows:
        y = getattr(r, target)
        ok = r.valid() & np.isfinite(y)
        xs.append(r.feats[ok])
        ys.append(y[ok].astype(np.float32))
    x, y = np.concatenate(xs), np.concatenate(ys)
    if len(x) > max_rows:
        pick = np.sort(rng.choice(len(x), size=max_rows, replace=False))
        x, y = x[pick], y[pick]
    return x, y


@dataclass
class DataPlan:
    """Which drives train and which validate (never the eval suite)."""

    train: list[RecordedDrive]
    val: list[RecordedDrive]
    dirs: list[str]
    paths: list[Path]
    split: str


def plan_data(chemistry: str, data: list[str], val: list[str], seed: int, val_fraction: float) -> DataPlan:
    """Drives of one chemistry from --data (and --val, else a seeded split by drive)."""
    trn, trn_paths = load_training_drives(data, chemistry)
    if val:
        vd, v_paths = load_training_drives(val, chemistry)
        names = {d.name for d in trn}
        if any(d.name in names for d in vd):
            raise ValueError("a drive is both in --data and --val")
        plan = DataPlan(trn, vd, list(data) + list(val), trn_paths + v_paths, "val suite")
    else:
        tr, va = split_drives([d.name for d in trn], val_fraction, seed)
        plan = DataPlan([trn[i] for i in tr], [trn[i] for i in va], list(data), trn_paths,
                        f"seeded split by drive (fraction {val_fraction}, seed {seed})")
    if not plan.train or not plan.val:
        raise ValueError(f"need {chemistry} drives for training and validation under {data} {val}: found "
                         f"{len(plan.train)} / {len(plan.val)}")
    return plan


def build_rows(drives: list[RecordedDrive], seed: int, row_s: float, cells: int, log) -> list[DriveRows]:
    """``drive_rows`` of every drive, each with its own (seed, name) generator; progress to ``log``."""
    rows = []
    for d in drives:
        t0 = time.time()
        rows.append(drive_rows(d, drive_rng(seed, d.name), row_s, cells))
        log(f"  {d.name}: {len(d.t)} samples x {d.n_cells} cells -> {rows[-1].feats.shape[0]} rows x "
            f"{len(rows[-1].cells)} cells ({time.time() - t0:.1f} s)", flush=True)
    return rows


def add_data_arguments(p) -> None:
    """The data options of `bms-ai train soc` and `bms-ai train ecm`."""
    from bms_ai.training.cli import add_common

    add_common(p)
    p.add_argument("--val", nargs="*", default=[], help="validation drives (default: a seeded split of --data)")
    p.add_argument("--suite-root", default=None,
                   help="root of the estimation suites: --data ROOT/train/CHEM and --val ROOT/val/CHEM")
    p.add_argument("--no-lovo", action="store_true",
                   help="calibrate on the validation drives only (no leave-one-variant-out folds)")


def data_dirs(args) -> tuple[list[str], list[str]]:
    """(--data, --val) with --suite-root filled in; a one-line error when neither names any drives."""
    data, val = list(args.data), list(args.val)
    if args.suite_root and not data:
        data = [str(Path(args.suite_root) / "train" / args.chemistry)]
        val = val or [str(Path(args.suite_root) / "val" / args.chemistry)]
    if not data:
        raise SystemExit("bms-ai train: give --data DIR... (and optionally --val DIR...) or --suite-root ROOT")
    return data, val
