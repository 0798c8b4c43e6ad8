"""`bms-ai demo`: the main job. A bundled recorded drive through the whole graph.

Replays the drive's CAN log on sim time through every node of the graph in
one process, shows a live terminal view (SOC, SOH, cell spread, active
diagnostics, progress) and writes an HTML report with plots next to the MCAP
log the cloud uploader recorded.
"""

from __future__ import annotations

import argparse
import base64
import html
import importlib
import io
import json
import math
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.core.cliargs import out_dir, positive_float, replay_speed
from bms_ai.core.levels import level_name, split_status_name
from bms_ai.core.paths import share_path
from bms_ai.graph import NODES, OPTION_BY_NAME, graph_from_options
from bms_ai.sim.dataset import read_meta


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The `bms-ai demo` flags."""
    p.add_argument("--drive", default="nmc_udds", help="bundled drive name (data/drives/NAME) or a drive directory")
    p.add_argument("--speed", type=replay_speed, default=20.0, help="replay speed factor; 0 = as fast as possible")
    p.add_argument("--out", type=out_dir, default="out/demo", help="report directory")
    p.add_argument("--params", default=OPTION_BY_NAME["params_file"].default, help=OPTION_BY_NAME["params_file"].help)
    p.add_argument("--no-live", action="store_true", help="no live view (plain progress lines)")
    p.add_argument("--timeout", type=positive_float, default=600.0, help="give up after this many seconds")


def resolve_drive(name: str) -> Path:
    """A drive directory given as a path or as the name of a bundled drive."""
    p = Path(name)
    if p.is_dir():
        return p
    d = share_path("data", "drives", name)
    if d.is_dir():
        return d
    have = sorted(x.name for x in share_path("data", "drives").glob("*") if x.is_dir())
    raise FileNotFoundError(f"drive '{name}' not found; bundled drives: {have}")


@dataclass
class Record:
    """What the demo saw on the topics, for the live view and the report."""

    t: list[float] = field(default_factory=list)
    soc: list[float] = field(default_factory=list)
    capacity: list[float] = field(default_factory=list)
    mt: list[float] = field(default_factory=list)
    voltage: list[float] = field(default_factory=list)
    current: list[float] = field(default_factory=list)
    spread_mv: list[float] = field(default_factory=list)
    tmax: list[float] = field(default_factory=list)
    diag: dict[str, tuple[int, str, dict]] = field(default_factory=dict)
    diag_events: list[tuple[float, str, int, str]] = field(default_factory=list)
    t_end: float = math.inf  # CAN time of the drive's last frame
    lock: threading.Lock = field(default_factory=threading.Lock)


def _probe(runner, rec: Record, namespace: str):
    from diagnostic_msgs.msg import DiagnosticArray
    from rclpy.node import Node
    from sensor_msgs.msg import BatteryState

    from bms_ai.nodes.common import GRAPH_SUB_QOS
    from bms_ai.nodes.convert import time_to_float

    node = Node("demo_view", namespace=namespace, context=runner.context)

    def stamp(m) -> float:
        return time_to_float(m.header.stamp)

    def on_state(m) -> None:
        with rec.lock:
            rec.t.append(stamp(m))
            rec.soc.append(m.percentage)
            rec.capacity.append(m.capacity)

    def on_meas(m) -> None:
        cv = np.asarray(m.cell_voltage, dtype=float)
        with rec.lock:
            rec.mt.append(stamp(m))
            rec.voltage.append(m.voltage)
            rec.current.append(m.current)
            rec.spread_mv.append(1000 * (np.nanmax(cv) - np.nanmin(cv)) if np.isfinite(cv).any() else math.nan)
            rec.tmax.append(m.temperature)

    def on_diag(m) -> None:
        with rec.lock:
            for st in m.status:
                lv = st.level[0] if isinstance(st.level, bytes) else int(st.level)
                prev = rec.diag.get(st.name)
                if prev is None or prev[0] != lv:
                    rec.diag_events.append((stamp(m), st.name, lv, st.message))
                rec.diag[st.name] = (lv, st.message, {kv.key: kv.value for kv in st.values})

    node.create_subscription(BatteryState, "battery_state", on_state, GRAPH_SUB_QOS)
    node.create_subscription(BatteryState, "pack/measurements", on_meas, GRAPH_SUB_QOS)
    node.create_subscription(DiagnosticArray, "/diagnostics", on_diag, GRAPH_SUB_QOS)
    runner.executor.add_node(node)
    runner.nodes.append(node)
    return node


def _last(xs: list[float]) -> float:
    """Latest finite value (after the drive ends the topics carry NaN)."""
    return next((x for x in reversed(xs[-50:]) if math.isfinite(x)), math.nan)


def _view(rec: Record, t0: float, t_end: float, live: bool) -> str:
    with rec.lock:
        mt = min(rec.mt[-1], t_end) if rec.mt else t0
        soc, cap = _last(rec.soc), _last(rec.capacity)
        v, i, spread, tmax = _last(rec.voltage), _last(rec.current), _last(rec.spread_mv), _last(rec.tmax)
        active = [(n, lv, msg) for n, (lv, msg, _) in rec.diag.items() if lv != 0]
        soh = next((vals.get("soh") for n, (lv, msg, vals) in rec.diag.items() if "soh" in vals), None)
    prog = 100 * (mt - t0) / max(t_end - t0, 1e-9)
    bar = "#" * int(prog / 4) + "." * (25 - int(prog / 4))
    lines = [
        f"bms_ai demo  [{bar}] {prog:5.1f} %   drive time {mt - t0:7.1f} s",
        f"  SOC {100 * soc:6.2f} %   SOH {soh or 'n/a':>8}   capacity {cap:6.2f} Ah",
        f"  pack {v:7.2f} V {i:8.2f} A   cell spread {spread:6.1f} mV   T max {tmax:5.1f} degC",
        "  diagnostics: " + (", ".join(f"{split_status_name(n)[1]}={level_name(lv)}" for n, lv, _ in active[:6])
                             if active else "all OK"),
    ]
    text = "\n".join(lines)
    return ("\x1b[H\x1b[2J" + text) if live else text.replace("\n", " |")


def _fig_png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode()


def _truth(drive: Path):
    p = drive / "truth.parquet"
    if not p.is_file():
        return None
    try:
        import pyarrow.parquet as pq
    except ImportError:
        return None
    cols = [c for c in ("t_can", "soc", "soh") if c in pq.read_schema(p).names]
    tab = pq.read_table(p, columns=cols)
    return {c: tab.column(c).to_numpy() for c in cols}


def write_report(rec: Record, drive: Path, out: Path, summary: dict) -> Path:
    """report.html (plots, diagnostics) and summary.json in ``out``; the SOC error against truth goes into summary."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    truth = _truth(drive)
    figs = []
    with rec.lock:  # the drive only: after its end the topics carry aged-out values
        keep = np.array(rec.t) <= rec.t_end
        t, soc = np.array(rec.t)[keep], np.array(rec.soc)[keep]
        mt = np.array(rec.mt)
        v, i, spread = np.array(rec.voltage), np.array(rec.current), np.array(rec.spread_mv)
        events = list(rec.diag_events)
        final = dict(rec.diag)
    t0 = mt[0] if mt.size else 0.0
    if t.size:
        fig, ax = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
        ax[0].plot(t - t0, 100 * soc, label="estimator")
        if truth is not None and "soc" in truth:
            ax[0].plot(truth["t_can"] - t0, 100 * truth["soc"], "k--", lw=1, label="truth")
            err = 100 * (soc - np.interp(t, truth["t_can"], truth["soc"]))
            ax[1].plot(t - t0, err)
            summary["soc_rmse_pct"] = float(np.sqrt(np.nanmean(err ** 2)))
            summary["soc_max_abs_err_pct"] = float(np.nanmax(np.abs(err)))
        ax[0].set_ylabel("SOC [%]")
        ax[0].legend()
        ax[1].set_ylabel("SOC error [pp]")
        ax[1].set_xlabel("drive time [s]")
        figs.append(("State of charge", _fig_png(fig)))
        plt.close(fig)
    if mt.size:
        fig, ax = plt.subplots(3, 1, figsize=(9, 6), sharex=True)
        ax[0].plot(mt - t0, v)
        ax[0].set_ylabel("pack V")
        ax[1].plot(mt - t0, i)
        ax[1].set_ylabel("pack I [A]")
        ax[2].plot(mt - t0, spread)
        ax[2].set_ylabel("cell spread [mV]")
        ax[2].set_xlabel("drive time [s]")
        figs.append(("Measurements (pack/measurements)", _fig_png(fig)))
        plt.close(fig)
    rows = "".join(f"<tr><td>{e[0] - t0:.1f}</td><td>{html.escape(e[1])}</td><td>{level_name(e[2])}</td>"
                   f"<td>{html.escape(e[3])}</td></tr>" for e in events)
    finals = "".join(f"<tr><td>{html.escape(n)}</td><td>{level_name(lv)}</td><td>{html.escape(m)}</td></tr>"
                     for n, (lv, m, _) in sorted(final.items()))
    body = "".join(f"<h2>{html.escape(title)}</h2><img src='data:image/png;base64,{png}'/>" for title, png in figs)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>bms_ai demo: {html.escape(drive.name)}</title>
<style>body{{font-family:sans-serif;max-width:960px;margin:auto}}td,th{{padding:2px 8px;text-align:left}}</style></head>
<body><h1>bms_ai demo: {html.escape(drive.name)}</h1>
<pre>{html.escape(json.dumps(summary, indent=2))}</pre>{body}
<h2>Diagnostics at the end</h2><table><tr><th>check</th><th>level</th><th>message</th></tr>{finals}</table>
<h2>Diagnostic level changes</h2><table><tr><th>t [s]</th><th>check</th><th>level</th><th>message</th></tr>{rows}</table>
</body></html>"""
    path = out / "report.html"
    path.write_text(page)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return path


def available_nodes() -> tuple[list[str], dict[str, str]]:
    """Graph nodes whose modules import here, and why the others do not (an optional extra missing)."""
    ok, missing = [], {}
    for name, _exe, module in NODES:
        try:
            importlib.import_module(module)
            ok.append(name)
        except ImportError as exc:
            missing[name] = str(exc)
    return ok, missing


def run(args: argparse.Namespace) -> int:
    """`bms-ai demo`: replay the drive through the graph, show it live, write the report; 1 if nothing arrived."""
    from bms_ai.can.logs import read_log
    from bms_ai.ros.runner import GraphRunner

    drive = resolve_drive(args.drive)
    log = next((drive / n for n in ("can.blf", "can.asc", "can.log") if (drive / n).is_file()), None)
    if log is None:
        raise FileNotFoundError(f"{drive}: no can.blf/can.asc/can.log")
    meta = read_meta(drive) if (drive / "meta.json").is_file() else {}
    pack_cfg = share_path("config", meta.get("pack_config", "pack96.yaml"))
    out = Path(args.out) / drive.name
    out.mkdir(parents=True, exist_ok=True)
    frames = read_log(log)
    t_start, t_end = float(frames.ts[0]), float(frames.ts[-1])
    nodes, missing = available_nodes()
    ingest = None
    if "cloud_uploader" in nodes:  # the cloud side too: a reference ingest server on 127.0.0.1
        import secrets

        from bms_ai.uplink.ingest_server import IngestServer

        token = secrets.token_hex(16)
        ingest = IngestServer(out / "cloud", token=token).start()
        token_file = out / "ingest.token"  # the uploader reads its token from a file, never a parameter
        token_file.touch(mode=0o600)
        token_file.write_text(token)
    options = {"params_file": args.params, "nodes": ",".join(nodes), "pack_config": str(pack_cfg),
               "can_log": str(log), "replay_speed": repr(float(args.speed)), "use_sim_time": "true"}
    uploader = {"spool_dir": str(out / "spool"), "backend_url": ingest.url if ingest else "",
                "token_file": str(token_file) if ingest else "", "shutdown_drain_s": 5.0}
    # the replay also waits for this view's reader, so the view sees every sample (drained() counts on it)
    specs = graph_from_options(options, overrides={"cloud_uploader": uploader,
                                                   "can_bridge": {"wait_for_subscribers": len(nodes)}})
    print(f"bms-ai demo: drive {drive.name} ({t_end - t_start:.0f} s, {len(frames)} frames) at {args.speed:g}x "
          f"through {', '.join(nodes)}" + (f"; not installed: {', '.join(missing)}" if missing else ""),
          file=sys.stderr)
    wall0 = time.monotonic()
    runner = GraphRunner(specs)
    rec = Record(t_end=t_end)
    _probe(runner, rec, specs[0].namespace)
    live = sys.stdout.isatty() and not args.no_live
    bridge = runner.node("can_bridge")
    done = threading.Event()

    def view() -> None:
        while not done.wait(0.5 if live else 5.0):
            print(_view(rec, t_start, t_end, live), flush=True)

    threading.Thread(target=view, daemon=True).start()

    at_end: dict[str, int] = {}

    estimator = runner.node("estimator") if "estimator" in nodes else None

    def drained() -> bool:  # every sample can_bridge published is through the estimator and in the view
        published = bridge.samples_published
        with rec.lock:
            measurements, estimates = len(rec.mt), len(rec.t)
        return measurements >= published and (
            estimator is None or (estimator.steps + estimator.rejected >= published and estimates >= estimator.steps))

    def finished() -> bool:
        if bridge.source.finished and not at_end:
            with rec.lock:  # what the graph said as the drive ended, before the bus went silent
                at_end.update({n: lv for n, (lv, _, _) in rec.diag.items()})
        if time.monotonic() - wall0 > args.timeout:
            return True
        # the graph has worked through the whole drive, then a second of bus silence for what follows it
        return bridge.source.finished and drained() and bridge.silence() > 1.0

    try:
        runner.spin(until=finished)
    finally:
        done.set()
        runner.shutdown()
        if ingest is not None:
            uploaded = ingest.store.list()
            ingest.stop()
    wall = time.monotonic() - wall0
    print(_view(rec, t_start, t_end, False), flush=True)
    raised = {split_status_name(n)[1]: level_name(lv) for n, lv in sorted(at_end.items()) if lv != 0}
    print("diagnostics at the end of the drive: " + (", ".join(f"{n}={lv}" for n, lv in raised.items())
                                                     if raised else "all OK")
          + " (after it the bus is silent: timeouts and STALE are expected)", flush=True)
    damaged = bridge.last_error if bridge.source_errors else ""
    if damaged:  # the replay stopped where the log became unreadable: say how much of the drive the report holds
        covered = (rec.mt[-1] - t_start) if rec.mt else 0.0
        length = meta.get("duration_s")
        of = f" of the drive's {float(length):.0f} s" if isinstance(length, (int, float)) else ""
        print(f"warning: CAN log damaged ({damaged}): the report covers its first {covered:.0f} s{of}", flush=True)
    summary = {
        "drive": drive.name, "chemistry": meta.get("chemistry"), "drive_seconds": t_end - t_start,
        "wall_seconds": wall, "replay_speed": args.speed, "frames": len(frames),
        "samples_received": len(rec.mt), "estimates_received": len(rec.t), "nodes": nodes,
        "diagnostics_at_drive_end": {n: level_name(lv) for n, lv in sorted(at_end.items())},
        "diagnostics_after_bus_silence": {n: level_name(lv) for n, (lv, _, _) in sorted(rec.diag.items())},
        "can_log_damaged": damaged,
    }
    if ingest is not None:
        summary["segments_uploaded_to_ingest_server"] = len(uploaded)
    report = write_report(rec, drive, out, summary)
    mcaps = sorted(str(p) for p in out.rglob("*.mcap"))
    print(f"report: {report}" + (f"\nMCAP log: {len(mcaps)} segment(s) under {out}" if mcaps else "")
          + (f" ({len(uploaded)} uploaded to the ingest server)" if ingest is not None else ""))
    return 0 if rec.mt else 1
