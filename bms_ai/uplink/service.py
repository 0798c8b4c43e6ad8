"""UplinkService: spool + recorder + uploader + telemetry composed from one config dict.

The node and the benchmark use this; it knows nothing about ROS beyond type
names, so it runs in a plain process too (tests kill -9 such a process).
"""

from __future__ import annotations

import fnmatch
import math
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from bms_ai.core.levels import ERROR, OK, WARN, split_status_name
from bms_ai.diagnostics.rules import CheckResult
from bms_ai.uplink.backends import make_backend
from bms_ai.uplink.config import resolve_env
from bms_ai.uplink.fsio import SpoolFS, is_regular
from bms_ai.uplink.privacy import IdentifierScrubber, Pseudonymizer
from bms_ai.uplink.segment import Recorder
from bms_ai.uplink.spool import Spool
from bms_ai.uplink.telemetry import make_telemetry
from bms_ai.uplink.uploader import RetryPolicy, Uploader

# Types of the graph's own topics; other topics come from ``topic_types`` in the config or the live graph.
KNOWN_TYPES = {
    "pack/measurements": "sensor_msgs/msg/BatteryState",
    "battery_state": "sensor_msgs/msg/BatteryState",
    "/diagnostics": "diagnostic_msgs/msg/DiagnosticArray",
    "/rosout": "rcl_interfaces/msg/Log",
}
HEALTH_CHECK = "uploader"
#: spool space is measured at most this often (steady clock): every tick of the 1 Hz timer, but not the
#: tens of ticks a second of a replay on sim time (a spool of thousands of files takes ms to walk)
REFRESH_S = 0.5
# stats reported in the uploader's DiagnosticStatus (the rest stays in stats())
HEALTH_KEYS = ("backlog_segments", "backlog_bytes", "backlog_age_s", "acknowledged", "uploaded", "evicted",
               "evicted_bytes", "expired", "rejected", "corrupt", "lost", "refused", "unsafe_files", "messages",
               "segments_committed", "snapshots", "snapshot_parts", "snapshot_truncated", "dropped_messages",
               "disk_full", "paused", "spool_bytes", "free_bytes", "privacy_dropped", "upload_last_upload_age_s",
               "upload_failures", "upload_consecutive_failures", "upload_refused", "upload_bytes", "mqtt_connected",
               "mqtt_published", "can_logs_picked", "internal_errors")


def health_level(stats: dict[str, Any], evicted_new: int, warn_age_s: float, refused_new: int = 0,
                 unsafe_new: int = 0) -> tuple[int, str]:
    """Level and message of the uploader status; later conditions win (rejected credentials, disk full most)."""
    failing = stats.get("upload_consecutive_failures", 0)
    paused = stats.get("paused", "")
    dropped = stats.get("dropped_messages", 0)
    rules: list[tuple[bool, int, str]] = [
        (True, OK, "uploading" if stats["backlog_segments"] else "idle, backlog empty"),
        (evicted_new > 0, WARN, f"spool full: evicted {evicted_new} segment(s)"),
        (unsafe_new > 0, WARN, f"ignored {unsafe_new} symlink(s) or special file(s) in the spool"),
        (refused_new > 0, WARN, f"server refused {refused_new} segment(s) for good (quarantined): "
                                f"{stats.get('upload_last_refusal', '')[:100]}"),
        (bool(failing), WARN, f"upload failing: {stats.get('upload_last_error', '')[:120]}"),
        (warn_age_s > 0 and stats["backlog_age_s"] > warn_age_s, WARN,
         f"oldest pending segment is {stats['backlog_age_s'] / 3600:.1f} h old"),
        (bool(paused), WARN, f"spool full: recording paused for {paused} ({dropped} messages dropped)"),
        (bool(stats.get("upload_last_error_auth")) and bool(failing), ERROR, "ingest rejects our credentials"),
        (bool(paused) and bool(stats.get("paused_disk_full")), ERROR,
         f"disk full: recording paused for {paused} ({dropped} messages dropped): {stats.get('last_write_error', '')[:80]}"),
    ]
    level, msg = OK, ""
    for cond, lvl, text in rules:
        if cond:
            level, msg = lvl, text
    return level, msg


def battery_telemetry(percentage: float, capacity: float, design_capacity: float) -> dict[str, float | None]:
    """SOC and SOH for the telemetry state from battery_state fields; None where the estimator has none."""
    soh = capacity / design_capacity if design_capacity and math.isfinite(capacity) else math.nan
    return {"soc": None if math.isnan(percentage) else float(percentage),
            "soh": None if not math.isfinite(soh) else float(soh)}


class UplinkService:
    """Spool, recorder, uploader and telemetry for one vehicle, composed from one config dict."""

    def __init__(self, cfg: dict[str, Any], start_threads: bool = True, fs: SpoolFS | None = None,
                 identifiers: Iterable[str] = ()) -> None:
        self.cfg = cfg
        self.pseudonymize = Pseudonymizer.from_config(resolve_env(cfg.get("privacy", {})))
        self.vehicle = self.pseudonymize(str(cfg.get("vehicle_id", "")))
        self.scrubber = IdentifierScrubber(self.pseudonymize, [str(cfg.get("vehicle_id", "")), *identifiers])
        self.privacy_dropped = 0
        sp = cfg["spool"]
        self.spool = Spool(os.path.expanduser(sp["dir"]), quota_bytes=int(float(sp["quota_mb"]) * 2**20),
                           min_free_bytes=int(float(sp["min_free_mb"]) * 2**20), fsync=bool(sp.get("fsync", True)),
                           fs=fs)
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
        self.internal_errors = 0
        self.last_internal_error = ""
        self._last_prune = 0.0
        self._last_refresh = -math.inf
        c = self.spool.counters()
        self._seen = {"evicted": c["evicted"], "refused": c["refused"], "unsafe_files": c["unsafe_files"]}
        if start_threads:
            self.start()

    def start(self) -> None:
        """Start the upload and telemetry threads (if configured)."""
        if self.uploader is not None:
            self.uploader.start()
        if self.telemetry is not None:
            self.telemetry.start()

    def _on_segment(self, seg: Any, cls: str) -> None:
        if seg is not None and self.uploader is not None:
            self.uploader.wake()

    # -- topics -----------------------------------------------------------------------------
    @property
    def topics(self) -> list[str]:
        """The topics to record, as configured (relative names resolve in the node's namespace)."""
        return list(self.cfg["topics"])

    def topic_type(self, topic: str, full_name: str,
                   discover: Callable[[], Iterable[tuple[str, list[str]]]] = tuple) -> str | None:
        """A topic's message type: configured, else one of the graph's own, else from ``discover()``

        (the live graph's (name, types) pairs, matched on the fully resolved ``full_name``); None if unknown yet.
        """
        configured = self.cfg.get("topic_types") or {}
        if topic in configured:
            return configured[topic]
        if topic in KNOWN_TYPES:
            return KNOWN_TYPES[topic]
        for name, types in discover():
            if name == full_name and types:
                return types[0]
        return None

    # -- inputs -----------------------------------------------------------------------------
    def record(self, topic: str, type_name: str, data: bytes, t_ns: int, cls: str | None = None) -> None:
        """Record one CDR message; a message the recorder cannot take is counted, never raised."""
        try:
            self.recorder.write(topic, type_name, data, t_ns, cls)
        except Exception as exc:  # noqa: BLE001 - counted, reported; recording continues
            self.rejected_messages += 1
            self.last_internal_error = f"{topic}: {type(exc).__name__}: {exc}"

    def private(self, data: bytes, decode: Callable[[bytes], Any], encode: Callable[[Any], bytes]) -> bytes | None:
        """CDR bytes with every known identifier pseudonymised (privacy on); None: drop it (counted).

        Only messages whose bytes contain an identifier are decoded (``decode``/``encode`` are the
        node's CDR (de)serialisation for the message's type).
        """
        if not self.scrubber.enabled or not self.scrubber.hits(data):
            return data
        out = encode(self.scrubber.message(decode(data)))
        if self.scrubber.hits(out):  # e.g. inside a byte array: never recorded
            self.privacy_dropped += 1
            return None
        return out

    def diagnostics(self, statuses: list[tuple[str, int]], t_ns: int) -> bool:
        """Feed (name, level) pairs; a name newly at ERROR starts (or extends) a fault snapshot."""
        now_err = {n for n, lvl in statuses if lvl == ERROR and split_status_name(n)[1] != HEALTH_CHECK}  # not our own
        seen = {n for n, _ in statuses}
        new = now_err - self._errors
        self._errors = (self._errors - seen) | now_err
        if new:
            self.recorder.trigger_snapshot(t_ns, reason=",".join(sorted(new)))
            return True
        return False

    @property
    def active_faults(self) -> list[str]:
        """Statuses at ERROR now (for telemetry)."""
        return sorted(self._errors)

    def telemetry_state(self, pack_id: str, battery: tuple[float, float, float] | None = None) -> dict[str, Any]:
        """The telemetry state: vehicle (pseudonymised), active faults, and SOC/SOH once battery_state came.

        ``battery`` is (percentage, capacity, design_capacity) of the last battery_state.
        """
        vals: dict[str, Any] = {"vehicle": self.vehicle or self.pseudonymize(pack_id), "faults": self.active_faults}
        if battery is not None:
            vals.update(battery_telemetry(*battery))
        return vals

    # -- health -----------------------------------------------------------------------------
    def started_status(self) -> CheckResult:
        """The first uploader status: what the spool recovery found, and a warning for plain http."""
        rec = self.spool.last_recovery
        level, msg = OK, "started"
        insecure = getattr(self.uploader.backend, "insecure", "") if self.uploader is not None else ""
        if insecure:
            level, msg = WARN, f"started; {insecure}"
        return CheckResult(HEALTH_CHECK, level, msg, {
            "recovered_partial": rec.partial_removed, "recovery_missing": rec.missing,
            "recovery_orphans": rec.orphans_adopted + rec.orphans_removed, "recovery_unsafe": rec.unsafe})

    def health(self, rejected: int = 0, reject_reason: str = "", subscribed: Iterable[str] = ()) -> CheckResult:
        """The periodic uploader status; ``rejected`` counts the node's own rejected messages.

        Evictions are reported once, in the first status after they happened.
        """
        s = self.stats()
        new = {k: s[k] - seen for k, seen in self._seen.items()}
        self._seen = {k: s[k] for k in self._seen}
        warn_age = float(self.cfg.get("backlog", {}).get("warn_age_s", 86400.0))
        level, msg = health_level(s, new["evicted"], warn_age, new["refused"], new["unsafe_files"])
        vals = {k: s[k] for k in HEALTH_KEYS if k in s}
        vals.update(rejected_messages=rejected + s["rejected_messages"], reject_reason=reject_reason,
                    subscribed=",".join(subscribed))
        return CheckResult(HEALTH_CHECK, level, msg, vals)

    def tick(self, t_ns: int) -> None:
        """Periodic (1 Hz): measure space, close due segments, resume paused ones, flush chunks, pick up CAN logs.

        Never raises: whatever goes wrong is counted (``internal_errors``) and reported, the graph stays up.
        """
        try:
            # between measurements the spool accounts its own writes (and measures again before refusing any)
            if time.monotonic() - self._last_refresh >= REFRESH_S:
                self._last_refresh = time.monotonic()
                self.spool.refresh()
            self.recorder.tick(t_ns)
            self.recorder.flush_files()
            if time.monotonic() - self._last_prune > 3600.0:
                self._last_prune = time.monotonic()
                self.spool.prune()
            if self._can_cfg.get("enabled") and time.monotonic() - self._last_scan > 1.0:
                self._last_scan = time.monotonic()
                self.pick_up_can_logs()
        except Exception as exc:  # noqa: BLE001 - disk/database trouble must not stop the node
            self.internal_errors += 1
            self.last_internal_error = f"tick: {type(exc).__name__}: {exc}"

    def pick_up_can_logs(self) -> int:
        """Closed CAN log files (not modified for min_age_s) go into the spool once, as class raw."""
        d = Path(os.path.expanduser(str(self._can_cfg.get("dir", ""))))
        if not str(self._can_cfg.get("dir", "")) or not d.is_dir():
            return 0
        pats = list(self._can_cfg.get("patterns", ["*.blf"]))
        min_age = float(self._can_cfg.get("min_age_s", 5.0))
        n = 0
        for p in sorted(d.iterdir()):
            if not is_regular(p) or not any(fnmatch.fnmatch(p.name, pat) for pat in pats):
                continue  # never through a symlink: only the bridge's own closed files
            st = p.lstat()
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
        """Spool, recorder, uploader (``upload_*``) and telemetry (``mqtt_*``) figures in one dict."""
        s: dict[str, Any] = dict(self.spool.stats())
        r = self.recorder.stats
        s.update(messages=r.messages, segments_committed=r.segments_committed, snapshots=r.snapshots,
                 snapshot_parts=r.snapshot_parts, snapshot_truncated=r.snapshot_truncated,
                 dropped_messages=r.dropped_messages, disk_full=r.disk_full, write_errors=r.write_errors,
                 last_write_error=r.last_error, paused=",".join(sorted(self.recorder.paused)),
                 paused_disk_full=any(w.startswith("disk full") for w in self.recorder.paused.values()),
                 rejected_messages=self.rejected_messages, privacy_dropped=self.privacy_dropped,
                 can_logs_picked=self.can_logs_picked, internal_errors=self.internal_errors,
                 last_internal_error=self.last_internal_error)
        if self.uploader is not None:
            s.update({f"upload_{k}": v for k, v in self.uploader.stats.as_dict().items()})
        if self.telemetry is not None:
            s.update({f"mqtt_{k}": v for k, v in self.telemetry.stats().items()})
        return s

    def close(self, drain_s: float = 0.0) -> None:
        """Commit open segments, upload for up to ``drain_s``, stop the threads, close the spool.

        Each step runs even if an earlier one failed (counted); what could not be committed stays in
        ``incoming/``, where recovery at the next start salvages it.
        """
        steps: list[Callable[[], Any]] = [self.recorder.flush]
        if self.uploader is not None:
            up = self.uploader
            steps += [up.stop, lambda: up.drain(drain_s) if drain_s > 0 else None, up.backend.close]
        if self.telemetry is not None:
            steps.append(self.telemetry.stop)
        steps.append(self.spool.close)
        for step in steps:
            try:
                step()
            except Exception as exc:  # noqa: BLE001 - shutdown goes on; the spool recovers at the next start
                self.internal_errors += 1
                self.last_internal_error = f"close: {type(exc).__name__}: {exc}"
