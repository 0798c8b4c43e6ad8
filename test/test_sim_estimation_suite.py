"""Estimation suites: composition and seeds of train / val / eval, the cache, and one tiny generated suite."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bms_ai.sim.estimation_suite import DriveSpec, eval_specs, generate, is_cached, suite_specs
from bms_ai.sim.life import LifeConfig, SensorSpec
from bms_ai.sim.variants import variant_names

os.environ.setdefault("PYBAMM_DISABLE_TELEMETRY", "true")


@pytest.mark.parametrize("chem", ["nmc", "lfp"])
def test_eval_composition(chem: str) -> None:
    specs = eval_specs(chem)
    by = {c: [s for s in specs if c in s.classes] for c in "abde"}
    assert [len(by[c]) for c in "abde"] == [6, 3, 6, 5]
    train, held = set(variant_names(chem, "train")), set(variant_names(chem, "heldout"))
    for s in by["a"]:
        c = s.config
        assert c.mode == "drive" and c.hours == 1.0 and c.sessions == 1 and c.soh is None and 20 <= c.ambient_c <= 30
        assert c.current_sensor == SensorSpec.clean() and c.voltage_sensor.offset_v == 0 and s.variant in train
    assert sorted(s.config.soc0 for s in by["a"]) == [0.3, 0.3, 0.6, 0.6, 0.9, 0.9]
    lives = [s for s in specs if s.config.mode == "life"]
    assert len(lives) == 3 and all(s.config.days == 3 and "b" in s.classes for s in lives)
    assert {s.config.ambient_c for s in by["d"]} >= {-10.0, 0.0, 10.0, 45.0}
    assert all(s.config.spread > 1 and 0.65 <= s.config.soh[0] < s.config.soh[1] <= 1.0 for s in by["d"])
    assert {s.variant for s in by["e"]} == held and all(s.held_out for s in by["e"])
    assert not any(s.held_out for s in specs if "e" not in s.classes)
    assert all(s.variant in train for c in "abd" for s in by[c] if "e" not in s.classes)
    assert len({s.name for s in specs}) == len(specs) and all(s.config.n_cells == 3 for s in specs)


def test_training_suites_use_training_variants_and_their_own_seeds() -> None:
    seeds = {}
    for split in ("train", "val", "eval"):
        for chem in ("nmc", "lfp"):
            specs = suite_specs(split, chem)
            assert [s.config.config_hash() for s in specs] == [s.config.config_hash() for s in suite_specs(split, chem)]
            seeds[split, chem] = {s.config.seed for s in specs}
            if split == "eval":
                continue
            assert len(specs) == {"train": 40, "val": 8}[split]
            assert {s.variant for s in specs} == set(variant_names(chem, "train"))
            for s in specs:
                c = s.config
                assert c.mode == "drive" and c.hours == 1.5 and not s.classes and not s.held_out
                assert -10 <= c.ambient_c <= 45 and 0.1 <= c.soc0 <= 0.95
                assert c.soh is None or 0.7 <= c.soh[0] <= c.soh[1] <= 1.0
    all_seeds = [x for v in seeds.values() for x in v]
    assert len(all_seeds) == len(set(all_seeds))          # no drive repeats across splits or chemistries


def test_unknown_suite_or_chemistry() -> None:
    with pytest.raises(ValueError, match="train, val, eval"):
        suite_specs("test", "nmc")
    with pytest.raises(ValueError, match="nmc, lfp"):
        suite_specs("eval", "nca")


def test_cache_matches_the_config_hash_and_refreshes_tags(tmp_path: Path) -> None:
    spec = DriveSpec("d", LifeConfig(mode="drive", seed=3), ("a",))
    d = tmp_path / "d"
    d.mkdir()
    assert not is_cached(d, spec)
    (d / "drive.npz").write_bytes(b"")
    (d / "meta.json").write_text(json.dumps({"config_hash": spec.config.config_hash(), "classes": [], "name": "d"}))
    assert is_cached(d, spec)
    assert json.loads((d / "meta.json").read_text())["classes"] == ["a"]
    assert not is_cached(d, DriveSpec("d", LifeConfig(mode="drive", seed=4), ("a",)))


def test_cli_lists_the_estimation_suites_and_needs_an_out_dir(capsys) -> None:
    from bms_ai.cli import main

    assert main(["simulate", "--list"]) == 0
    assert json.loads(capsys.readouterr().out)["estimation_suites"] == {
        "train:nmc": 40, "train:lfp": 40, "val:nmc": 8, "val:lfp": 8, "eval:nmc": 19, "eval:lfp": 19}
    assert main(["simulate", "--estimation-suite", "eval", "--chemistry", "lfp"]) == 1
    assert "--out DIR is required" in capsys.readouterr().err


@pytest.mark.pybamm
def test_generate_writes_manifest_and_skips_present_drives(tmp_path: Path) -> None:
    from bms_ai.sim.dataset import load_drive

    cfg = LifeConfig(variant="NCA_Kim2011", seed=9, mode="drive", hours=0.05, sessions=1, n_cells=2, ambient_c=25.0,
                     soc0=0.6)
    specs = [DriveSpec("eval_nmc_e90_NCA_Kim2011", cfg, ("e",))]
    lines: list[str] = []
    s1 = generate(specs, tmp_path, header={"suite": "t", "chemistry": "nmc"}, log=lines.append)
    assert s1["simulated"] == 1 and not s1["failed"] and s1["max_truth_pct"] < 0.1
    assert any(line.startswith("[1/1] eval_nmc_e90_NCA_Kim2011:") for line in lines)
    d = load_drive(tmp_path / "eval_nmc_e90_NCA_Kim2011")
    assert d.meta["held_out"] and d.meta["classes"] == ["e"] and d.meta["cell_set"] == "NCA_Kim2011"
    assert d.chemistry == "nmc" and d.capacity_ah == 5.0 and d.n_cells == 2 and d.current_true is not None
    assert 170 <= d.t[-1] - d.t[0] <= 181
    manifest = json.loads((tmp_path / "suite.json").read_text())
    assert manifest["drives"][0]["held_out"] and manifest["drives"][0]["classes"] == ["e"]
    assert manifest["composition"] == {"e": 1} and manifest["summary"]["simulated"] == 1
    s2 = generate(specs, tmp_path, log=lines.append)
    assert s2["simulated"] == 0 and s2["present"] == 1
    assert not list(tmp_path.glob("*.tmp"))
