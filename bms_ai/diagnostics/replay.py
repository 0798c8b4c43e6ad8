"""Offline replay of recorded drives through the rules and detectors (evaluation and calibration).

A drive directory (bms_ai/sim layout: can.blf + meta.json [+ truth.parquet])
is decoded once with ``bms_ai.can.offline.decode_log`` - exactly the
samples can_bridge publishes - and cached as npz, because BLF decoding costs
far more than the rules themselves.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bms_ai.diagnostics.config import LimitsConfig, default_limits_path, load_limits
from bms_ai.diagnostics.detectors import DetectorBank, DetectorParams
from bms_ai.diagnostics.rules import Event, RuleEngine
from bms_ai.pack import PackSample
from bms_ai.sim.dataset import read_meta


@dataclass
class Measured:
    """A drive's decoded measurements (what can_bridge would publish) and its true faults."""

    name: str
    chemistry: str
    capacity_ah: float
    t: np.ndarray          # s since drive start (truth time base)
    pack_voltage: np.ndarray
    current: np.ndarray
    cell_v: np.ndarray     # (T, n)
    cell_t: np.ndarray     # (T, m)
    contactor: np.ndarray  # (T,) NaN if unknown
    faults: list[dict] = field(default_factory=list)
    duration_s: float = 0.0

    @property
    def hours(self) -> float:
        """Drive length in hours (false-alarm rates are per hour)."""
        return self.duration_s / 3600.0


def load_measured(drive_dir: str | Path, cache_dir: str | Path | None = None) -> Measured:
    """Decode a drive's CAN log (cached) and read its ground-truth fault list from meta.json."""
    d = Path(drive_dir)
    meta = read_meta(d)
    logs = [p for p in (d / "can.blf", d / "can.asc") if p.is_file()]
    if not logs:
        raise FileNotFoundError(f"{d}: no can.blf / can.asc")
    log = logs[0]
    key = hashlib.sha256(f"{log.resolve()}:{log.stat().st_size}:{log.stat().st_mtime_ns}".encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{d.name}-{key}.npz" if cache_dir else None
    if cache is not None and cache.is_file():
        z = np.load(cache)
        t, pv, cur, cv, ct, con = (z[k] for k in ("t", "pv", "cur", "cv", "ct", "con"))
    else:
        from bms_ai.can.offline import decode_log
        from bms_ai.can.packconfig import load_pack_config
        from bms_ai.core.paths import default_pack_config

        cfg = load_pack_config(default_pack_config())
        tab = decode_log(log, cfg, rate=10.0)
        t = tab.t - float(meta.get("can_time_origin", tab.t[0]))
        pv, cur = tab.pack_voltage, tab.pack_current
        cv, ct = tab.cell_voltages.astype(np.float32), tab.cell_temperatures.astype(np.float32)
        con = tab.status.get("contactor_plus", np.full(len(t), np.nan))
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, t=t, pv=pv, cur=cur, cv=cv, ct=ct, con=con)
    return Measured(name=d.name, chemistry=str(meta.get("chemistry", "nmc")),
                    capacity_ah=float(meta.get("design_capacity_ah", 50.0)), t=t, pack_voltage=pv, current=cur,
                    cell_v=cv.astype(np.float64), cell_t=ct.astype(np.float64), contactor=con,
                    faults=list(meta.get("faults", [])), duration_s=float(meta.get("duration_s", t[-1] - t[0])))


@dataclass
class ReplayResult:
    """Events of one replay, a decimated detector trace and the step cost."""

    rule_events: list[Event]
    detector_events: list[Event]
    trace: dict[str, np.ndarray]
    step_us_p50: float
    step_us_p99: float


def replay(m: Measured, limits: LimitsConfig | None = None, params: DetectorParams | None = None,
           rules: bool = True, detectors: bool = True, trace_every: int = 10) -> ReplayResult:
    """Step the rules and detectors over every sample of a drive, as fault_monitor would."""
    import time

    limits = limits or load_limits(default_limits_path(m.chemistry))
    n, k = m.cell_v.shape[1], m.cell_t.shape[1]
    eng = RuleEngine(limits, n, k) if rules else None
    if params is None:
        params = DetectorParams.load(chemistry=m.chemistry)
    params.capacity_ah = m.capacity_ah
    bank = DetectorBank(n, k, tick_hz=limits.tick_hz, params=params) if detectors else None
    tr: dict[str, list] = {"t": [], "leak": [], "leak_z": [], "leak_lcb": [], "drift": [], "th_cusum": [], "p_plating": [], "score": []}
    times = np.empty(len(m.t))
    for j in range(len(m.t)):
        tj = float(m.t[j])
        s = PackSample(stamp=tj, pack_voltage=float(m.pack_voltage[j]), pack_current=float(m.current[j]),
                       cell_voltages=m.cell_v[j], cell_temperatures=m.cell_t[j], pack_voltage_stamp=tj,
                       pack_current_stamp=tj, cell_voltage_stamps=np.full(n, tj),
                       cell_temperature_stamps=np.full(k, tj),
                       status={} if math.isnan(m.contactor[j]) else {"contactor_plus": float(m.contactor[j])})
        t0 = time.perf_counter()
        if eng is not None:
            eng.step(s, tj)
        if bank is not None:
            bank.step(s, tj)
        times[j] = time.perf_counter() - t0
        if bank is not None and j % trace_every == 0:
            tr["t"].append(tj)
            tr["leak"].append(bank.leak.copy())
            tr["drift"].append(bank.drift.copy())
            tr["leak_z"].append(bank.leak_z.copy())
            tr["leak_lcb"].append(bank.leak_lcb.copy())
            tr["th_cusum"].append(bank.thermal_cusum.copy())
            tr["p_plating"].append(bank.p_plating)
            tr["score"].append(bank.score)
    trace = {key: np.asarray(v) for key, v in tr.items()}
    return ReplayResult(eng.events if eng else [], bank.events if bank else [], trace,
                        float(np.percentile(times, 50) * 1e6), float(np.percentile(times, 99) * 1e6))
