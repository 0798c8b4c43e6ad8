"""Uplink library: schemas, MCAP segments, spool durability/eviction/recovery, snapshots, privacy."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
from mcap.reader import make_reader
from mcap_ros2.decoder import DecoderFactory
from rclpy.serialization import serialize_message

from bms_ai.core.files import sha256_file
from bms_ai.uplink.privacy import Pseudonymizer
from bms_ai.uplink.schemas import DELIMITER, full_definition
from bms_ai.uplink.segment import Message, Recorder, SegmentWriter
from bms_ai.uplink.spool import Spool
from bms_ai.uplink.uploader import RetryPolicy

BS = "sensor_msgs/msg/BatteryState"
DA = "diagnostic_msgs/msg/DiagnosticArray"
LOG = "rcl_interfaces/msg/Log"
DB = 1 << 20  # database allowance in quota arithmetic (its real size stays below this)


def battery(i: int):
    """A BatteryState as CDR, voltage i."""
    from sensor_msgs.msg import BatteryState
    m = BatteryState()
    m.header.stamp.sec = i
    m.header.frame_id = "pack"
    m.voltage = 300.0 + i * 0.5
    m.current = -12.5
    m.percentage = math.nan
    m.cell_voltage = [3.2 + 0.001 * k for k in range(96)]
    m.cell_temperature = [25.0 + 0.1 * k for k in range(32)]
    m.serial_number = f"SN{i}"
    return m


def diag(level: int, name: str = "bms_ai: limits"):
    """A DiagnosticArray with one status as CDR."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    m = DiagnosticArray()
    m.status = [DiagnosticStatus(level=bytes([level]), name=name, message="msg", hardware_id="pack1",
                                 values=[KeyValue(key="soc_sigma", value="0.01")])]
    return m


def read_segment(path: Path) -> list[tuple[str, str, object, int]]:
    """Decoded (topic, type, message, log time) of a segment."""
    with open(path, "rb") as f:
        r = make_reader(f, decoder_factories=[DecoderFactory()])
        return [(s.name, c.topic, d, m.log_time) for s, c, m, d in r.iter_decoded_messages()]


def test_schema_text_is_full_rosbag2_style() -> None:
    """Schema text has every dependency once, as rosbag2 writes it."""
    bs = full_definition("sensor_msgs/BatteryState")
    from bms_ai.uplink.schemas import msg_file
    assert bs.startswith(msg_file(BS).read_text())
    assert f"\n{DELIMITER}\nMSG: std_msgs/msg/Header\n" in bs
    assert f"\n{DELIMITER}\nMSG: builtin_interfaces/msg/Time\n" in bs
    assert "float32[] cell_voltage" in bs
    da = full_definition(DA)
    heads = [ln for ln in da.splitlines() if ln.startswith("MSG: ")]
    assert heads == ["MSG: diagnostic_msgs/msg/DiagnosticStatus", "MSG: diagnostic_msgs/msg/KeyValue",
                     "MSG: std_msgs/msg/Header", "MSG: builtin_interfaces/msg/Time"]
    lg = full_definition(LOG)
    assert [ln for ln in lg.splitlines() if ln.startswith("MSG: ")] == ["MSG: builtin_interfaces/msg/Time"]
    with pytest.raises(LookupError):
        full_definition("nonexistent_msgs/msg/Nope")


def test_segment_roundtrip_decodes_to_original_messages(tmp_path: Path) -> None:
    """What is written decodes back to the same messages and times."""
    from rcl_interfaces.msg import Log
    w = SegmentWriter(tmp_path / "a.mcap", metadata={"vehicle": "v"})
    originals = []
    for i in range(50):
        m = battery(i)
        originals.append(("pack/measurements", m))
        w.write(Message("pack/measurements", BS, serialize_message(m), i * 10**8))
        if i % 10 == 0:
            d = diag(2 if i == 20 else 0)
            w.write(Message("/diagnostics", DA, serialize_message(d), i * 10**8 + 1))
            originals.append(("/diagnostics", d))
            lg = Log(level=Log.WARN, name="estimator", msg=f"hello {i}", file="f.py", function="fn", line=i)
            w.write(Message("/rosout", LOG, serialize_message(lg), i * 10**8 + 2))
            originals.append(("/rosout", lg))
    w.close()
    got = read_segment(tmp_path / "a.mcap")
    assert len(got) == len(originals)
    for (schema, topic, dec, _), (otopic, orig) in zip(got, originals):
        assert topic == otopic
        if topic == "pack/measurements":
            assert schema == BS
            assert dec.voltage == pytest.approx(orig.voltage)
            assert dec.current == pytest.approx(orig.current)
            assert math.isnan(dec.percentage)
            assert list(dec.cell_voltage) == pytest.approx(list(orig.cell_voltage))
            assert list(dec.cell_temperature) == pytest.approx(list(orig.cell_temperature))
            assert dec.serial_number == orig.serial_number and dec.header.stamp.sec == orig.header.stamp.sec
        elif topic == "/diagnostics":
            st, ost = dec.status[0], orig.status[0]
            assert (st.name, st.hardware_id, st.level) == (ost.name, ost.hardware_id, ost.level[0])
            assert st.values[0].key == "soc_sigma" and st.values[0].value == "0.01"
        else:
            assert (dec.msg, dec.name, dec.line, dec.level) == (orig.msg, orig.name, orig.line, orig.level)


def test_rotation_by_size_and_time(tmp_path: Path) -> None:
    """Segments rotate by compressed size and by message time."""
    sp = Spool(tmp_path / "s", quota_bytes=1 << 30, min_free_bytes=0, fsync=False)
    data = serialize_message(battery(1))
    rec = Recorder(sp, {"pack/measurements": "raw", "battery_state": "estimates"}, max_bytes=20_000,
                   max_duration_s=5.0, chunk_size=4096, snapshot_pre_s=-1)
    for i in range(600):  # 0.1 s apart -> 60 s
        rec.write("pack/measurements", BS, data, i * 10**8)
    n_size = rec.segments_committed
    assert n_size >= 5  # by size: ~350 kB raw, zstd-compressed in 4 kB chunks
    rec.flush()
    rows = sp.rows()
    total = 0
    for r in rows:
        msgs = read_segment(sp.segments_dir / r["file"])
        total += len(msgs)
        assert r["sha256"] == sha256_file(sp.segments_dir / r["file"]) and r["cls"] == "raw"
    assert total == 600
    # by time: 1 msg/s on a slow topic rotates every 5 s of message time, and tick() closes idle ones
    rec2 = Recorder(sp, {"battery_state": "estimates"}, max_bytes=1 << 30, max_duration_s=5.0, snapshot_pre_s=-1)
    for i in range(12):
        rec2.write("battery_state", BS, data, i * 10**9)
    assert rec2.segments_committed == 2
    rec2.tick(100 * 10**9)
    assert rec2.segments_committed == 3


def test_eviction_lowest_priority_oldest_first_and_counted(tmp_path: Path) -> None:
    """A full spool evicts the lowest class, oldest first, and counts it (the database counts as 1 MiB here)."""
    sp = Spool(tmp_path / "s", quota_bytes=DB + 10_000, min_free_bytes=0, fsync=False, db_reserve_bytes=DB)

    def add(cls: str, n: int, tag: str):
        p = sp.new_part_path()
        p.write_bytes(tag.encode() * (n // len(tag)))
        return sp.commit(p, cls)

    raw = [add("raw", 2000, f"r{i}") for i in range(3)]
    est = add("estimates", 2000, "e0")
    snap = add("fault_snapshot", 2000, "f0")
    assert all(s is not None for s in [*raw, est, snap])
    new = add("diagnostics", 3000, "d0")  # needs 3000: evicts raw[0] then raw[1] (oldest raw first)
    assert new is not None
    st = sp.states()
    assert sp.counters()["evicted"] == 2 and st["evicted"] == 2
    evicted = {r["sha256"] for r in sp.rows() if r["state"] == "evicted"}
    assert evicted == {raw[0].sha256, raw[1].sha256}
    assert not raw[0].path.exists()
    # a raw newcomer that would need higher classes evicted is refused, not stored (counted 'rejected')
    assert add("raw", 9000, "r9") is None
    assert sp.counters()["rejected"] == 1
    # a fault snapshot may push out everything below it
    assert add("fault_snapshot", 7000, "f1") is not None
    left = {r["cls"] for r in sp.rows() if r["state"] == "pending"}
    assert left == {"fault_snapshot"}
    c = sp.counters()
    assert c["acknowledged"] == c["evicted"] + len(sp.pending())


def test_recovery_counts_damage_and_never_crashes(tmp_path: Path) -> None:
    """Damaged state at start is counted, never raised."""
    root = tmp_path / "s"
    sp = Spool(root, quota_bytes=1 << 30, min_free_bytes=0)
    segs = []
    for i in range(4):
        p = sp.new_part_path()
        p.write_bytes(os.urandom(1000 + i))
        segs.append(sp.commit(p, "estimates"))
    half = sp.new_part_path()
    half.write_bytes(b"\x89MCAP0\r\npartial")  # writer died mid-segment
    sp.close()
    segs[0].path.unlink()  # row points at a missing file
    with open(segs[1].path, "ab") as f:  # truncated/extended file
        f.write(b"junk")
    orphan_data = os.urandom(500)
    import hashlib
    h = hashlib.sha256(orphan_data).hexdigest()
    (root / "segments" / f"{h}.diagnostics.mcap").write_bytes(orphan_data)  # renamed, row never committed
    (root / "segments" / "garbage.bin").write_bytes(b"x")
    sp2 = Spool(root, quota_bytes=1 << 30, min_free_bytes=0)
    rep = sp2.last_recovery
    assert (rep.partial_removed, rep.missing, rep.wrong_size, rep.orphans_adopted, rep.orphans_removed) == (1, 1, 1, 1, 1)
    c = sp2.counters()
    assert c["lost"] == 1 and c["corrupt"] == 1 and c["recovered_orphan"] == 1 and c["recovered_partial"] == 1
    pend = {s.sha256 for s in sp2.pending()}
    assert pend == {segs[2].sha256, segs[3].sha256, h}
    sp2.close()
    # a garbage database is not a crash either: it is set aside and the index rebuilt from the files
    for suffix in ("-wal", "-shm"):
        (root / f"spool.db{suffix}").unlink(missing_ok=True)
    (root / "spool.db").write_bytes(b"this is not sqlite" * 100)
    sp3 = Spool(root, quota_bytes=1 << 30, min_free_bytes=0)
    assert sp3.db_rebuilt and sp3.counters()["db_rebuilt"] == 1
    assert {s.sha256 for s in sp3.pending()} == pend
    assert any(p.name.startswith("spool.db.") for p in (root / "quarantine").iterdir())
    sp3.close()


def test_fault_snapshot_keeps_before_and_after(tmp_path: Path) -> None:
    """A fault snapshot holds the seconds before and after the trigger."""
    sp = Spool(tmp_path / "s", quota_bytes=1 << 30, min_free_bytes=0, fsync=False)
    rec = Recorder(sp, {"pack/measurements": "raw", "/diagnostics": "diagnostics"}, max_duration_s=1000,
                   snapshot_pre_s=2.0, snapshot_post_s=3.0)
    data = serialize_message(battery(0))
    for i in range(100):  # 10 Hz for 10 s; fault at t = 5 s
        t = i * 10**8
        rec.write("pack/measurements", BS, data, t)
        if i == 50:
            assert rec.trigger_snapshot(t, "bms_ai: limits") is True
            assert rec.trigger_snapshot(t + 1, "again") is False  # extends, no second snapshot
    rec.flush()
    snaps = [r for r in sp.rows() if r["cls"] == "fault_snapshot"]
    assert len(snaps) == 1 and rec.snapshots == 1
    times = [t for *_, t in read_segment(sp.segments_dir / snaps[0]["file"])]
    assert min(times) == 30 * 10**8 and max(times) == 80 * 10**8  # 2 s before .. 3 s after
    assert len(times) == len(set(times)) == 51


def test_pseudonymizer() -> None:
    """Pseudonyms are stable, keyed and not the identifier."""
    p = Pseudonymizer("fleet-secret")
    a = p("WVWZZZ1JZXW000001")
    assert a == p("WVWZZZ1JZXW000001") and a != p("WVWZZZ1JZXW000002") and "WVW" not in a
    assert Pseudonymizer("other")("WVWZZZ1JZXW000001") != a
    assert Pseudonymizer(None)("VIN") == "VIN"
    with pytest.raises(ValueError):
        Pseudonymizer.from_config({"enabled": True, "key_env": "BMS_AI_UNSET_KEY_FOR_TEST"})


def test_retry_policy_bounds() -> None:
    """Backoff grows, is capped, and jitter stays in [d/2, d]."""
    import random
    pol = RetryPolicy(base_s=1.0, max_s=60.0, factor=2.0)
    rng = random.Random(1)
    for n in range(1, 20):
        d = pol.delay(n, rng)
        cap = min(60.0, 2.0 ** (n - 1))
        assert cap / 2 <= d <= cap
    assert pol.delay(0) == 0.0


def test_can_log_pickup_backlog_age_and_bandwidth_cap(tmp_path: Path) -> None:
    """Closed CAN logs are picked up once; backlog age and bandwidth cap are reported."""
    import time

    from bms_ai.uplink.config import load_config
    from bms_ai.uplink.service import UplinkService
    logs = tmp_path / "canlogs"
    logs.mkdir()
    (logs / "can_0001.blf").write_bytes(os.urandom(30_000))
    (logs / "can_0002.blf").write_bytes(os.urandom(30_000))
    (logs / "ignore.txt").write_text("x")
    os.utime(logs / "can_0001.blf", (time.time() - 60, time.time() - 60))
    os.utime(logs / "can_0002.blf", (time.time() - 60, time.time() - 60))
    (logs / "can_0003.blf").write_bytes(b"still being written")  # too fresh: not picked yet
    out = tmp_path / "out"
    cfg = load_config(None, {"spool": {"dir": str(tmp_path / "spool"), "min_free_mb": 0, "fsync": False},
                             "backend": {"kind": "directory", "path": str(out)}, "bandwidth_kbps": 800,
                             "can_logs": {"enabled": True, "dir": str(logs), "min_age_s": 5},
                             "backlog": {"max_age_s": {"estimates": 3600}}})
    svc = UplinkService(cfg, start_threads=False)
    try:
        assert svc.pick_up_can_logs() == 2 and svc.pick_up_can_logs() == 0  # once only
        segs = svc.spool.pending()
        assert {s.cls for s in segs} == {"raw"} and all(s.path.name.endswith(".blf") for s in segs)
        # backlog-age policy: an estimates segment older than an hour is expired, counted
        p = svc.spool.new_part_path()
        p.write_bytes(b"old estimates")
        svc.spool.commit(p, "estimates", created=time.time() - 7200)
        assert svc.uploader is not None
        t0 = time.monotonic()
        assert svc.uploader.drain(10)
        dt = time.monotonic() - t0
        # 60 kB at 800 kbit/s (100 kB/s) with a 25 kB burst: >= 0.35 s, and not unbounded
        assert 0.35 <= dt <= 5.0, dt
        assert svc.spool.counters()["expired"] == 1 and svc.uploader.stats.expired == 1
        assert sorted(p.name for p in out.glob("*.blf")) == sorted(s.path.name for s in segs)
        assert sha256_file(out / segs[0].path.name) == segs[0].sha256
    finally:
        svc.close()


def test_min_free_space_refuses_instead_of_filling_the_disk(tmp_path: Path) -> None:
    """Below the free-space floor the spool refuses new segments instead of filling the disk."""
    import shutil
    free = shutil.disk_usage(tmp_path).free
    sp = Spool(tmp_path / "s", quota_bytes=1 << 40, min_free_bytes=free + (10 << 30), fsync=False)
    p = sp.new_part_path()
    p.write_bytes(b"x" * 1000)
    assert sp.commit(p, "fault_snapshot") is None  # nothing to evict can make room: refused, counted
    assert sp.counters()["rejected"] == 1 and not p.exists() and sp.pending() == []
    sp.close()


def test_clock_jump_back_closes_segment_and_resets_snapshot_window(tmp_path: Path) -> None:
    """A replay restart (clock back) closes the segment and clears the snapshot window."""
    sp = Spool(tmp_path / "s", quota_bytes=1 << 30, min_free_bytes=0, fsync=False)
    rec = Recorder(sp, {"t": "raw"}, max_duration_s=100.0, snapshot_pre_s=2.0, snapshot_post_s=1.0)
    data = serialize_message(battery(0))
    for i in range(50):
        rec.write("t", BS, data, 1000 * 10**9 + i * 10**8)
    for i in range(5):  # replay restarted: sim time back near zero
        rec.write("t", BS, data, i * 10**8)
    assert rec.segments_committed == 1
    rec.trigger_snapshot(5 * 10**8)
    rec.write("t", BS, data, 10 * 10**8)
    rec.flush()
    snap = [r for r in sp.rows() if r["cls"] == "fault_snapshot"][0]
    times = [t for *_, t in read_segment(sp.segments_dir / snap["file"])]
    assert max(times) < 100 * 10**9 and len(times) == 6  # 5 buffered after the jump + 1 after the trigger
    sp.close()


def test_identical_content_is_spooled_once(tmp_path: Path) -> None:
    """The same content committed twice is one segment."""
    sp = Spool(tmp_path / "s", min_free_bytes=0, fsync=False)
    segs = []
    for _ in range(2):
        p = sp.new_part_path()
        p.write_bytes(b"same bytes" * 100)
        segs.append(sp.commit(p, "raw"))
    assert segs[0] is not None and segs[1] is not None and segs[0].id == segs[1].id
    assert len(sp.pending()) == 1 and sp.counters()["acknowledged"] == 1
    assert not list(sp.incoming.iterdir())
    sp.close()


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_bench_reports_uplink_figures() -> None:
    """The uplink bench section produces its figures."""
    import tempfile

    from bms_ai.bench.uplink import bench_recording
    with tempfile.TemporaryDirectory() as d:
        r = bench_recording(2000, Path(d))
    assert r["recording_msgs_per_s"] > 0 and r["bare_mcap_msgs_per_s"] > 0 and r["compression_ratio"] > 1


def test_upload_order_priority_then_age(tmp_path: Path) -> None:
    """Uploads go by class priority, then age."""
    import time

    from bms_ai.uplink.backends import make_backend
    from bms_ai.uplink.uploader import Uploader
    sp = Spool(tmp_path / "s", min_free_bytes=0, fsync=False)
    order = [("raw", 1), ("estimates", 2), ("raw", 3), ("fault_snapshot", 4), ("diagnostics", 5), ("estimates", 6)]
    names = {}
    for cls, k in order:
        p = sp.new_part_path()
        p.write_bytes(f"{cls}{k}".encode() * 50)
        names[sp.commit(p, cls, created=time.time() - 100 + k).sha256] = (cls, k)
    seen: list[tuple[str, int]] = []

    class Recording(type(make_backend({"kind": "directory", "path": str(tmp_path / "o")}))):
        def upload(self, seg, f, throttle, headers):  # noqa: ANN001, ANN201
            seen.append(names[seg.sha256])
            return super().upload(seg, f, throttle, headers)

    from bms_ai.uplink.backends import BACKENDS
    assert BACKENDS.get("directory") is not Recording
    assert Uploader(sp, Recording(str(tmp_path / "o"))).drain(5)
    assert seen == [("fault_snapshot", 4), ("diagnostics", 5), ("estimates", 2), ("estimates", 6), ("raw", 1), ("raw", 3)]
    sp.close()


def test_crashed_segment_complete_chunks_are_salvaged(tmp_path: Path) -> None:
    """A segment cut by a crash keeps its complete chunks."""
    import shutil
    sp = Spool(tmp_path / "a", min_free_bytes=0, fsync=False)
    rec = Recorder(sp, {"pack/measurements": "estimates"}, chunk_size=4096, max_duration_s=1e9, snapshot_pre_s=-1)
    originals = []
    for i in range(120):
        m = battery(i)
        originals.append(m.voltage)
        rec.write("pack/measurements", BS, serialize_message(m), i * 10**8)
    rec.flush_files()
    part = next(sp.incoming.iterdir())
    assert ".estimates.mcap.part" in part.name
    # the process dies: copy what is on disk now, cut into the middle of the last record
    crashed = tmp_path / "b"
    (crashed / "incoming").mkdir(parents=True)
    data = part.read_bytes()
    (crashed / "incoming" / part.name).write_bytes(data[: len(data) * 3 // 4 + 7])
    sp.close()
    shutil.rmtree(tmp_path / "a")
    sp2 = Spool(crashed, min_free_bytes=0, fsync=False)
    rep = sp2.last_recovery
    assert rep.partial_removed == 1 and 0 < rep.salvaged_messages < 120
    seg = sp2.pending()[0]
    assert seg.cls == "estimates" and sp2.counters()["salvaged_messages"] == rep.salvaged_messages
    got = read_segment(seg.path)
    assert [d.voltage for _s, _c, d, _t in got] == pytest.approx(originals[: len(got)])
    assert len(got) == rep.salvaged_messages
    # garbage in incoming is counted and removed, not salvaged, never a crash
    sp2.close()
    (crashed / "incoming" / "123-abc.raw.mcap.part").write_bytes(b"\x89MCAP0\r\n" + b"\x00" * 50)
    sp3 = Spool(crashed, min_free_bytes=0, fsync=False)
    assert sp3.last_recovery.partial_removed == 1 and sp3.last_recovery.salvaged_messages == 0
    sp3.close()


# ----------------------------------------------------------------------------- space, snapshots, unsafe files
# What is real here: files on the real disk, SQLite, the MCAP writer, recorder and spool. What is simulated:
# the size of the disk. SmallDisk is the spool's file-system seam (SpoolFS) with a capacity: free space is
# capacity - (bytes of every file under the spool folder) - bytes "others" use, and a write that does not fit
# raises ENOSPC before touching the disk. The real disk is never filled.

import errno  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402

from bms_ai.uplink.fsio import SpoolFS  # noqa: E402


def tree_bytes(root: Path) -> int:
    """Bytes of every file under ``root`` (what a quota must cover), symlinks not followed."""
    return sum(p.lstat().st_size for p in root.rglob("*") if not p.is_dir() or p.is_symlink())


class _SmallFile:
    """A file on the SmallDisk: unbuffered, so its size on disk is always what was written."""

    def __init__(self, path: Path, disk: SmallDisk) -> None:
        self._f = open(path, "xb", buffering=0)  # noqa: SIM115
        self.disk = disk

    def write(self, data: bytes) -> int:
        if self.disk.enospc or len(data) > self.disk.free_bytes(self.disk.root):
            raise OSError(errno.ENOSPC, "No space left on device")
        return self._f.write(data)

    def tell(self) -> int:
        return self._f.tell()

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self._f.fileno()

    def close(self) -> None:
        self._f.close()

    def read(self, n: int = -1) -> bytes:
        return self._f.read(n)


class SmallDisk(SpoolFS):
    """A disk of ``capacity`` bytes holding the spool folder and ``other`` bytes of somebody else's."""

    def __init__(self, root: Path, capacity: int, other: int = 0) -> None:
        self.root, self.capacity, self.other = root, capacity, other
        self.enospc = False  # True: every write and fsync fails, whatever the free space says

    def free_bytes(self, path: Path) -> int:
        return self.capacity - self.other - tree_bytes(self.root)

    def open_write(self, path: Path):  # noqa: ANN201
        return _SmallFile(path, self)

    def fsync_path(self, path: Path) -> None:
        if self.enospc:
            raise OSError(errno.ENOSPC, "No space left on device")
        super().fsync_path(path)


_NOISE: list[bytes] = []


def noisy(rng: random.Random, i: int) -> bytes:
    """A BatteryState whose cells are noise (compresses poorly, like real raw data); 300 of them, reused."""
    if not _NOISE:
        r = random.Random(0)
        for k in range(300):
            m = battery(k)
            m.cell_voltage = [r.random() for _ in range(96)]
            m.cell_temperature = [r.random() for _ in range(96)]
            _NOISE.append(serialize_message(m))
    return _NOISE[(i * 7 + rng.randrange(300)) % 300]


@pytest.mark.parametrize("bound", ["quota", "min_free"])
def test_quota_and_min_free_cover_every_file_checked_before_writing(tmp_path: Path, bound: str) -> None:
    """Quota 4 MiB / min free 5 MiB hold at every moment: segments being written and the database count.

    Before: only acknowledged segments counted and only at commit, so open .part files (up to max_mb each),
    the database and its WAL pushed the folder to 13 MiB over a 4 MiB quota.
    """
    root = tmp_path / "s"
    root.mkdir()
    quota, min_free = 4 << 20, 5 << 20
    disk = SmallDisk(root, capacity=64 << 20 if bound == "quota" else 8 << 20)  # min_free: 3 MiB usable
    sp = Spool(root, quota_bytes=quota, min_free_bytes=min_free, fsync=False, fs=disk)
    rec = Recorder(sp, {"pack/measurements": "raw", "battery_state": "estimates", "/diagnostics": "diagnostics"},
                   max_bytes=8 << 20, max_duration_s=1e9, chunk_size=64 << 10, snapshot_pre_s=5.0,
                   snapshot_post_s=5.0)
    rng = random.Random(5)
    for i in range(6000):  # ~7 MiB of noise at 100 Hz, 10 Hz estimates, 1 Hz diagnostics; a fault at 30 s
        t = i * 10**7
        rec.write("pack/measurements", BS, noisy(rng, i), t)
        if i % 10 == 0:
            rec.write("battery_state", BS, noisy(rng, i), t)
        if i % 100 == 0:
            rec.write("/diagnostics", DA, serialize_message(diag(0)), t)
            rec.tick(t)
        if i == 3000:
            rec.trigger_snapshot(t, "bms_ai: limits")
        if i % 250 == 0:
            assert tree_bytes(root) <= quota, f"spool folder {tree_bytes(root)} B over the quota at message {i}"
            assert disk.free_bytes(root) >= min_free, f"free space {disk.free_bytes(root)} B at message {i}"
    rec.flush()
    assert tree_bytes(root) <= quota and disk.free_bytes(root) >= min_free
    c = sp.counters()
    assert c["evicted"] > 0 and rec.stats.disk_full == 0, (c, rec.stats, rec.paused)  # evicted, never hit the wall
    assert {r["cls"] for r in sp.rows() if r["state"] == "evicted"} == {"raw"}
    newest_raw = max(json.loads(r)["last_ns"] for r in
                     [sp._db.execute("SELECT meta FROM segments WHERE id=?", (x["id"],)).fetchone()[0]
                      for x in sp.rows() if x["cls"] == "raw" and x["state"] == "pending"])
    assert newest_raw >= 5990 * 10**7  # recording kept going to the end, evicting the oldest raw data
    sp.close()


def test_fault_snapshot_larger_than_the_quota_is_split_and_the_nearest_part_kept(tmp_path: Path) -> None:
    """A snapshot bigger than the quota: parts that fit, the ones around the trigger kept; none refused whole."""
    root = tmp_path / "s"
    sp = Spool(root, quota_bytes=DB + (1 << 20), min_free_bytes=0, fsync=False, db_reserve_bytes=DB)
    rec = Recorder(sp, {"pack/measurements": "raw"}, max_bytes=8 << 20, max_duration_s=1e9, chunk_size=16 << 10,
                   snapshot_pre_s=20.0, snapshot_post_s=10.0, compression="none")
    rng = random.Random(2)
    trigger = 2000 * 10**7
    for i in range(3000):  # 100 Hz of ~900 B: 20 s before the fault = ~1.8 MB, more than the 1 MiB quota
        if i == 2000:
            assert rec.trigger_snapshot(trigger, "bms_ai: limits")
        rec.write("pack/measurements", BS, noisy(rng, i), i * 10**7)
    rec.flush()
    snaps = [r for r in sp.rows() if r["cls"] == "fault_snapshot" and r["state"] == "pending"]
    assert len(snaps) >= 2 and sp.counters()["rejected"] == 0
    assert all(r["size"] <= rec.part_bytes for r in snaps)
    times = sorted(t for r in snaps for *_, t in read_segment(sp.segments_dir / r["file"]))
    assert times[0] <= trigger - 10**9 and trigger in times and times[-1] >= trigger + 10**9  # around the fault
    assert times[-1] - times[0] < 30 * 10**9 and rec.stats.snapshot_truncated >= 1  # not all of it fitted
    assert len(times) == len(set(times)) and times == list(range(times[0], times[-1] + 1, 10**7))  # one window
    sp.close()


def test_symlinks_and_special_files_are_never_adopted_or_uploaded(tmp_path: Path) -> None:
    """A symlink (or FIFO) in segments/ is moved aside unfollowed and counted; nothing outside reaches the cloud."""
    import hashlib

    from bms_ai.uplink.backends import make_backend
    from bms_ai.uplink.uploader import Uploader
    root = tmp_path / "s"
    sp = Spool(root, min_free_bytes=0, fsync=False)
    p = sp.new_part_path()
    p.write_bytes(b"real segment" * 10)
    good = sp.commit(p, "raw")
    sp.close()
    secret = tmp_path / "outside" / "secret.txt"
    secret.parent.mkdir()
    secret.write_bytes(b"not for the cloud")
    h = hashlib.sha256(secret.read_bytes()).hexdigest()
    (root / "segments" / f"{h}.raw.bin").symlink_to(secret)  # name and hash check out: was adopted before
    os.mkfifo(root / "segments" / f"{'f' * 64}.raw.bin")
    (root / "incoming" / "1-abc.raw.mcap.part").symlink_to(secret)
    sp2 = Spool(root, min_free_bytes=0, fsync=False)
    assert sp2.last_recovery.unsafe == 3 and sp2.counters()["unsafe_files"] == 3
    assert [s.sha256 for s in sp2.pending()] == [good.sha256]
    # a pending segment's file swapped for a symlink later is not followed at upload time either
    (root / "segments" / good.path.name).unlink()
    (root / "segments" / good.path.name).symlink_to(secret)
    out = tmp_path / "cloud"
    assert Uploader(sp2, make_backend({"kind": "directory", "path": str(out)})).drain(5)
    assert not out.exists() or not any(f.read_bytes() == secret.read_bytes() for f in out.iterdir() if f.is_file())
    assert sp2.counters()["corrupt"] == 1 and secret.read_bytes() == b"not for the cloud"
    sp2.close()


def test_finished_but_unacknowledged_part_is_recovered_whole_with_its_metadata(tmp_path: Path) -> None:
    """A segment finished but not acknowledged (shutdown cut after close, or the database was full):
    the next start recovers every message and keeps its metadata (vehicle, class)."""
    from mcap.reader import make_reader as reader
    sp = Spool(tmp_path / "s", min_free_bytes=0, fsync=False)
    w = SegmentWriter(sp.new_part_path(cls="diagnostics"), metadata={"vehicle": "p-abc", "priority_class": "diagnostics"},
                      opener=sp.open_part)
    for i in range(40):
        w.write(Message("/diagnostics", DA, serialize_message(diag(0)), i * 10**8))
    w.close()
    sp.close()
    sp2 = Spool(tmp_path / "s", min_free_bytes=0, fsync=False)
    assert sp2.last_recovery.partial_removed == 1 and sp2.last_recovery.salvaged_messages == 40
    seg = sp2.pending()[0]
    assert seg.cls == "diagnostics" and len(read_segment(seg.path)) == 40
    with open(seg.path, "rb") as f:
        md = {m.name: dict(m.metadata) for m in reader(f).iter_metadata()}
    assert md["bms_ai"]["vehicle"] == "p-abc"
    assert not list(sp2.incoming.iterdir())
    sp2.close()


def test_a_spool_has_one_owner(tmp_path):
    """Two uploaders on one spool (two packs given one spool.dir) would adopt and delete each other's
    segments: the second is refused with a one-line configuration error; the spool is free again after close."""
    from bms_ai.uplink.spool import SpoolInUseError

    first = Spool(tmp_path / "s", min_free_bytes=0, fsync=False)
    with pytest.raises(SpoolInUseError, match=r"spool .* is in use by pid \d+ \(give each pack its own spool.dir\)"):
        Spool(tmp_path / "s", min_free_bytes=0, fsync=False)
    assert isinstance(SpoolInUseError("x"), ValueError)  # the CLI prints config errors as one line
    first.close()
    Spool(tmp_path / "s", min_free_bytes=0, fsync=False).close()
