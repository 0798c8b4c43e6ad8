"""`bms-ai fleet demo`: one turn of the closed loop on one machine, measured.

A fleet whose cells partly differ from the factory training set drives a week
(fleet simulator -> the vehicle's own estimator and fault monitor -> pseudonymised
MCAP segments in an object store) -> the Ray pipeline (timelines, pseudo-labels,
SOH trends, anomaly ranking) -> learning on some vehicles -> the gate on the others
-> TUF publication -> each vehicle's updater installs what verifies -> the fleet
drives a second week with what it installed. The report compares, on the second
week of the held-out vehicles, the factory models and the installed ones on the
same drives (paired), next to Coulomb counting from the true start, and counts
alarms against the injected faults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bms_ai.core.cliargs import nonneg_int, out_dir

DEMO_KEY_FILE = "pseudonym.key"
SECONDS_PER_WEEK = 7 * 86400.0


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo fleet; the defaults fit the 15-minute budget on 2 cores."""

    vehicles: int = 8
    days: float = 7.0
    seed: int = 0
    n_cells: int = 96
    mix: dict[str, float] | None = None   # variant -> weight; None: the default mix (mostly unfamiliar cells)
    heldout_every: int = 3                # every k-th vehicle is held out from learning (gate + before/after)
    edge_rate_hz: float = 0.1             # the vehicles' estimator and fault monitor rate in the fleet run
    workers: int = 2
    fault_rate: float = 0.1
    anomaly_z: float = 6.0                # a fleet anomaly score at least this is an alarm
    address: str | None = None            # an existing Ray cluster; None: local Ray on 127.0.0.1

    def validate(self) -> DemoConfig:
        """One-line ValueError on a demo that cannot show anything."""
        if not (isinstance(self.vehicles, int) and self.vehicles >= 2):
            raise ValueError(f"vehicles must be an integer >= 2, not {self.vehicles!r}")
        if not (isinstance(self.heldout_every, int) and 2 <= self.heldout_every <= self.vehicles):
            raise ValueError(f"heldout_every must be an integer in [2, vehicles], not {self.heldout_every!r}")
        if not (0 < self.edge_rate_hz <= 1.0):
            raise ValueError(f"edge_rate_hz must be in (0, 1], not {self.edge_rate_hz!r}")
        if not (isinstance(self.workers, int) and self.workers >= 1):
            raise ValueError(f"workers must be a positive integer, not {self.workers!r}")
        return self


def default_mix() -> dict[str, float]:
    """Fitted cell types: unfamiliar ones (the factory models never saw them) weigh twice the familiar ones."""
    from bms_ai.fleet.cellmodel import available
    from bms_ai.sim.variants import get_variant

    return {v: (2.0 if get_variant(v).held_out else 1.0) for v in available()}


@dataclass
class Stage:
    """Wall and CPU seconds of one stage (the report's timing table)."""

    name: str
    wall_s: float = 0.0
    cpu_s: float = 0.0
    note: str = ""


@dataclass
class DemoRun:
    """Everything the demo measured (written as ``demo.json``)."""

    config: dict
    stages: list[Stage] = field(default_factory=list)
    fleet: dict = field(default_factory=dict)
    pipeline: dict = field(default_factory=dict)
    learn: dict = field(default_factory=dict)
    gate: dict = field(default_factory=dict)
    update: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    alarms: dict = field(default_factory=dict)


class _Timer:
    def __init__(self, run: DemoRun, name: str, log) -> None:
        self.stage, self.run, self.log = Stage(name), run, log

    def __enter__(self) -> Stage:
        self.log(f"[demo] {self.stage.name} ...")
        self.w, self.c = time.perf_counter(), time.process_time()
        return self.stage

    def __exit__(self, *exc: object) -> None:
        self.stage.wall_s = round(time.perf_counter() - self.w, 2)
        self.stage.cpu_s = round(time.process_time() - self.c, 2)
        self.run.stages.append(self.stage)
        self.log(f"[demo] {self.stage.name}: {self.stage.wall_s:.1f} s {self.stage.note}")


def _fleet(cfg: DemoConfig, period: int):
    from bms_ai.fleet.simulator import FleetConfig

    return FleetConfig(vehicles=cfg.vehicles, days=cfg.days, seed=cfg.seed, n_cells=cfg.n_cells,
                       mix=cfg.mix or default_mix(), fault_rate=cfg.fault_rate, period=period).validate()


def simulate_week(cfg: DemoConfig, period: int, workers: int) -> list:
    """Every vehicle of the fleet over one period, simulated on Ray (one task per vehicle)."""
    import ray

    from bms_ai.fleet.simulator import simulate_vehicle

    fc = _fleet(cfg, period)
    sim = ray.remote(num_cpus=1)(simulate_vehicle)
    return ray.get([sim.remote(fc, i) for i in range(cfg.vehicles)])


def _hours(drives: list) -> dict:
    cal = sum(float(d.meta["timing"]["calendar_h"]) for d in drives)
    awake = sum(float(d.meta["timing"]["awake_h"]) for d in drives)
    return {"vehicles": len(drives), "calendar_h": round(cal, 1), "awake_h": round(awake, 1)}


def _edge(drives: list, store, cfg: DemoConfig, model_dir: str) -> list[dict]:
    from bms_ai.fleet.edge import EdgeConfig
    from bms_ai.fleet.pipeline import run_vehicles

    ec = EdgeConfig(key=_key(store), rate_hz=cfg.edge_rate_hz, model_dir=model_dir)
    return run_vehicles(drives, store, ec, workers=cfg.workers)


def _key(store) -> str:
    """The fleet's pseudonym key (demo: a random one kept beside the store, like a secret file)."""
    import secrets

    p = Path(store.url.removeprefix("file://")).parent / DEMO_KEY_FILE
    if not p.exists():
        p.write_text(secrets.token_hex(32))
        p.chmod(0o600)
    return p.read_text().strip()


def labelled_from_store(store, pseudonyms: list[str], cell_types: dict[str, str]) -> list:
    """What the cloud learns from: each vehicle's uploaded timeline and its pseudo-labels (no truth)."""
    import io

    import pyarrow.parquet as pq

    from bms_ai.fleet.ingest import read_timeline
    from bms_ai.fleet.labels import label_timeline
    from bms_ai.fleet.learn import LabelledVehicle
    from bms_ai.fleet.pipeline import MANIFEST
    from bms_ai.sim.dataset import RecordedDrive
    man = pq.read_table(io.BytesIO(store.get(MANIFEST))).to_pylist()
    out = []
    for pid in pseudonyms:
        rows = [r for r in man if r.get("vehicle") == pid and not r.get("error")]
        if not rows:
            continue
        tl = read_timeline(store, pid, sorted({r["part"] for r in rows}))
        chem, cap = rows[0]["chemistry"], float(rows[0]["design_capacity_ah"])
        lab = label_timeline(tl.t, tl.current, tl.cell_v, chem, cap, tl.session)
        d = RecordedDrive(name=pid, chemistry=chem, capacity_ah=cap, t=tl.t - tl.t[0], current=tl.current,
                          cell_v=tl.cell_v, cell_t=tl.cell_t, soc=np.full(tl.cell_v.shape, np.nan),
                          meta={"variant": cell_types[pid], "rate_hz": None}, session=tl.session)
        out.append(LabelledVehicle(d, lab, vehicle=pid, cell_type=cell_types[pid]))
    return out


def _save_drives(drives: list, root: Path) -> list[Path]:
    from bms_ai.sim.dataset import resample_drive, save_npz

    out = []
    for d in drives:
        out.append(save_npz(root / d.name, resample_drive(d, 1.0)))
    return out


def _serve(repo: Path) -> tuple[Any, str]:
    from bms_ai.fleet.tufrepo import make_server

    srv = make_server(repo, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv, f"http://127.0.0.1:{srv.server_address[1]}"


def distribute(candidate: Path, gate_ok: bool, out: Path, factory: Path) -> dict:
    """Publish (if the gate accepted) to a TUF repository over HTTP; the fleet's updater installs into its model dir."""
    from bms_ai.fleet.gate import publish
    from bms_ai.fleet.tufrepo import TufPublisher
    from bms_ai.fleet.updater import ModelUpdater

    repo, keys, vdir = out / "tuf" / "repo", out / "tuf" / "keys", out / "vehicle_models"
    shutil.rmtree(out / "tuf", ignore_errors=True)
    shutil.rmtree(vdir, ignore_errors=True)
    shutil.copytree(factory, vdir, ignore=shutil.ignore_patterns(".tuf", "*.tmp"))
    TufPublisher.init(repo, keys)
    published = [str(getattr(p, "label", p)) for p in publish(candidate, repo, keys, log=lambda s: None)] if gate_ok else []
    srv, url = _serve(repo)
    try:
        upd = ModelUpdater(url, repo / "metadata" / "1.root.json", vdir, vdir / ".tuf")
        res = upd.poll()
    finally:
        srv.shutdown()
        srv.server_close()
    return {"published": published, "installed": upd.installs, "rejected": upd.rejected,
            "poll": str(getattr(res, "summary", res))[:300], "model_dir": str(vdir)}


def before_after(paths: list[Path], factory: Path, installed: Path, jobs: int, rate_hz: float) -> dict:
    """Factory vs installed models on the same second-week drives of held-out vehicles, next to CC from the true start."""
    from bms_ai.fleet.gate import compare, summarise, vehicle_rows

    runs = compare(paths, factory, installed, rate_hz, jobs, lambda s: None)
    per = vehicle_rows(runs)
    return {"summary": summarise(runs), "vehicles": per}


# Operating-limit checks: the simulated vehicle really went there (cold soak, empty pack); counted, not scored.
LIMIT_CHECKS = frozenset({"cell undervoltage", "cell overvoltage", "cell undertemperature", "cell overtemperature",
                          "pack current", "derating"})


def parse_event(text: str) -> tuple[str, int]:
    """``check#index@Ns`` (edge result) -> (check, index); index -1 for pack-level checks."""
    check, _, rest = text.partition("#")
    idx = rest.split("@")[0]
    return check, int(idx) if idx.lstrip("-").isdigit() else -1


def check_elements() -> dict[str, tuple[str, bool]]:
    """Per check of the fault monitor: what its event index counts (cell, sensor, channel, signal) and whether
    a signal index is the concatenated cells / sensors / pack voltage layout (else it names no cell)."""
    from bms_ai.diagnostics.config import pack_limits
    from bms_ai.diagnostics.detectors import DetectorBank
    from bms_ai.diagnostics.rules import RuleEngine

    n, nt = 4, 2
    rules = RuleEngine(pack_limits("nmc", 50.0), n, nt).rules + DetectorBank(n, nt, plating=False).rules
    return {r.check: (r.element, r.deb.n == n + nt + 1) for r in rules}


def event_element(check: str, idx: int, meta: dict, elements: dict[str, tuple[str, bool]]) -> tuple[str, int]:
    """The element an alarm names: ("cell", c), ("sensor", s) or ("pack", -1); sensor and channel indices are
    not cell numbers (a thermal anomaly on sensor 26 covers the cells under it, ``meta["temp_sensor_cells"]``)."""
    kind, concatenated = elements.get(check, ("cell", False))
    n = len(meta.get("temp_sensor_cells") or []) or None
    if idx < 0 or (kind == "signal" and not concatenated):
        return ("pack", -1)
    if kind in ("channel", "signal") and n is not None:
        kind, idx = ("cell", idx) if idx < n else ("sensor", idx - n)
    if kind == "sensor" and n is not None and idx >= max(meta["temp_sensor_cells"]) + 1:
        return ("pack", -1)                            # the pack voltage of the stuck-signal layout
    return (kind if kind in ("cell", "sensor") else "cell", idx)


def element_cells(element: tuple[str, int], meta: dict) -> set[int]:
    """The cells an alarm element covers (none for a pack-level one)."""
    kind, idx = element
    if kind == "cell":
        return {idx}
    if kind == "sensor":
        return {c for c, g in enumerate(meta.get("temp_sensor_cells") or []) if g == idx}
    return set()


def _alarms_of(events: list[str], flagged: set[int], meta: dict,
               elements: dict[str, tuple[str, bool]]) -> tuple[dict[tuple[str, int], set[str]], dict[str, int]]:
    """Fault alarms per element (cell, sensor or pack) and operating-limit events per check."""
    by_el: dict[tuple[str, int], set[str]] = {}
    limits: dict[str, int] = {}
    for e in events:
        check, idx = parse_event(e)
        if check in LIMIT_CHECKS:
            limits[check] = limits.get(check, 0) + 1
        else:
            by_el.setdefault(event_element(check, idx, meta, elements), set()).add(check)
    for c in flagged:
        by_el.setdefault(("cell", c), set()).add("fleet anomaly")
    return by_el, limits


def score_alarms(drives: list, edge_rows: list[dict], ranking: list[dict], anomaly_z: float) -> dict:
    """Fault alarms (fault monitor detectors and plausibility checks, fleet anomalies above ``anomaly_z``)
    against the injected faults' truth; operating-limit events counted apart.

    An injected fault is detected when any fault alarm names its cell (or the temperature sensor over
    it); a fault alarm on a cell or sensor without an injected fault under it, or at pack level on a
    vehicle without one, is a false alarm.
    """
    flagged: dict[str, set[int]] = {}
    for r in ranking:
        if float(r.get("score") or 0.0) >= anomaly_z:
            flagged.setdefault(r["vehicle"], set()).add(int(r["cell"]))
    elements = check_elements()
    faults: dict[tuple[str, int], str] = {}
    alarms: dict[tuple[str, tuple[str, int]], set[str]] = {}
    cells_of: dict[tuple[str, tuple[str, int]], set[int]] = {}
    limits: dict[str, int] = {}
    for d, e in zip(drives, edge_rows):
        pid = e["pseudonym"]
        for f in d.meta.get("faults", []):
            faults[(pid, int(f["cell"]))] = str(f["kind"])
        by_el, lim = _alarms_of(e.get("events", []), flagged.pop(pid, set()), d.meta, elements)
        for el, checks in by_el.items():
            alarms.setdefault((pid, el), set()).update(checks)
            cells_of[(pid, el)] = element_cells(el, d.meta)
        for k, n in lim.items():
            limits[k] = limits.get(k, 0) + n
    faulty_vehicles = {v for v, _ in faults}
    rows, detected = [], 0
    for (pid, cell), kind in sorted(faults.items()):
        hit = set().union(*(v for k, v in alarms.items() if k[0] == pid and cell in cells_of[k]))
        detected += bool(hit)
        rows.append({"vehicle": pid, "cell": cell, "kind": f"injected {kind}", "level": "detected" if hit else "missed",
                     "by": sorted(hit)})

    def explained(key: tuple[str, tuple[str, int]]) -> bool:
        pid, el = key
        return pid in faulty_vehicles if el[0] == "pack" else any((pid, c) in faults for c in cells_of[key])

    false = [(k, v) for k, v in alarms.items() if not explained(k)]
    rows += [{"vehicle": pid, "element": f"{el[0]} {el[1]}" if el[0] != "pack" else "pack",
              "kind": "false alarm: " + ", ".join(sorted(v)), "level": "false"} for (pid, el), v in false]
    h = _hours(drives)
    return {"injected": len(faults), "detected": detected, "recall": detected / len(faults) if faults else None,
            "false_alarms": len(false), "per_1000_calendar_h": 1000 * len(false) / max(h["calendar_h"], 1e-9),
            "per_1000_awake_h": 1000 * len(false) / max(h["awake_h"], 1e-9), "limit_events": limits,
            "anomaly_z": anomaly_z, **h, "rows": rows}


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), log=print) -> DemoRun:  # noqa: C901 - one story, told in order
    """The whole loop once; returns what it measured (also ``out/demo.json`` and ``out/report/index.html``)."""
    from bms_ai.fleet.gate import gate
    from bms_ai.fleet.learn import learn
    from bms_ai.fleet.pipeline import RANKING, run_ingest, run_label, start_ray
    from bms_ai.fleet.store import open_store
    from bms_ai.models.runtime import default_model_dir

    cfg = cfg.validate()
    out = Path(out)
    shutil.rmtree(out / "store", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    run = DemoRun(config=dataclasses.asdict(cfg))
    factory = Path(default_model_dir())
    start_ray(cfg.address, None if cfg.address else cfg.workers)
    store = open_store(str(out / "store"))

    with _Timer(run, "simulate week 1", log) as st:
        week1 = simulate_week(cfg, 0, cfg.workers)
        run.fleet["week1"] = _hours(week1)
        st.note = f"{run.fleet['week1']}"
    held = [d for i, d in enumerate(week1) if i % cfg.heldout_every == 0]
    with _Timer(run, "vehicles week 1 (estimator, fault monitor, segments)", log):
        edge1 = _edge(week1, store, cfg, str(factory))
    pid_of = {d.name: e["pseudonym"] for d, e in zip(week1, edge1)}
    cell_types = {pid_of[d.name]: str(d.meta["variant"]) for d in week1}
    with _Timer(run, "pipeline: ingest", log) as st:
        ing = run_ingest(store, cfg.workers)
        st.note = f"{ing.get('segments', '')} segments"
    with _Timer(run, "pipeline: labels, SOH, anomalies", log):
        lab = run_label(store, cfg.workers)
    run.pipeline = {"ingest": {k: v for k, v in ing.items() if not isinstance(v, list)},
                    "label": {k: v for k, v in lab.items() if not isinstance(v, list)}}
    with _Timer(run, "learn (pseudo-labelled vehicles only)", log) as st:
        learners = [pid_of[d.name] for d in week1 if d not in held]
        vehicles = labelled_from_store(store, learners, cell_types)
        cand = out / "candidate"
        shutil.rmtree(cand, ignore_errors=True)
        try:
            learn(vehicles, cand, factory, log=lambda s: None)
            run.learn = json.loads((cand / "learn.json").read_text())
        except ValueError as exc:
            run.learn = {"error": str(exc)}
        st.note = run.learn.get("error", f"{len(run.learn.get('models', []))} new model version(s)")
    held_paths = _save_drives(held, out / "heldout_week1")
    with _Timer(run, "gate (held-out vehicles, week 1)", log) as st:
        if "error" in run.learn:
            run.gate = {"accepted": False, "reasons": [run.learn["error"]]}
        else:
            run.gate = gate(cand, held_paths, factory, rate_hz=cfg.edge_rate_hz, jobs=cfg.workers, log=lambda s: None)
        st.note = "ACCEPTED" if run.gate.get("accepted") else f"REFUSED: {'; '.join(run.gate.get('reasons', []))}"
    with _Timer(run, "TUF publish + vehicle update", log) as st:
        run.update = distribute(cand, bool(run.gate.get("accepted")), out, factory)
        st.note = f"installed {run.update['installed']}, rejected {run.update['rejected']}"
    with _Timer(run, "simulate week 2", log) as st:
        week2 = simulate_week(cfg, 1, cfg.workers)
        run.fleet["week2"] = _hours(week2)
        st.note = f"{run.fleet['week2']}"
    with _Timer(run, "vehicles week 2 (installed models)", log):
        edge2 = _edge(week2, store, cfg, run.update["model_dir"])
    with _Timer(run, "before/after on held-out vehicles (week 2, paired)", log):
        held2 = [d for i, d in enumerate(week2) if i % cfg.heldout_every == 0]
        run.after = before_after(_save_drives(held2, out / "heldout_week2"), factory, Path(run.update["model_dir"]),
                                 cfg.workers, cfg.edge_rate_hz)
    with _Timer(run, "pipeline: both weeks (ingest, labels, SOH, anomalies)", log):
        run_ingest(store, cfg.workers)
        lab2 = run_label(store, cfg.workers)
    run.pipeline["both_weeks"] = {k: v for k, v in lab2.items() if not isinstance(v, list)}
    ranking = json.loads(store.get(RANKING)).get("cells", [])
    run.alarms = score_alarms(week1 + week2, edge1 + edge2, ranking, cfg.anomaly_z)
    (out / "demo.json").write_text(json.dumps(dataclasses.asdict(run), indent=1, default=str) + "\n")
    write_demo_report(out / "report", run, store, cell_types)
    return run


def _soh_rows(store, cell_types: dict[str, str]) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    from bms_ai.fleet.pipeline import SOH

    t = pq.read_table(io.BytesIO(store.get(SOH))).to_pydict()
    by: dict[str, list[float]] = {}
    for v, soh in zip(t["vehicle"], t["soh"]):
        by.setdefault(v, []).append(float(soh))
    return [{"vehicle": v, "cell_type": cell_types.get(v, ""), "soh": vals} for v, vals in by.items()]


def _timing_html(run: DemoRun) -> str:
    import html

    rows = "".join(f"<tr><td>{html.escape(s.name)}</td><td>{s.wall_s:.1f}</td><td>{html.escape(s.note)}</td></tr>"
                   for s in run.stages)
    a = run.alarms
    return ("<h2>Alarms against injected faults</h2>"
            f"<p>{a.get('detected')}/{a.get('injected')} injected faults detected; {a.get('false_alarms')} false alarms "
            f"= {a.get('per_1000_calendar_h', 0):.2f} per 1000 vehicle-hours ({a.get('calendar_h')} h), "
            f"{a.get('per_1000_awake_h', 0):.2f} per 1000 awake hours ({a.get('awake_h')} h); "
            f"operating-limit events (counted, not scored): {html.escape(json.dumps(a.get('limit_events', {})))}</p>"
            f"<h2>Stages</h2><table><tr><th>stage</th><th>wall s</th><th>note</th></tr>{rows}</table>")


def write_demo_report(out: Path, run: DemoRun, store, cell_types: dict[str, str]) -> Path:
    """The HTML report: fleet SOH, before/after on the held-out vehicles' second week, alarms, stage timings."""
    from bms_ai.fleet.report import write_report

    after = {"accepted": bool(run.gate.get("accepted")), "reasons": run.gate.get("reasons", []),
             "summary": run.after.get("summary", {"classes": {}}), "vehicles": run.after.get("vehicles", [])}
    return write_report(out, soh=_soh_rows(store, cell_types) or None, gate=after if after["vehicles"] else None,
                        alarms=run.alarms.get("rows") or None, extra_html=_timing_html(run),
                        title="bms_ai fleet demo: one turn of the learning loop")


def _pct(x: float | None) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{100 * x:.2f} %"


def summary_lines(run: DemoRun) -> list[str]:
    """What a user reads at the end."""
    lines = [f"fleet: week 1 {run.fleet.get('week1')}, week 2 {run.fleet.get('week2')}"]
    lines.append(f"gate: {'ACCEPTED' if run.gate.get('accepted') else 'REFUSED ' + '; '.join(run.gate.get('reasons', []))}")
    cls = (run.after.get("summary") or {}).get("classes", {})
    for name, m in cls.items():
        cur, cand, ref = (m.get(k) or {} for k in ("current", "candidate", "cc_oracle"))
        lines.append(f"week 2 {name}: SOC RMSE factory {_pct(cur.get('rmse'))} -> installed {_pct(cand.get('rmse'))}"
                     f" (CC from the true start {_pct(ref.get('rmse'))})")
    a = run.alarms
    lines.append(f"alarms: recall {a.get('detected')}/{a.get('injected')} injected faults, {a.get('false_alarms')} false "
                 f"= {a.get('per_1000_calendar_h', float('nan')):.2f} per 1000 vehicle-h "
                 f"({a.get('per_1000_awake_h', float('nan')):.2f} per 1000 awake h)")
    lines.append("stages: " + ", ".join(f"{s.name.split(' (')[0]} {s.wall_s:.0f} s" for s in run.stages))
    return lines


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `bms-ai fleet demo`."""
    d = DemoConfig()
    p.add_argument("--out", type=out_dir, default="fleet_demo", help="output directory (store, candidate, TUF repo, report)")
    p.add_argument("--vehicles", type=int, default=d.vehicles)
    p.add_argument("--days", type=float, default=d.days, help="days per week-long period")
    p.add_argument("--cells", type=int, default=d.n_cells, help="series cells per pack")
    p.add_argument("--seed", type=nonneg_int, default=d.seed)
    p.add_argument("--heldout-every", type=int, default=d.heldout_every, help="every k-th vehicle is held out from learning")
    p.add_argument("--edge-rate-hz", type=float, default=d.edge_rate_hz)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--address", default=None, help="an existing Ray cluster (default: local Ray on 127.0.0.1)")


def run(args: argparse.Namespace) -> int:
    """CLI entry: one-line errors, the summary at the end."""
    try:
        cfg = DemoConfig(vehicles=args.vehicles, days=args.days, seed=args.seed, n_cells=args.cells,
                         heldout_every=args.heldout_every, edge_rate_hz=args.edge_rate_hz, workers=args.workers, address=args.address).validate()
        r = run_demo(args.out, cfg)
    except ValueError as exc:
        print(f"bms-ai fleet demo: {exc}")
        return 2
    for line in summary_lines(r):
        print(line)
    print(f"report: {Path(args.out) / 'report' / 'index.html'}")
    return 0
