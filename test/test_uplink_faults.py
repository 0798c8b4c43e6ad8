"""Fault runs against the real ingest server (HTTP/HTTPS on 127.0.0.1), S3 (moto) and a killed uploader.

Invariant checked everywhere: every segment the spool acknowledged reaches the
server exactly once (by sha256), unless it was evicted/expired and counted.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from testutil import free_port, moto_s3, wait_for

from bms_ai.uplink.backends import make_backend
from bms_ai.uplink.ingest_server import IngestServer
from bms_ai.uplink.segment import Recorder
from bms_ai.uplink.spool import Spool
from bms_ai.uplink.uploader import RetryPolicy, Uploader

ROOT = Path(__file__).resolve().parents[1]
BS = "sensor_msgs/msg/BatteryState"
TOKEN = "s3cret-token"
FAST = RetryPolicy(base_s=0.05, max_s=0.4)


def fill(sp: Spool, n: int, cls: str = "estimates", size: int = 4000) -> list[str]:
    """Commit n random segments of a class; their hashes."""
    out = []
    for _ in range(n):
        p = sp.new_part_path()
        p.write_bytes(os.urandom(size))
        seg = sp.commit(p, cls)
        assert seg is not None
        out.append(seg.sha256)
    return out


def server_hashes(srv: IngestServer) -> list[str]:
    """Hashes the ingest server stores."""
    return [d["sha256"] for d in srv.store.list()]


def http_uploader(sp: Spool, url: str, token: str = TOKEN, **kw) -> Uploader:
    """An HTTP uploader with fast retries, deterministic jitter."""
    return Uploader(sp, make_backend({"kind": "http", "url": url, "token": token}), FAST, idle_s=0.05, seed=1, **kw)


@pytest.mark.drive
def test_server_down_then_up(tmp_path: Path) -> None:
    """Segments wait while the server is down and all arrive once it is up."""
    sp = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    acked = fill(sp, 12)
    port = free_port()
    up = http_uploader(sp, f"http://127.0.0.1:{port}")
    up.start()
    try:
        assert wait_for(lambda: up.stats.failures >= 3, 5)
        assert up.stats.uploaded == 0 and len(sp.pending()) == 12
        srv = IngestServer(tmp_path / "cloud", TOKEN, port=port).start()
        try:
            fill(sp, 3, "diagnostics")  # recording goes on while the link is down
            acked = sp.hashes()
            assert wait_for(lambda: not sp.pending(), 15)
            assert sorted(server_hashes(srv)) == sorted(acked)
            assert srv.store.received == len(acked) and srv.store.duplicates == 0
            assert sp.counters()["uploaded"] == 15 and up.stats.consecutive_failures == 0
        finally:
            srv.stop()
    finally:
        up.stop()
        sp.close()


@pytest.mark.drive
def test_bad_token_keeps_everything_then_recovers(tmp_path: Path) -> None:
    """A rejected token uploads nothing and loses nothing; the right token then uploads all."""
    srv = IngestServer(tmp_path / "cloud", TOKEN).start()
    sp = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    try:
        acked = fill(sp, 5)
        bad = http_uploader(sp, srv.url, token="wrong")
        assert not bad.drain(1.0)
        assert bad.stats.auth_failures >= 1 and bad.stats.uploaded == 0
        assert "401" in bad.stats.last_error
        assert server_hashes(srv) == [] and len(sp.pending()) == 5 and sp.counters()["lost"] == 0
        good = http_uploader(sp, srv.url)
        assert good.drain(10)
        assert sorted(server_hashes(srv)) == sorted(acked)
    finally:
        srv.stop()
        sp.close()


def test_corrupt_spool_file_is_quarantined_not_uploaded(tmp_path: Path) -> None:
    """A segment changed on disk is quarantined, counted and never uploaded."""
    srv = IngestServer(tmp_path / "cloud", TOKEN).start()
    sp = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    try:
        acked = fill(sp, 6)
        victim = sp.pending()[2]
        with open(victim.path, "r+b") as f:  # bit rot, same size: only the hash can tell
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 0xFF]))
        up = http_uploader(sp, srv.url)
        assert up.drain(10)
        assert up.stats.corrupt == 1 and sp.counters()["corrupt"] == 1
        assert (sp.quarantine / victim.path.name).exists()
        assert sorted(server_hashes(srv)) == sorted(h for h in acked if h != victim.sha256)
    finally:
        srv.stop()
        sp.close()


def test_disk_quota_exhausted_during_outage(tmp_path: Path) -> None:
    """A full spool evicts raw data first and keeps snapshots and diagnostics; the rest arrives."""
    from rclpy.serialization import serialize_message
    from sensor_msgs.msg import BatteryState
    m = BatteryState()
    m.cell_voltage = [3.3] * 96
    db = 1 << 20  # the database's allowance in the quota (its real size stays below)
    sp = Spool(tmp_path / "spool", quota_bytes=db + 120_000, min_free_bytes=0, fsync=False, db_reserve_bytes=db)
    rec = Recorder(sp, {"pack/measurements": "raw", "/diagnostics": "diagnostics"}, max_bytes=8_000,
                   max_duration_s=1e9, chunk_size=2048, snapshot_pre_s=1.0, snapshot_post_s=1.0)
    rng = __import__("random").Random(3)
    for i in range(3000):  # link down: ~3000 incompressible-ish messages into a 120 kB spool
        m.voltage = rng.random()
        m.cell_voltage = [rng.random() for _ in range(24)]
        rec.write("pack/measurements", BS, serialize_message(m), i * 10**7)
        if i % 100 == 0:
            rec.write("/diagnostics", BS, serialize_message(m), i * 10**7)
        if i == 1500:
            rec.trigger_snapshot(i * 10**7, "bms_ai: test")
    rec.flush()
    c = sp.counters()
    assert c["evicted"] > 0, "quota never reached: test does not exercise eviction"
    sp.refresh()
    assert sp.spool_bytes() <= db + 120_000 and sp.usage_bytes() <= db + 120_000  # every file counted
    rows = sp.rows()
    evicted = [r for r in rows if r["state"] == "evicted"]
    assert {r["cls"] for r in evicted} == {"raw"}
    assert {"fault_snapshot", "diagnostics"} <= {r["cls"] for r in rows if r["state"] == "pending"}
    srv = IngestServer(tmp_path / "cloud", TOKEN).start()
    try:
        assert http_uploader(sp, srv.url).drain(20)
        c = sp.counters()
        uploaded = {r["sha256"] for r in sp.rows() if r["state"] == "uploaded"}
        assert c["acknowledged"] == c["uploaded"] + c["evicted"] == len(rows)
        assert set(server_hashes(srv)) == uploaded and len(server_hashes(srv)) == len(uploaded)
    finally:
        srv.stop()
        sp.close()


@pytest.mark.drive
def test_https_verifies_certificate(tmp_path: Path) -> None:
    """HTTPS refuses an untrusted certificate and works with the configured CA."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    r = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                        "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                        "-addext", "subjectAltName=IP:127.0.0.1"], capture_output=True, timeout=30)
    if r.returncode != 0:
        pytest.skip(f"openssl cannot make a test certificate: {r.stderr[-200:]!r}")
    srv = IngestServer(tmp_path / "cloud", TOKEN, certfile=str(cert), keyfile=str(key)).start()
    sp = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    try:
        acked = fill(sp, 3)
        untrusted = http_uploader(sp, srv.url)  # system CAs only: must refuse our self-signed server
        assert not untrusted.drain(0.8)
        assert "CERTIFICATE_VERIFY_FAILED" in untrusted.stats.last_error or "certificate" in untrusted.stats.last_error
        trusted = Uploader(sp, make_backend({"kind": "http", "url": srv.url, "token": TOKEN, "ca_file": str(cert)}),
                           FAST, seed=2)
        assert trusted.drain(10)
        assert sorted(server_hashes(srv)) == sorted(acked)
    finally:
        srv.stop()
        sp.close()


@pytest.mark.drive
def test_s3_backend_with_moto_server(tmp_path: Path) -> None:
    """S3 upload against moto: keys by class and hash, duplicates skipped."""
    import hashlib

    with moto_s3("fleet") as (ep, s3):
        cred = {"access_key": "testing", "secret_key": "testing"}
        sp = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
        acked = fill(sp, 4) + fill(sp, 2, "fault_snapshot")
        be = make_backend({"kind": "s3", "bucket": "fleet", "endpoint_url": ep, "prefix": "v1/", **cred})
        up = Uploader(sp, be, FAST, seed=3)
        assert up.drain(20), up.stats.last_error
        keys = [o["Key"] for o in s3.list_objects_v2(Bucket="fleet")["Contents"]]
        assert sorted(k.split("/")[-1].split(".")[0] for k in keys) == sorted(acked)
        assert sum(k.startswith("v1/fault_snapshot/") for k in keys) == 2
        obj = s3.get_object(Bucket="fleet", Key=keys[0])
        assert hashlib.sha256(obj["Body"].read()).hexdigest() == keys[0].split("/")[-1].split(".")[0]
        # re-sending the same content (crash after upload, before the row was marked) is a no-op
        p = sp.new_part_path()
        p.write_bytes(s3.get_object(Bucket="fleet", Key=keys[0])["Body"].read())
        seg = sp.commit(p, keys[0].split("/")[1])
        assert seg is not None and seg.sha256 == keys[0].split("/")[-1].split(".")[0]
        assert up.drain(10) and up.stats.duplicates == 1
        assert len(s3.list_objects_v2(Bucket="fleet")["Contents"]) == len(acked)
        sp.close()


CHILD = textwrap.dedent('''
    import os, sys, time, random
    sys.path.insert(0, {root!r})
    from bms_ai.uplink.config import load_config
    from bms_ai.uplink.service import UplinkService
    mode, spool, url = sys.argv[1], sys.argv[2], sys.argv[3]
    cfg = load_config(None, {{
        "spool": {{"dir": spool, "quota_mb": 512, "min_free_mb": 0}},
        "segments": {{"max_mb": 0.05, "max_duration_s": 3600, "chunk_kb": 16}},
        "fault_snapshot": {{"enabled": False}},
        "backend": {{"kind": "http", "url": url, "token": {token!r}}},
        "retry": {{"base_s": 0.05, "max_s": 0.3}},
        "bandwidth_kbps": 800 if mode == "record" else 0,
    }})
    svc = UplinkService(cfg)
    rng = random.Random(os.getpid())
    t0 = time.monotonic()
    i = 0
    while time.monotonic() - t0 < 20:
        if mode == "record":
            for _ in range(20):
                svc.record("pack/measurements", "sensor_msgs/msg/BatteryState", rng.randbytes(900), i * 10**7)
                i += 1
            svc.tick(i * 10**7)
            time.sleep(0.02)
        else:
            if not svc.spool.pending(limit=1):
                print("drained", flush=True)
                break
            time.sleep(0.05)
    svc.close()
''')


@pytest.mark.e2e  # several processes: a recording uploader killed -9, then a second one draining
def test_kill9_mid_upload_then_restart(tmp_path: Path) -> None:
    """kill -9 mid-upload: after restart every acknowledged segment arrives exactly once."""
    srv = IngestServer(tmp_path / "cloud", TOKEN).start()
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(root=str(ROOT), token=TOKEN))
    spool = tmp_path / "spool"
    db = spool / "spool.db"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    child = subprocess.Popen([sys.executable, str(script), "record", str(spool), srv.url], env=env)
    try:
        def mid_upload() -> bool:  # server is receiving a body right now and some are already done
            return len(server_hashes(srv)) >= 2 and any((tmp_path / "cloud" / "tmp").iterdir())
        assert wait_for(mid_upload, 15, 0.005), "never caught the uploader mid-upload"
        child.send_signal(signal.SIGKILL)
        child.wait(5)
        partial_at_kill = len(list((spool / "incoming").iterdir()))
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            acked = [r[0] for r in con.execute("SELECT sha256 FROM segments")]
        assert len(acked) > len(server_hashes(srv))
        before = set(server_hashes(srv))
        out = subprocess.run([sys.executable, str(script), "drain", str(spool), srv.url], env=env,
                             capture_output=True, text=True, timeout=40)
        assert "drained" in out.stdout, out.stderr[-2000:]
        got = server_hashes(srv)
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
            states = dict(con.execute("SELECT state, COUNT(*) FROM segments GROUP BY state").fetchall())
            counters = dict(con.execute("SELECT name, value FROM counters").fetchall())
            all_rows = [r[0] for r in con.execute("SELECT sha256 FROM segments")]
        assert set(acked) <= set(got), "a segment acknowledged before the kill never arrived"
        # after restart: acknowledged-before-kill + complete chunks salvaged from the open segment(s)
        assert sorted(got) == sorted(all_rows) and len(got) == len(set(got))
        assert before <= set(got)
        assert states == {"uploaded": len(all_rows)}
        assert counters.get("lost", 0) == 0 and counters.get("corrupt", 0) == 0
        assert counters.get("recovered_partial", 0) == partial_at_kill  # the open segment at kill time, counted
        # a kill between rename and row commit leaves an orphan file that recovery adopts (never acknowledged)
        assert counters["uploaded"] == len(all_rows)
        assert counters["acknowledged"] + counters.get("recovered_orphan", 0) == len(all_rows)
        # at most one salvaged segment per partial file, plus a segment renamed but not yet acknowledged
        assert len(all_rows) - len(acked) <= partial_at_kill + counters.get("recovered_orphan", 0)
        assert srv.store.duplicates <= 1  # at most the one in flight was re-sent
    finally:
        if child.poll() is None:
            child.kill()
        srv.stop()


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_ingest_server_cli_protocol(tmp_path: Path) -> None:
    """`bms-ai ingest-server` speaks the protocol: auth, hash check, idempotency, listing."""
    import hashlib
    import http.client
    import json
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "bms_ai.cli", "ingest-server", "--root", str(tmp_path / "c"),
                             "--port", str(port), "--token", TOKEN], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and "127.0.0.1" in proc.stdout.readline()

        def req(method: str, path: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, dict]:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            out = (r.status, json.loads(r.read() or b"{}"))
            c.close()
            return out

        assert wait_for(lambda: req("GET", "/healthz")[0] == 200, 10)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        data = os.urandom(3000)
        h = hashlib.sha256(data).hexdigest()
        assert req("PUT", f"/segments/{h}", data, {"Authorization": "Bearer nope"})[0] == 401
        assert req("GET", "/segments")[0] == 401
        assert req("PUT", f"/segments/{'0' * 64}", data, auth)[0] == 400  # content does not match its name
        assert req("PUT", "/segments/not-a-hash", data, auth)[0] == 400
        assert req("PUT", f"/segments/{h}", data, {**auth, "X-BMS-Class": "raw"}) == (201, {"sha256": h,
                                                                                           "result": "created"})
        assert req("POST", "/segments", data, {**auth, "X-Content-SHA256": h})[1]["result"] == "duplicate"
        code, listing = req("GET", "/segments", headers=auth)
        assert code == 200 and [s["sha256"] for s in listing["segments"]] == [h]
        assert listing["segments"][0]["class"] == "raw" and listing["duplicates"] == 1
        assert (tmp_path / "c" / "objects" / h).read_bytes() == data
    finally:
        proc.terminate()
        proc.wait(5)


def test_permanent_refusal_is_quarantined_and_the_rest_keep_flowing(tmp_path: Path) -> None:
    """HTTP 413 for one segment: it is quarantined (kept, counted, reported); the ones behind it upload.

    Before: the refused segment was retried forever with backoff and blocked its class.
    """
    from bms_ai.uplink.ingest_server import Limits
    from bms_ai.uplink.service import health_level

    srv = IngestServer(tmp_path / "cloud", TOKEN, limits=Limits(max_body=50_000)).start()
    sp = Spool(tmp_path / "spool", min_free_bytes=0, fsync=False)
    try:
        big = fill(sp, 1, "diagnostics", size=80_000)[0]  # oldest in the highest class: first in line
        rest = fill(sp, 4, "diagnostics") + fill(sp, 3, "raw")
        up = http_uploader(sp, srv.url)
        assert up.drain(10), up.stats.last_error
        assert sorted(server_hashes(srv)) == sorted(rest)
        assert up.stats.refused == 1 and "HTTP 413" in up.stats.last_refusal
        assert sp.counters()["refused"] == 1 and sp.states().get("refused") == 1
        assert list(sp.quarantine.glob(f"{big}.diagnostics.*"))  # kept for inspection
        assert up.stats.consecutive_failures == 0  # no backoff for a refusal
        stats = {"backlog_segments": 0, "backlog_age_s": 0.0, "upload_last_refusal": up.stats.last_refusal}
        level, msg = health_level(stats, 0, 0.0, refused_new=1)
        assert level == 1 and msg.startswith("server refused 1 segment(s) for good (quarantined): HTTP 413")
    finally:
        srv.stop()
        sp.close()
