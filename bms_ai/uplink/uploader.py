"""Upload loop: drains the spool through a backend with backoff, jitter, bandwidth cap, age policy.

Order: highest priority class first, then oldest (or newest, by policy) first.
A segment leaves the spool only after the backend confirmed it (201 created or
200 already-there), so a crash mid-upload re-sends it and the server's
idempotency by sha256 keeps exactly one copy.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from bms_ai.uplink.backends import Backend, Throttle, UploadError
from bms_ai.uplink.fsio import open_regular
from bms_ai.uplink.spool import Segment, Spool


@dataclass
class RetryPolicy:
    """Exponential backoff with equal jitter: wait in [d/2, d], d = base * factor**(n-1) capped at max."""

    base_s: float = 1.0
    max_s: float = 300.0
    factor: float = 2.0
    jitter: bool = True

    def delay(self, failures: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after ``failures`` consecutive failures."""
        if failures <= 0:
            return 0.0
        d = min(self.max_s, self.base_s * self.factor ** min(failures - 1, 60))
        if not self.jitter:
            return d
        return d / 2 + (rng or random).uniform(0, d / 2)


@dataclass
class UploaderStats:
    """Upload counters and the last error, reported in the uploader status."""

    uploaded: int = 0
    duplicates: int = 0
    bytes: int = 0
    failures: int = 0
    auth_failures: int = 0
    consecutive_failures: int = 0
    corrupt: int = 0
    lost: int = 0
    expired: int = 0
    refused: int = 0
    last_refusal: str = ""
    last_error: str = ""
    last_error_auth: bool = False
    last_upload_wall: float = 0.0
    upload_seconds: float = 0.0
    history: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Counters plus the age of the last successful upload (-1 before the first)."""
        d = {k: v for k, v in self.__dict__.items() if k != "history"}
        d["last_upload_age_s"] = time.time() - self.last_upload_wall if self.last_upload_wall else -1.0
        return d


class Uploader:
    """Drains the spool through a backend, in its own thread or step by step."""

    def __init__(self, spool: Spool, backend: Backend, retry: RetryPolicy | None = None, bandwidth_bps: float = 0.0,
                 max_age_s: dict[str, float] | None = None, newest_first: bool = False,
                 headers: dict[str, str] | None = None, idle_s: float = 0.5, seed: int | None = None) -> None:
        self.spool = spool
        self.backend = backend
        self.retry = retry or RetryPolicy()
        self.throttle = Throttle(bandwidth_bps)
        self.max_age_s = dict(max_age_s or {})
        self.newest_first = newest_first
        self.headers = dict(headers or {})
        self.idle_s = idle_s
        self.stats = UploaderStats()
        self._rng = random.Random(seed)
        self._next_try = 0.0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def step(self) -> str:
        """One unit of work: 'uploaded', 'duplicate', 'failed', 'refused', 'corrupt', 'lost', 'idle' or 'waiting'."""
        now = time.monotonic()
        if now < self._next_try:
            return "waiting"
        if self.max_age_s:
            self.stats.expired += self.spool.expire(self.max_age_s)
        seg = self.spool.claim(self.newest_first)
        if seg is None:
            return "idle"
        try:
            return self._upload(seg)
        except Exception:
            self.spool.release(seg)
            raise

    def _open_verified(self, seg: Segment) -> BinaryIO | str:
        """The segment's file, opened without following symlinks and hashed through that same descriptor.

        Returns 'lost' or 'corrupt' (already recorded) when it cannot be uploaded.
        """
        try:
            f = open_regular(seg.path)
        except FileNotFoundError:
            self.spool.mark_lost(seg, "file vanished")
            self.stats.lost += 1
            return "lost"
        except OSError as exc:  # a symlink or special file where the segment was: never followed
            self.spool.mark_corrupt(seg, f"not a regular file: {exc}")
            self.stats.corrupt += 1
            return "corrupt"
        h = hashlib.sha256()
        while chunk := f.read(1 << 20):
            h.update(chunk)
        if h.hexdigest() != seg.sha256:  # bit rot / tampering: never ship a file that lies
            f.close()
            self.spool.mark_corrupt(seg, "sha256 mismatch before upload")
            self.stats.corrupt += 1
            return "corrupt"
        f.seek(0)
        return f

    def _upload(self, seg: Segment) -> str:
        f = self._open_verified(seg)
        if isinstance(f, str):
            return f
        headers = {"X-BMS-Class": seg.cls, "X-BMS-Created": f"{seg.created:.3f}", **self.headers}
        t0 = time.monotonic()
        try:
            with f:
                result = self.backend.upload(seg, f, self.throttle, headers)
        except UploadError as exc:
            if exc.permanent:  # the server will never take it: quarantine it, the rest keep flowing
                self.spool.mark_refused(seg, str(exc))
                self.stats.refused += 1
                self.stats.last_refusal = str(exc)
                return "refused"
            self.spool.release(seg, str(exc))
            self.stats.failures += 1
            self.stats.consecutive_failures += 1
            self.stats.auth_failures += int(exc.auth)
            self.stats.last_error = str(exc)
            self.stats.last_error_auth = exc.auth
            self._next_try = time.monotonic() + self.retry.delay(self.stats.consecutive_failures, self._rng)
            return "failed"
        except OSError as exc:  # local read error
            self.spool.release(seg, str(exc))
            self.stats.failures += 1
            self.stats.last_error = str(exc)
            self._next_try = time.monotonic() + self.retry.delay(1, self._rng)
            return "failed"
        self.stats.upload_seconds += time.monotonic() - t0
        self.spool.mark_uploaded(seg)
        self.stats.consecutive_failures = 0
        self.stats.last_error_auth = False
        self.stats.last_upload_wall = time.time()
        self.stats.bytes += seg.size
        if result == "duplicate":
            self.stats.duplicates += 1
        else:
            self.stats.uploaded += 1
        return result

    def drain(self, timeout_s: float) -> bool:
        """Upload until the spool is empty or the time is up (tests, shutdown). True if empty."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            r = self.step()
            if r == "idle":
                return True
            if r == "waiting":
                time.sleep(min(0.05, max(0.0, self._next_try - time.monotonic())))
        return not self.spool.pending(limit=1)

    # -- background thread ------------------------------------------------------------------
    def start(self) -> None:
        """Run the upload loop in a daemon thread."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="bms_ai-uplink", daemon=True)
            self._thread.start()

    def wake(self) -> None:
        """A new segment was committed: try now rather than after the idle sleep (backoff still applies)."""
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                r = self.step()
            except Exception as exc:  # noqa: BLE001 - the loop must survive anything; counted
                self.stats.failures += 1
                self.stats.last_error = f"internal: {type(exc).__name__}: {exc}"
                r = "failed"
                self._next_try = time.monotonic() + self.retry.delay(1, self._rng)
            if r in ("idle", "waiting", "failed"):
                wait = self.idle_s if r == "idle" else max(0.01, min(self.idle_s, self._next_try - time.monotonic()))
                self._wake.wait(wait)
                self._wake.clear()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop (the segment in flight finishes or is retried next time)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
