"""UplinkService decisions the uploader node used to make: health, snapshot triggers, telemetry, topic types."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from bms_ai.core.levels import ERROR, OK, WARN
from bms_ai.core.paths import share_path
from bms_ai.uplink.config import default_config_path, load_config, parameter_overrides
from bms_ai.uplink.service import KNOWN_TYPES, UplinkService, battery_telemetry, health_level

BS = "sensor_msgs/msg/BatteryState"


@pytest.fixture
def svc(tmp_path: Path):
    """A service on a 1 MiB spool, no backend, no threads."""
    cfg = load_config(None, {"spool": {"dir": str(tmp_path / "spool"), "min_free_mb": 0, "fsync": False,
                                       "quota_mb": 1},
                             "segments": {"max_mb": 0.01, "max_duration_s": 1.0},
                             "backend": {"kind": "none"},
                             "topic_types": {"extra/temp": "sensor_msgs/Temperature"}})
    s = UplinkService(cfg, start_threads=False)
    yield s
    s.close()


def test_default_config_is_the_shipped_file() -> None:
    """The node's default config comes from the package's share directory, wherever it is installed."""
    assert default_config_path() == str(share_path("config", "uploader.yaml"))
    cfg = load_config(default_config_path())
    assert cfg["backend"]["kind"] == "http" and cfg["topics"]["/diagnostics"] == "diagnostics"


def test_bad_config_files_are_one_line_errors(tmp_path: Path) -> None:
    """A missing file, broken YAML or a non-mapping document: a clear error naming the file."""
    with pytest.raises(FileNotFoundError, match="uploader config not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("uplink: [unclosed\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    bad.write_text("- a list\n")
    with pytest.raises(ValueError, match="bad.yaml: expected a mapping"):
        load_config(bad)


def test_parameter_overrides_only_for_set_parameters() -> None:
    """Empty parameters keep the file's settings; topics 'name=class' replace the list (bare name -> raw)."""
    assert parameter_overrides(topics=[""]) == {}
    over = parameter_overrides("/var/spool", "", "/run/secrets/ingest", "", "VIN1", ["a=estimates", "b", ""])
    assert over == {"spool": {"dir": "/var/spool"}, "backend": {"token_file": "/run/secrets/ingest"}, "vehicle_id": "VIN1",
                    "topics": {"a": "estimates", "b": "raw"}}
    cfg = load_config(None, parameter_overrides(backend_url="https://x/ingest"))
    assert cfg["backend"]["url"] == "https://x/ingest" and cfg["backend"]["token_env"] == "BMS_AI_INGEST_TOKEN"


def test_health_level_precedence() -> None:
    """Idle/uploading < evictions < failing uploads < old backlog < rejected credentials."""
    base = {"backlog_segments": 0, "backlog_age_s": 0.0}
    assert health_level(base, 0, 86400.0) == (OK, "idle, backlog empty")
    assert health_level(dict(base, backlog_segments=3), 0, 86400.0) == (OK, "uploading")
    assert health_level(base, 2, 86400.0) == (WARN, "spool full: evicted 2 segment(s)")
    failing = dict(base, upload_consecutive_failures=1, upload_last_error="HTTP 503: " + "x" * 200)
    level, msg = health_level(failing, 2, 86400.0)
    assert level == WARN and msg.startswith("upload failing: HTTP 503") and len(msg) == len("upload failing: ") + 120
    assert health_level(dict(failing, backlog_age_s=7200.0), 0, 3600.0) == (WARN, "oldest pending segment is 2.0 h old")
    assert health_level(dict(base, backlog_age_s=7200.0), 0, 0.0)[0] == OK  # warn_age 0: never
    assert health_level(dict(failing, upload_last_error_auth=True), 0, 86400.0) == (ERROR, "ingest rejects our credentials")
    assert health_level(dict(base, upload_last_error_auth=True), 0, 86400.0)[0] == OK  # recovered since


def test_started_and_periodic_health(svc: UplinkService) -> None:
    """Start status reports the recovery; evictions show once; node rejections add to the service's."""
    r = svc.started_status()
    assert (r.check, r.level, r.message) == ("uploader", OK, "started")
    assert r.values == {"recovered_partial": 0, "recovery_missing": 0, "recovery_orphans": 0, "recovery_unsafe": 0}
    r = svc.health(2, "pack/measurements: bad", ["a", "b"])
    assert (r.level, r.message) == (OK, "idle, backlog empty")
    assert r.values["rejected_messages"] == 2 and r.values["subscribed"] == "a,b"
    assert "quota_bytes" not in r.values and r.values["backlog_segments"] == 0
    # fill the 1 MiB quota with raw segments: the oldest are evicted, reported in the next status only
    for k in range(12):
        p = svc.spool.new_part_path()
        p.write_bytes(bytes([k]) * 100_000)
        svc.spool.commit(p, "raw", created=time.time() - 100 + k)
    r = svc.health()
    assert r.level == WARN and r.message.startswith("spool full: evicted ")
    assert r.values["evicted"] > 0
    assert svc.health().message == "uploading"


def test_new_error_triggers_one_snapshot_and_sets_active_faults(svc: UplinkService) -> None:
    """A status newly at ERROR starts a snapshot; staying at ERROR does not start another; OK clears it."""
    t = 10**9
    svc.record("pack/measurements", BS, b"\x00\x01\x00\x00" + b"\x00" * 40, t)
    assert svc.diagnostics([("bms_ai: limits", ERROR), ("bms_ai: soc", OK)], t) is True
    assert svc.active_faults == ["bms_ai: limits"]
    assert svc.diagnostics([("bms_ai: limits", ERROR)], t + 10**8) is False
    assert svc.diagnostics([("bms_ai: other", WARN)], t + 2 * 10**8) is False
    assert svc.active_faults == ["bms_ai: limits"]  # not mentioned: still at ERROR
    assert svc.diagnostics([("bms_ai: limits", OK)], t + 3 * 10**8) is False
    assert svc.active_faults == []
    assert svc.recorder.snapshots == 1


def test_telemetry_state(svc: UplinkService) -> None:
    """Vehicle and faults always; SOC/SOH once battery_state came, None where the estimator has none."""
    assert svc.telemetry_state("PACK-1") == {"vehicle": "PACK-1", "faults": []}
    st = svc.telemetry_state("PACK-1", (0.55, 45.0, 50.0))
    assert st["soc"] == pytest.approx(0.55) and st["soh"] == pytest.approx(0.9)
    assert battery_telemetry(math.nan, math.nan, 50.0) == {"soc": None, "soh": None}
    assert battery_telemetry(0.5, 45.0, 0.0) == {"soc": 0.5, "soh": None}


def test_telemetry_vehicle_is_pseudonymised(tmp_path: Path) -> None:
    """With privacy on, the pack id sent as vehicle is the keyed pseudonym."""
    cfg = load_config(None, {"spool": {"dir": str(tmp_path / "s"), "min_free_mb": 0, "fsync": False},
                             "backend": {"kind": "none"}, "privacy": {"enabled": True, "key": "k"}})
    svc = UplinkService(cfg, start_threads=False)
    try:
        vehicle = svc.telemetry_state("PACK-1")["vehicle"]
        assert vehicle.startswith("p-") and "PACK" not in vehicle
    finally:
        svc.close()


def test_topic_types_configured_known_or_discovered(svc: UplinkService) -> None:
    """Configured types win, then the graph's own topics, then the live graph (by resolved name)."""
    graph = [("/bms/other", ["std_msgs/msg/String"]), ("/bms/empty", [])]
    assert svc.topic_type("extra/temp", "/bms/extra/temp", lambda: graph) == "sensor_msgs/Temperature"
    assert svc.topic_type("battery_state", "/bms/battery_state") == KNOWN_TYPES["battery_state"]
    assert svc.topic_type("other", "/bms/other", lambda: graph) == "std_msgs/msg/String"
    assert svc.topic_type("empty", "/bms/empty", lambda: graph) is None
    assert svc.topic_type("other", "/bms/other") is None  # not in the graph yet
    assert svc.topics == ["pack/measurements", "battery_state", "/diagnostics", "/rosout"]


# ----------------------------------------------------------------------------- disk full, privacy, transport
# Real: files, SQLite, MCAP, the service. Injected: ENOSPC from the spool's file-system seam (FullDisk: a real
# SpoolFS whose writes and fsyncs fail while ``full``), and a full database through SQLite's own page limit
# (PRAGMA max_page_count: SQLite then fails with its real "database or disk is full").

import errno  # noqa: E402

from bms_ai.uplink.fsio import SpoolFS  # noqa: E402


class FullDisk(SpoolFS):
    """Real file-system calls that fail with ENOSPC while ``full`` (free space still reads as plenty)."""

    def __init__(self) -> None:
        self.full = False

    def _check(self) -> None:
        if self.full:
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_write(self, path: Path):  # noqa: ANN201
        f = super().open_write(path)
        disk = self

        class Writer:
            def write(self, data: bytes) -> int:
                disk._check()
                return f.write(data)

            def __getattr__(self, name: str):  # noqa: ANN204
                return getattr(f, name)

        return Writer()

    def fsync_path(self, path: Path) -> None:
        self._check()
        super().fsync_path(path)


def _record(svc: UplinkService, start: int, n: int) -> None:
    data = serialize_message(_battery())
    for i in range(start, start + n):
        svc.record("pack/measurements", BS, data, i * 10**7)
        if i % 20 == 0:
            svc.record("/diagnostics", DA, serialize_message(_diag()), i * 10**7)
        if i % 100 == 0:
            svc.tick(i * 10**7)


def _battery():  # noqa: ANN202
    from sensor_msgs.msg import BatteryState
    return BatteryState(voltage=300.0, cell_voltage=[3.3] * 96, serial_number="PACK-SN-42")


def _diag():  # noqa: ANN202
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus
    return DiagnosticArray(status=[DiagnosticStatus(level=bytes([0]), name="bms_ai: soc", hardware_id="PACK-SN-42")])


DA = "diagnostic_msgs/msg/DiagnosticArray"


def serialize_message(m):  # noqa: ANN001, ANN201
    from rclpy.serialization import serialize_message as ser
    return ser(m)


@pytest.mark.drive   # ~1 s: outside the fast library tier
def test_disk_full_pauses_recording_evicts_reports_and_resumes(tmp_path: Path) -> None:
    """ENOSPC while writing and committing: no exception, recording pauses, lower classes are evicted,
    the status says so at ERROR with counters, and recording resumes once there is space again."""
    disk = FullDisk()
    cfg = load_config(None, {"spool": {"dir": str(tmp_path / "spool"), "min_free_mb": 0, "fsync": True},
                             "segments": {"max_mb": 0.05, "max_duration_s": 0.5, "chunk_kb": 4},
                             "topics": {"pack/measurements": "raw", "/diagnostics": "diagnostics"},
                             "backend": {"kind": "none"}})
    svc = UplinkService(cfg, start_threads=False, fs=disk)
    try:
        _record(svc, 0, 1000)  # 10 s: raw and diagnostics segments acknowledged
        before = svc.spool.states().get("pending", 0)
        assert before > 4 and svc.health().level == OK
        disk.full = True
        _record(svc, 1000, 500)  # writes and commit fsyncs fail: must not raise
        r = svc.health()
        assert r.level == ERROR and r.message.startswith("disk full: recording paused for ")
        assert int(r.values["disk_full"]) > 0 and int(r.values["dropped_messages"]) > 0
        assert "raw" in r.values["paused"]
        rows = svc.spool.rows()
        evicted = {row["cls"] for row in rows if row["state"] == "evicted"}
        assert "raw" in evicted  # lowest priority first: diagnostics only once no raw is left
        assert "diagnostics" not in evicted or not [row for row in rows if row["cls"] == "raw"
                                                    and row["state"] == "pending"]
        # the database fills up too: acknowledging fails inside SQLite, still nothing raised
        pages = svc.spool._db.execute("PRAGMA page_count").fetchone()[0]
        svc.spool._db.execute(f"PRAGMA max_page_count={pages}")
        disk.full = False
        _record(svc, 1500, 2000)
        assert svc.recorder.stats.disk_full > 0
        # space returns: held-back segments are acknowledged, recording resumes
        svc.spool._db.execute("PRAGMA max_page_count=1073741823")
        committed = svc.recorder.segments_committed
        _record(svc, 3500, 600)
        assert not svc.recorder.paused and svc.recorder.stats.resumes >= 1
        assert svc.recorder.segments_committed > committed
        svc.health()  # evictions are reported once
        r = svc.health()
        assert r.level == OK, r.message
    finally:
        svc.close()


def test_sqlite_full_during_commit_does_not_raise(tmp_path: Path) -> None:
    """The database full while a segment is acknowledged: record() and tick() never raise; nothing is lost."""
    cfg = load_config(None, {"spool": {"dir": str(tmp_path / "spool"), "min_free_mb": 0, "fsync": False},
                             "segments": {"max_mb": 0.004, "max_duration_s": 1e6, "chunk_kb": 1},
                             "backend": {"kind": "none"}, "fault_snapshot": {"enabled": False}})
    svc = UplinkService(cfg, start_threads=False)
    try:
        pages = svc.spool._db.execute("PRAGMA page_count").fetchone()[0]
        svc.spool._db.execute(f"PRAGMA max_page_count={pages}")
        _record(svc, 0, 8000)  # before: sqlite3.OperationalError out of record()/tick() stopped the node
        assert svc.recorder.stats.disk_full > 0 and svc.recorder._unacked
        svc.spool._db.execute("PRAGMA max_page_count=1073741823")
        svc.tick(10**12)
        svc.recorder.flush()
        assert not svc.recorder._unacked and svc.spool.counters()["lost"] == 0
    finally:
        svc.close()


def test_identifiers_are_pseudonymised_in_every_string_field(tmp_path: Path) -> None:
    """/rosout text, diagnostic hardware_id, message and values: the VIN and pack id never reach a segment."""
    from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
    from rcl_interfaces.msg import Log
    from rclpy.serialization import deserialize_message

    vin, pack = "WVWZZZ1JZXW000001", "PACK-SN-42"
    cfg = load_config(None, {"spool": {"dir": str(tmp_path / "spool"), "min_free_mb": 0, "fsync": False},
                             "backend": {"kind": "none"}, "vehicle_id": vin,
                             "privacy": {"enabled": True, "key": "fleet-key"}})
    svc = UplinkService(cfg, start_threads=False, identifiers=[pack])
    try:
        log = Log(msg=f"pack {pack} of vehicle {vin}: cell 12 over voltage", name="estimator", file=f"/{pack}.py")
        out = svc.private(serialize_message(log), lambda b: deserialize_message(b, Log), serialize_message)
        got = deserialize_message(out, Log)
        assert vin not in got.msg and pack not in got.msg and pack not in got.file
        assert got.msg == f"pack {svc.pseudonymize(pack)} of vehicle {svc.pseudonymize(vin)}: cell 12 over voltage"
        svc.scrubber.learn("HW-77-ABC")  # learned from a status' hardware_id
        d = DiagnosticArray(status=[DiagnosticStatus(name="bms_ai: limits", message=f"{vin} derated",
                                                     hardware_id="HW-77-ABC",
                                                     values=[KeyValue(key="vin", value=vin)])])
        out = svc.private(serialize_message(d), lambda b: deserialize_message(b, DiagnosticArray), serialize_message)
        assert vin.encode() not in out and b"HW-77-ABC" not in out
        st = deserialize_message(out, DiagnosticArray).status[0]
        assert st.hardware_id == svc.pseudonymize("HW-77-ABC") and st.values[0].value == svc.pseudonymize(vin)
        plain = serialize_message(Log(msg="nothing personal"))
        assert svc.private(plain, lambda b: deserialize_message(b, Log), serialize_message) is plain  # fast path
    finally:
        svc.close()


def test_transport_defaults_to_https_and_plain_http_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The default ingest URL is https; an explicit http URL works but warns (log and first status)."""
    assert load_config(None)["backend"]["url"].startswith("https://")
    assert load_config(default_config_path())["backend"]["url"].startswith("https://")
    cfg = load_config(None, {"spool": {"dir": str(tmp_path / "spool"), "min_free_mb": 0, "fsync": False},
                             "backend": {"url": "http://127.0.0.1:9"}})
    svc = UplinkService(cfg, start_threads=False)
    try:
        r = svc.started_status()
        assert r.level == WARN and "plain http to 127.0.0.1:9" in r.message
        assert any("plain http" in rec.getMessage() for rec in caplog.records)
    finally:
        svc.close()


def test_token_comes_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """backend.token_file / token_env give the token; a missing file is a one-line error."""
    from bms_ai.uplink.config import resolve_env
    f = tmp_path / "token"
    f.write_text("from-file\n")
    monkeypatch.setenv("BMS_AI_TEST_TOKEN", "from-env")
    assert resolve_env({"token_file": str(f), "token_env": "BMS_AI_TEST_TOKEN"})["token"] == "from-file"
    assert resolve_env({"token_env": "BMS_AI_TEST_TOKEN"})["token"] == "from-env"
    assert resolve_env({"token": "inline", "token_file": str(f)})["token"] == "inline"
    with pytest.raises(ValueError, match=r"^token_file: cannot read .*nope"):
        resolve_env({"token_file": str(tmp_path / "nope")})
