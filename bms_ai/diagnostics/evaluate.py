"""`bms-ai evaluate --faults`: learned+rules vs thresholds-only, side by side, on recorded drives.

For every drive directory (bms_ai/sim layout) the rules and the detectors are
replayed over the decoded CAN log exactly as fault_monitor runs them. Metrics:

- detection per fault (type, severity): the first alarm active at or after
  the true onset (an alarm raised earlier and still active counts as an early
  warning, negative delay) - rule checks plus the detector checks relevant to
  the fault kind *naming the faulty cell* for the full system, rule checks
  only for the baseline;
  delay from onset; lead time of the full system over the baseline (when the
  baseline never fires, the lead is at least the remaining drive time, shown
  as ">=");
- whether the first detector alarm names the faulty cell (or the sensor
  covering it);
- false alarms: alarm events on fault-free drives (and before the onset on
  fault drives) per 100 h, counted separately for detectors, plausibility
  rules and limit rules (a limit event on a fault-free drive is a real limit
  violation of the driving, reported, not hidden).
Writes summary.json, results.csv, report.html and PNG plots to report_dir.
"""

from __future__ import annotations

import argparse
import csv
import html
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.diagnostics.detectors import DetectorBank
from bms_ai.diagnostics.replay import Measured, ReplayResult, load_measured, replay
from bms_ai.diagnostics.rules import Event

LIMIT_CHECKS = {"cell overvoltage", "cell undervoltage", "cell overtemperature", "cell undertemperature",
                "charge overcurrent", "discharge overcurrent"}
DETECTOR_CHECKS = set(DetectorBank.CHECKS)
# a cell fault is "located" when the first detector alarm names the cell (or its temperature sensor)
CELL_FAULTS = {"isc", "self_discharge", "thermal", "plating"}
CELL_CHECKS = {"internal short", "imbalance growth", "thermal anomaly", "lithium plating"}
# detector checks that count as detecting a fault kind (the generic anomaly score is reported, not counted)
RELEVANT = {"isc": {"internal short", "imbalance growth", "thermal anomaly"},
            "self_discharge": {"internal short", "imbalance growth"},
            "thermal": {"thermal anomaly"}, "plating": {"lithium plating"}}
# sensor / communication faults: only the rule meant for them counts (several faults share one drive)
RULE_RELEVANT = {"sensor_stuck": {"stuck signal"}, "open_wire": {"open wire"}, "sensor_drift": {"current sensor offset",
                 "pack voltage plausibility", "cell voltage spread", "temperature spread", "stuck signal"},
                 "can_timeout": {"can timeout"}}
SEVERITY_UNIT = {"isc": "ohm", "self_discharge": "A", "thermal": "W", "plating": "Ah lost"}
# the specified severities; weaker injected faults are reported but not counted in recall
IN_SPEC = {"isc": lambda m: m <= 100.0, "plating": lambda m: m >= 0.01}


@dataclass
class FaultRow:
    """One injected fault: when the full system and the thresholds-only baseline first alarmed."""

    drive: str
    kind: str
    severity: str
    cell: int
    onset_s: float
    end_s: float
    system_s: float = math.nan
    system_check: str = ""
    baseline_s: float = math.nan
    baseline_check: str = ""
    located: bool | None = None
    in_spec: bool = True

    @property
    def detected(self) -> bool:
        """Whether the full system alarmed at or after the onset."""
        return math.isfinite(self.system_s)

    @property
    def delay_s(self) -> float:
        """Full-system detection time after the onset (s)."""
        return self.system_s - self.onset_s

    @property
    def baseline_delay_s(self) -> float:
        """Baseline detection time after the onset (s)."""
        return self.baseline_s - self.onset_s

    @property
    def lead_s(self) -> tuple[float, bool]:
        """(lead over baseline, is a lower bound)."""
        if not self.detected:
            return math.nan, False
        if math.isfinite(self.baseline_s):
            return self.baseline_s - self.system_s, False
        return self.end_s - self.system_s, True


@dataclass
class DriveEval:
    """Per drive: false alarms by group, fault-free exposure and step cost."""

    name: str
    hours: float
    fault_free: bool
    false_alarms: dict[str, list[Event]] = field(default_factory=dict)
    exposure_h: float = 0.0
    step_us_p50: float = 0.0
    step_us_p99: float = 0.0


def _active_from(e: Event, t: float) -> bool:
    """Set at/after t, or set earlier and still active at t (an early warning of the fault)."""
    return e.set_time >= t - 1e-9 or math.isnan(e.cleared) or e.cleared >= t


def _first(events: list[Event], t_from: float, checks: set[str] | None = None) -> Event | None:
    ev = [e for e in events if _active_from(e, t_from) and (checks is None or e.check in checks)]
    return min(ev, key=lambda e: e.set_time) if ev else None


def _located(ev: Event | None, cell: int) -> bool | None:
    if ev is None or cell < 0:
        return None
    if ev.check == "thermal anomaly":
        return ev.index == cell // 3
    if ev.check == "lithium plating":
        return True  # pack-level alarm with the coldest sensor as evidence
    return ev.index == cell


def evaluate_drive(m: Measured, r: ReplayResult) -> tuple[list[FaultRow], DriveEval]:
    """Fault rows and false alarms of one replayed drive."""
    rows: list[FaultRow] = []
    all_ev = r.rule_events + r.detector_events
    onsets = [float(f["onset_s"]) for f in m.faults]
    t_first_fault = min(onsets) if onsets else math.inf
    end = float(m.t[-1])
    for f in m.faults:
        on = float(f["onset_s"])
        mag = f.get("magnitude", 0.0)
        sev = f"{mag:g} {SEVERITY_UNIT.get(f['kind'], '')}".strip() if f["kind"] in SEVERITY_UNIT else (
            f.get("target") or "-")
        row = FaultRow(m.name, f["kind"], sev, int(f.get("cell", -1) if f.get("cell") is not None else -1), on, end)
        row.in_spec = bool(IN_SPEC.get(f["kind"], lambda _m: True)(float(mag or 0.0)))
        # the full system: any alarm from the onset on; the baseline: rule checks only
        rule_ok = RULE_RELEVANT.get(f["kind"])  # None: any rule check
        cell = int(f.get("cell", -1) if f.get("cell") is not None else -1)
        # a detector alarm counts only if it names the faulty cell (or its sensor): every alarm must say which cell
        det = [e for e in r.detector_events if e.check in RELEVANT.get(f["kind"], set()) and
               (f["kind"] not in CELL_FAULTS or _located(e, cell) is not False)]
        e_sys = _first(r.rule_events + det, on, None if rule_ok is None else rule_ok | RELEVANT.get(f["kind"], set()))
        e_base = _first(r.rule_events, on, rule_ok)
        if e_sys is not None:
            row.system_s, row.system_check = e_sys.set_time, e_sys.check
        if e_base is not None:
            row.baseline_s, row.baseline_check = e_base.set_time, e_base.check
        if f["kind"] in CELL_FAULTS:
            row.located = _located(_first(r.detector_events, on, CELL_CHECKS), row.cell)
        rows.append(row)
    de = DriveEval(m.name, m.hours, not m.faults, step_us_p50=r.step_us_p50, step_us_p99=r.step_us_p99)
    de.exposure_h = min(t_first_fault, end) / 3600.0
    for group, checks in (("detector", DETECTOR_CHECKS), ("plausibility", None), ("limit", LIMIT_CHECKS)):
        # before the first onset, and not an early warning still active at the onset
        ev = [e for e in all_ev if e.set_time < t_first_fault and
              not (math.isfinite(t_first_fault) and _active_from(e, t_first_fault))]
        if group == "plausibility":
            ev = [e for e in ev if e.check not in DETECTOR_CHECKS and e.check not in LIMIT_CHECKS]
        else:
            ev = [e for e in ev if e.check in checks]
        de.false_alarms[group] = ev
    return rows, de


def _one(d: Path, cache: Path) -> tuple[Measured, ReplayResult, float]:
    t0 = time.perf_counter()
    m = load_measured(d, cache)
    return m, replay(m), time.perf_counter() - t0


def run_fault_evaluation(drive_dirs: list[str | Path], report_dir: str | Path, cache_dir: str | Path | None = None,
                         log=print, jobs: int = 1) -> dict:
    """Evaluate learned+rules vs thresholds-only on drives; write the report; return the summary."""
    report = Path(report_dir)
    report.mkdir(parents=True, exist_ok=True)
    # decoded logs are large: never cache them next to a report that gets committed
    cache = Path(cache_dir) if cache_dir else Path(tempfile.gettempdir()) / "bms_ai_fault_cache"
    dirs = _expand(drive_dirs)
    if not dirs:
        raise FileNotFoundError(f"no drive directories (with meta.json) in {[str(d) for d in drive_dirs]}")
    rows: list[FaultRow] = []
    drives: list[DriveEval] = []
    traces: dict[str, tuple[Measured, ReplayResult]] = {}
    if jobs > 1 and len(dirs) > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=jobs) as ex:
            done = list(ex.map(_one, dirs, [cache] * len(dirs)))
    else:
        done = [_one(d, cache) for d in dirs]
    for m, r, dt in done:
        fr, de = evaluate_drive(m, r)
        rows += fr
        drives.append(de)
        traces[m.name] = (m, r)
        log(f"{m.name}: {m.hours * 60:.0f} min, {len(r.rule_events)} rule / {len(r.detector_events)} detector events, "
            f"{dt:.1f} s")
    summary = _summarise(rows, drives)
    _write(report, rows, drives, summary, traces)
    return summary


def _expand(paths: list[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / "meta.json").is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(sorted(q.parent for q in p.glob("*/meta.json")))
        else:
            raise FileNotFoundError(f"{p}: not a drive directory or a folder of drives")
    return out


def _summarise(all_rows: list[FaultRow], drives: list[DriveEval]) -> dict:
    rows = [r for r in all_rows if r.in_spec]
    by_kind: dict[str, dict] = {}
    for kind in sorted({r.kind for r in rows}):
        rr = [r for r in rows if r.kind == kind]
        det = [r for r in rr if r.detected]
        base = [r for r in rr if math.isfinite(r.baseline_s)]
        leads = [r.lead_s[0] for r in det]
        by_kind[kind] = {
            "faults": len(rr), "recall": len(det) / len(rr), "baseline_recall": len(base) / len(rr),
            "median_delay_s": float(np.median([r.delay_s for r in det])) if det else None,
            "baseline_median_delay_s": float(np.median([r.baseline_delay_s for r in base])) if base else None,
            "median_lead_s": float(np.median(leads)) if leads else None,
            "located": sum(1 for r in rr if r.located) if kind in CELL_FAULTS else None,
        }
    ff_h = sum(d.exposure_h for d in drives)
    fa = {g: sum(len(d.false_alarms.get(g, [])) for d in drives) for g in ("detector", "plausibility", "limit")}
    n_ff = sum(1 for d in drives if d.fault_free)
    return {
        "faults": len(rows), "below_spec_faults": len(all_rows) - len(rows),
        "recall": (sum(r.detected for r in rows) / len(rows)) if rows else None,
        "baseline_recall": (sum(math.isfinite(r.baseline_s) for r in rows) / len(rows)) if rows else None,
        "by_kind": by_kind, "fault_free_exposure_h": ff_h, "fault_free_drives": n_ff,
        "false_alarm_events": fa,
        "false_alarms_per_100h": {g: (100.0 * n / ff_h if ff_h > 0 else None) for g, n in fa.items()},
        # zero events in H hours: the 95 % upper bound of the rate is 3/H (rule of three)
        "detector_false_alarm_rate_95ci_upper_per_1000h": (1000.0 * (3.0 if fa["detector"] == 0 else
                                                                      _poisson_upper(fa["detector"])) / ff_h)
        if ff_h > 0 else None,
        "step_us_p50": float(np.median([d.step_us_p50 for d in drives])) if drives else None,
        "step_us_p99": float(np.max([d.step_us_p99 for d in drives])) if drives else None,
    }


def _poisson_upper(k: int) -> float:
    """Approximate 95 % upper bound of a Poisson mean with k observed events (Wilson-Hilferty)."""
    k1 = k + 1
    return k1 * (1 - 1 / (9 * k1) + 1.645 / (3 * math.sqrt(k1))) ** 3


def _fmt_s(x: float) -> str:
    return "-" if not math.isfinite(x) else f"{x:.0f}"


def _write(report: Path, rows: list[FaultRow], drives: list[DriveEval], summary: dict,
           traces: dict[str, tuple[Measured, ReplayResult]]) -> None:
    (report / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    with open(report / "results.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["drive", "kind", "severity", "in_spec", "cell", "onset_s", "system_detect_s", "system_check", "delay_s",
                    "baseline_detect_s", "baseline_check", "baseline_delay_s", "lead_s", "lead_is_lower_bound",
                    "located"])
        for r in rows:
            lead, lb = r.lead_s
            w.writerow([r.drive, r.kind, r.severity, r.in_spec, r.cell, r.onset_s, r.system_s, r.system_check, r.delay_s,
                        r.baseline_s, r.baseline_check, r.baseline_delay_s, lead, lb, r.located])
    plots = _plots(report, rows, traces)
    _html(report, rows, drives, summary, plots)


def _plots(report: Path, rows: list[FaultRow], traces: dict[str, tuple[Measured, ReplayResult]]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: list[str] = []
    if rows:
        fig, ax = plt.subplots(figsize=(9, 0.35 * len(rows) + 1.5))
        y = np.arange(len(rows))
        sys_d = [r.delay_s / 60 if r.detected else np.nan for r in rows]
        base_d = [r.baseline_delay_s / 60 if math.isfinite(r.baseline_s) else np.nan for r in rows]
        ax.barh(y - 0.2, sys_d, 0.4, label="learned + rules")
        ax.barh(y + 0.2, base_d, 0.4, label="thresholds only")
        ax.set_yticks(y, [f"{r.drive} ({r.kind} {r.severity})" for r in rows], fontsize=7)
        ax.set_xlabel("detection delay from true onset [min] (no bar = not detected)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(report / "delays.png", dpi=90)
        plt.close(fig)
        out.append("delays.png")
    for name, (m, r) in traces.items():
        cell_faults = [f for f in m.faults if f.get("kind") in ("isc", "self_discharge", "thermal")]
        pl = [f for f in m.faults if f.get("kind") == "plating"]
        if not (cell_faults or pl) or r.trace["t"].size == 0:
            continue
        tr = r.trace
        fig, axes = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
        t = tr["t"] / 60
        for f in cell_faults + pl:
            for ax in axes:
                ax.axvline(float(f["onset_s"]) / 60, color="k", ls="--", lw=0.8)
        c = cell_faults[0].get("cell", -1) if cell_faults else -1
        leak = tr["leak"]
        axes[0].plot(t, np.delete(leak, c, axis=1) if c >= 0 else leak, color="0.75", lw=0.5)
        if c >= 0:
            axes[0].plot(t, leak[:, c], color="C3", lw=1.5, label=f"cell {c}")
            axes[0].legend(loc="upper left")
        axes[0].set_ylabel("extra leak [A]")
        cus = tr["th_cusum"]
        axes[1].plot(t, cus, color="0.75", lw=0.5)
        if c >= 0:
            axes[1].plot(t, cus[:, c // 3], color="C1", lw=1.5, label=f"sensor {c // 3}")
            axes[1].legend(loc="upper left")
        axes[1].set_ylabel("thermal CUSUM")
        axes[2].plot(t, tr["p_plating"], color="C0", lw=1, label="p(plating)")
        axes[2].plot(t, tr["score"], color="C2", lw=1, label="anomaly score")
        axes[2].legend(loc="upper left")
        axes[2].set_xlabel("time [min]")
        for e in r.detector_events + r.rule_events:
            axes[0].axvline(e.set_time / 60, color="C3" if e.check in DETECTOR_CHECKS else "C4", lw=0.4, alpha=0.5)
        fig.suptitle(name)
        fig.tight_layout()
        fn = f"trace_{name}.png"
        fig.savefig(report / fn, dpi=80)
        plt.close(fig)
        out.append(fn)
    return out


def _html(report: Path, rows: list[FaultRow], drives: list[DriveEval], s: dict, plots: list[str]) -> None:
    e = html.escape
    parts = ["<html><head><meta charset='utf-8'><title>bms_ai fault evaluation</title>",
             "<style>body{font-family:sans-serif;max-width:1100px}td,th{border:1px solid #ccc;padding:2px 6px;"
             "font-size:13px}table{border-collapse:collapse}</style></head><body>",
             "<h1>Fault detection: learned + rules vs thresholds only</h1>",
             f"<p>{s['faults']} injected faults, {s['fault_free_drives']} fault-free drives, "
             f"{s['fault_free_exposure_h']:.2f} h of fault-free driving (incl. time before onsets).</p>",
             "<h2>Per fault type</h2><table><tr><th>kind</th><th>faults</th><th>recall</th><th>baseline recall</th>"
             "<th>median delay [s]</th><th>baseline median delay [s]</th><th>median lead [s]</th><th>located</th></tr>"]
    for k, v in s["by_kind"].items():
        parts.append(f"<tr><td>{e(k)}</td><td>{v['faults']}</td><td>{v['recall']:.0%}</td>"
                     f"<td>{v['baseline_recall']:.0%}</td><td>{_opt(v['median_delay_s'])}</td>"
                     f"<td>{_opt(v['baseline_median_delay_s'])}</td><td>{_opt(v['median_lead_s'])}</td>"
                     f"<td>{'-' if v['located'] is None else v['located']}</td></tr>")
    parts.append("</table><h2>False alarms (fault-free driving)</h2><table><tr><th>group</th><th>events</th>"
                 "<th>per 100 h</th></tr>")
    for g, n in s["false_alarm_events"].items():
        parts.append(f"<tr><td>{g}</td><td>{n}</td><td>{_opt(s['false_alarms_per_100h'][g], 2)}</td></tr>")
    parts.append(f"</table><p>Detector false-alarm rate, 95 % upper bound: "
                 f"{_opt(s['detector_false_alarm_rate_95ci_upper_per_1000h'], 1)} per 1000 h. "
                 f"Rules+detectors step: p50 {_opt(s['step_us_p50'])} us, worst p99 {_opt(s['step_us_p99'])} us.</p>")
    parts.append("<h2>Per fault</h2><table><tr><th>drive</th><th>kind</th><th>severity</th><th>cell</th>"
                 "<th>onset [s]</th><th>system: delay [s] (check)</th><th>baseline: delay [s] (check)</th>"
                 "<th>lead [s]</th><th>located</th></tr>")
    for r in rows:
        lead, lb = r.lead_s
        parts.append(f"<tr><td>{e(r.drive)}</td><td>{e(r.kind)}</td><td>{e(r.severity)}{'' if r.in_spec else ' (below spec)'}</td><td>{r.cell}</td>"
                     f"<td>{r.onset_s:.0f}</td><td>{_fmt_s(r.delay_s)} ({e(r.system_check)})</td>"
                     f"<td>{_fmt_s(r.baseline_delay_s)} ({e(r.baseline_check)})</td>"
                     f"<td>{('&ge;' if lb else '') + _fmt_s(lead)}</td><td>{'-' if r.located is None else r.located}</td></tr>")
    parts.append("</table><h2>Events on fault-free driving</h2><table><tr><th>drive</th><th>group</th><th>check</th>"
                 "<th>tier</th><th>index</th><th>set [s]</th></tr>")
    for d in drives:
        for g, evs in d.false_alarms.items():
            for ev in evs[:20]:
                parts.append(f"<tr><td>{e(d.name)}</td><td>{g}</td><td>{e(ev.check)}</td><td>{ev.tier}</td>"
                             f"<td>{ev.index}</td><td>{ev.set_time:.0f}</td></tr>")
    parts.append("</table>")
    parts.append(_provenance_html())
    parts.append("<h2>Plots</h2>")
    for p in plots:
        parts.append(f"<p><img src='{e(p)}' style='max-width:100%'></p>")
    parts.append("</body></html>")
    (report / "report.html").write_text("\n".join(parts))


def _provenance_html() -> str:
    """Which drives the shipped thresholds / model were fitted on (those results are in-sample)."""
    from bms_ai.core.paths import share_path

    p = share_path("models", "faults", "manifest.json")
    if not p.is_file():
        return "<p>No models/faults/manifest.json: detectors ran with default thresholds.</p>"
    man = json.loads(p.read_text())
    rows = []
    for m in man.get("models", []):
        rows.append(f"<li><b>{html.escape(m['name'])}</b> ({html.escape(m.get('file', ''))}, sha256 "
                    f"{html.escape(m.get('sha256', '')[:12])}...): fitted on "
                    f"{html.escape(', '.join(m.get('provenance', {}).get('drives', [])))}</li>")
    return ("<h2>Provenance</h2><p>Results on drives listed here are in-sample for that model; "
            "the others are held out.</p><ul>" + "".join(rows) + "</ul>")


def _opt(x, nd: int = 0) -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`bms-ai evaluate --faults` arguments."""
    from bms_ai.core.cliargs import out_dir, positive_int

    p.add_argument("drives", nargs="+", help="drive directories (bms_ai/sim layout) or folders of them")
    p.add_argument("--report", type=out_dir, required=True, help="output directory for report.html, summary.json, plots")
    p.add_argument("--cache", default=None, help="decoded-log cache directory (default: $TMPDIR/bms_ai_fault_cache)")
    p.add_argument("--jobs", type=positive_int, default=1, help="drives replayed in parallel")


def run(args: argparse.Namespace) -> int:
    """Evaluate, write the report and print the headline figures."""
    s = run_fault_evaluation(args.drives, args.report, args.cache, jobs=getattr(args, "jobs", 1))
    print(json.dumps({k: s[k] for k in ("recall", "baseline_recall", "false_alarms_per_100h")}, indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m bms_ai.diagnostics.evaluate``."""
    p = argparse.ArgumentParser(prog="bms-ai evaluate --faults", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
