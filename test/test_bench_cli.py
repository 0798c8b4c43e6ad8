"""`bms-ai bench` runs and reports each figure next to its baseline (no timing asserts)."""

from __future__ import annotations

import pytest

from bms_ai.bench import cli
from bms_ai.bench.decode import bench_decode
from bms_ai.core.registry import Registry


def test_decode_bench_reports_ratio_and_identity(monkeypatch):
    """Each figure comes with its baseline and the offline path is checked identical, not only fast."""
    from bms_ai.bench import decode

    frames_for = decode._synthetic_frames
    monkeypatch.setattr(decode, "_synthetic_frames", lambda seconds: frames_for(min(seconds, 1.0)))  # report, not load
    r = bench_decode(quick=True)
    assert r["frames"] > 1000
    assert r["offline_identical_to_per_frame"] is True
    assert r["ratio_to_cantools"] > 0 and r["decode_assemble_frames_per_s"] > 0


def test_missing_sections_are_reported_not_invented(monkeypatch):
    """A section whose part is not installed says so instead of breaking the whole report."""
    table = Registry("bench section")
    table.add("nope", "bms_ai.does_not_exist:bench")
    monkeypatch.setattr(cli, "SECTIONS", table)
    out = cli.run_sections(["nope"], quick=True)
    assert "skipped" in out["nope"] and out["machine"]["cpus"] >= 1


@pytest.mark.drive
def test_processes_measured_side_by_side_each_get_their_own_cpu():
    """The graph bench's side-by-side measurement: a busy and an idle process over the same window, each
    figure its own process tree's (a mixed-up or shared figure would make the ratio meaningless)."""
    import sys

    from bms_ai.bench.graph import _cpu_rss_together

    busy = [sys.executable, "-c", "import time\nwhile True:\n    t = time.monotonic()\n"
            "    while time.monotonic() - t < 0.01: pass\n    time.sleep(0.01)"]
    idle = [sys.executable, "-c", "import time; time.sleep(60)"]
    a, b, c = _cpu_rss_together([busy, idle, busy], warmup=0.5, window=1.5)
    # the busy ones take ~50 % of a core each (less when CI's other tests compete), never two processes' worth
    assert 10 < a["cpu_percent_of_one_core"] < 80 and 10 < c["cpu_percent_of_one_core"] < 80, (a, c)
    assert b["cpu_percent_of_one_core"] < 3, b
    assert all(r["rss_mb"] > 1 for r in (a, b, c))
