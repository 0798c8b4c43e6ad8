"""The vehicle side of the fleet loop, in-process: a recorded drive through the product's own library into segments.

``run_vehicle(drive, store)`` does for one simulated vehicle what the graph does
on a real one, without ROS: the estimator (``PackEstimator``, the shipped models,
session by session with its saved state across parks, as ``bms-ai evaluate``
runs it) and the fault monitor (``FaultMonitor``, every sample) run on the
measured samples, and what the cloud uploader would upload lands in the store:

- MCAP segments (``SegmentWriter``: profile ros2, ros2msg schemas, CDR) with the
  graph's topics and types: ``/bms/pack/measurements`` and ``/bms/battery_state``
  (``sensor_msgs/msg/BatteryState``) every sample, ``/diagnostics``
  (``diagnostic_msgs/msg/DiagnosticArray``) when a check's level changes, plus
  the estimator's ``soc`` status every ``diag_period_s`` (it carries the SOC sigma);
- rotated like the Recorder: a new segment at each UTC day and after
  ``max_duration_s`` of message time;
- pseudonymised as the uplink does (``Pseudonymizer`` with the fleet key): the
  vehicle id becomes ``p-<hex>`` in keys, metadata, ``serial_number`` and
  ``hardware_id``; the raw id is in no uploaded byte;
- under ``segments/<pseudonym>/<YYYY-MM-DD>/<sha256>.mcap`` (content-addressed:
  re-running a vehicle writes the same keys).

The truth (simulation only) goes separately to ``truth/<pseudonym>/<drive>.npz``
for the evaluation gate and tests; it never enters a segment.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.core.cdr import (
    BATTERY_STATE,
    DIAGNOSTIC_ARRAY,
    Status,
    charging_status,
    encode_battery_states,
    encode_diagnostic_array,
)
from bms_ai.core.levels import status_name
from bms_ai.diagnostics.monitor import FaultMonitor
from bms_ai.estimation.pack import PackEstimator, open_models
from bms_ai.estimation.rul import load_rul_estimator
from bms_ai.fleet.store import ObjectStore
from bms_ai.pack import PackSample
from bms_ai.sim.dataset import RecordedDrive, resample_drive
from bms_ai.uplink.privacy import Pseudonymizer
from bms_ai.uplink.segment import Message, SegmentWriter

MEASUREMENTS = "/bms/pack/measurements"
BATTERY = "/bms/battery_state"
DIAGNOSTICS = "/diagnostics"
DEFAULT_T0_UNIX = 1767225600.0   # 2026-01-01 UTC: a drive without meta t0_unix starts here
DEFAULT_KEY_ENV = "BMS_AI_PSEUDONYM_KEY"
# wall-clock costs of this process, not of a vehicle: left out so a re-run uploads the same bytes (same keys)
TIMING_KEYS = frozenset({"inference_ms", "cycle_ms", "cycle_max_ms", "step_mean_us", "step_max_us"})


@dataclass(frozen=True)
class EdgeConfig:
    """How a simulated vehicle runs and uploads (the uploader's defaults where it has one)."""

    key: str | bytes = ""                 # fleet pseudonym key ('' -> $BMS_AI_PSEUDONYM_KEY); required
    max_duration_s: float = 3600.0        # segment rotation by message time (and always at a UTC day)
    diag_period_s: float = 60.0           # the estimator's soc status (SOC sigma) this often, besides level changes
    rate_hz: float = 1.0                  # the fleet records at 1 Hz
    model_dir: str | None = ""            # '' the shipped models, None EKF only
    monitor: bool = True                  # run the fault monitor (off only to make test fleets quickly)
    detectors: bool = True                # the fault monitor's incipient-fault detectors
    compression: str = "zstd"


@dataclass
class EdgeResult:
    """What one vehicle uploaded."""

    pseudonym: str
    segments: list[str] = field(default_factory=list)
    samples: int = 0
    messages: int = 0
    bytes: int = 0
    estimator_rejected: int = 0
    monitor_rejected: int = 0
    diagnostics: int = 0
    events: list[str] = field(default_factory=list)
    truth_key: str = ""
    seconds: float = 0.0


def pseudonymizer(cfg: EdgeConfig) -> Pseudonymizer:
    """The uplink's keyed pseudonyms; no key is a one-line error (never upload a raw id)."""
    key = cfg.key or os.environ.get(DEFAULT_KEY_ENV, "")
    if not key:
        raise ValueError(f"the fleet edge needs a pseudonym key (EdgeConfig.key or ${DEFAULT_KEY_ENV})")
    return Pseudonymizer(key)


def segment_bounds(t_abs: np.ndarray, max_duration_s: float) -> list[tuple[int, int]]:
    """[start, end) sample ranges: a new segment at each UTC day and when one spans ``max_duration_s``."""
    day = np.floor(t_abs / 86400.0)
    out, s0 = [], 0
    for k in range(1, len(t_abs)):
        if day[k] != day[s0] or t_abs[k] - t_abs[s0] >= max_duration_s:
            out.append((s0, k))
            s0 = k
    if len(t_abs):
        out.append((s0, len(t_abs)))
    return out


@dataclass
class _Trace:
    """Per-sample estimator outputs and the diagnostics to send, filled while the vehicle runs."""

    n: int
    soc: np.ndarray = field(init=False)
    capacity: np.ndarray = field(init=False)
    health: np.ndarray = field(init=False)
    ok: np.ndarray = field(init=False)
    diag: list[tuple[float, list[Status]]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.soc = np.full(self.n, np.nan)
        self.capacity = np.full(self.n, np.nan)
        self.health = np.zeros(self.n, np.uint8)
        self.ok = np.zeros(self.n, bool)


class _Diag:
    """The nodes' diagnostics policy, reduced: a status goes out when its level changes (or when due)."""

    def __init__(self, hardware_id: str) -> None:
        self.hw = hardware_id
        self.levels: dict[str, int] = {}

    def changed(self, node: str, results, force: tuple[str, ...] = ()) -> list[Status]:
        out = []
        for r in results:
            name = status_name(node, r.check)
            if self.levels.get(name) != r.level or r.check in force:
                self.levels[name] = r.level
                vals = tuple((str(k), _fmt(v)) for k, v in r.values.items() if k not in TIMING_KEYS)
                out.append(Status(int(r.level), name, r.message, self.hw, vals))
        return out


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.6g}"
    return str(v)


def _estimate(d: RecordedDrive, cfg: EdgeConfig, hw: str, t_abs: np.ndarray) -> tuple[_Trace, PackEstimator,
                                                                                       FaultMonitor]:
    """Estimator session by session (state saved across parks) and fault monitor on every sample."""
    from bms_ai.estimation.evaluate import session_bounds, soc_stored

    models = None
    rul = None
    if cfg.model_dir is not None:
        models = open_models(cfg.model_dir)
        models.poll()
        rul = load_rul_estimator(models.model_dir, d.chemistry)[0]
    mon = FaultMonitor.load("", d.chemistry, hw, detectors=cfg.detectors, capacity_ah=d.capacity_ah)
    tr, diag = _Trace(len(d.t)), _Diag(hw)
    blob, est, next_soc_status = None, None, -math.inf
    for s0, s1 in session_bounds(d.session_ids()):
        est = PackEstimator(d.chemistry, d.capacity_ah, models, rul=rul,
                            initial_soc=soc_stored(d) if blob is None else None, cell_type=d.cell_type)
        if blob is not None:
            est.restore_state(blob)
        for k in range(s0, s1):
            t = float(t_abs[k])
            v, temp, cur = d.cell_v[k], d.cell_t[k], float(d.current[k])
            step = est.step(t, cur, v, temp)
            if step is not None:
                tr.ok[k], tr.soc[k], tr.capacity[k], tr.health[k] = True, step.soc.soc, step.capacity_ah, step.health
                mon.on_estimate(step.soc.soc, t, step.capacity_ah)
            sts = []
            if cfg.monitor:
                s = PackSample(t, float(np.sum(v)), cur, v, temp, t, t, np.full(v.shape, t), np.full(temp.shape, t))
                sts = diag.changed("fault_monitor", mon.on_sample(s, t))
            due = t >= next_soc_status
            sts += diag.changed("estimator", est.statuses(), force=("soc",) if due else ())
            if due:
                next_soc_status = t + cfg.diag_period_s
            if sts:
                tr.diag.append((t, sts))
        blob = est.save_state()
    return tr, est, mon


def _segment_bytes(msgs: list[Message], meta: dict[str, str], cfg: EdgeConfig, tmpdir: str) -> bytes:
    path = Path(tmpdir) / "segment.mcap"
    w = SegmentWriter(path, cfg.compression, metadata=meta)
    for m in msgs:
        w.write(m)
    w.close()
    data = path.read_bytes()
    path.unlink()
    return data


def start_unix(d: RecordedDrive) -> float:
    """Wall time of the drive's t=0: meta ``t0_unix``; else 0 when ``t`` is already wall time, else a fixed day."""
    if d.meta.get("t0_unix") is not None:
        return float(d.meta["t0_unix"])
    return 0.0 if len(d.t) and d.t[0] > 1e8 else DEFAULT_T0_UNIX


def _day(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%d")


def run_vehicle(drive: RecordedDrive, store: ObjectStore, cfg: EdgeConfig = EdgeConfig(),
                truth: bool = True) -> EdgeResult:
    """Run one vehicle's drive through estimator and fault monitor; upload its segments (and truth) to ``store``.

    ``drive.meta["vehicle_id"]`` is the raw id (required); ``meta["t0_unix"]`` the wall time of t=0.
    """
    t_start = time.perf_counter()
    vid = str(drive.meta.get("vehicle_id") or "")
    if not vid:
        raise ValueError(f"drive {drive.name!r} has no meta vehicle_id")
    pid = pseudonymizer(cfg)(vid)
    d = resample_drive(drive, cfg.rate_hz) if cfg.rate_hz else drive
    t0 = start_unix(d)
    tr, est, mon = _estimate(d, cfg, pid, t0 + d.t)
    res = EdgeResult(pid, estimator_rejected=est.rejected, monitor_rejected=mon.rejected)
    res.events = [f"{e.check}#{e.index}@{e.set_time - t0:.0f}s" for e in mon.all_events()]
    upload(d, tr, store, res, cfg)
    if truth:
        res.truth_key = write_truth(d, store, pid, vid, t0)
    res.seconds = time.perf_counter() - t_start
    return res


def replayed_trace(d: RecordedDrive, soc: np.ndarray, sigma: float = 0.02) -> _Trace:
    """A trace of given pack SOC per sample (estimator output recorded elsewhere, or truth for benches)."""
    tr = _Trace(len(d.t))
    tr.ok[:], tr.soc[:], tr.capacity[:] = True, soc, d.capacity_ah
    t_abs = start_unix(d) + d.t
    for t in t_abs[:: max(1, int(60 * float(d.meta.get("rate_hz") or 1.0)))]:
        tr.diag.append((float(t), [Status(0, "estimator: soc", "replayed", "", (("soc_sigma", f"{sigma:g}"),))]))
    return tr


def upload(d: RecordedDrive, tr: _Trace, store: ObjectStore, res: EdgeResult, cfg: EdgeConfig) -> None:
    """Segments of the drive's samples and their estimator trace into the store (``res`` counts them)."""
    pid = res.pseudonym
    t_abs = start_unix(d) + d.t
    res.samples = len(d.t)
    meta = {"vehicle": pid, "chemistry": d.chemistry, "design_capacity_ah": f"{d.capacity_ah:.6g}",
            "n_cells": str(d.n_cells), "rate_hz": f"{cfg.rate_hz:g}", "source": "bms_ai.fleet.edge"}
    diag_t = np.array([t for t, _ in tr.diag])
    with tempfile.TemporaryDirectory(prefix="bms_edge_") as tmp:
        for s0, s1 in segment_bounds(t_abs, cfg.max_duration_s):
            msgs = _messages(d, tr, t_abs, s0, s1, pid)
            lo = int(np.searchsorted(diag_t, t_abs[s0], side="left"))
            hi = int(np.searchsorted(diag_t, t_abs[s1 - 1], side="right"))
            for t, sts in tr.diag[lo:hi]:
                msgs.append(Message(DIAGNOSTICS, DIAGNOSTIC_ARRAY, encode_diagnostic_array(t, sts), int(t * 1e9)))
                res.diagnostics += 1
            msgs.sort(key=lambda m: m.log_time_ns)
            data = _segment_bytes(msgs, dict(meta, priority_class="estimates"), cfg, tmp)
            key = f"segments/{pid}/{_day(t_abs[s0])}/{hashlib.sha256(data).hexdigest()}.mcap"
            store.put(key, data)
            res.segments.append(key)
            res.messages += len(msgs)
            res.bytes += len(data)


def _messages(d: RecordedDrive, tr: _Trace, t_abs: np.ndarray, s0: int, s1: int, pid: str) -> list[Message]:
    """Measurements every sample, battery_state for every sample the estimator accepted."""
    sl = slice(s0, s1)
    cur = d.current[sl]
    stat = charging_status(cur)
    meas = encode_battery_states(t_abs[sl], d.cell_v[sl], d.cell_t[sl], current=cur, status=stat)
    ok = tr.ok[sl]
    idx = np.flatnonzero(ok)
    bs = encode_battery_states(t_abs[sl][idx], d.cell_v[sl][idx], d.cell_t[sl][idx], current=cur[idx],
                               percentage=tr.soc[sl][idx], capacity=tr.capacity[sl][idx],
                               design_capacity=d.capacity_ah, health=tr.health[sl][idx], status=stat[idx],
                               location="pack", serial=pid)
    ns = np.round(t_abs[sl] * 1e9).astype(np.int64).tolist()
    out = [Message(MEASUREMENTS, BATTERY_STATE, b, n) for b, n in zip(meas, ns)]
    out += [Message(BATTERY, BATTERY_STATE, b, ns[i]) for b, i in zip(bs, idx.tolist())]
    return out


def write_truth(d: RecordedDrive, store: ObjectStore, pid: str, vid: str, t0_unix: float) -> str:
    """Simulation truth for the gate and tests (never in a segment); the raw id scrubbed from its metadata too."""
    meta = json.loads(json.dumps(d.meta, default=str).replace(vid, pid))
    arrays = {"t_unix": t0_unix + d.t, "soc": d.soc.astype(np.float32),
              "meta": np.array(json.dumps(meta))}
    for name in ("cell_capacity_ah", "ocv_soc", "ocv_v", "current_true"):
        v = getattr(d, name)
        if v is not None:
            arrays[name] = np.asarray(v)
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    key = f"truth/{pid}/{_day(t0_unix + float(d.t[0]))}-{hashlib.sha256(buf.getvalue()).hexdigest()[:16]}.npz"
    store.put(key, buf.getvalue())
    return key
