"""Drives for training/evaluation: measured inputs (PackSample-like) + truth.

Two sources, one ``Drive`` record:
- a sim drive directory (bms_ai/sim: truth.parquet [+ can.blf]); when a CAN log
  and ``bms_ai.can.offline.decode_log`` exist, inputs come from the decoded log,
  i.e. exactly what the estimator sees at run time;
- a ``drive.npz`` written by ``bms_ai.training.synth`` (cell-level PyBaMM drives,
  used when no sim drives are available).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class Drive:
    name: str
    chemistry: str
    capacity_ah: float                 # design capacity per cell (= pack Ah for series strings)
    t: np.ndarray                      # (T,) s
    current: np.ndarray                # (T,) A, + = charging (measured)
    cell_v: np.ndarray                 # (T, n) V (measured)
    cell_t: np.ndarray                 # (T, m) degC (measured)
    soc: np.ndarray                    # (T, n) truth
    meta: dict = field(default_factory=dict)   # condition labels, soh, r0, ...

    @property
    def n_cells(self) -> int:
        return int(self.cell_v.shape[1])


def save_npz(path: Path, d: Drive) -> Path:
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path / "drive.npz", t=d.t, current=d.current, cell_v=d.cell_v.astype(np.float32),
                        cell_t=d.cell_t.astype(np.float32), soc=d.soc.astype(np.float32))
    meta = dict(d.meta, name=d.name, chemistry=d.chemistry, capacity_ah=d.capacity_ah)
    (path / "meta.json").write_text(json.dumps(meta, indent=1))
    return path


def _load_npz(path: Path) -> Drive:
    z = np.load(path / "drive.npz")
    meta = json.loads((path / "meta.json").read_text())
    return Drive(name=meta.get("name", path.name), chemistry=meta["chemistry"], capacity_ah=float(meta["capacity_ah"]),
                 t=z["t"], current=z["current"], cell_v=z["cell_v"].astype(np.float64),
                 cell_t=z["cell_t"].astype(np.float64), soc=z["soc"].astype(np.float64), meta=meta)


def load_drive(path: str | Path) -> Drive:
    path = Path(path)
    if (path / "drive.npz").exists():
        return _load_npz(path)
    if (path / "truth.parquet").exists():
        from bms_ai.training.simdrive import load_sim_drive  # written against docs in /work/notes/sim.md

        return load_sim_drive(path)
    raise FileNotFoundError(f"{path}: no drive.npz or truth.parquet")


def find_drives(paths: list[str | Path]) -> list[Path]:
    """Expand directories of drives; a path that is itself a drive is kept."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "drive.npz").exists() or (p / "truth.parquet").exists():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q.parent for q in p.rglob("drive.npz")))
            out.extend(sorted(q.parent for q in p.rglob("truth.parquet")))
        else:
            raise FileNotFoundError(f"{p}: not a drive or directory of drives")
    return out
