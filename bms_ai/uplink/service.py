"""UplinkService: spool + recorder + uploader + telemetry composed from one config dict.

The node and the benchmark use this; it knows nothing about ROS beyond type
names, so it runs in a plain process too (tests kill -9 such a process).
"""

from __future__ import annotations

import fnmatch
import os
import time
from pathlib import Path
from typing import Any

from bms_ai.core.levels import ERROR
from bms_ai.uplink.backends import make_backend
from bms_ai.uplink.config import resolve_env
from bms_ai.uplink.privacy import Pseudonymizer
from bms_ai.uplink.segment import Recorder
from bms_ai.uplink.spool import Spool
from bms_ai.uplink.telemetry import make_telemetry
from bms_ai.uplink.uploader import RetryPolicy, Uploader


class UplinkService:
    def __init__(self, cfg: dict[str, Any], start_threads: bool = True) -> None:
        self.cfg = cfg
        self.pseudonymize = Pseudonymizer.from_config(resolve_env(cfg.get("privacy", {})))
        self.vehicle = self.pseudonymize(str(cfg.get("vehicle_id", "")))
        sp = cfg["spool"]
        self.spool = Spool(os.path.expanduser(sp["dir"]), quota_bytes=int(float(sp["quota_mb"]) * 2**20),
                           min_free_bytes=int(float(sp["min_free_mb"]) * 2**20), fsync=bool(sp.get("fsync", True)))
        seg = cfg["segments"]
        snap = cfg.get("fault_snapshot", {})
        meta = {"vehicle": self.vehicle} if self.vehicle else {}
        self.recorder = Recorder(
            self.spool, dict(cfg.get("topics", {})), cfg.get("default_class", "raw"),
            max_bytes=int(float(seg["max_mb"]) * 2**20), max_duration_s=float(seg["max_duration_s"]),
            compression=seg.get("compression", "zstd"), chunk_size=int(float(seg.get("chunk_kb", 1024)) * 1024),
            snapshot_pre_s=float(snap.get("pre_s", 30.0)) if snap.get("enabled", True) else -1.0,
            snapshot_post_s=float(snap.get("post_s", 30.0)), metadata=meta, on_segment=self._on_segment)
        self.uploader: Uploader | None = None
        backend_cfg = cfg.get("backend") or {}
        if backend_cfg and backend_cfg.get("kind") not in (None, "", "none"):
            backlog = cfg.get("backlog", {})
            order = backlog.get("order", "oldest_first")
            if order not in ("oldest_first", "newest_first"):
                raise ValueError(f"backlog.order must be oldest_first or newest_first, got {order!r}")
            self.uploader = Uploader(
                self.spool, make_backend(resolve_env(backend_cfg)), RetryPolicy(**cfg.get("retry", {})),
                bandwidth_bps=float(cfg.get("bandwidth_kbps", 0)) * 125.0,  # kbit/s -> bytes/s
                max_age_s={k: float(v) for k, v in (backlog.get("max_age_s") or {}).items()},
                newest_first=order == "newest_first",
                headers={"X-BMS-Vehicle": self.vehicle} if self.vehicle else {})
        self.telemetry = make_telemetry(resolve_env(cfg.get("telemetry", {})))
        self._errors: set[str] = set()
        self._can_cfg = cfg.get("can_logs", {})
        self._picked: dict[str, tuple[int, float]] = {}
        self._last_scan = 0.0
        self.can_logs_picked = 0
        self.rejected_messages = 0
        if start_threads:
            self.start()

    def start(self) -> None:
        if self.uploader is not None:
            self.uploader.start()
        if self.telemetry is not None:
            self.telemetry.start()

    def _on_segment(self, seg: Any, cls: str) -> None:
        if seg is not None and self.uploader is not None:
            self.uploader.wake()

    # -- inputs -----------------------------------------------------------------------------
    def record(self, topic: str, type_name: str, data: bytes, t_ns: int, cls: str | None = None) -> None:
        try:
            self.recorder.write(topic, type_name, data, t_ns, cls)
        except (OSError, ValueError, LookupError):
            self.rejected_messages += 1  # counted, reported; recording continues

    def diagnostics(self, statuses: list[tuple[str, int]], t_ns: int) -> bool:
        """Feed (name, level) pairs; a name newly at ERROR starts (or extends) a fault snapshot."""
        now_err = {n for n, lvl in statuses if lvl == ERROR}
        seen = {n for n, _ in statuses}
        new = now_err - self._errors
        self._errors = (self._errors - seen) | now_err
        if new:
            self.recorder.trigger_snapshot(t_ns, reason=",".join(sorted(new)))
            return True
        return False

    @property
    def active_faults(self) -> list[str]:
        return sorted(self._errors)

    def tick(self, t_ns: int) -> None:
        """Periodic (1 Hz): close due segments, flush finished chunks, pick up CAN logs."""
        self.recorder.tick(t_ns)
        self.recorder.flush_files()
        if self._can_cfg.get("enabled") and time.monotonic() - self._last_scan > 1.0:
            self._last_scan = time.monotonic()
            self.pick_up_can_logs()

    def pick_up_can_logs(self) -> int:
        """Closed CAN log files (not modified for min_age_s) go into the spool once, as class raw."""
        d = Path(os.path.expanduser(str(self._can_cfg.get("dir", ""))))
        if not str(self._can_cfg.get("dir", "")) or not d.is_dir():
            return 0
        pats = list(self._can_cfg.get("patterns", ["*.blf"]))
        min_age = float(self._can_cfg.get("min_age_s", 5.0))
        n = 0
        for p in sorted(d.iterdir()):
            if not p.is_file() or not any(fnmatch.fnmatch(p.name, pat) for pat in pats):
                continue
            st = p.stat()
            if time.time() - st.st_mtime < min_age or self._picked.get(p.name) == (st.st_size, st.st_mtime):
                continue
            seg = self.spool.add_file(p, str(self._can_cfg.get("class", "raw")),
                                      meta=f'{{"source": "{p.name}"}}')
            self._picked[p.name] = (st.st_size, st.st_mtime)
            if seg is not None:
                n += 1
                if self._can_cfg.get("delete_after_pickup"):
                    p.unlink(missing_ok=True)
        self.can_logs_picked += n
        if n and self.uploader is not None:
            self.uploader.wake()
        return n

    def stats(self) -> dict[str, Any]:
        s: dict[str, Any] = dict(self.spool.stats())
        s.update(messages=self.recorder.messages, segments_committed=self.recorder.segments_committed,
                 snapshots=self.recorder.snapshots, rejected_messages=self.rejected_messages,
                 write_errors=self.recorder.write_errors, can_logs_picked=self.can_logs_picked)
        if self.uploader is not None:
            s.update({f"upload_{k}": v for k, v in self.uploader.stats.as_dict().items()})
        if self.telemetry is not None:
            s.update({f"mqtt_{k}": v for k, v in self.telemetry.stats().items()})
        return s

    def close(self, drain_s: float = 0.0) -> None:
        self.recorder.flush()
        if self.uploader is not None:
            self.uploader.stop()
            if drain_s > 0:
                self.uploader.drain(drain_s)
            self.uploader.backend.close()
        if self.telemetry is not None:
            self.telemetry.stop()
        self.spool.close()
