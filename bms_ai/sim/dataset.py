"""Recorded drives for training and evaluation: measured inputs (PackSample-like) plus truth.

Two sources, one ``RecordedDrive`` record:
- a simulated drive directory (``bms_ai.sim.io``: truth.parquet [+ can.blf]). With a
  CAN log, the inputs come from decoding it through the pack config, i.e. exactly
  what the estimator sees at run time (quantisation, noise, dropped frames); truth
  SOC per cell comes from truth.parquet, matched on CAN time. Without a CAN log
  the truth table's own columns are used (true values, no sensor effects), flagged in meta;
- a ``drive.npz`` written by ``bms_ai.training.synth`` (cell-level PyBaMM drives) or the
  data factory. Version 2 adds optional arrays (sessions of a multi-day life, true cell
  capacities, the true OCV curve, the true current; ``V2_ARRAYS``) and meta keys
  (cell_set, held_out, classes, soc_stored, ...); drives without them load with defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from bms_ai.chemistry.registry import get_chemistry
from bms_ai.core.files import load_json
from bms_ai.core.paths import share_path


@dataclass
class RecordedDrive:
    """One drive as the estimator sees it (measured inputs) with the true SOC alongside."""

    name: str
    chemistry: str
    capacity_ah: float                 # design capacity per cell (= pack Ah for series strings)
    t: np.ndarray                      # (T,) s
    current: np.ndarray                # (T,) A, + = charging (measured)
    cell_v: np.ndarray                 # (T, n) V (measured)
    cell_t: np.ndarray                 # (T, m) degC (measured)
    soc: np.ndarray                    # (T, n) truth
    meta: dict = field(default_factory=dict)   # condition labels, soh, r0, ...
    # v2 (optional; absent in older drives): see V2_ARRAYS
    session: np.ndarray | None = None            # (T,) int32 session index; None: one session
    cell_capacity_ah: np.ndarray | None = None   # (n,) true capacity of each cell at the start
    ocv_soc: np.ndarray | None = None            # (K,) true equilibrium OCV curve of this cell type
    ocv_v: np.ndarray | None = None              # (K,)
    current_true: np.ndarray | None = None       # (T,) true cell current (A) incl. what the sensor misses

    @property
    def cell_type(self) -> str:
        """The cell type as a vehicle's pack config names it (simulated drives: the cell set); '' unknown."""
        return str(self.meta.get("variant") or self.meta.get("cell_set") or "")

    @property
    def n_cells(self) -> int:
        """Number of series cells (groups) measured."""
        return int(self.cell_v.shape[1])

    def session_ids(self) -> np.ndarray:
        """Session index per sample (all zeros for a drive recorded as one session)."""
        if self.session is None:
            return np.zeros(len(self.t), dtype=np.int32)
        return np.asarray(self.session, dtype=np.int32)


def resample_drive(d: RecordedDrive, rate_hz: float) -> RecordedDrive:
    """The drive as a BMS sampling at ``rate_hz`` would see it (no change if it is already that slow).

    Every k-th sample of each session is kept; the current is the mean over the k samples it
    stands for (a coulomb counter integrates, it does not sample), so Coulomb counting of the
    resampled drive keeps the charge of the original. Voltages, temperatures and truth are the
    kept samples'. Windows never cross a session boundary.
    """
    if not rate_hz > 0 or len(d.t) < 2:
        return d
    k = int(round(1.0 / (rate_hz * float(np.median(np.diff(d.t))))))
    if k <= 1:
        return d
    ses = d.session_ids()
    starts = np.flatnonzero(np.r_[True, ses[1:] != ses[:-1]])
    ends = np.r_[starts[1:], len(ses)]
    keep = np.concatenate([np.arange(a + k - 1, b, k) if b - a >= k else np.array([b - 1]) for a, b in zip(starts, ends)])
    keep = np.union1d(keep, starts)          # the first sample of every session: its start values

    def window_mean(x: np.ndarray) -> np.ndarray:
        c = np.r_[0.0, np.cumsum(x)]
        lo = np.maximum(keep - k + 1, starts[np.searchsorted(starts, keep, side="right") - 1])
        return (c[keep + 1] - c[lo]) / (keep + 1 - lo)

    return replace(d, t=d.t[keep], current=window_mean(d.current), cell_v=d.cell_v[keep], cell_t=d.cell_t[keep],
                   soc=d.soc[keep], session=None if d.session is None else d.session[keep],
                   current_true=None if d.current_true is None else window_mean(d.current_true),
                   meta={**d.meta, "resampled_hz": rate_hz})


# Optional v2 arrays: name -> dtype on disk. A drive without them loads with None (session: one session).
V2_ARRAYS: dict[str, type] = {"session": np.int32, "cell_capacity_ah": np.float64, "ocv_soc": np.float64,
                              "ocv_v": np.float64, "current_true": np.float64}


def save_npz(path: Path, d: RecordedDrive) -> Path:
    """Write ``drive.npz`` + ``meta.json`` into the directory ``path``; returns it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    extra = {k: np.asarray(getattr(d, k), dtype=dt) for k, dt in V2_ARRAYS.items() if getattr(d, k) is not None}
    np.savez_compressed(path / "drive.npz", t=d.t, current=d.current, cell_v=d.cell_v.astype(np.float32),
                        cell_t=d.cell_t.astype(np.float32), soc=d.soc.astype(np.float32), **extra)
    meta = dict(d.meta, name=d.name, chemistry=d.chemistry, capacity_ah=d.capacity_ah)
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


def read_meta(drive_dir: Path | str) -> dict:
    """meta.json of a drive directory, or a one-line ValueError when it is no JSON object (or FileNotFoundError)."""
    p = Path(drive_dir) / "meta.json"
    if not p.is_file():
        raise FileNotFoundError(f"{drive_dir}: no meta.json (not a recorded drive directory)")
    meta = load_json(p, "drive metadata")
    if not isinstance(meta, dict):
        raise ValueError(f"{p}: drive metadata must be a JSON object, got {type(meta).__name__}")
    return meta


def _load_npz(path: Path) -> RecordedDrive:
    meta = read_meta(path)
    z = np.load(path / "drive.npz")
    extra = {k: z[k].astype(dt) for k, dt in V2_ARRAYS.items() if k in z.files}
    return RecordedDrive(name=meta.get("name", path.name), chemistry=meta["chemistry"],
                         capacity_ah=float(meta["capacity_ah"]), t=z["t"], current=z["current"],
                         cell_v=z["cell_v"].astype(np.float64), cell_t=z["cell_t"].astype(np.float64),
                         soc=z["soc"].astype(np.float64), meta=meta, **extra)


def load_drive(path: str | Path) -> RecordedDrive:
    """A drive directory of either source (drive.npz, or truth.parquet [+ can.blf])."""
    path = Path(path)
    if (path / "drive.npz").exists():
        return _load_npz(path)
    if (path / "truth.parquet").exists():
        return load_sim_drive(path)
    raise FileNotFoundError(f"{path}: no drive.npz or truth.parquet")


def find_drives(paths: list[str | Path]) -> list[Path]:
    """Expand directories of drives; a path that is itself a drive is kept.

    ``*.tmp`` directories are drives still being written (a suite generator renames them when
    done) and are skipped, so a suite can be read while it grows.
    """
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "drive.npz").exists() or (p / "truth.parquet").exists():
            out.append(p)
        elif p.is_dir():
            for marker in ("drive.npz", "truth.parquet"):
                out.extend(sorted(q.parent for q in p.rglob(marker) if not q.parent.name.endswith(".tmp")))
        else:
            raise FileNotFoundError(f"{p}: not a drive or directory of drives")
    return out


def load_sim_drive(path: Path, max_cells: int | None = None) -> RecordedDrive:
    """A simulated drive directory (format_version 1, see bms_ai.sim.io) as a RecordedDrive."""
    import pyarrow.parquet as pq

    path = Path(path)
    meta = read_meta(path)
    tab = pq.read_table(path / "truth.parquet")
    cols = set(tab.column_names)
    n = sum(1 for c in cols if c.startswith("soc_c"))
    n_t = sum(1 for c in cols if c.startswith("tsens_c_s"))
    soc = np.column_stack([tab.column(f"soc_c{k:02d}").to_numpy() for k in range(n)])
    t_can = tab.column("t_can").to_numpy() if "t_can" in cols else tab.column("t").to_numpy()
    chem = str(meta.get("chemistry", "nmc"))
    cap = float(meta.get("design_capacity_ah", 50.0))
    log = path / "can.blf"
    if log.exists():
        from bms_ai.can.offline import decode_log
        from bms_ai.can.packconfig import load_pack_config

        cfg_name = meta.get("pack_config") or get_chemistry(chem).pack_config
        cfg = load_pack_config(share_path("config", Path(cfg_name).name))
        st = decode_log(log, cfg, rate=10.0)
        # truth at the decoded sample instants (nearest 0.1 s row)
        idx = np.clip(np.searchsorted(t_can, st.t - 0.05), 0, len(t_can) - 1)
        keep = np.abs(t_can[idx] - st.t) <= 0.06
        t, cur, cv, ct, s = st.t[keep], st.pack_current[keep], st.cell_voltages[keep], st.cell_temperatures[keep], soc[idx[keep]]
        source = "can.blf decoded (bms_ai.can.offline)"
    else:
        t, cur, s = t_can, tab.column("current_a").to_numpy(), soc
        cv = np.column_stack([tab.column(f"v_c{k:02d}").to_numpy() for k in range(n)])
        ct = np.column_stack([tab.column(f"tsens_c_s{k:02d}").to_numpy() for k in range(n_t)])
        source = "truth.parquet true values (no CAN log)"
    if max_cells:
        cv, s = cv[:, :max_cells], s[:, :max_cells]
    scenario = meta.get("scenario") if isinstance(meta.get("scenario"), dict) else None
    m = {"condition": str(scenario.get("name", path.name) if scenario else path.name),
         "ambient_c": scenario.get("ambient_c") if scenario else None,
         "source": f"bms_ai.sim: {source}", "sim_meta": meta}
    if "soh" in cols:
        m["soh"] = float(tab.column("soh").to_numpy()[0])
    return RecordedDrive(name=path.name, chemistry=chem, capacity_ah=cap, t=np.asarray(t, float),
                         current=np.asarray(cur, float), cell_v=np.asarray(cv, float), cell_t=np.asarray(ct, float),
                         soc=np.asarray(s, float), meta=m)
