"""`bms-ai demo` (the README's main job) end to end on a bundled drive, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.ros]


def test_demo_runs_the_graph_and_writes_report(tmp_path, root):
    """The README's main job works end to end: lossless replay, accurate SOC, uploads, report."""
    r = subprocess.run([sys.executable, "-m", "bms_ai.cli", "demo", "--drive", "nmc_udds", "--speed", "40",
                        "--no-live", "--out", str(tmp_path)], capture_output=True, text=True, timeout=240, cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "nmc_udds"
    summary = json.loads((out / "summary.json").read_text())
    drive_samples = int(summary["drive_seconds"] * 10)
    assert summary["samples_received"] >= drive_samples - 2  # lossless file replay
    assert summary["estimates_received"] >= drive_samples - 2
    assert summary["nodes"] == ["can_bridge", "estimator", "fault_monitor", "cloud_uploader"]
    assert summary["soc_rmse_pct"] < 1.0
    assert summary["segments_uploaded_to_ingest_server"] >= 3  # one per priority class at least
    assert "ERROR" not in summary["diagnostics_at_drive_end"].values()
    assert summary["can_log_damaged"] == ""
    html = (out / "report.html").read_text()
    assert "State of charge" in html and "data:image/png;base64," in html
    assert "report:" in r.stdout


def test_demo_on_a_log_cut_mid_file_says_how_much_it_covers(tmp_path, root):
    """A drive whose CAN log ends mid-object: replayed up to the damage, and the demo says so (not a silent 'all OK')."""
    import shutil

    from bms_ai.core.paths import share_path

    src = share_path("data", "drives", "nmc_udds")
    drive = tmp_path / "cut"
    shutil.copytree(src, drive)
    blf = drive / "can.blf"
    blf.write_bytes(blf.read_bytes()[: blf.stat().st_size // 2 + 123])
    r = subprocess.run([sys.executable, "-m", "bms_ai.cli", "demo", "--drive", str(drive), "--speed", "40",
                        "--no-live", "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=240,
                       cwd=root)
    assert r.returncode == 0, r.stderr[-3000:]
    warning = [line for line in r.stdout.splitlines() if line.startswith("warning: CAN log damaged")]
    assert len(warning) == 1 and "of the drive's 177 s" in warning[0], r.stdout[-2000:]
    summary = json.loads((tmp_path / "out" / "cut" / "summary.json").read_text())
    assert "unreadable after" in summary["can_log_damaged"]
    assert 0.3 < summary["samples_received"] / 1771 < 0.7
