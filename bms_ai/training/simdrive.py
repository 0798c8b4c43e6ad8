"""Load a bms_ai.sim drive (format_version 1, see docs of bms_ai.sim) as a ``Drive``.

Inputs come from decoding can.blf through the pack config (the can_bridge's
exact view: quantisation, noise, dropped frames); truth SOC per cell comes
from truth.parquet, matched on CAN time. Without a CAN log the truth table's
own columns are used (true values, no sensor effects), flagged in meta.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bms_ai.training.data import Drive

ROOT = Path(__file__).resolve().parents[2]


def load_sim_drive(path: Path, max_cells: int | None = None) -> Drive:
    import pyarrow.parquet as pq

    path = Path(path)
    meta = json.loads((path / "meta.json").read_text())
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

        cfg_name = meta.get("pack_config") or ("pack96_lfp.yaml" if chem == "lfp" else "pack96.yaml")
        cfg = load_pack_config(ROOT / "config" / Path(cfg_name).name)
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
    cond = meta.get("scenario", {}).get("name", path.name) if isinstance(meta.get("scenario"), dict) else path.name
    m = {"condition": str(cond), "ambient_c": meta.get("scenario", {}).get("ambient_c") if isinstance(
        meta.get("scenario"), dict) else None, "source": f"bms_ai.sim: {source}", "sim_meta": meta}
    if "soh" in cols:
        m["soh"] = float(tab.column("soh").to_numpy()[0])
    return Drive(name=path.name, chemistry=chem, capacity_ah=cap, t=np.asarray(t, float), current=np.asarray(cur, float),
                 cell_v=np.asarray(cv, float), cell_t=np.asarray(ct, float), soc=np.asarray(s, float), meta=m)
