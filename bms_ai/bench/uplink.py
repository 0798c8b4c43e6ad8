"""Uplink figures for `bms-ai bench`: recording rate, upload throughput, CPU at nominal traffic.

Payloads are BatteryState-sized (96 cells, 32 sensors) CDR records with
realistic float noise, so zstd compresses them as it would real data. The
ingest server runs as a separate process (`bms-ai ingest-server`) on
127.0.0.1, so the CPU figure is the vehicle side only.
"""

from __future__ import annotations

import contextlib
import io
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mcap.writer import CompressionType, Writer

from bms_ai.uplink.backends import make_backend
from bms_ai.uplink.schemas import full_definition
from bms_ai.uplink.segment import Recorder
from bms_ai.uplink.spool import Spool
from bms_ai.uplink.uploader import RetryPolicy, Uploader

BS = "sensor_msgs/msg/BatteryState"
DA = "diagnostic_msgs/msg/DiagnosticArray"


def battery_payload(rng: random.Random, cells: int = 96, temps: int = 32) -> bytes:
    """BatteryState CDR layout as can_bridge publishes it (96 cells, 32 sensors: ~590 bytes)."""
    b = bytearray(b"\x00\x01\x00\x00")
    b += struct.pack("<iI", int(time.time()), rng.randrange(10**9))
    b += struct.pack("<I", 5) + b"pack\x00" + b"\x00" * 3
    b += struct.pack("<7f", 350 + rng.random(), 25 + rng.random(), -20 + rng.random(), 40.0, 50.0, 50.0, 0.8)
    b += bytes([2, 1, 2, 1])
    # quantised as the DBC sends them: 1 mV cell voltages, 0.5 degC temperatures
    b += struct.pack("<I", cells) + struct.pack(f"<{cells}f", *(round(3.6 + rng.gauss(0, 0.004), 3) for _ in range(cells)))
    b += struct.pack("<I", temps) + struct.pack(f"<{temps}f", *(round(2 * (25 + rng.gauss(0, 0.3))) / 2 for _ in range(temps)))
    b += struct.pack("<I", 1) + b"\x00" + b"\x00" * 3 + struct.pack("<I", 8) + b"SN00042\x00"
    return bytes(b)


def diag_payload(rng: random.Random, n: int = 8) -> bytes:
    """Printable bytes of a few statuses' size: /diagnostics traffic for the nominal load."""
    return bytes(rng.randrange(32, 127) for _ in range(60 * n))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def bench_recording(n: int, tmp: Path) -> dict[str, Any]:
    """Recorder throughput (spool, rotation, snapshot ring, fsync) next to a bare mcap Writer."""
    rng = random.Random(0)
    # distinct within any chunk: no free dedup (and no more than the run uses)
    payloads = [battery_payload(rng) for _ in range(min(n, 4096))]
    sp = Spool(tmp / "rec", quota_bytes=1 << 40, min_free_bytes=0, fsync=True)
    rec = Recorder(sp, {"pack/measurements": "raw"}, max_bytes=8 << 20, max_duration_s=60.0, snapshot_pre_s=30.0,
                   chunk_size=64 << 10)
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(n):
        rec.write("pack/measurements", BS, payloads[i % len(payloads)], i * 10**8)
    rec.flush()
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    size = sp.used_bytes()
    sp.close()
    # baseline: bare mcap Writer into memory, same payloads, no spool/rotation/snapshot ring
    buf = io.BytesIO()
    w = Writer(buf, compression=CompressionType.ZSTD, chunk_size=64 << 10)
    w.start(profile="ros2")
    sid = w.register_schema(BS, "ros2msg", full_definition(BS).encode())
    cid = w.register_channel("pack/measurements", "cdr", sid)
    t1 = time.perf_counter()
    for i in range(n):
        w.add_message(cid, log_time=i * 10**8, data=payloads[i % len(payloads)], publish_time=i * 10**8)
    w.finish()
    base = n / (time.perf_counter() - t1)
    rate = n / dt
    return {"recording_msgs_per_s": round(rate), "recording_cpu_us_per_msg": round(cpu / n * 1e6, 2),
            "bare_mcap_msgs_per_s": round(base), "recording_ratio_to_bare_mcap": round(rate / base, 3),
            "payload_bytes": len(payloads[0]), "compression_ratio": round(n * len(payloads[0]) / max(size, 1), 2)}


@contextlib.contextmanager
def _ingest_server(root: Path, token: str) -> Iterator[int | None]:
    """`bms-ai ingest-server` as its own process (its CPU is not the vehicle's); the port, None if it never came up."""
    port = _free_port()
    srv = subprocess.Popen([sys.executable, "-m", "bms_ai.cli", "ingest-server", "--root", str(root),
                            "--port", str(port), "--token", token], stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
    try:
        end = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > end or srv.poll() is not None:
                    port = None
                    break
                time.sleep(0.1)
        yield port
    finally:
        srv.terminate()
        srv.wait(5)


def bench_upload(total_mb: float, seg_mb: float, tmp: Path) -> dict[str, Any]:
    """Upload throughput to a real ingest server process on 127.0.0.1."""
    token = "bench"
    with _ingest_server(tmp / "cloud", token) as port:
        if port is None:
            return {"upload_skipped": "ingest server did not start"}
        sp = Spool(tmp / "up", quota_bytes=1 << 40, min_free_bytes=0, fsync=False)
        n = max(1, int(total_mb / seg_mb))
        for _ in range(n):
            p = sp.new_part_path()
            p.write_bytes(os.urandom(int(seg_mb * 2**20)))
            sp.commit(p, "raw")
        total = sp.used_bytes()
        up = Uploader(sp, make_backend({"kind": "http", "url": f"http://127.0.0.1:{port}", "token": token}),
                      RetryPolicy(base_s=0.05, max_s=0.5))
        t0, c0 = time.perf_counter(), time.process_time()
        ok = up.drain(120)
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        sp.close()
        return {"upload_MB_per_s": round(total / 2**20 / dt, 1), "upload_segments": n, "upload_segment_MB": seg_mb,
                "upload_all_arrived": bool(ok and up.stats.uploaded == n),
                "upload_cpu_s_per_MB": round(cpu / (total / 2**20), 4)}


def bench_nominal(seconds: float, tmp: Path) -> dict[str, Any]:
    """10 Hz battery_state + 10 Hz measurements + 1 Hz diagnostics, recorded and uploaded (fsync on)."""
    rng = random.Random(1)
    bp = [battery_payload(rng) for _ in range(1024)]
    dp = [diag_payload(rng) for _ in range(4)]
    with _ingest_server(tmp / "cloud2", "t") as port:
        if port is None:
            return {"nominal_skipped": "ingest server did not start"}
        sp = Spool(tmp / "nom", quota_bytes=1 << 40, min_free_bytes=0, fsync=True)
        topics = {"pack/measurements": "raw", "battery_state": "estimates", "/diagnostics": "diagnostics"}
        rec = Recorder(sp, topics, max_bytes=8 << 20, max_duration_s=60.0, chunk_size=64 << 10)
        up = Uploader(sp, make_backend({"kind": "http", "url": f"http://127.0.0.1:{port}", "token": "t"}),
                      RetryPolicy(base_s=0.05, max_s=0.5))
        c0 = time.process_time()
        steps = int(seconds * 10)
        for k in range(steps):
            t = k * 10**8
            rec.write("pack/measurements", BS, bp[k & 1023], t)
            rec.write("battery_state", BS, bp[(k + 7) & 1023], t + 1000)
            if k % 10 == 0:
                rec.write("/diagnostics", DA, dp[(k // 10) & 3], t + 2000)
        rec.flush()
        up.drain(60)
        cpu = time.process_time() - c0
        uploaded = up.stats.uploaded
        sp.close()
        return {"nominal_cpu_s_per_s": round(cpu / seconds, 5),
                "nominal_cpu_percent_of_core": round(100 * cpu / seconds, 3),
                "nominal_simulated_s": seconds, "nominal_segments_uploaded": uploaded}


def bench(quick: bool = False) -> dict[str, Any]:
    """All uplink figures (the `uplink` section of `bms-ai bench`)."""
    with tempfile.TemporaryDirectory(prefix="bms_ai_uplink_bench_") as d:
        tmp = Path(d)
        out: dict[str, Any] = {}
        out.update(bench_recording(20_000 if quick else 200_000, tmp))
        out.update(bench_upload(8 if quick else 64, 2 if quick else 4, tmp))
        out.update(bench_nominal(300.0 if quick else 3600.0, tmp))
        out["baseline_note"] = "bare_mcap = mcap Writer to memory, no spool/fsync/rotation/snapshot ring"
        return out


if __name__ == "__main__":
    import json
    print(json.dumps(bench(quick="--quick" in sys.argv), indent=2))
