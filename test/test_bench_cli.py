"""`bms-ai bench` runs and reports each figure next to its baseline (no timing asserts)."""

from __future__ import annotations

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
