"""`bms-ai bench` runs and reports each figure next to its baseline (no timing asserts)."""

from __future__ import annotations

from bms_ai.bench import cli
from bms_ai.bench.decode import bench_decode
from bms_ai.core.registry import Registry


def test_decode_bench_reports_ratio_and_identity():
    r = bench_decode(quick=True)
    assert r["frames"] > 5000
    assert r["offline_identical_to_per_frame"] is True
    assert r["ratio_to_cantools"] > 0 and r["decode_assemble_frames_per_s"] > 0


def test_missing_sections_are_reported_not_invented(monkeypatch):
    table = Registry("bench section")
    table.add("nope", "bms_ai.does_not_exist:bench")
    monkeypatch.setattr(cli, "SECTIONS", table)
    out = cli.run_sections(["nope"], quick=True)
    assert "skipped" in out["nope"] and out["machine"]["cpus"] >= 1
