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
